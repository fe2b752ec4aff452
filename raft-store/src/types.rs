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
/// RecordBatches ([`crate::state_machine::encode_batches`]), in kv mode a [`crate::state_machine::KvCommand`].
///
/// A command may also carry its entry's stored form (`codec::seal_entry`: CRC, header, then these same
/// bytes) and the log id it was sealed under, so the one sealing on the leader serves its own disk and every
/// follower's wire, and a follower stores the bytes it received and checked: a data entry is sealed once
/// per node instead of once per disk write and per send. The data is then a slice of that
/// sealed buffer, so carrying both costs no memory. Equality looks at the data only.
#[derive(Clone)]
pub struct Command {
    data: Bytes,
    sealed: Option<(LogId, Bytes)>,
}

impl Command {
    pub fn new(data: Bytes) -> Self {
        Self { data, sealed: None }
    }

    /// The command's bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// A command read back from `sealed`, the stored form of its entry with id `log_id`; `data` is the
    /// slice of `sealed` that holds it.
    pub(crate) fn with_sealed(data: Bytes, log_id: LogId, sealed: Bytes) -> Self {
        Self { data, sealed: Some((log_id, sealed)) }
    }

    /// The stored form of this command's entry, if it was sealed under `log_id`.
    pub(crate) fn sealed_as(&self, log_id: &LogId) -> Option<&Bytes> {
        self.sealed.as_ref().filter(|(id, _)| id == log_id).map(|(_, sealed)| sealed)
    }
}

impl PartialEq for Command {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl Eq for Command {}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.data.len())
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
