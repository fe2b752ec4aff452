//! What the workload did and saw: the history the checker judges.
//!
//! Times are seconds since the run started. A key is one topic-partition, written `topic/partition`.
//! Values are unique integers, sent as their decimal text; a read value that does not parse is kept as
//! [`UNPARSABLE`], which nobody sends.

use serde::{Deserialize, Serialize};

/// A read value that was not a decimal integer.
pub const UNPARSABLE: u64 = u64::MAX;

/// How a send ended (FAILOVER.md 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Acknowledged: committed on a quorum.
    Ok,
    /// Definitely not applied: refused before it reached Raft.
    Fail,
    /// Unknown: it may still commit.
    Info,
}

/// One record sent to one key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendOp {
    /// The sending process; a process sends one record at a time.
    pub process: u64,
    pub key: String,
    pub value: u64,
    pub outcome: Outcome,
    /// The acknowledged offset (only for `Ok`).
    pub offset: Option<u64>,
    /// Sent with a deliberately short deadline (S18's client faults): not counted for availability.
    #[serde(default)]
    pub cut_short: bool,
    pub start: f64,
    pub end: f64,
}

/// One poll of one key by an assign-mode consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Poll {
    pub consumer: u64,
    pub key: String,
    /// The offset the poll asked for.
    pub from: u64,
    /// (offset, value) in the order returned.
    pub records: Vec<(u64, u64)>,
    /// An assign, seek or client crash came between this poll and the consumer's previous poll of the key.
    pub reset: bool,
    pub start: f64,
    pub end: f64,
}

/// A complete read of one key from its log start (the final read) or of one node's replica of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Read {
    pub key: String,
    /// For a replica read, the node read; for a final read, None.
    pub node: Option<u64>,
    /// The log start offset the read began at: 0 unless retention removed the records before it.
    #[serde(default)]
    pub start: u64,
    pub records: Vec<(u64, u64)>,
    /// The offset the read should have reached: one past the highest acknowledged offset of the key.
    pub expected_end: u64,
}

/// `ListOffsets(latest)` on one key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffsetsRead {
    pub key: String,
    pub latest: u64,
    pub start: f64,
    pub end: f64,
}

/// A line of a node's log that reports a panic or a failed assertion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeLogLine {
    pub node: u64,
    pub line: String,
}

/// Everything one run recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub sends: Vec<SendOp>,
    pub polls: Vec<Poll>,
    pub final_reads: Vec<Read>,
    pub replica_reads: Vec<Read>,
    pub offsets_reads: Vec<OffsetsRead>,
    pub node_log_lines: Vec<NodeLogLine>,
}

/// Parses a value as the workload writes it.
pub fn parse_value(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse().ok()).unwrap_or(UNPARSABLE)
}

/// The key of a topic-partition.
pub fn key(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}")
}

/// The topic and partition of a key.
pub fn split_key(key: &str) -> Option<(&str, u32)> {
    let (topic, partition) = key.rsplit_once('/')?;
    Some((topic, partition.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip() {
        assert_eq!(split_key(&key("orders", 7)), Some(("orders", 7)));
        assert_eq!(split_key("no-partition"), None);
        assert_eq!(parse_value(Some(b"42")), 42);
        assert_eq!(parse_value(Some(b"x")), UNPARSABLE);
        assert_eq!(parse_value(None), UNPARSABLE);
    }
}
