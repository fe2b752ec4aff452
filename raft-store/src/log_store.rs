//! [`LogStore`]: one Raft group's log on the node's shared engine.
//!
//! Writes go to the engine unsynced (readable at once), then a job on the node's [`WalSyncer`] fires the
//! openraft callback after the fsync that covers them. A small tail cache keeps the newest entries decoded,
//! because the leader reads each fresh entry back once per follower to replicate it, and consumers tail the
//! newest records. The node's groups share one [`TailBudget`] for it.
//!
//! Architecture Invariant: entries, vote, committed index and purge marker of a group are written by this
//! module only, in the order openraft submits them (each call writes before it returns; a lazy committed
//! index is the exception: it is written with the group's next append, still behind the entries it
//! covers), so the WAL holds them in submission order and any fsync covers a prefix of them.
//!
//! Architecture Invariant: a stored entry that fails its checksum (or decodes under the wrong index) is
//! never returned. The read fails with an error naming the group and index, and the store refuses every
//! later operation, which stops the group's Raft.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::codec::{self, CodecError, Reader};
use crate::engine::{Cf, Engine, WriteBatch};
use crate::keys::{self, GroupId, meta_tag};
use crate::types::{Entry, EntryPayload, LogId, TypeConfig, Vote};
use crate::wal::{SyncJob, WalSyncer};

/// Entries kept decoded per group, newest first out of the cache last.
const TAIL_CACHE_ENTRIES_MAX: usize = 1024;
/// Payload bytes kept decoded per group at most, however large the node's budget.
const TAIL_CACHE_BYTES_MAX: usize = 2 << 20;
/// Payload bytes one AppendEntries carries at most, plus the entry that crosses the limit. The broker's
/// entries are at most a 16 MiB record batch past its 1 MiB proposal limit, so a request stays well
/// under the transport's 64 MiB message limit. A follower catching up gets its backlog in requests of
/// this size, and each is read, encoded and sent in one go by the leader's threads, between the live
/// work: at 8 MiB, a follower restarted after 5 s under B6's load (10 MB/s) gave the second it caught up
/// a p99 of 126-146 ms; at 1 MiB 16-33 ms (at 256 KiB 15-29), and 2.3 GB of backlog went over in 4.1 s
/// instead of 5.1.
pub const APPEND_BYTES_MAX: usize = 1 << 20;

/// The node-wide budget of decoded tail-cache bytes, shared fairly by the node's groups: each group keeps
/// at most `cap / groups` (and at most [`TAIL_CACHE_BYTES_MAX`]). A group above its share, because groups
/// were added since its last append, gives the excess back on its next append.
pub struct TailBudget {
    cap: usize,
    used: AtomicUsize,
    groups: AtomicUsize,
}

impl TailBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { cap, used: AtomicUsize::new(0), groups: AtomicUsize::new(0) })
    }

    /// The bytes one group may keep now.
    fn share(&self) -> usize {
        (self.cap / self.groups.load(Ordering::Relaxed).max(1)).min(TAIL_CACHE_BYTES_MAX)
    }

    /// Bytes cached by all groups together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

struct LogInner {
    last_purged: Option<LogId>,
    last_log_id: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// `committed` is newer than what the engine holds (lazy mode): the group's next append writes it.
    committed_unwritten: bool,
    cache: BTreeMap<u64, Entry>,
    cache_bytes: usize,
    budget: Arc<TailBudget>,
    /// Set once corruption or a failed write is seen: the group must stop.
    failed: Option<String>,
}

fn payload_len(e: &Entry) -> usize {
    match &e.payload {
        EntryPayload::Normal(c) => c.data().len(),
        _ => 64,
    }
}

impl LogInner {
    fn cache_insert(&mut self, e: Entry) {
        self.add_cached(payload_len(&e));
        if let Some(old) = self.cache.insert(e.log_id.index, e) {
            self.sub_cached(payload_len(&old));
        }
        let share = self.budget.share();
        while self.cache.len() > TAIL_CACHE_ENTRIES_MAX || self.cache_bytes > share {
            match self.cache.pop_first() {
                Some((_, old)) => self.sub_cached(payload_len(&old)),
                None => break,
            }
        }
    }

    /// Drops cached entries with index >= `from`.
    fn cache_truncate(&mut self, from: u64) {
        let dropped = self.cache.split_off(&from);
        self.sub_cached(dropped.values().map(payload_len).sum::<usize>());
    }

    /// Drops cached entries with index <= `upto`.
    fn cache_purge(&mut self, upto: u64) {
        let kept = match upto.checked_add(1) {
            Some(from) => self.cache.split_off(&from),
            None => BTreeMap::new(),
        };
        let dropped = std::mem::replace(&mut self.cache, kept);
        self.sub_cached(dropped.values().map(payload_len).sum::<usize>());
    }

    fn add_cached(&mut self, n: usize) {
        self.cache_bytes += n;
        self.budget.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_cached(&mut self, n: usize) {
        self.cache_bytes -= n;
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for LogInner {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.cache_bytes, Ordering::Relaxed);
        self.budget.groups.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State shared by a group's log store, its readers and its state machine.
pub struct LogShared {
    group: GroupId,
    engine: Arc<dyn Engine>,
    syncer: WalSyncer,
    committed_sync: CommittedSync,
    inner: Mutex<LogInner>,
}

/// Whether `save_committed` waits for an fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommittedSync {
    /// Durable before openraft applies anything at that index: after a restart the state machine is
    /// re-applied up to the committed index at once, so a reader of this replica never sees it go back.
    /// For groups whose state a restarted replica acts on before it hears from a leader (the controller).
    Durable,
    /// Written with the group's next append (no write of its own), durable with that append's group
    /// commit; off the commit-to-apply path. An idle group's latest committed index stays unwritten until
    /// its next append (a stop loses it), which is harmless: every apply writes the applied index, and
    /// openraft starts from the larger of the two. After a crash this replica may restart applied below
    /// what it showed before, until a leader's commit reaches it: readers must be served only by a leader
    /// that has applied an entry of its own term (`Group::serves_reads`). For partition logs.
    Lazy,
}

/// One group's Raft log. Cloning gives another handle (openraft's log reader) onto the same log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<LogShared>,
}

fn corrupt(group: GroupId, what: &str, e: CodecError) -> String {
    format!("group {group}: {what} is corrupt: {e}")
}

fn read_meta<T>(
    engine: &dyn Engine,
    group: GroupId,
    tag: u8,
    what: &str,
    decode: impl FnOnce(bytes::Bytes) -> Result<T, CodecError>,
) -> io::Result<Option<T>> {
    match engine.get(Cf::RaftMeta, &keys::group_tag(group, tag))? {
        None => Ok(None),
        Some(sealed) => {
            let body = codec::unseal(&sealed).map_err(|e| io::Error::other(corrupt(group, what, e)))?;
            decode(body).map(Some).map_err(|e| io::Error::other(corrupt(group, what, e)))
        }
    }
}

fn decode_log_id(body: bytes::Bytes) -> Result<Option<LogId>, CodecError> {
    codec::read_log_id(&mut Reader::new(body))
}

fn encode_log_id(id: Option<&LogId>) -> bytes::Bytes {
    let mut out = bytes::BytesMut::new();
    codec::put_log_id(&mut out, id);
    codec::seal(&out)
}

/// Adds the write of `group`'s committed log id to `batch`.
fn put_committed(batch: &mut WriteBatch, group: GroupId, committed: Option<&LogId>) {
    batch.put(Cf::RaftMeta, keys::group_tag(group, meta_tag::COMMITTED), encode_log_id(committed));
}

impl LogStore {
    /// Opens group `group`'s log, recovering its state from the engine. Its tail cache takes a share of
    /// `budget`.
    pub fn open(
        group: GroupId,
        engine: Arc<dyn Engine>,
        syncer: WalSyncer,
        budget: Arc<TailBudget>,
        committed_sync: CommittedSync,
    ) -> io::Result<Self> {
        let vote = read_meta(&*engine, group, meta_tag::VOTE, "vote", codec::decode_vote)?;
        let committed = read_meta(&*engine, group, meta_tag::COMMITTED, "committed index", decode_log_id)?.flatten();
        let last_purged = read_meta(&*engine, group, meta_tag::LAST_PURGED, "purge marker", decode_log_id)?.flatten();
        let (from, to) = keys::group_range(group);
        let last_entry = match engine.last_in_range(Cf::Log, &keys::group_u64(group, 0), &to)? {
            None => None,
            Some((key, sealed)) => {
                let index = keys::suffix_u64(&key).unwrap_or(u64::MAX);
                Some(decode_stored(group, index, &sealed).map_err(io::Error::other)?)
            }
        };
        debug_assert!(from <= keys::group_u64(group, 0));
        let last_log_id = last_entry.map(|e| e.log_id).or(last_purged);
        let shared = LogShared {
            group,
            engine,
            syncer,
            committed_sync,
            inner: Mutex::new(LogInner {
                last_purged,
                last_log_id,
                vote,
                committed,
                committed_unwritten: false,
                cache: BTreeMap::new(),
                cache_bytes: 0,
                budget: {
                    budget.groups.fetch_add(1, Ordering::Relaxed);
                    budget
                },
                failed: None,
            }),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    pub fn shared(&self) -> &Arc<LogShared> {
        &self.shared
    }
}

fn decode_stored(group: GroupId, index: u64, sealed: &bytes::Bytes) -> Result<Entry, String> {
    codec::unseal_entry(sealed, Some(index)).map_err(|e| corrupt(group, &format!("log entry {index}"), e))
}

impl LogShared {
    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    fn check(&self) -> io::Result<()> {
        match &self.lock().failed {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, why: String) -> io::Error {
        tracing::error!(group = self.group, "{why}; stopping the group");
        let mut inner = self.lock();
        if inner.failed.is_none() {
            inner.failed = Some(why.clone());
        }
        io::Error::other(why)
    }

    /// The failure that stopped this log, if any.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub fn last_purged(&self) -> Option<LogId> {
        self.lock().last_purged
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.lock().last_log_id
    }

    /// Entries with index in `[start, end)` that are present, in order. A hole between present entries
    /// is corruption.
    pub fn entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.entries_limited(start, end, usize::MAX)
    }

    /// The entries of `[start, end)` from the first, stopping after the one that brings their payloads to
    /// `bytes_max` or more: never empty when the range is not, however large its first entry.
    pub fn entries_limited(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        self.check()?;
        if start >= end {
            return Ok(Vec::new());
        }
        // Newest entries come from the cache; everything before the cache's first index from the engine.
        let (cached, cache_start) = {
            let inner = self.lock();
            let cached: Vec<Entry> = inner.cache.range(start..end).map(|(_, e)| e.clone()).collect();
            (cached, inner.cache.keys().next().copied().unwrap_or(u64::MAX))
        };
        let (mut out, mut bytes) = self.entries_from_disk(start, end.min(cache_start), bytes_max)?;
        if bytes >= bytes_max {
            return Ok(out);
        }
        if let (Some(last), Some(first_cached)) = (out.last(), cached.first())
            && last.log_id.index + 1 != first_cached.log_id.index
        {
            // The cache moved (eviction or truncation) between the two reads; every cached entry is
            // also in the engine, so read the whole range from there.
            return Ok(self.entries_from_disk(start, end, bytes_max)?.0);
        }
        for e in cached {
            if bytes >= bytes_max {
                break;
            }
            bytes += payload_len(&e);
            out.push(e);
        }
        Ok(out)
    }

    /// The stored entries of `[start, end)` from the first, up to the one that brings their payloads to
    /// `bytes_max` or more, and their payload bytes.
    fn entries_from_disk(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<(Vec<Entry>, usize)> {
        let mut out: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        if start >= end {
            return Ok((out, bytes));
        }
        let mut failure = None;
        self.engine.scan(
            Cf::Log,
            &keys::group_u64(self.group, start),
            &keys::group_u64(self.group, end),
            &mut |key, value| {
                let index = keys::suffix_u64(key).unwrap_or(u64::MAX);
                if out.last().is_some_and(|prev| prev.log_id.index + 1 != index) {
                    failure = Some(format!("group {}: log hole before index {index}", self.group));
                    return false;
                }
                match decode_stored(self.group, index, &bytes::Bytes::copy_from_slice(value)) {
                    Ok(e) => {
                        bytes += payload_len(&e);
                        out.push(e);
                        bytes < bytes_max
                    }
                    Err(why) => {
                        failure = Some(why);
                        false
                    }
                }
            },
        )?;
        match failure {
            Some(why) => Err(self.fail(why)),
            None => Ok((out, bytes)),
        }
    }

    /// The entry at `index`, if present.
    pub fn entry(&self, index: u64) -> io::Result<Option<Entry>> {
        Ok(self.entries(index, index.saturating_add(1))?.pop())
    }

    fn write(&self, batch: WriteBatch) -> io::Result<()> {
        self.engine.write(batch).map_err(|e| self.fail(format!("group {}: write failed: {e}", self.group)))
    }

    async fn write_synced(&self, batch: WriteBatch) -> io::Result<()> {
        self.write(batch)?;
        self.syncer.sync().await.map_err(|e| self.fail(format!("group {}: sync failed: {e}", self.group)))
    }
}

fn range_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = range_bounds(&range);
        self.shared.entries(start, end)
    }

    /// What replication sends in one AppendEntries: at most [`APPEND_BYTES_MAX`] of payload (and at
    /// least one entry), so that a follower catching up on large record batches gets messages the
    /// transport can carry, and the leader does not hold thousands of them in memory at once.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.shared.entries_limited(start, end, APPEND_BYTES_MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.shared.check()?;
        Ok(self.shared.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        self.shared.check()?;
        let inner = self.shared.lock();
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: inner.last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.shared.check()?;
        let g = self.shared.group;
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftMeta, keys::group_tag(g, meta_tag::VOTE), codec::seal(&codec::encode_vote(vote)));
        // Readers see the new vote only once it is durable.
        self.shared.write_synced(batch).await?;
        self.shared.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.shared.check()?;
        match self.shared.committed_sync {
            CommittedSync::Durable => {
                let mut batch = WriteBatch::new();
                put_committed(&mut batch, self.shared.group, committed.as_ref());
                // The fsync is shared with every other group's appends.
                self.shared.write_synced(batch).await?;
                self.shared.lock().committed = committed;
            }
            // No write of its own: the group's next append carries it, durable with that append's fsync.
            // It goes behind the entries it covers in the one WAL, so a crash never keeps it without them.
            CommittedSync::Lazy => {
                let mut inner = self.shared.lock();
                inner.committed = committed;
                inner.committed_unwritten = true;
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.shared.check()?;
        Ok(self.shared.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.shared.check()?;
        let g = self.shared.group;
        let mut batch = WriteBatch::new();
        // Each entry keeps its sealed form (the tail cache's copy too), so replication sends these bytes.
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|e| {
                let (e, sealed) = codec::seal_owned(e);
                batch.put(Cf::Log, keys::group_u64(g, e.log_id.index), sealed);
                e
            })
            .collect();
        let bytes = batch.payload_bytes() as u64;
        {
            let mut inner = self.shared.lock();
            if inner.committed_unwritten {
                put_committed(&mut batch, g, inner.committed.as_ref());
                inner.committed_unwritten = false;
            }
        }
        self.shared.write(batch)?;
        {
            let mut inner = self.shared.lock();
            if let Some(last) = entries.last() {
                debug_assert!(inner.last_log_id.is_none_or(|l| l.index + 1 >= entries[0].log_id.index));
                inner.last_log_id = Some(last.log_id);
            }
            for e in entries.iter().cloned() {
                inner.cache_insert(e);
            }
        }
        self.shared.syncer.submit(SyncJob {
            entries: entries.len() as u64,
            bytes,
            done: Box::new(move |r| callback.io_completed(r)),
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.shared.check()?;
        let g = self.shared.group;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let (_, group_end) = keys::group_range(g);
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::Log, keys::group_u64(g, from), group_end);
        // Not synced: a crash that undoes it leaves the longer log openraft truncates again.
        self.shared.write(batch)?;
        let mut inner = self.shared.lock();
        inner.cache_truncate(from);
        // Truncating after an id past the end keeps the log as it is.
        let keeps_all = matches!((inner.last_log_id, last_log_id), (Some(cur), Some(l)) if cur.index <= l.index);
        if !keeps_all {
            inner.last_log_id = last_log_id.or(inner.last_purged);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.shared.check()?;
        let g = self.shared.group;
        let upto = log_id.index;
        let mut batch = WriteBatch::new();
        // The marker first: after a crash the log never looks as if entries before it still existed.
        batch.put(Cf::RaftMeta, keys::group_tag(g, meta_tag::LAST_PURGED), encode_log_id(Some(&log_id)));
        batch.delete_range(Cf::Log, keys::group_u64(g, 0), keys::group_u64(g, upto.saturating_add(1)));
        // Reclaiming drops files at once, outside WAL order: the marker, and the snapshot written before it
        // that covers the purged entries, must be durable first, or a crash could keep the deletion and
        // lose what justified it.
        self.shared.write_synced(batch).await?;
        self.shared.engine.reclaim_range(
            Cf::Log,
            &keys::group_u64(g, 0),
            &keys::group_u64(g, upto.saturating_add(1)),
        )?;
        let mut inner = self.shared.lock();
        inner.cache_purge(upto);
        inner.last_purged = Some(log_id);
        if inner.last_log_id.is_none_or(|l| l.index < upto) {
            inner.last_log_id = Some(log_id);
        }
        Ok(())
    }
}
