//! Key layout. Every key starts with the big-endian group id, so one group's keys are contiguous in each
//! column family and a group is dropped with one range delete per column family.
//!
//! | column family | key                         | value                                   |
//! |---------------|-----------------------------|-----------------------------------------|
//! | `log`         | group, raft index           | encoded entry ([`crate::entry_codec`])  |
//! | `raft_meta`   | group, tag                  | vote, committed, last purged, snapshot  |
//! | `offset_idx`  | group, base offset          | raft index, record count, max timestamp |
//! | `sm_meta`     | group, tag                  | state-machine metadata                  |
//! | `kv`          | group, user key             | user value                              |

/// A Raft group's id. Group 0 is the controller; the controller assigns the others.
pub type GroupId = u64;

/// Length of the group-id prefix of every key.
pub const GROUP_PREFIX_BYTES: usize = 8;

/// Tags of `raft_meta` keys.
pub mod meta_tag {
    pub const VOTE: u8 = 1;
    pub const COMMITTED: u8 = 2;
    pub const LAST_PURGED: u8 = 3;
    pub const SNAPSHOT: u8 = 4;
    /// The group's membership in the node registry (its mode), so a restart finds its groups.
    pub const GROUP_INFO: u8 = 5;
}

/// Tags of `sm_meta` keys.
pub mod sm_tag {
    pub const STATE: u8 = 1;
}

pub fn group_prefix(group: GroupId) -> [u8; 8] {
    group.to_be_bytes()
}

/// `group ++ n`: the key of a log entry (n = raft index) or of an offset-index row (n = base offset).
pub fn group_u64(group: GroupId, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// `group ++ tag`: a metadata key.
pub fn group_tag(group: GroupId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    k
}

/// `group ++ bytes`: a kv-mode key.
pub fn group_bytes(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The first key of `group` and the first key after it, as a half-open range.
pub fn group_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let from = group.to_be_bytes().to_vec();
    let to = match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        // The last group id: everything after the prefix, padded past any real key.
        None => [group.to_be_bytes().as_slice(), &[0xff; 32]].concat(),
    };
    (from, to)
}

/// Decodes the trailing u64 of a `group_u64` key.
pub fn suffix_u64(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(GROUP_PREFIX_BYTES..GROUP_PREFIX_BYTES + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_group_sort_by_index_and_stay_inside_its_range() {
        let (from, to) = group_range(7);
        let keys = [group_u64(7, 0), group_u64(7, 1), group_u64(7, 256), group_u64(7, u64::MAX)];
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(keys.iter().all(|k| from <= *k && *k < to));
        assert!(group_u64(6, u64::MAX) < from && to <= group_u64(8, 0));
        assert_eq!(suffix_u64(&group_u64(7, 256)), Some(256));
        let (from, to) = group_range(u64::MAX);
        assert!(from <= group_u64(u64::MAX, u64::MAX) && group_u64(u64::MAX, u64::MAX) < to);
    }
}
