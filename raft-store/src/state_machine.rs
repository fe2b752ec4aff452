//! The state machine of a group, in one of two modes.
//!
//! **Log mode** (topic partitions). The Raft log *is* the partition log: applying an entry parses the
//! RecordBatch headers of its payload, assigns dense offsets (`base_offset = next_offset`, then
//! `next_offset += record_count`), writes one offset-index row `base offset -> raft index` and publishes the
//! high watermark. Payload bytes are never copied. Entries without records (blank, membership) take no
//! offsets. A snapshot is metadata only (start offset, next offset, membership), taken at a *retention
//! cut*: a raft index R at or below `applied`, so that openraft may purge the log up to R and a lagging
//! follower resumes from R + 1 with no gap. A snapshot at `applied` would let openraft purge records, so it
//! is never built in log mode.
//!
//! **Kv mode** (controller, consumer offsets). An ordinary in-memory map with ordinary snapshots of the
//! whole map at `applied`, rebuilt on restart from the last snapshot plus the log.
//!
//! Architecture Invariant: offsets are assigned only at apply time, from committed entries, so every
//! replica assigns the same offsets to the same records, whatever leader changes and truncations happened.
//!
//! Architecture Invariant: in log mode a responder is answered, and the high watermark moves, only after
//! the offset-index rows of the applied entries are written, so an acknowledged record is always readable.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, TryStreamExt};
use openraft::OptionalSend;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use tokio::sync::watch;

use crate::codec::{self, CodecError, Reader};
use crate::engine::{Cf, Engine, WriteBatch};
use crate::keys::{self, GroupId, meta_tag, sm_tag};
use crate::log_store::LogShared;
use crate::record_batch;
use crate::types::{
    Command, EntryPayload, LogId, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

/// Which kind of state machine a group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Log,
    Kv,
}

impl Mode {
    pub fn tag(self) -> u8 {
        match self {
            Mode::Log => 1,
            Mode::Kv => 2,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Mode> {
        match tag {
            1 => Some(Mode::Log),
            2 => Some(Mode::Kv),
            _ => None,
        }
    }
}

/// The published read state of a log-mode group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// The first readable offset.
    pub log_start_offset: u64,
    /// One past the last committed and applied offset: reads stop here.
    pub high_watermark: u64,
    /// Raft index of the last applied entry.
    pub applied_index: u64,
    /// RecordBatch bytes between the log start and the high watermark (what `retention.bytes` limits).
    pub log_bytes: u64,
}

/// A pending retention cut: snapshot at raft index `index`; offsets below `start_offset` go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub index: u64,
    pub start_offset: u64,
}

/// One offset-index row: the entry at `raft_index` holds offsets `base_offset .. base_offset + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRow {
    pub base_offset: u64,
    pub raft_index: u64,
    pub count: u32,
    pub max_timestamp: i64,
    /// RecordBatch bytes of the entry.
    pub bytes: u32,
}

impl IndexRow {
    fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(24);
        out.put_u64(self.raft_index);
        out.put_u32(self.count);
        out.put_i64(self.max_timestamp);
        out.put_u32(self.bytes);
        out.freeze()
    }

    /// Rows written before sizes were recorded (20 bytes) read as size 0.
    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Option<IndexRow> {
        let base_offset = keys::suffix_u64(key)?;
        let mut r = Reader::new(Bytes::copy_from_slice(value));
        let (raft_index, count, max_timestamp) = (r.u64().ok()?, r.u32().ok()?, r.i64().ok()?);
        let bytes = if r.is_empty() { 0 } else { r.u32().ok()? };
        r.is_empty().then_some(IndexRow { base_offset, raft_index, count, max_timestamp, bytes })
    }
}

/// Encodes the log-mode command that appends `batches` (each a RecordBatch v2 as produced).
pub fn encode_batches(batches: &[Bytes]) -> Command {
    let len = 4 + batches.iter().map(|b| 4 + b.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_u32(batches.len() as u32);
    for b in batches {
        codec::put_len_prefixed(&mut out, b);
    }
    Command::new(out.freeze())
}

/// Splits a log-mode command into its batches (zero-copy slices).
pub fn decode_batches(command: &Bytes) -> Result<Vec<Bytes>, CodecError> {
    let mut r = Reader::new(command.clone());
    let n = r.u32()?;
    let mut out = Vec::with_capacity((n as usize).min(4096));
    for _ in 0..n {
        out.push(r.len_prefixed()?);
    }
    if !r.is_empty() {
        return Err(CodecError::Truncated);
    }
    Ok(out)
}

/// A kv-mode command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCommand {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Applies `ops` (puts and deletes) atomically if every guard holds: the key's current value equals the
    /// expected one (`None`: absent). Otherwise nothing changes and the command is rejected. This is the
    /// compare-and-set that keeps read-modify-write correct across leader changes.
    Guarded {
        guards: Vec<(Bytes, Option<Bytes>)>,
        ops: Vec<KvCommand>,
    },
}

const KV_PUT: u8 = 1;
const KV_DELETE: u8 = 2;
const KV_GUARDED: u8 = 3;
/// Guards and operations in one guarded command, checked before allocating.
const KV_GUARDED_ITEMS_MAX: u32 = 1 << 16;

impl KvCommand {
    pub fn encode(&self) -> Command {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        Command::new(out.freeze())
    }

    fn encode_into(&self, out: &mut BytesMut) {
        match self {
            KvCommand::Put { key, value } => {
                out.put_u8(KV_PUT);
                codec::put_len_prefixed(out, key);
                codec::put_len_prefixed(out, value);
            }
            KvCommand::Delete { key } => {
                out.put_u8(KV_DELETE);
                codec::put_len_prefixed(out, key);
            }
            KvCommand::Guarded { guards, ops } => {
                out.put_u8(KV_GUARDED);
                out.put_u32(guards.len() as u32);
                for (key, expected) in guards {
                    codec::put_len_prefixed(out, key);
                    match expected {
                        None => out.put_u8(0),
                        Some(v) => {
                            out.put_u8(1);
                            codec::put_len_prefixed(out, v);
                        }
                    }
                }
                out.put_u32(ops.len() as u32);
                for op in ops {
                    op.encode_into(out);
                }
            }
        }
    }

    pub fn decode(command: &Bytes) -> Result<KvCommand, CodecError> {
        let mut r = Reader::new(command.clone());
        let cmd = Self::decode_from(&mut r, true)?;
        if !r.is_empty() {
            return Err(CodecError::Truncated);
        }
        Ok(cmd)
    }

    fn decode_from(r: &mut Reader, allow_guarded: bool) -> Result<KvCommand, CodecError> {
        match r.u8()? {
            KV_PUT => Ok(KvCommand::Put { key: r.len_prefixed()?, value: r.len_prefixed()? }),
            KV_DELETE => Ok(KvCommand::Delete { key: r.len_prefixed()? }),
            KV_GUARDED if allow_guarded => {
                let n = r.u32()?;
                if n > KV_GUARDED_ITEMS_MAX {
                    return Err(CodecError::Truncated);
                }
                let mut guards = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let key = r.len_prefixed()?;
                    let expected = match r.u8()? {
                        0 => None,
                        _ => Some(r.len_prefixed()?),
                    };
                    guards.push((key, expected));
                }
                let n = r.u32()?;
                if n > KV_GUARDED_ITEMS_MAX {
                    return Err(CodecError::Truncated);
                }
                let mut ops = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    ops.push(Self::decode_from(r, false)?);
                }
                Ok(KvCommand::Guarded { guards, ops })
            }
            v => Err(CodecError::Unknown { what: "kv command", value: v }),
        }
    }
}

/// Log-mode state, persisted under `sm_meta/STATE` together with the offset-index rows it describes.
#[derive(Debug, Clone, Default)]
struct LogModeState {
    next_offset: u64,
    log_start_offset: u64,
    /// RecordBatch bytes in `[log_start_offset, next_offset)`.
    log_bytes: u64,
    /// Memberships since the last cut, plus the last one at or before it, oldest first.
    memberships: Vec<StoredMembership>,
    pending_cut: Option<Cut>,
}

struct SmInner {
    group: GroupId,
    mode: Mode,
    applied: Option<LogId>,
    membership: StoredMembership,
    log: LogModeState,
    kv: BTreeMap<Bytes, Bytes>,
    snapshot: Option<Snapshot>,
}

/// State shared by a group's state machine, its snapshot builder and its readers.
pub struct SmShared {
    engine: Arc<dyn Engine>,
    log: Arc<LogShared>,
    inner: Mutex<SmInner>,
    state_tx: watch::Sender<PartitionState>,
}

/// A group's state machine (openraft `RaftStateMachine`).
#[derive(Clone)]
pub struct GroupStateMachine {
    shared: Arc<SmShared>,
}

/// Version 2 added `log_bytes`; version 1 states read as `log_bytes` 0.
const STATE_VERSION: u8 = 2;
const LOG_SNAPSHOT_VERSION: u8 = 1;

fn encode_snapshot_record(snapshot: &Snapshot) -> Bytes {
    let mut out = BytesMut::new();
    codec::put_log_id(&mut out, snapshot.meta.last_log_id.as_ref());
    codec::put_stored_membership(&mut out, &snapshot.meta.last_membership);
    out.put_slice(&snapshot.snapshot);
    codec::seal(&out)
}

fn decode_snapshot_record(body: Bytes) -> Result<Snapshot, CodecError> {
    let mut r = Reader::new(body);
    let last_log_id = codec::read_log_id(&mut r)?;
    let last_membership = codec::read_stored_membership(&mut r)?;
    Ok(Snapshot { meta: SnapshotMeta { last_log_id, last_membership }, snapshot: r.rest() })
}

fn encode_kv_map(map: &BTreeMap<Bytes, Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(map.len() as u32);
    for (k, v) in map {
        codec::put_len_prefixed(&mut out, k);
        codec::put_len_prefixed(&mut out, v);
    }
    out.freeze()
}

fn decode_kv_map(data: &Bytes) -> Result<BTreeMap<Bytes, Bytes>, CodecError> {
    let mut r = Reader::new(data.clone());
    let n = r.u32()?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        let k = r.len_prefixed()?;
        let v = r.len_prefixed()?;
        map.insert(k, v);
    }
    Ok(map)
}

fn io_err(group: GroupId, what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("group {group}: {what}: {e}"))
}

impl SmInner {
    fn encode_state(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(STATE_VERSION);
        codec::put_log_id(&mut out, self.applied.as_ref());
        out.put_u64(self.log.next_offset);
        out.put_u64(self.log.log_start_offset);
        out.put_u32(self.log.memberships.len() as u32);
        for m in &self.log.memberships {
            codec::put_stored_membership(&mut out, m);
        }
        out.put_u64(self.log.log_bytes);
        codec::seal(&out)
    }

    /// Whether a snapshot installed since `cut` was planned already covers it.
    fn overtaken_by_snapshot(&self, cut: Cut) -> bool {
        let newest = self.snapshot.as_ref().and_then(|c| c.meta.last_log_id).map(|l| l.index);
        self.log.log_start_offset >= cut.start_offset || newest.is_some_and(|i| i >= cut.index)
    }

    /// Drops an overtaken `cut` and returns the snapshot that covers it.
    fn take_overtaken(&mut self, group: GroupId, cut: Cut) -> io::Result<Snapshot> {
        if self.log.pending_cut == Some(cut) {
            self.log.pending_cut = None;
        }
        self.snapshot.clone().ok_or_else(|| io_err(group, "snapshot", "an overtaken cut without a snapshot"))
    }

    fn published(&self) -> PartitionState {
        PartitionState {
            log_start_offset: self.log.log_start_offset,
            high_watermark: self.log.next_offset,
            applied_index: self.applied.map_or(0, |l| l.index),
            log_bytes: self.log.log_bytes,
        }
    }

    fn record_membership(&mut self, m: StoredMembership) {
        self.membership = m.clone();
        if self.mode == Mode::Log {
            self.log.memberships.push(m);
        }
    }

    /// The membership in force at raft index `index`.
    fn membership_at(&self, index: u64) -> StoredMembership {
        self.log
            .memberships
            .iter()
            .rev()
            .find(|m| m.log_id().is_some_and(|l| l.index <= index))
            .cloned()
            .unwrap_or_default()
    }
}

impl GroupStateMachine {
    /// Opens group `group`'s state machine, recovering its state from the engine.
    pub fn open(group: GroupId, mode: Mode, engine: Arc<dyn Engine>, log: Arc<LogShared>) -> io::Result<Self> {
        let snapshot = match engine.get(Cf::RaftMeta, &keys::group_tag(group, meta_tag::SNAPSHOT))? {
            None => None,
            Some(sealed) => {
                let body = codec::unseal(&sealed).map_err(|e| io_err(group, "stored snapshot is corrupt", e))?;
                Some(decode_snapshot_record(body).map_err(|e| io_err(group, "stored snapshot is corrupt", e))?)
            }
        };
        let mut inner = SmInner {
            group,
            mode,
            applied: None,
            membership: StoredMembership::default(),
            log: LogModeState::default(),
            kv: BTreeMap::new(),
            snapshot: None,
        };
        match mode {
            Mode::Log => {
                if let Some(sealed) = engine.get(Cf::SmMeta, &keys::group_tag(group, sm_tag::STATE))? {
                    let body = codec::unseal(&sealed).map_err(|e| io_err(group, "state is corrupt", e))?;
                    let mut r = Reader::new(body);
                    let decoded: Result<(), CodecError> = (|| {
                        let version = r.u8()?;
                        if version != STATE_VERSION && version != 1 {
                            return Err(CodecError::Unknown { what: "state version", value: version });
                        }
                        inner.applied = codec::read_log_id(&mut r)?;
                        inner.log.next_offset = r.u64()?;
                        inner.log.log_start_offset = r.u64()?;
                        let n = r.u32()?;
                        for _ in 0..n {
                            inner.log.memberships.push(codec::read_stored_membership(&mut r)?);
                        }
                        if version >= 2 {
                            inner.log.log_bytes = r.u64()?;
                        }
                        Ok(())
                    })();
                    decoded.map_err(|e| io_err(group, "state is corrupt", e))?;
                    inner.membership = inner.log.memberships.last().cloned().unwrap_or_default();
                }
            }
            Mode::Kv => {
                // The map lives in memory: start from the last snapshot; openraft re-applies the log after it.
                if let Some(s) = &snapshot {
                    inner.kv = decode_kv_map(&s.snapshot).map_err(|e| io_err(group, "snapshot is corrupt", e))?;
                    inner.applied = s.meta.last_log_id;
                    inner.membership = s.meta.last_membership.clone();
                }
            }
        }
        inner.snapshot = snapshot;
        let (state_tx, _) = watch::channel(inner.published());
        Ok(Self { shared: Arc::new(SmShared { engine, log, inner: Mutex::new(inner), state_tx }) })
    }

    pub fn shared(&self) -> &Arc<SmShared> {
        &self.shared
    }
}

impl SmShared {
    fn lock(&self) -> MutexGuard<'_, SmInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// Watches the published read state (log mode).
    pub fn subscribe(&self) -> watch::Receiver<PartitionState> {
        self.state_tx.subscribe()
    }

    pub fn partition_state(&self) -> PartitionState {
        *self.state_tx.borrow()
    }

    pub fn log(&self) -> &Arc<LogShared> {
        &self.log
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Kv mode: the value of `key`, as applied on this replica.
    pub fn kv_get(&self, key: &[u8]) -> Option<Bytes> {
        self.lock().kv.get(key).cloned()
    }

    /// Kv mode: every pair whose key starts with `prefix`, as applied on this replica.
    pub fn kv_scan(&self, prefix: &[u8]) -> Vec<(Bytes, Bytes)> {
        let inner = self.lock();
        inner
            .kv
            .range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Log mode: plans a retention cut removing every record below `before_offset`, at whole entries.
    /// Returns `None` when no whole entry lies below it. The cut is taken by the next snapshot build.
    pub fn plan_cut(&self, before_offset: u64) -> io::Result<Option<Cut>> {
        self.plan(|row, _, _| row.base_offset + u64::from(row.count) <= before_offset)
    }

    /// Log mode: plans the cut `retention.ms` and `retention.bytes` ask for: whole entries from the start
    /// of the log whose newest record is older than `older_than_ms`, and the oldest entries whose removal
    /// still leaves at least `bytes_max` (as Kafka deletes a segment only if the log stays at or above
    /// `retention.bytes` without it). `None` when nothing is due.
    pub fn plan_retention(&self, older_than_ms: Option<i64>, bytes_max: Option<u64>) -> io::Result<Option<Cut>> {
        self.plan(|row, removed, log_bytes| {
            older_than_ms.is_some_and(|t| row.max_timestamp < t)
                || bytes_max.is_some_and(|max| {
                    log_bytes.checked_sub(removed + u64::from(row.bytes)).is_some_and(|left| left >= max)
                })
        })
    }

    /// The cut after the longest run of applied entries from the log start that `due(row, bytes removed
    /// before it, log bytes)` accepts (start and size read together).
    fn plan(&self, mut due: impl FnMut(&IndexRow, u64, u64) -> bool) -> io::Result<Option<Cut>> {
        let (group, start, applied, log_bytes) = {
            let inner = self.lock();
            (inner.group, inner.log.log_start_offset, inner.applied.map_or(0, |l| l.index), inner.log.log_bytes)
        };
        let mut last: Option<IndexRow> = None;
        let mut removed = 0u64;
        let (_, group_end) = keys::group_range(group);
        self.engine.scan(
            Cf::OffsetIdx,
            &keys::group_u64(group, start),
            &group_end,
            &mut |k, v| match IndexRow::decode(k, v) {
                Some(row) if row.raft_index <= applied && due(&row, removed, log_bytes) => {
                    removed += u64::from(row.bytes);
                    last = Some(row);
                    true
                }
                _ => false,
            },
        )?;
        let cut = last.map(|row| Cut { index: row.raft_index, start_offset: row.base_offset + u64::from(row.count) });
        if let Some(c) = cut {
            let mut inner = self.lock();
            if inner.log.pending_cut.is_none_or(|p| p.index < c.index) {
                inner.log.pending_cut = Some(c);
            }
        }
        Ok(cut)
    }

    /// RecordBatch bytes of the offset-index rows with base offsets in `[from, to)`.
    fn row_bytes(&self, group: GroupId, from: u64, to: u64) -> io::Result<u64> {
        let mut total = 0u64;
        if from >= to {
            return Ok(0);
        }
        self.engine.scan(Cf::OffsetIdx, &keys::group_u64(group, from), &keys::group_u64(group, to), &mut |k, v| {
            total += IndexRow::decode(k, v).map_or(0, |r| u64::from(r.bytes));
            true
        })?;
        Ok(total)
    }

    /// Offset-index rows with base offset in `[from, to)`, after the last row at or below `from`.
    pub fn index_rows_from(&self, offset: u64, to: u64, rows_max: usize) -> io::Result<Vec<IndexRow>> {
        let group = self.lock().group;
        let first = self
            .engine
            .last_in_range(
                Cf::OffsetIdx,
                &keys::group_u64(group, 0),
                &keys::group_u64(group, offset.saturating_add(1)),
            )?
            .and_then(|(k, v)| IndexRow::decode(&k, &v));
        let from = first.map_or(offset, |r| r.base_offset);
        let mut rows = Vec::new();
        let mut bad = false;
        self.engine.scan(Cf::OffsetIdx, &keys::group_u64(group, from), &keys::group_u64(group, to), &mut |k, v| {
            match IndexRow::decode(k, v) {
                Some(row) => rows.push(row),
                None => bad = true,
            }
            !bad && rows.len() < rows_max
        })?;
        if bad {
            return Err(io_err(group, "offset index", "corrupt row"));
        }
        Ok(rows)
    }

    fn apply_log_payload(inner: &mut SmInner, batch: &mut WriteBatch, index: u64, command: &Command) -> Response {
        let batches = match decode_batches(command.data()) {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return Response::Rejected("empty append".into()),
            Err(e) => return Response::Rejected(format!("malformed append: {e}")),
        };
        let mut count: u64 = 0;
        let mut max_timestamp = i64::MIN;
        let bytes: usize = batches.iter().map(Bytes::len).sum();
        for b in &batches {
            match record_batch::parse_header(b) {
                Ok(h) if h.total_bytes == b.len() => {
                    count += u64::from(h.record_count);
                    max_timestamp = max_timestamp.max(h.max_timestamp);
                }
                Ok(h) => {
                    return Response::Rejected(format!(
                        "batch length {} disagrees with its header {}",
                        b.len(),
                        h.total_bytes
                    ));
                }
                Err(e) => return Response::Rejected(format!("bad record batch: {e}")),
            }
        }
        let base_offset = inner.log.next_offset;
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let row = IndexRow { base_offset, raft_index: index, count: count as u32, max_timestamp, bytes };
        batch.put(Cf::OffsetIdx, keys::group_u64(inner.group, base_offset), row.encode());
        inner.log.next_offset += count;
        inner.log.log_bytes += u64::from(bytes);
        Response::Appended { base_offset, last_offset: inner.log.next_offset - 1 }
    }

    fn apply_kv(inner: &mut SmInner, command: &Command) -> Response {
        match KvCommand::decode(command.data()) {
            Ok(KvCommand::Put { key, value }) => Response::Kv(inner.kv.insert(key, value)),
            Ok(KvCommand::Delete { key }) => Response::Kv(inner.kv.remove(&key)),
            Ok(KvCommand::Guarded { guards, ops }) => {
                if let Some((key, _)) = guards.iter().find(|(k, expected)| inner.kv.get(k) != expected.as_ref()) {
                    return Response::Rejected(format!("guard failed on key {}", String::from_utf8_lossy(key)));
                }
                for op in ops {
                    match op {
                        KvCommand::Put { key, value } => {
                            inner.kv.insert(key, value);
                        }
                        KvCommand::Delete { key } => {
                            inner.kv.remove(&key);
                        }
                        // Decoding refuses nested guarded commands.
                        KvCommand::Guarded { .. } => {}
                    }
                }
                Response::Kv(None)
            }
            Err(e) => Response::Rejected(format!("malformed kv command: {e}")),
        }
    }
}

/// Builds snapshots for one group (runs in its own task).
pub struct SnapshotBuilder {
    shared: Arc<SmShared>,
}

impl SnapshotBuilder {
    fn build_log_mode(&self) -> io::Result<Snapshot> {
        let s = &self.shared;
        let (group, cut, current) = {
            let inner = s.lock();
            (inner.group, inner.log.pending_cut, inner.snapshot.clone())
        };
        let current_index = current.as_ref().and_then(|c| c.meta.last_log_id).map(|l| l.index);
        let cut = match cut {
            Some(c) if current_index.is_none_or(|i| c.index > i) => c,
            _ => {
                // Nothing new to cut: the current snapshot stays the newest.
                return current.ok_or_else(|| {
                    io_err(group, "snapshot", "a log-mode group is snapshotted only at a retention cut")
                });
            }
        };
        let Some(entry) = s.log.entry(cut.index)? else {
            // Purged by a snapshot installed since the cut was planned, which then covers it.
            let mut inner = s.lock();
            if inner.overtaken_by_snapshot(cut) {
                return inner.take_overtaken(group, cut);
            }
            return Err(io_err(group, "snapshot", format!("cut entry {} is no longer in the log", cut.index)));
        };
        // The rows below the cut are counted before the lock is taken, so applies do not wait on the scan;
        // if an installed snapshot moved the log start meanwhile (rare), they are counted again.
        let start_seen = s.lock().log.log_start_offset;
        let mut cut_bytes = s.row_bytes(group, start_seen, cut.start_offset)?;
        let mut inner = s.lock();
        if inner.overtaken_by_snapshot(cut) {
            return inner.take_overtaken(group, cut);
        }
        if inner.log.log_start_offset != start_seen {
            cut_bytes = s.row_bytes(group, inner.log.log_start_offset, cut.start_offset)?;
        }
        let membership = inner.membership_at(cut.index);
        let mut data = BytesMut::new();
        data.put_u8(LOG_SNAPSHOT_VERSION);
        data.put_u64(cut.start_offset);
        // The next offset at the cut is where the first record after it starts.
        data.put_u64(cut.start_offset);
        let snapshot = Snapshot {
            meta: SnapshotMeta { last_log_id: Some(entry.log_id), last_membership: membership.clone() },
            snapshot: data.freeze(),
        };
        // Forget memberships older than the one in force at the cut.
        inner.log.memberships.retain(|m| m.log_id().is_some_and(|l| l.index > cut.index));
        inner.log.memberships.insert(0, membership);
        let old_start = inner.log.log_start_offset;
        inner.log.log_start_offset = inner.log.log_start_offset.max(cut.start_offset);
        inner.log.log_bytes = inner.log.log_bytes.saturating_sub(cut_bytes);
        // A later cut planned while this one was built stays pending for the next build.
        if inner.log.pending_cut == Some(cut) {
            inner.log.pending_cut = None;
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftMeta, keys::group_tag(group, meta_tag::SNAPSHOT), encode_snapshot_record(&snapshot));
        batch.put(Cf::SmMeta, keys::group_tag(group, sm_tag::STATE), inner.encode_state());
        batch.delete_range(
            Cf::OffsetIdx,
            keys::group_u64(group, old_start.min(cut.start_offset)),
            keys::group_u64(group, cut.start_offset),
        );
        inner.snapshot = Some(snapshot.clone());
        s.engine.write(batch)?;
        s.state_tx.send_replace(inner.published());
        Ok(snapshot)
    }

    fn build_kv_mode(&self) -> io::Result<Snapshot> {
        let s = &self.shared;
        let mut inner = s.lock();
        let snapshot = Snapshot {
            meta: SnapshotMeta { last_log_id: inner.applied, last_membership: inner.membership.clone() },
            snapshot: encode_kv_map(&inner.kv),
        };
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftMeta, keys::group_tag(inner.group, meta_tag::SNAPSHOT), encode_snapshot_record(&snapshot));
        s.engine.write(batch)?;
        inner.snapshot = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        match self.shared.mode() {
            Mode::Log => self.build_log_mode(),
            Mode::Kv => self.build_kv_mode(),
        }
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.shared.lock();
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut replies = Vec::new();
        let mut batch = WriteBatch::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let mut inner = self.shared.lock();
            let index = entry.log_id.index;
            let response = match &entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(command) => match inner.mode {
                    Mode::Log => SmShared::apply_log_payload(&mut inner, &mut batch, index, command),
                    Mode::Kv => SmShared::apply_kv(&mut inner, command),
                },
                EntryPayload::Membership(m) => {
                    inner.record_membership(StoredMembership::new(Some(entry.log_id), m.clone()));
                    Response::None
                }
            };
            inner.applied = Some(entry.log_id);
            if let Some(r) = responder {
                replies.push((r, response));
            }
        }
        let published = {
            // Encode and write under the lock: the snapshot builder also writes the state under it, and an
            // older state written after a newer one would bring back a purged start offset.
            let inner = self.shared.lock();
            if inner.mode == Mode::Log {
                batch.put(Cf::SmMeta, keys::group_tag(inner.group, sm_tag::STATE), inner.encode_state());
            }
            if !batch.is_empty() {
                // Unsynced: a crash loses at most a suffix, which openraft re-applies up to the saved
                // committed index, and a leader's commit brings the rest.
                self.shared.engine.write(batch)?;
            }
            inner.published()
        };
        self.shared.state_tx.send_replace(published);
        for (responder, response) in replies {
            responder.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let s = &self.shared;
        let mut inner = s.lock();
        let group = inner.group;
        let record = Snapshot { meta: meta.clone(), snapshot: snapshot.clone() };
        let mut batch = WriteBatch::new();
        match inner.mode {
            Mode::Log => {
                let mut r = Reader::new(snapshot);
                let parsed: Result<(u64, u64), CodecError> = (|| {
                    let version = r.u8()?;
                    if version != LOG_SNAPSHOT_VERSION {
                        return Err(CodecError::Unknown { what: "snapshot version", value: version });
                    }
                    Ok((r.u64()?, r.u64()?))
                })();
                let (start_offset, next_offset) = parsed.map_err(|e| io_err(group, "received snapshot", e))?;
                inner.log.log_start_offset = start_offset;
                inner.log.next_offset = next_offset;
                // A log-mode snapshot holds no records: everything up to it was cut.
                inner.log.log_bytes = 0;
                inner.log.memberships = vec![meta.last_membership.clone()];
                inner.log.pending_cut = None;
                // Rows past the snapshot are rebuilt as openraft re-applies the log after it.
                let (from, to) = keys::group_range(group);
                batch.delete_range(Cf::OffsetIdx, from, to);
            }
            Mode::Kv => {
                inner.kv = decode_kv_map(&snapshot).map_err(|e| io_err(group, "received snapshot", e))?;
            }
        }
        inner.applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        batch.put(Cf::RaftMeta, keys::group_tag(group, meta_tag::SNAPSHOT), encode_snapshot_record(&record));
        if inner.mode == Mode::Log {
            batch.put(Cf::SmMeta, keys::group_tag(group, sm_tag::STATE), inner.encode_state());
        }
        inner.snapshot = Some(record);
        s.engine.write(batch)?;
        s.state_tx.send_replace(inner.published());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.shared.lock().snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_commands_round_trip_and_reject_garbage() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let cmds = [
            KvCommand::Put { key: b("k"), value: b("v") },
            KvCommand::Delete { key: b("k") },
            KvCommand::Guarded {
                guards: vec![(b("a"), None), (b("b"), Some(b("1")))],
                ops: vec![KvCommand::Put { key: b("a"), value: b("x") }, KvCommand::Delete { key: b("b") }],
            },
        ];
        for c in cmds {
            let encoded = c.encode().data().clone();
            assert_eq!(KvCommand::decode(&encoded).expect("decode"), c);
            for len in 0..encoded.len() {
                assert!(KvCommand::decode(&encoded.slice(..len)).is_err(), "prefix {len} decoded");
            }
        }
        assert!(KvCommand::decode(&Bytes::from_static(&[9])).is_err());
    }

    #[test]
    fn batches_round_trip() {
        let batches = vec![Bytes::from_static(b"one"), Bytes::from_static(b""), Bytes::from_static(b"three")];
        assert_eq!(decode_batches(encode_batches(&batches).data()).expect("decode"), batches);
        assert!(decode_batches(&Bytes::from_static(&[0, 0, 0, 2, 0, 0, 0, 9])).is_err());
    }
}
