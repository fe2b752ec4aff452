//! The Flotilla client library: metadata cache, routing to partition leaders, retries with backoff.
//! The CLI, the tests, the failover harness and the benchmark use it.
//!
//! # Layout
//! - [`client`]: the `Client` type.
//! - [`bench`]: the produce load generator behind `flotilla bench produce`.
pub mod bench;
pub mod client;
