//! The controller: cluster metadata in Raft group 0 (kv mode), replicated on every initial node.
//!
//! Keys: `topic/<name>` -> [`TopicRecord`]; `meta/next_group` -> the next unused partition group id. Every
//! change is one guarded command (compare-and-set on the keys it read), so a change computed by a deposed
//! leader is rejected instead of clobbering a newer one. Reads come from this node's replica (possibly a
//! little stale); writes go through the controller leader.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use flotilla_proto::broker::ErrorCode;
use flotilla_raft_store::codec::{Reader, put_len_prefixed};
use flotilla_raft_store::keys::GroupId;
use flotilla_raft_store::state_machine::KvCommand;
use flotilla_raft_store::types::NodeId;

use crate::error::BrokerError;

/// The controller's Raft group.
pub const CONTROLLER_GROUP: GroupId = 0;
const TOPIC_PREFIX: &str = "topic/";
const NEXT_GROUP_KEY: &str = "meta/next_group";
/// Kafka's limit on topic name length.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Partitions per topic, a named limit so a typo cannot create a million Raft groups.
pub const PARTITIONS_MAX: u32 = 4096;
/// Default `max.message.bytes`: the largest record batch a partition accepts.
pub const MAX_MESSAGE_BYTES_DEFAULT: u64 = 1 << 20;
/// Largest `max.message.bytes` allowed: one Raft entry must stay well under the transport's message cap.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 16 << 20;

/// A partition's place in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAssignment {
    pub group_id: GroupId,
    /// The first replica is the preferred leader.
    pub replicas: Vec<NodeId>,
}

/// A topic as the controller stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRecord {
    pub name: String,
    pub topic_id: u64,
    pub replication_factor: u32,
    pub configs: BTreeMap<String, String>,
    pub partitions: Vec<PartitionAssignment>,
}

const TOPIC_RECORD_VERSION: u8 = 1;

impl TopicRecord {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(TOPIC_RECORD_VERSION);
        put_len_prefixed(&mut out, self.name.as_bytes());
        out.put_u64(self.topic_id);
        out.put_u32(self.replication_factor);
        out.put_u32(self.configs.len() as u32);
        for (k, v) in &self.configs {
            put_len_prefixed(&mut out, k.as_bytes());
            put_len_prefixed(&mut out, v.as_bytes());
        }
        out.put_u32(self.partitions.len() as u32);
        for p in &self.partitions {
            out.put_u64(p.group_id);
            out.put_u32(p.replicas.len() as u32);
            for r in &p.replicas {
                out.put_u64(*r);
            }
        }
        out.freeze()
    }

    pub fn decode(bytes: &Bytes) -> Option<TopicRecord> {
        let mut r = Reader::new(bytes.clone());
        let text = |r: &mut Reader| -> Option<String> { String::from_utf8(r.len_prefixed().ok()?.to_vec()).ok() };
        if r.u8().ok()? != TOPIC_RECORD_VERSION {
            return None;
        }
        let name = text(&mut r)?;
        let topic_id = r.u64().ok()?;
        let replication_factor = r.u32().ok()?;
        let mut configs = BTreeMap::new();
        for _ in 0..r.u32().ok()?.min(1024) {
            let k = text(&mut r)?;
            configs.insert(k, text(&mut r)?);
        }
        let n = r.u32().ok()?;
        let mut partitions = Vec::with_capacity(n.min(PARTITIONS_MAX) as usize);
        for _ in 0..n {
            let group_id = r.u64().ok()?;
            let count = r.u32().ok()?;
            let mut replicas = Vec::with_capacity(count.min(64) as usize);
            for _ in 0..count {
                replicas.push(r.u64().ok()?);
            }
            partitions.push(PartitionAssignment { group_id, replicas });
        }
        Some(TopicRecord { name, topic_id, replication_factor, configs, partitions })
    }

    /// `max.message.bytes` of the topic.
    pub fn max_message_bytes(&self) -> u64 {
        self.configs.get("max.message.bytes").and_then(|v| v.parse().ok()).unwrap_or(MAX_MESSAGE_BYTES_DEFAULT)
    }

    /// `retention.ms` (default 7 days, as Kafka); `None` when unlimited (-1).
    pub fn retention_ms(&self) -> Option<u64> {
        self.limit("retention.ms", RETENTION_MS_DEFAULT)
    }

    /// `retention.bytes` per partition (default unlimited); `None` when unlimited (-1).
    pub fn retention_bytes(&self) -> Option<u64> {
        self.limit("retention.bytes", -1)
    }

    /// Whether `cleanup.policy` includes `delete` (the default), so retention removes old records.
    pub fn cleanup_deletes(&self) -> bool {
        self.configs.get("cleanup.policy").is_none_or(|p| p.split(',').any(|s| s.trim() == "delete"))
    }

    fn limit(&self, key: &str, default: i64) -> Option<u64> {
        let v = self.configs.get(key).and_then(|v| v.parse::<i64>().ok()).unwrap_or(default);
        u64::try_from(v).ok()
    }
}

pub fn topic_key(name: &str) -> Bytes {
    Bytes::from(format!("{TOPIC_PREFIX}{name}"))
}

pub fn topic_prefix() -> &'static [u8] {
    TOPIC_PREFIX.as_bytes()
}

/// Kafka's topic name rules: 1 to 249 characters of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let bad =
        |why: &str| Err(BrokerError::new(ErrorCode::InvalidTopicName, format!("invalid topic name {name:?}: {why}")));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return bad(&format!("it is longer than {TOPIC_NAME_BYTES_MAX} characters"));
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Kafka's default `retention.ms`: 7 days.
pub const RETENTION_MS_DEFAULT: i64 = 7 * 24 * 3600 * 1000;

fn config_error(key: &str, value: &str, why: &str) -> BrokerError {
    BrokerError::new(ErrorCode::InvalidConfig, format!("invalid config {key}={value}: {why}"))
}

/// Checks topic configs: known keys with valid values. Stored now, enforced as features land.
pub fn validate_configs(configs: &BTreeMap<String, String>) -> Result<(), BrokerError> {
    for (k, v) in configs {
        match k.as_str() {
            "retention.ms" | "retention.bytes" => {
                let n: i64 = v.parse().map_err(|_| config_error(k, v, "not an integer"))?;
                if n < -1 {
                    return Err(config_error(k, v, "must be -1 (unlimited) or positive"));
                }
            }
            "max.message.bytes" => {
                let n: u64 = v.parse().map_err(|_| config_error(k, v, "not a positive integer"))?;
                if n == 0 || n > MAX_MESSAGE_BYTES_LIMIT {
                    return Err(config_error(k, v, &format!("must be between 1 and {MAX_MESSAGE_BYTES_LIMIT}")));
                }
            }
            "cleanup.policy" => {
                if !matches!(v.as_str(), "delete" | "compact" | "compact,delete" | "delete,compact") {
                    return Err(config_error(k, v, "must be delete, compact or both"));
                }
            }
            _ => return Err(config_error(k, v, "unknown config")),
        }
    }
    Ok(())
}

/// Places `partitions` partitions of `replication_factor` replicas on `nodes` (sorted ids): replicas
/// round-robin from a start that moves by one per partition, so each node holds an equal share and is
/// the preferred leader (first replica) of an equal share. `topic_id` shifts the start so small topics
/// do not all lead on the same node.
pub fn place(nodes: &[NodeId], topic_id: u64, partitions: u32, replication_factor: u32) -> Vec<Vec<NodeId>> {
    let n = nodes.len();
    (0..partitions as usize)
        .map(|p| {
            let start = (topic_id as usize + p) % n;
            (0..replication_factor as usize).map(|r| nodes[(start + r) % n]).collect()
        })
        .collect()
}

/// Computes the guarded command creating topic `name`, given the controller state it was read from.
pub fn create_topic_command(
    name: &str,
    partitions: u32,
    replication_factor: u32,
    configs: BTreeMap<String, String>,
    nodes: &[NodeId],
    existing: Option<&Bytes>,
    next_group: Option<&Bytes>,
) -> Result<(TopicRecord, KvCommand), BrokerError> {
    validate_topic_name(name)?;
    if existing.is_some() {
        return Err(BrokerError::new(ErrorCode::TopicExists, format!("topic {name:?} already exists")));
    }
    if partitions == 0 || partitions > PARTITIONS_MAX {
        return Err(BrokerError::new(
            ErrorCode::InvalidPartitions,
            format!("a topic has between 1 and {PARTITIONS_MAX} partitions, not {partitions}"),
        ));
    }
    if replication_factor == 0 {
        return Err(BrokerError::new(ErrorCode::InvalidReplicationFactor, "the replication factor must be at least 1"));
    }
    if replication_factor as usize > nodes.len() {
        return Err(BrokerError::new(
            ErrorCode::NotEnoughReplicas,
            format!(
                "replication factor {replication_factor} needs {replication_factor} live nodes; {} are live",
                nodes.len()
            ),
        ));
    }
    validate_configs(&configs)?;
    let first_group = next_group.and_then(|b| <[u8; 8]>::try_from(&b[..]).ok()).map_or(1, u64::from_be_bytes);
    let topic_id = first_group;
    let placement = place(nodes, topic_id, partitions, replication_factor);
    let record = TopicRecord {
        name: name.to_owned(),
        topic_id,
        replication_factor,
        configs,
        partitions: placement
            .into_iter()
            .enumerate()
            .map(|(p, replicas)| PartitionAssignment { group_id: first_group + p as u64, replicas })
            .collect(),
    };
    let next = Bytes::copy_from_slice(&(first_group + u64::from(partitions)).to_be_bytes());
    let command = KvCommand::Guarded {
        guards: vec![(topic_key(name), None), (Bytes::from_static(NEXT_GROUP_KEY.as_bytes()), next_group.cloned())],
        ops: vec![
            KvCommand::Put { key: topic_key(name), value: record.encode() },
            KvCommand::Put { key: Bytes::from_static(NEXT_GROUP_KEY.as_bytes()), value: next },
        ],
    };
    Ok((record, command))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        for ok in ["orders", "a", "A.b_c-9", &"x".repeat(249)] {
            assert!(validate_topic_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "has space", "slash/", "ü", &"x".repeat(250)] {
            let e = validate_topic_name(bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidTopicName);
        }
    }

    #[test]
    fn placement_spreads_replicas_and_preferred_leaders_evenly() {
        let nodes = [1, 2, 3];
        let placed = place(&nodes, 0, 6, 3);
        let mut leaders = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for p in &placed {
            assert_eq!(p.len(), 3);
            let mut distinct = p.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "a partition's replicas are distinct: {p:?}");
            *leaders.entry(p[0]).or_insert(0) += 1;
            for r in p {
                *replicas.entry(*r).or_insert(0) += 1;
            }
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        assert_eq!(replicas.values().copied().collect::<Vec<_>>(), vec![6, 6, 6]);
        let five = place(&[1, 2, 3, 4, 5], 7, 10, 3);
        let mut counts = BTreeMap::new();
        for p in &five {
            *counts.entry(p[0]).or_insert(0) += 1;
        }
        assert!(counts.values().all(|c| *c == 2), "{counts:?}");
    }

    #[test]
    fn create_topic_validates_and_allocates_groups_atomically() {
        let nodes = [1, 2, 3];
        let (record, cmd) = create_topic_command("orders", 3, 2, BTreeMap::new(), &nodes, None, None).expect("create");
        assert_eq!(record.partitions.iter().map(|p| p.group_id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(TopicRecord::decode(&record.encode()), Some(record.clone()));
        let KvCommand::Guarded { guards, ops } = cmd else { panic!("guarded") };
        assert_eq!(guards.len(), 2);
        assert_eq!(ops.len(), 2);
        let next = Bytes::copy_from_slice(&4u64.to_be_bytes());
        let (second, _) = create_topic_command("other", 1, 1, BTreeMap::new(), &nodes, None, Some(&next)).expect("ok");
        assert_eq!(second.partitions[0].group_id, 4);
        let err = |r: Result<(TopicRecord, KvCommand), BrokerError>| r.expect_err("must fail").code;
        let existing = record.encode();
        assert_eq!(
            err(create_topic_command("orders", 1, 1, BTreeMap::new(), &nodes, Some(&existing), None)),
            ErrorCode::TopicExists
        );
        assert_eq!(
            err(create_topic_command("t", 0, 1, BTreeMap::new(), &nodes, None, None)),
            ErrorCode::InvalidPartitions
        );
        assert_eq!(
            err(create_topic_command("t", 1, 0, BTreeMap::new(), &nodes, None, None)),
            ErrorCode::InvalidReplicationFactor
        );
        assert_eq!(
            err(create_topic_command("t", 1, 4, BTreeMap::new(), &nodes, None, None)),
            ErrorCode::NotEnoughReplicas
        );
        let bad = BTreeMap::from([("retention.ms".to_string(), "soon".to_string())]);
        assert_eq!(err(create_topic_command("t", 1, 1, bad, &nodes, None, None)), ErrorCode::InvalidConfig);
        let unknown = BTreeMap::from([("colour".to_string(), "red".to_string())]);
        assert_eq!(err(create_topic_command("t", 1, 1, unknown, &nodes, None, None)), ErrorCode::InvalidConfig);
    }
}
