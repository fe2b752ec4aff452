//! The Flotilla broker: one node of a cluster.
//!
//! # Layout
//! - [`broker`]: configuration, start-up (data-directory guard, controller bootstrap) and the reconciler
//!   that keeps this node's partition groups in line with the controller.
//! - [`balancer`]: hands leadership back to preferred leaders once they have caught up.
//! - [`controller`]: cluster metadata in Raft group 0: topic records, placement, validation.
//! - [`service`]: the gRPC client and admin API, with leader routing.
//! - [`proposer`]: packs concurrent produce requests of a partition into one Raft entry.
//! - [`retention`]: enforces retention.ms and retention.bytes on every replica hosted here.
//! - [`peers`]: cached channels to brokers, shared by forwarding and the client library.
//! - [`pipe`]: produce streams to brokers, shared by forwarding and the client library.
//! - [`partitioner`]: Kafka-compatible murmur2 partitioning.
//! - [`metrics`]: the Prometheus endpoint and the Raft/storage collector.
//! - [`error`]: client-facing errors with stable codes.
//! - [`memory`]: the memory budget and its split; the produce bytes in flight.
//! - [`disk`]: the data volume's free space and the floor under which produce is refused.
//! - [`logging`]: log filters and formats; sampling of openraft's per-group repeated warnings.
//! - [`server`]: serving everything on one listen address until shutdown.
pub mod balancer;
pub mod broker;
pub mod controller;
pub mod disk;
pub mod error;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod partitioner;
pub mod peers;
pub mod pipe;
pub mod proposer;
pub mod retention;
pub mod server;
pub mod service;
