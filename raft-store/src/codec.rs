//! Binary encodings of Raft entries and metadata, shared by the disk and the wire.
//!
//! Every stored value is framed as `[crc32c: u32][body]`, the CRC covering the body, so a flipped bit is
//! found on read instead of being served. An entry body is `[version: u8][term: u64][index: u64][kind: u8]
//! [payload]`; the index is stored although the key holds it too, so an entry found under the wrong key is
//! caught as well. Integers are big-endian.
//!
//! A data entry read or received in sealed form keeps those bytes and is stored and sent on as they are
//! (see `types::Command`), at the version they were written in: a new `ENTRY_VERSION` must leave the old
//! one decodable.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use openraft::BasicNode;
use openraft::entry::RaftEntry;

use crate::types::{Command, Entry, EntryPayload, LogId, Membership, NodeId, StoredMembership, Vote, log_id, term_of};

const ENTRY_VERSION: u8 = 1;
const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

/// A stored or received value that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("truncated value")]
    Truncated,
    #[error("unknown {what} {value}")]
    Unknown { what: &'static str, value: u8 },
    #[error("entry claims index {found}, expected {expected}")]
    WrongIndex { expected: u64, found: u64 },
    #[error("invalid membership: {0}")]
    Membership(String),
    #[error("invalid UTF-8 in a node address")]
    Utf8,
}

/// Prefixes `body` with its CRC32C.
pub fn seal(body: &[u8]) -> Bytes {
    seal_written(body.len(), |out| out.put_slice(body))
}

/// A sealed value (`crc32c ++ body`) whose body `write` puts straight into the one buffer (about
/// `body_len` bytes), so the body is written once and never copied behind its CRC.
fn seal_written(body_len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + body_len);
    out.put_u32(0);
    write(&mut out);
    let crc = crc32c::crc32c(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    out.freeze()
}

/// Verifies and strips the CRC of a sealed value; the body shares the input's buffer.
pub fn unseal(sealed: &Bytes) -> Result<Bytes, CodecError> {
    if sealed.len() < 4 {
        return Err(CodecError::Truncated);
    }
    let stored = u32::from_be_bytes([sealed[0], sealed[1], sealed[2], sealed[3]]);
    let body = sealed.slice(4..);
    let computed = crc32c::crc32c(&body);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(body)
}

/// A reader over a body that reports truncation instead of panicking.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    fn need(&self, n: usize) -> Result<(), CodecError> {
        if self.buf.remaining() < n { Err(CodecError::Truncated) } else { Ok(()) }
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub fn i64(&mut self) -> Result<i64, CodecError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }

    pub fn bytes(&mut self, n: usize) -> Result<Bytes, CodecError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// A `u32` length followed by that many bytes.
    pub fn len_prefixed(&mut self) -> Result<Bytes, CodecError> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }

    pub fn rest(self) -> Bytes {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

pub fn put_len_prefixed(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

pub fn put_log_id(out: &mut BytesMut, id: Option<&LogId>) {
    match id {
        None => out.put_u8(0),
        Some(id) => {
            out.put_u8(1);
            out.put_u64(term_of(id));
            out.put_u64(id.index);
        }
    }
}

pub fn read_log_id(r: &mut Reader) -> Result<Option<LogId>, CodecError> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let term = r.u64()?;
            let index = r.u64()?;
            Ok(Some(log_id(term, index)))
        }
        v => Err(CodecError::Unknown { what: "log id tag", value: v }),
    }
}

pub fn put_membership(out: &mut BytesMut, m: &Membership) {
    let configs = m.get_joint_config();
    out.put_u32(configs.len() as u32);
    for c in configs {
        out.put_u32(c.len() as u32);
        for id in c {
            out.put_u64(*id);
        }
    }
    let nodes: Vec<(&NodeId, &BasicNode)> = m.nodes().collect();
    out.put_u32(nodes.len() as u32);
    for (id, node) in nodes {
        out.put_u64(*id);
        put_len_prefixed(out, node.addr.as_bytes());
    }
}

/// Collection sizes in decoded values are checked against this before allocating.
const DECODED_ITEMS_MAX: u32 = 1 << 16;

pub fn read_membership(r: &mut Reader) -> Result<Membership, CodecError> {
    let n_configs = r.u32()?;
    if n_configs > DECODED_ITEMS_MAX {
        return Err(CodecError::Truncated);
    }
    let mut configs = Vec::with_capacity(n_configs as usize);
    for _ in 0..n_configs {
        let n = r.u32()?;
        if n > DECODED_ITEMS_MAX {
            return Err(CodecError::Truncated);
        }
        let mut c = BTreeSet::new();
        for _ in 0..n {
            c.insert(r.u64()?);
        }
        configs.push(c);
    }
    let n_nodes = r.u32()?;
    if n_nodes > DECODED_ITEMS_MAX {
        return Err(CodecError::Truncated);
    }
    let mut nodes = BTreeMap::new();
    for _ in 0..n_nodes {
        let id = r.u64()?;
        let addr = String::from_utf8(r.len_prefixed()?.to_vec()).map_err(|_| CodecError::Utf8)?;
        nodes.insert(id, BasicNode::new(addr));
    }
    Membership::new(configs, nodes).map_err(|e| CodecError::Membership(e.to_string()))
}

pub fn put_stored_membership(out: &mut BytesMut, m: &StoredMembership) {
    put_log_id(out, m.log_id().as_ref());
    put_membership(out, m.membership());
}

pub fn read_stored_membership(r: &mut Reader) -> Result<StoredMembership, CodecError> {
    let id = read_log_id(r)?;
    let m = read_membership(r)?;
    Ok(StoredMembership::new(id, m))
}

/// Encodes an entry and seals it (`crc32c ++ body`, as [`seal`] would), copying its payload once.
pub fn seal_entry(entry: &Entry) -> Bytes {
    if let EntryPayload::Normal(c) = &entry.payload
        && let Some(sealed) = c.sealed_as(&entry.log_id)
    {
        return sealed.clone();
    }
    let payload_len = match &entry.payload {
        EntryPayload::Normal(c) => c.data().len(),
        _ => 64,
    };
    seal_written(18 + payload_len, |out| {
        out.put_u8(ENTRY_VERSION);
        out.put_u64(term_of(&entry.log_id));
        out.put_u64(entry.log_id.index);
        match &entry.payload {
            EntryPayload::Blank => out.put_u8(KIND_BLANK),
            EntryPayload::Normal(c) => {
                out.put_u8(KIND_NORMAL);
                out.put_slice(c.data());
            }
            EntryPayload::Membership(m) => {
                out.put_u8(KIND_MEMBERSHIP);
                put_membership(out, m);
            }
        }
    })
}

/// Where a normal entry's payload starts in its sealed form: the CRC, then version, term, index and kind.
const SEALED_PAYLOAD_AT: usize = 4 + 1 + 8 + 8 + 1;

/// Seals an entry the log is about to store and returns it carrying its sealed form (its payload then a
/// slice of that form, see [`Command`]), so sending it to followers later reuses these bytes.
pub fn seal_owned(mut entry: Entry) -> (Entry, Bytes) {
    let sealed = seal_entry(&entry);
    let id = entry.log_id;
    if let EntryPayload::Normal(c) = &mut entry.payload
        && c.sealed_as(&id).is_none()
    {
        let data = sealed.slice(SEALED_PAYLOAD_AT..);
        debug_assert_eq!(&data, c.data());
        *c = Command::with_sealed(data, id, sealed.clone());
    }
    (entry, sealed)
}

/// Verifies and decodes a sealed entry (stored, or received from a leader); the entry carries `sealed` as
/// its stored form, so storing or sending it again copies nothing.
pub fn unseal_entry(sealed: &Bytes, expected_index: Option<u64>) -> Result<Entry, CodecError> {
    let mut entry = decode_entry(unseal(sealed)?, expected_index)?;
    let id = entry.log_id;
    if let EntryPayload::Normal(c) = &mut entry.payload {
        *c = Command::with_sealed(c.data().clone(), id, sealed.clone());
    }
    Ok(entry)
}

/// Decodes an entry body; `expected_index` guards against an entry stored under the wrong key.
fn decode_entry(body: Bytes, expected_index: Option<u64>) -> Result<Entry, CodecError> {
    let mut r = Reader::new(body);
    let version = r.u8()?;
    if version != ENTRY_VERSION {
        return Err(CodecError::Unknown { what: "entry version", value: version });
    }
    let term = r.u64()?;
    let index = r.u64()?;
    if let Some(expected) = expected_index
        && expected != index
    {
        return Err(CodecError::WrongIndex { expected, found: index });
    }
    let id = log_id(term, index);
    match r.u8()? {
        KIND_BLANK => Ok(Entry::new_blank(id)),
        KIND_NORMAL => Ok(Entry::new_normal(id, Command::new(r.rest()))),
        KIND_MEMBERSHIP => Ok(Entry::new_membership(id, read_membership(&mut r)?)),
        v => Err(CodecError::Unknown { what: "entry kind", value: v }),
    }
}

pub fn encode_vote(vote: &Vote) -> Bytes {
    let mut out = BytesMut::with_capacity(17);
    out.put_u64(vote.leader_id.term);
    out.put_u64(vote.leader_id.voted_for);
    out.put_u8(u8::from(vote.committed));
    out.freeze()
}

pub fn decode_vote(body: Bytes) -> Result<Vote, CodecError> {
    let mut r = Reader::new(body);
    let term = r.u64()?;
    let voted_for = r.u64()?;
    let committed = r.u8()? != 0;
    let mut vote = Vote::new(term, voted_for);
    vote.committed = committed;
    Ok(vote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        let nodes: BTreeMap<u64, BasicNode> =
            [(1, BasicNode::new("127.0.0.1:1")), (2, BasicNode::new("127.0.0.1:2")), (3, BasicNode::new("x"))]
                .into_iter()
                .collect();
        Membership::new(vec![BTreeSet::from([1, 2]), BTreeSet::from([2, 3])], nodes).expect("membership")
    }

    #[test]
    fn entries_round_trip_through_seal() {
        let entries = vec![
            Entry::new_blank(log_id(1, 1)),
            Entry::new_normal(log_id(2, 7), Command::new(Bytes::from_static(b"payload"))),
            Entry::new_membership(log_id(3, 9), membership()),
        ];
        for e in entries {
            let sealed = seal_entry(&e);
            let back = decode_entry(unseal(&sealed).expect("crc"), Some(e.log_id.index)).expect("decode");
            assert_eq!(back, e);
        }
    }

    #[test]
    fn an_entry_is_sealed_once_per_node() {
        let fresh = Entry::new_normal(log_id(2, 7), Command::new(Bytes::from_static(b"payload")));
        // The leader's log store seals it; the entry it keeps (cache, replication) carries those bytes.
        let (stored, sealed) = seal_owned(fresh.clone());
        assert_eq!(stored, fresh);
        assert_eq!(sealed, seal_entry(&fresh), "the stored form is the entry's seal");
        let sent = seal_entry(&stored);
        assert_eq!(sent.as_ptr(), sealed.as_ptr(), "sending the stored entry sealed it again");
        // A follower checks what it received and stores those very bytes.
        let received = unseal_entry(&sent, Some(7)).expect("received");
        assert_eq!(received, fresh);
        let (_, stored_again) = seal_owned(received);
        assert_eq!(stored_again.as_ptr(), sealed.as_ptr(), "the follower sealed the received entry again");
        // The sealed form belongs to its log id: the same command under another id is sealed afresh.
        let mut moved = stored.clone();
        moved.log_id = log_id(3, 8);
        let resealed = seal_entry(&moved);
        assert_ne!(resealed, sealed);
        assert_eq!(decode_entry(unseal(&resealed).expect("crc"), Some(8)).expect("decode"), moved);
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let e = Entry::new_normal(log_id(2, 7), Command::new(Bytes::from_static(b"payload")));
        let sealed = seal_entry(&e);
        for at in 0..sealed.len() {
            let mut bad = sealed.to_vec();
            bad[at] ^= 0x10;
            assert!(unseal(&Bytes::from(bad)).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn entry_under_the_wrong_key_is_rejected() {
        let e = Entry::new_blank(log_id(1, 5));
        let err = decode_entry(unseal(&seal_entry(&e)).expect("crc"), Some(6)).expect_err("wrong index");
        assert_eq!(err, CodecError::WrongIndex { expected: 6, found: 5 });
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let e = Entry::new_membership(log_id(3, 9), membership());
        let body = unseal(&seal_entry(&e)).expect("crc");
        for len in 0..body.len() {
            assert!(decode_entry(body.slice(..len), None).is_err(), "prefix of {len} bytes decoded");
        }
    }

    #[test]
    fn votes_round_trip() {
        let mut v = Vote::new(5, 3);
        assert_eq!(decode_vote(encode_vote(&v)).expect("vote"), v);
        v.committed = true;
        assert_eq!(decode_vote(encode_vote(&v)).expect("vote"), v);
    }
}
