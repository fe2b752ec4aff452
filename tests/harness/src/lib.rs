//! Flotilla's failover harness: a Jepsen-style workload against a real cluster under faults, and a
//! checker for the invariants of FAILOVER.md. See `flotilla-harness --help`.

pub mod checker;
pub mod compose;
pub mod history;
pub mod host;
pub mod lazyfs;
pub mod local;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod selftest;
pub mod target;
