//! The key-value engine under every Raft group of a node.
//!
//! One engine per node holds all groups: a fixed set of column families ([`Cf`]) with the group id as key
//! prefix (see [`crate::keys`]). The trait is small on purpose: ordered point reads and range scans,
//! atomic batched writes that are *not* durable by themselves, and one `sync_wal` that makes every write
//! issued before it durable. Durability is owned by [`crate::wal::WalSyncer`], never by the callers of
//! `write`.
//!
//! Architecture Invariant: a write is visible to reads as soon as `write` returns, and durable only after
//! a `sync_wal` that started after it. Nothing else in the crate fsyncs.

mod memory;
mod rocks;

pub use memory::MemEngine;
pub use rocks::{RocksConfig, RocksEngine};

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

/// The column families. Adding one is a storage format change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Raft log entries: `group, index -> entry`.
    Log,
    /// Per-group Raft metadata: vote, committed, last purged, snapshot.
    RaftMeta,
    /// Log-mode offset index: `group, base offset -> raft index, record count`.
    OffsetIdx,
    /// Per-group state-machine metadata: applied log id, offsets, membership.
    SmMeta,
    /// Kv-mode state machines.
    Kv,
}

impl Cf {
    pub const ALL: [Cf; 5] = [Cf::Log, Cf::RaftMeta, Cf::OffsetIdx, Cf::SmMeta, Cf::Kv];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::RaftMeta => "raft_meta",
            Cf::OffsetIdx => "offset_idx",
            Cf::SmMeta => "sm_meta",
            Cf::Kv => "kv",
        }
    }

    fn index(self) -> usize {
        match self {
            Cf::Log => 0,
            Cf::RaftMeta => 1,
            Cf::OffsetIdx => 2,
            Cf::SmMeta => 3,
            Cf::Kv => 4,
        }
    }
}

/// A failed engine operation. Every storage failure is an I/O failure to openraft, which stops the group.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage engine: {0}")]
    Backend(String),
    #[error("storage engine stopped after an earlier failed sync: {0}")]
    Poisoned(String),
}

impl From<EngineError> for std::io::Error {
    fn from(e: EngineError) -> Self {
        std::io::Error::other(e)
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Bytes,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes keys in `[from, to)`.
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// Operations applied atomically by [`Engine::write`].
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<Op>,
    payload_bytes: usize,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: impl Into<Bytes>) {
        let value = value.into();
        self.payload_bytes += key.len() + value.len();
        self.ops.push(Op::Put { cf, key, value });
    }

    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(Op::Delete { cf, key });
    }

    pub fn delete_range(&mut self, cf: Cf, from: Vec<u8>, to: Vec<u8>) {
        self.ops.push(Op::DeleteRange { cf, from, to });
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Key and value bytes put by this batch.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }
}

/// The storage engine of one node. Implementations are internally synchronised.
pub trait Engine: Send + Sync + 'static {
    /// Applies `batch` atomically. Visible to reads on return; durable only after a later [`Engine::sync_wal`].
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError>;

    /// Makes every write that returned before this call durable.
    fn sync_wal(&self) -> Result<(), EngineError>;

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Bytes>, EngineError>;

    /// Calls `visit` on each pair with key in `[from, to)`, ascending, until it returns `false`.
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError>;

    /// The pair with the greatest key in `[from, to)`, if any.
    fn last_in_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Bytes)>, EngineError>;

    /// Hints that `[from, to)` of `cf` was range-deleted and its files can be dropped now.
    fn reclaim_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<(), EngineError>;

    /// Memory the engine holds in memtables and its block cache, for metrics.
    fn memory_usage(&self) -> EngineMemory {
        EngineMemory::default()
    }

    /// How long and how often the engine has held writes back since it opened, because its background
    /// work (memtable flushes, compactions) fell behind; for metrics. An engine without background work
    /// never does.
    fn write_stalls(&self) -> WriteStalls {
        WriteStalls::default()
    }

    /// Decides, from how much of the stored log is garbage, whether the engine's background work should
    /// spend effort reclaiming it (see [`LogGarbage`]); called now and then (the broker does after each
    /// retention pass). An engine that keeps no garbage has nothing to decide.
    fn reclaim_garbage(&self) -> Result<LogGarbage, EngineError> {
        Ok(LogGarbage::default())
    }
}

/// The log's payloads in blob files (entries of 4 KiB or more) and how much of them is garbage: entries
/// purged from the log (retention, a dropped group) whose files still hold them because the same files
/// hold live entries of other groups. Garbage collection copies the live entries of the oldest files
/// elsewhere when compactions meet them, so those files can go; it runs only while enough of the blob
/// bytes are garbage ([`LogGarbage::wanted`]), since in a log that only grows it would copy entries that
/// are all live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogGarbage {
    /// Bytes in the log's blob files.
    pub blob_bytes: u64,
    /// Of those, bytes of entries no longer in the log.
    pub garbage_bytes: u64,
    /// Whether garbage collection is on.
    pub collecting: bool,
}

impl LogGarbage {
    /// Whether garbage collection should run, given whether it runs now: it starts once a quarter of the
    /// blob bytes is garbage and stops once a tenth or less is, so that it does not flap around one
    /// figure.
    pub fn wanted(blob_bytes: u64, garbage_bytes: u64, collecting: bool) -> bool {
        let (blob, garbage) = (u128::from(blob_bytes), u128::from(garbage_bytes));
        if collecting { garbage * 10 > blob } else { blob > 0 && garbage * 4 >= blob }
    }
}

/// Writes the engine held back because its background work fell behind, since it opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStalls {
    /// Time writers spent delayed or stopped.
    pub waited: Duration,
    /// How often writes had to be delayed or stopped, by cause and condition: RocksDB's names, such as
    /// ("memtable-limit", "stops") or ("pending-compaction-bytes", "delays"), summed over column families.
    pub counts: BTreeMap<(String, String), u64>,
}

/// Engine memory by use, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineMemory {
    pub memtables: u64,
    pub block_cache: u64,
}
