//! Flotilla's replicated storage: many openraft groups on one RocksDB per node.
//!
//! # Layout
//! - [`engine`]: the key-value engine trait, RocksDB and in-memory implementations.
//! - [`keys`]: key layout (group id prefix in fixed column families).
//! - [`wal`]: the node-wide group-commit syncer; the only place that fsyncs.
//! - [`codec`]: checksummed encodings of entries and metadata (disk and wire).
//! - [`log_store`]: one group's Raft log (openraft `RaftLogStorage`).
//! - [`partition`]: reads of a log-mode group by offset (the fetch path).
//! - [`node`]: the registry of a node's groups (create, reopen, drop).
//! - [`transport`]: the Raft RPCs over tonic, one connection per peer for all groups.
//! - [`record_batch`]: Kafka RecordBatch v2, the format records are stored in.
//! - [`state_machine`]: log-mode (partition) and kv-mode state machines.
//! - [`types`]: the openraft type configuration.
pub mod codec;
pub mod engine;
pub mod keys;
pub mod log_store;
pub mod node;
pub mod partition;
pub mod record_batch;
pub mod state_machine;
pub mod transport;
pub mod types;
pub mod wal;
