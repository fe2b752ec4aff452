//! Kafka RecordBatch v2 (magic 2): the on-disk and on-wire form of records.
//!
//! Records are stored exactly as a Kafka client would produce them, so a Kafka-protocol listener can serve
//! stored bytes without re-encoding. Only two header fields change after a batch is stored: `baseOffset`
//! (bytes 0..8) and `partitionLeaderEpoch` (bytes 12..16). Neither is covered by the CRC, which runs over
//! the bytes from `attributes` to the end of the batch, so patching them never invalidates a batch.
//!
//! Layout of the 61-byte header (all integers big-endian):
//!
//! | bytes  | field                 |
//! |--------|-----------------------|
//! | 0..8   | baseOffset            |
//! | 8..12  | batchLength (bytes after this field) |
//! | 12..16 | partitionLeaderEpoch  |
//! | 16     | magic (2)             |
//! | 17..21 | crc (CRC32C of 21..)  |
//! | 21..23 | attributes            |
//! | 23..27 | lastOffsetDelta       |
//! | 27..35 | baseTimestamp         |
//! | 35..43 | maxTimestamp          |
//! | 43..51 | producerId            |
//! | 51..53 | producerEpoch         |
//! | 53..57 | baseSequence          |
//! | 57..61 | record count          |
//!
//! Each record that follows is `length: varint`, `attributes: i8`, `timestampDelta: varlong`,
//! `offsetDelta: varint`, key and value as `varint length (-1 = null) + bytes`, then `varint` header count
//! and per header a `varint`-length UTF-8 key and a nullable value. Varints are zig-zag encoded.

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the fixed RecordBatch v2 header.
pub const BATCH_HEADER_BYTES: usize = 61;
/// The only record format accepted: Kafka's magic 2.
pub const MAGIC_V2: i8 = 2;
/// Bytes before `batchLength`'s coverage starts (baseOffset + batchLength).
const LOG_OVERHEAD_BYTES: usize = 12;
/// Byte offset of the first CRC-covered field (`attributes`).
const CRC_COVERAGE_START: usize = 21;
/// Attribute bits 0..2: compression codec.
const COMPRESSION_MASK: i16 = 0x07;
/// Attribute bit 3: timestamps are LogAppendTime rather than CreateTime.
const LOG_APPEND_TIME_FLAG: i16 = 0x08;
/// Attribute bit 5: a control batch (transaction markers).
const CONTROL_FLAG: i16 = 0x20;
/// A batch holds at most this many records; Kafka clients stay far below it.
pub const RECORDS_PER_BATCH_MAX: usize = 1 << 20;

/// Why a RecordBatch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("record batch is truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("record batch has magic {0}, only magic 2 (RecordBatch v2) is supported")]
    UnsupportedMagic(i8),
    #[error("record batch checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("record batch length field {0} is invalid")]
    BadLength(i32),
    #[error("record batch declares {declared} records but lastOffsetDelta is {last_offset_delta}")]
    CountMismatch { declared: i32, last_offset_delta: i32 },
    #[error("record batch holds {0} records; a batch holds between 1 and {RECORDS_PER_BATCH_MAX}")]
    BadRecordCount(i32),
    #[error("record batch is compressed with codec {0}; compressed batches cannot be read yet")]
    CompressionUnsupported(i16),
    #[error("malformed record {index}: {reason}")]
    MalformedRecord { index: usize, reason: &'static str },
}

/// The decoded fixed header of a RecordBatch v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Total size of the batch in bytes, header included.
    pub total_bytes: usize,
    pub partition_leader_epoch: i32,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: u32,
}

impl BatchHeader {
    pub fn compression(&self) -> i16 {
        self.attributes & COMPRESSION_MASK
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }

    pub fn is_log_append_time(&self) -> bool {
        self.attributes & LOG_APPEND_TIME_FLAG != 0
    }
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads the header of the batch at the start of `buf` without verifying the CRC.
/// `buf` may hold more bytes after the batch.
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    if buf.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated { needed: BATCH_HEADER_BYTES, available: buf.len() });
    }
    let magic = buf[16] as i8;
    if magic != MAGIC_V2 {
        return Err(BatchError::UnsupportedMagic(magic));
    }
    let batch_length = be_i32(buf, 8);
    let min_length = (BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32;
    if batch_length < min_length {
        return Err(BatchError::BadLength(batch_length));
    }
    let total_bytes = LOG_OVERHEAD_BYTES + batch_length as usize;
    if buf.len() < total_bytes {
        return Err(BatchError::Truncated { needed: total_bytes, available: buf.len() });
    }
    let record_count = be_i32(buf, 57);
    if record_count <= 0 || record_count as usize > RECORDS_PER_BATCH_MAX {
        return Err(BatchError::BadRecordCount(record_count));
    }
    let last_offset_delta = be_i32(buf, 23);
    if last_offset_delta != record_count - 1 {
        return Err(BatchError::CountMismatch { declared: record_count, last_offset_delta });
    }
    Ok(BatchHeader {
        base_offset: be_i64(buf, 0),
        total_bytes,
        partition_leader_epoch: be_i32(buf, 12),
        crc: be_i32(buf, 17) as u32,
        attributes: be_i16(buf, 21),
        last_offset_delta,
        base_timestamp: be_i64(buf, 27),
        max_timestamp: be_i64(buf, 35),
        producer_id: be_i64(buf, 43),
        producer_epoch: be_i16(buf, 51),
        base_sequence: be_i32(buf, 53),
        record_count: record_count as u32,
    })
}

/// Reads the header of the batch at the start of `buf` and verifies its CRC32C.
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = parse_header(buf)?;
    let computed = crc32c::crc32c(&buf[CRC_COVERAGE_START..header.total_bytes]);
    if computed != header.crc {
        return Err(BatchError::ChecksumMismatch { stored: header.crc, computed });
    }
    Ok(header)
}

/// Rewrites `baseOffset` and `partitionLeaderEpoch` in place; the CRC stays valid (neither is covered).
pub fn patch_header(batch: &mut [u8], base_offset: i64, partition_leader_epoch: i32) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
    batch[12..16].copy_from_slice(&partition_leader_epoch.to_be_bytes());
}

/// One record header (Kafka "header", a key/value pair attached to a record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A record as a producer gives it. A `None` value is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<RecordHeader>,
    pub timestamp_ms: i64,
}

/// A record read back from a stored batch, with its absolute offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: i64,
    pub record: Record,
}

/// Producer identity for idempotent produce; `NONE` for a plain producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl ProducerInfo {
    pub const NONE: ProducerInfo = ProducerInfo { producer_id: -1, producer_epoch: -1, base_sequence: -1 };
}

fn put_varlong(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn varlong_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn nullable_len(b: Option<&[u8]>) -> usize {
    match b {
        None => varlong_len(-1),
        Some(b) => varlong_len(b.len() as i64) + b.len(),
    }
}

fn put_nullable(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_varlong(buf, -1),
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

/// Encoded size of one record body (everything after its length varint).
fn record_body_len(record: &Record, timestamp_delta: i64, offset_delta: i64) -> usize {
    let mut n = 1 + varlong_len(timestamp_delta) + varlong_len(offset_delta);
    n += nullable_len(record.key.as_deref());
    n += nullable_len(record.value.as_deref());
    n += varlong_len(record.headers.len() as i64);
    for h in &record.headers {
        n += nullable_len(Some(h.key.as_bytes()));
        n += nullable_len(h.value.as_deref());
    }
    n
}

/// Encoded size of a batch holding `records`, for size limits checked before building.
pub fn encoded_len(records: &[Record]) -> usize {
    let base_timestamp = records.first().map_or(0, |r| r.timestamp_ms);
    BATCH_HEADER_BYTES
        + records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let body = record_body_len(r, r.timestamp_ms - base_timestamp, i as i64);
                varlong_len(body as i64) + body
            })
            .sum::<usize>()
}

/// Builds one uncompressed RecordBatch v2 holding `records`, with base offset 0 (the log assigns offsets).
///
/// Panics if `records` is empty or longer than [`RECORDS_PER_BATCH_MAX`]: callers check request sizes first.
pub fn build(records: &[Record], producer: ProducerInfo) -> Bytes {
    assert!(!records.is_empty() && records.len() <= RECORDS_PER_BATCH_MAX, "batch record count out of range");
    let base_timestamp = records[0].timestamp_ms;
    let max_timestamp = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(base_timestamp);
    let total = encoded_len(records);
    let mut buf = BytesMut::with_capacity(total);
    buf.put_i64(0);
    buf.put_i32((total - LOG_OVERHEAD_BYTES) as i32);
    buf.put_i32(-1);
    buf.put_i8(MAGIC_V2);
    buf.put_u32(0); // CRC, filled in below.
    buf.put_i16(0); // attributes: no compression, CreateTime, not transactional, not control.
    buf.put_i32(records.len() as i32 - 1);
    buf.put_i64(base_timestamp);
    buf.put_i64(max_timestamp);
    buf.put_i64(producer.producer_id);
    buf.put_i16(producer.producer_epoch);
    buf.put_i32(producer.base_sequence);
    buf.put_i32(records.len() as i32);
    for (i, r) in records.iter().enumerate() {
        let timestamp_delta = r.timestamp_ms - base_timestamp;
        let body = record_body_len(r, timestamp_delta, i as i64);
        put_varlong(&mut buf, body as i64);
        buf.put_i8(0);
        put_varlong(&mut buf, timestamp_delta);
        put_varlong(&mut buf, i as i64);
        put_nullable(&mut buf, r.key.as_deref());
        put_nullable(&mut buf, r.value.as_deref());
        put_varlong(&mut buf, r.headers.len() as i64);
        for h in &r.headers {
            put_nullable(&mut buf, Some(h.key.as_bytes()));
            put_nullable(&mut buf, h.value.as_deref());
        }
    }
    debug_assert_eq!(buf.len(), total);
    let crc = crc32c::crc32c(&buf[CRC_COVERAGE_START..]);
    buf[17..21].copy_from_slice(&crc.to_be_bytes());
    buf.freeze()
}

/// A cursor over the records of one stored batch.
struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl Cursor<'_> {
    fn varlong(&mut self) -> Option<i64> {
        let mut z: u64 = 0;
        let mut shift = 0;
        loop {
            if self.pos >= self.end || shift > 63 {
                return None;
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Some(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn nullable(&mut self) -> Option<Option<Bytes>> {
        let len = self.varlong()?;
        if len == -1 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        if self.end - self.pos < len {
            return None;
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Some(Some(out))
    }
}

/// Iterates the records of the batch at the start of `batch`, yielding absolute offsets (the header's
/// `baseOffset` plus each record's delta). Values are zero-copy slices of `batch`. Verifies the CRC first.
pub fn records(batch: &Bytes) -> Result<RecordIter<'_>, BatchError> {
    let header = validate(batch)?;
    if header.compression() != 0 {
        return Err(BatchError::CompressionUnsupported(header.compression()));
    }
    Ok(RecordIter { cursor: Cursor { buf: batch, pos: BATCH_HEADER_BYTES, end: header.total_bytes }, header, index: 0 })
}

/// Iterator returned by [`records`].
pub struct RecordIter<'a> {
    cursor: Cursor<'a>,
    header: BatchHeader,
    index: usize,
}

impl RecordIter<'_> {
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    fn next_record(&mut self) -> Result<StoredRecord, &'static str> {
        let c = &mut self.cursor;
        let len = c.varlong().ok_or("bad length")?;
        let len = usize::try_from(len).map_err(|_| "negative length")?;
        if c.end - c.pos < len {
            return Err("length past end of batch");
        }
        let record_end = c.pos + len;
        let outer_end = c.end;
        c.end = record_end;
        let parsed = (|| {
            c.pos += 1; // attributes, unused in v2
            let timestamp_delta = c.varlong()?;
            let offset_delta = c.varlong()?;
            let key = c.nullable()?;
            let value = c.nullable()?;
            let header_count = usize::try_from(c.varlong()?).ok()?;
            let mut headers = Vec::with_capacity(header_count.min(64));
            for _ in 0..header_count {
                let key = c.nullable()??;
                let key = String::from_utf8(key.to_vec()).ok()?;
                let value = c.nullable()?;
                headers.push(RecordHeader { key, value });
            }
            Some((timestamp_delta, offset_delta, key, value, headers))
        })();
        let consumed_all = c.pos == record_end;
        c.end = outer_end;
        c.pos = record_end;
        let (timestamp_delta, offset_delta, key, value, headers) = parsed.ok_or("malformed field")?;
        if !consumed_all {
            return Err("record length disagrees with its fields");
        }
        let timestamp_ms = if self.header.is_log_append_time() {
            self.header.max_timestamp
        } else {
            self.header.base_timestamp + timestamp_delta
        };
        Ok(StoredRecord {
            offset: self.header.base_offset + offset_delta,
            record: Record { key, value, headers, timestamp_ms },
        })
    }
}

impl Iterator for RecordIter<'_> {
    type Item = Result<StoredRecord, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.header.record_count as usize {
            return None;
        }
        let index = self.index;
        self.index += 1;
        match self.next_record() {
            Ok(r) => Some(Ok(r)),
            Err(reason) => {
                // A malformed record poisons the rest of the batch: stop after reporting it.
                self.index = self.header.record_count as usize;
                Some(Err(BatchError::MalformedRecord { index, reason }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&str>, value: Option<&str>, ts: i64) -> Record {
        Record {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: vec![],
            timestamp_ms: ts,
        }
    }

    #[test]
    fn build_then_iterate_round_trips_every_field() {
        let mut with_headers = rec(Some("k2"), Some("v2"), 1_700_000_000_123);
        with_headers.headers = vec![
            RecordHeader { key: "trace".into(), value: Some(Bytes::from_static(b"abc")) },
            RecordHeader { key: "empty".into(), value: None },
        ];
        let input = vec![
            rec(Some("k1"), Some("v1"), 1_700_000_000_000),
            with_headers,
            rec(None, None, 1_699_999_999_000), // keyless tombstone with an earlier timestamp
            rec(Some(""), Some(""), 1_700_000_000_500),
        ];
        let mut batch = BytesMut::from(&build(&input, ProducerInfo::NONE)[..]);
        patch_header(&mut batch, 42, 7);
        let batch = batch.freeze();
        let header = validate(&batch).expect("valid batch");
        assert_eq!(header.base_offset, 42);
        assert_eq!(header.partition_leader_epoch, 7);
        assert_eq!(header.record_count, 4);
        assert_eq!(header.total_bytes, batch.len());
        assert_eq!(header.max_timestamp, 1_700_000_000_500);
        assert_eq!(encoded_len(&input), batch.len());
        let out: Vec<StoredRecord> = records(&batch).expect("iter").collect::<Result<_, _>>().expect("records");
        assert_eq!(out.len(), 4);
        for (i, (got, want)) in out.iter().zip(&input).enumerate() {
            assert_eq!(got.offset, 42 + i as i64);
            assert_eq!(&got.record, want);
        }
    }

    #[test]
    fn matches_kafka_reference_encoding() {
        // One record, key "key", value "value", timestamp 1000, no producer: bytes as Kafka's
        // DefaultRecordBatch writes them (hand-checked field by field).
        let batch = build(&[rec(Some("key"), Some("value"), 1000)], ProducerInfo::NONE);
        assert_eq!(&batch[0..8], &[0; 8]);
        assert_eq!(be_i32(&batch, 8) as usize, batch.len() - 12);
        assert_eq!(batch[16], 2);
        // The record: body length 14 (zig-zag 28 = 0x1c), attributes 0, timestamp delta 0, offset delta 0,
        // key length 3 (zig-zag 6) "key", value length 5 (zig-zag 10) "value", 0 headers.
        let expected_record = [0x1c, 0, 0, 0, 0x06, b'k', b'e', b'y', 0x0a, b'v', b'a', b'l', b'u', b'e', 0];
        assert_eq!(&batch[BATCH_HEADER_BYTES..], &expected_record[..]);
        assert_eq!(be_i32(&batch, 57), 1, "record count");
        assert_eq!(be_i64(&batch, 43), -1, "producer id");
    }

    #[test]
    fn any_flipped_covered_byte_fails_the_crc() {
        let batch = build(&[rec(Some("a"), Some("b"), 5)], ProducerInfo::NONE);
        for at in CRC_COVERAGE_START..batch.len() {
            let mut bad = batch.to_vec();
            bad[at] ^= 0x01;
            assert!(validate(&bad).is_err(), "flip at byte {at} went unnoticed");
        }
    }

    #[test]
    fn rejects_bad_headers_with_clear_errors() {
        let batch = build(&[rec(None, Some("x"), 0)], ProducerInfo::NONE);
        assert!(matches!(parse_header(&batch[..10]), Err(BatchError::Truncated { .. })));
        assert!(matches!(parse_header(&batch[..batch.len() - 1]), Err(BatchError::Truncated { .. })));
        let mut magic1 = batch.to_vec();
        magic1[16] = 1;
        assert_eq!(parse_header(&magic1), Err(BatchError::UnsupportedMagic(1)));
        let mut neg = batch.to_vec();
        neg[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(parse_header(&neg), Err(BatchError::BadLength(-5)));
        let mut zero = batch.to_vec();
        zero[57..61].copy_from_slice(&0i32.to_be_bytes());
        assert_eq!(parse_header(&zero), Err(BatchError::BadRecordCount(0)));
    }

    #[test]
    fn malformed_record_body_is_an_error_not_a_panic() {
        let batch = build(&[rec(Some("key"), Some("value"), 0)], ProducerInfo::NONE);
        // Corrupt the key length to claim more bytes than exist, then fix the CRC so only the body is wrong.
        let mut bad = batch.to_vec();
        bad[BATCH_HEADER_BYTES + 4] = 0x7e; // key length 63
        let crc = crc32c::crc32c(&bad[CRC_COVERAGE_START..]);
        bad[17..21].copy_from_slice(&crc.to_be_bytes());
        let bad = Bytes::from(bad);
        let results: Vec<_> = records(&bad).expect("header ok").collect();
        assert_eq!(results.len(), 1);
        assert!(matches!(results[0], Err(BatchError::MalformedRecord { index: 0, .. })));
    }

    #[test]
    fn varlong_round_trips_extremes() {
        for v in [0i64, 1, -1, 63, -64, 64, i32::MAX as i64, i32::MIN as i64, i64::MAX, i64::MIN] {
            let mut buf = BytesMut::new();
            put_varlong(&mut buf, v);
            assert_eq!(buf.len(), varlong_len(v));
            let bytes = buf.freeze();
            let mut c = Cursor { buf: &bytes, pos: 0, end: bytes.len() };
            assert_eq!(c.varlong(), Some(v));
        }
    }
}
