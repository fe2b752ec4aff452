//! Reading a log-mode group by Kafka offset: the fetch path.
//!
//! `offset -> offset-index row (last base offset <= offset) -> raft index -> log entry (tail cache or
//! engine) -> RecordBatches`, each patched with its absolute base offset and the entry's term as
//! `partitionLeaderEpoch`. Reads stop at the high watermark, so an uncommitted record is never returned.

use std::io;

use bytes::{Bytes, BytesMut};

use crate::record_batch;
use crate::state_machine::{PartitionState, SmShared, decode_batches};
use crate::types::{EntryPayload, term_of};

/// A stored RecordBatch, ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedBatch {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The batch with `baseOffset` and `partitionLeaderEpoch` patched in.
    pub bytes: Bytes,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "offset {offset} is out of range: the log holds offsets {log_start_offset} to {high_watermark} (exclusive)"
    )]
    OffsetOutOfRange { offset: u64, log_start_offset: u64, high_watermark: u64 },
    #[error(transparent)]
    Storage(#[from] io::Error),
}

/// Offset-index rows read per step; each row is one Raft entry.
const ROWS_PER_READ: usize = 256;

/// The offset of the first record stamped `timestamp_ms` or later, or the high watermark if there is
/// none (Kafka's ListOffsets by timestamp). The offset index is scanned [`ROWS_PER_READ`] rows at a time,
/// so the lookup holds a bounded number of rows however long the log; then the entry of the first row whose
/// newest record is that late is read to find the record.
pub fn offset_at_time(sm: &SmShared, timestamp_ms: i64) -> Result<u64, ReadError> {
    let state = sm.partition_state();
    let mut next = state.log_start_offset;
    while next < state.high_watermark {
        let rows = sm.index_rows_from(next, state.high_watermark, ROWS_PER_READ)?;
        let Some(last) = rows.last() else {
            break;
        };
        if let Some(row) = rows.iter().find(|r| r.max_timestamp >= timestamp_ms) {
            let end = row.base_offset + u64::from(row.count);
            let from = row.base_offset.max(state.log_start_offset);
            let (batches, _) = read(sm, from, row.bytes as usize)?;
            for batch in batches.iter().filter(|b| b.base_offset < end) {
                let records = record_batch::records(&batch.bytes).map_err(io::Error::other)?;
                for r in records {
                    let r = r.map_err(io::Error::other)?;
                    if r.record.timestamp_ms >= timestamp_ms && r.offset >= from as i64 {
                        return Ok(r.offset as u64);
                    }
                }
            }
            return Ok(end);
        }
        let after = last.base_offset + u64::from(last.count);
        if after <= next {
            break;
        }
        next = after;
    }
    Ok(state.high_watermark)
}

/// Reads batches from `offset` on, stopping at the high watermark or once `max_bytes` are gathered. The
/// first batch is returned whole even if larger than `max_bytes`, so a consumer always makes progress. The
/// first batch may start before `offset` (batches are never split); consumers skip the records before it.
pub fn read(sm: &SmShared, offset: u64, max_bytes: usize) -> Result<(Vec<FetchedBatch>, PartitionState), ReadError> {
    let state = sm.partition_state();
    if offset < state.log_start_offset || offset > state.high_watermark {
        return Err(ReadError::OffsetOutOfRange {
            offset,
            log_start_offset: state.log_start_offset,
            high_watermark: state.high_watermark,
        });
    }
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut next = offset;
    while next < state.high_watermark && (out.is_empty() || bytes < max_bytes) {
        let rows = sm.index_rows_from(next, state.high_watermark, ROWS_PER_READ)?;
        if rows.is_empty() {
            break;
        }
        // Offsets are dense, so the rows start at or below `next` unless a retention cut removed the rows
        // holding it since the state check: serve what was gathered, or say where the log starts now.
        if rows[0].base_offset > next {
            if !out.is_empty() {
                break;
            }
            let now = sm.partition_state();
            return Err(ReadError::OffsetOutOfRange {
                offset,
                log_start_offset: now.log_start_offset,
                high_watermark: now.high_watermark,
            });
        }
        // The rows wholly before `next` (only the first can be) are skipped; the entries of the rest are
        // read with one scan of the log, not one lookup each: a lookup per entry opened an iterator per
        // entry, and a log read from disk got no readahead.
        let before = rows.iter().take_while(|row| row.base_offset + u64::from(row.count) <= next).count();
        let rows = &rows[before..];
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            break;
        };
        let entries =
            sm.log().entries_limited(first.raft_index, last.raft_index + 1, max_bytes.saturating_sub(bytes))?;
        let mut entries = entries.into_iter();
        for (i, row) in rows.iter().enumerate() {
            // Entries between the rows carry no records (blank and membership entries).
            let Some(entry) =
                entries.find(|e| e.log_id.index >= row.raft_index).filter(|e| e.log_id.index == row.raft_index)
            else {
                if i > 0 {
                    // The scan stopped at its byte budget: read on from this row, if the budget is not spent.
                    break;
                }
                // Purged by retention between the state check and this read.
                let now = sm.partition_state();
                return Err(ReadError::OffsetOutOfRange {
                    offset,
                    log_start_offset: now.log_start_offset,
                    high_watermark: now.high_watermark,
                });
            };
            let EntryPayload::Normal(command) = &entry.payload else {
                return Err(io::Error::other(format!(
                    "group {}: offset index points at non-data entry {}",
                    sm.log().group(),
                    row.raft_index
                ))
                .into());
            };
            let batches = decode_batches(command.data()).map_err(|e| {
                io::Error::other(format!("group {}: entry {} is malformed: {e}", sm.log().group(), row.raft_index))
            })?;
            let epoch = i32::try_from(term_of(&entry.log_id)).unwrap_or(i32::MAX);
            let mut base = row.base_offset;
            for batch in batches {
                let header = record_batch::parse_header(&batch).map_err(|e| {
                    io::Error::other(format!(
                        "group {}: entry {} holds a bad batch: {e}",
                        sm.log().group(),
                        row.raft_index
                    ))
                })?;
                let last = base + u64::from(header.record_count) - 1;
                if last >= next && (out.is_empty() || bytes < max_bytes) {
                    let mut patched = BytesMut::from(&batch[..]);
                    record_batch::patch_header(&mut patched, base as i64, epoch);
                    bytes += patched.len();
                    out.push(FetchedBatch { base_offset: base, last_offset: last, bytes: patched.freeze() });
                }
                base = last + 1;
            }
            next = row.base_offset + u64::from(row.count);
            if bytes >= max_bytes {
                break;
            }
        }
    }
    Ok((out, state))
}
