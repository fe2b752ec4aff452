//! Flotilla's wire types: generated from the `.proto` files under `proto/` at build time.
//!
//! # Layout
//! - [`raft`]: the Raft transport between broker nodes (`flotilla.raft.v1`).
//! - [`broker`]: the client and admin API every broker serves (`flotilla.broker.v1`).

/// Raft transport between nodes.
pub mod raft {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flotilla.raft.v1");
}

/// The client and admin API.
pub mod broker {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flotilla.broker.v1");
}
