//! The openraft type configuration shared by every group on a node, and the application payloads.
//!
//! One configuration serves both state-machine modes so one transport and one registry carry every
//! group. Log ids are (term, index): `leader_id_std` gives one leader per term, as in the Raft paper.

use std::fmt;

use bytes::Bytes;

pub use openraft::BasicNode;

openraft::declare_raft_types!(
    /// Flotilla's openraft configuration.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<Self::Term, Self::NodeId>,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

/// A broker node's id. Never reused: a wiped node rejoins under a new id.
pub type NodeId = u64;
pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, openraft::BasicNode>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// Snapshots are small in both modes (metadata in log mode, the whole map in kv mode): one buffer.
pub type SnapshotData = Bytes;

/// Builds a log id from its term and index.
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new_term_index(term, index)
}

/// The term of a log id.
pub fn term_of(log_id: &LogId) -> u64 {
    log_id.leader_id.term
}

/// An opaque application command. Its meaning belongs to the group's state machine: in log mode a list of
/// RecordBatches ([`crate::log_sm::encode_batches`]), in kv mode a [`crate::kv_sm::KvCommand`].
#[derive(Clone, PartialEq, Eq)]
pub struct Command(pub Bytes);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What applying an entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Response {
    /// Blank and membership entries.
    #[default]
    None,
    /// Log mode: the records of the entry got offsets `base_offset ..= last_offset`.
    Appended { base_offset: u64, last_offset: u64 },
    /// Kv mode: the previous value of the key.
    Kv(Option<Bytes>),
    /// The command was committed but could not be applied (every replica rejects it the same way).
    Rejected(String),
}
