//! The checker: FAILOVER.md's invariants I1-I9 and I11, counted over a [`History`].
//!
//! I10 (committed consumer-group offsets) has nothing to judge until consumer groups exist; the report says
//! so rather than counting zero. Without idempotent produce, a value at two offsets is an I3 anomaly only if
//! its send was acknowledged or refused; duplicates of `info` sends are counted apart, as allowed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::history::{History, Outcome, SendOp};

/// Examples kept per anomaly.
const EXAMPLES_MAX: usize = 8;

/// The invariants, in report order: (id, name).
pub const INVARIANTS: [(&str, &str); 10] = [
    ("I1", "lost-write"),
    ("I2", "inconsistent-offsets"),
    ("I3", "duplicate"),
    ("I4", "aborted-read (G1a)"),
    ("I5", "unexpected"),
    ("I6", "nonmonotonic-send"),
    ("I7", "poll-skip / nonmonotonic-poll"),
    ("I8", "replica divergence"),
    ("I9", "linearizable offsets"),
    ("I11", "node panic"),
];

/// One invariant's count and a few examples.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub id: &'static str,
    pub name: &'static str,
    pub count: u64,
    pub examples: Vec<String>,
}

/// What the checker found.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub anomalies: Vec<Anomaly>,
    /// Acknowledged values no read reached (the final read did not cover them): a failed final read, not
    /// a loss; the run's gates fail on it.
    pub unseen: u64,
    /// Values of `info` sends found at more than one offset (allowed without idempotent produce).
    pub info_duplicates: u64,
    /// Acknowledged values below the final read's log start: removed by retention, not lost.
    pub expired: u64,
    /// Keys whose final read began past offset 0 (retention had cut their log), and the highest such start.
    pub keys_cut: u64,
    pub highest_log_start: u64,
    pub sends_ok: u64,
    pub sends_fail: u64,
    pub sends_info: u64,
    pub values_read: u64,
}

impl Checked {
    pub fn count(&self, id: &str) -> u64 {
        self.anomalies.iter().find(|a| a.id == id).map_or(0, |a| a.count)
    }

    /// Every invariant held.
    pub fn clean(&self) -> bool {
        self.anomalies.iter().all(|a| a.count == 0)
    }
}

struct Counts(BTreeMap<&'static str, Anomaly>);

impl Counts {
    fn new() -> Self {
        Self(INVARIANTS.iter().map(|(id, name)| (*id, Anomaly { id, name, count: 0, examples: Vec::new() })).collect())
    }

    fn flag(&mut self, id: &'static str, example: impl FnOnce() -> String) {
        if let Some(a) = self.0.get_mut(id) {
            a.count += 1;
            if a.examples.len() < EXAMPLES_MAX {
                a.examples.push(example());
            }
        }
    }
}

/// Every (key, offset, value) some read returned, with where it came from.
fn read_records(h: &History) -> impl Iterator<Item = (&str, u64, u64, String)> {
    let polls = h
        .polls
        .iter()
        .flat_map(|p| p.records.iter().map(move |(o, v)| (&p.key[..], *o, *v, format!("poll by {}", p.consumer))));
    let finals = h
        .final_reads
        .iter()
        .flat_map(|r| r.records.iter().map(move |(o, v)| (&r.key[..], *o, *v, "final read".into())));
    let replicas = h.replica_reads.iter().flat_map(|r| {
        r.records.iter().map(move |(o, v)| (&r.key[..], *o, *v, format!("replica on node {}", r.node.unwrap_or(0))))
    });
    polls.chain(finals).chain(replicas)
}

/// Checks every invariant over `h`.
pub fn check(h: &History) -> Checked {
    let mut counts = Counts::new();
    let sent: HashMap<u64, &SendOp> = h.sends.iter().map(|s| (s.value, s)).collect();

    // Who holds what, from acknowledgements and from every read.
    let mut at_offset: BTreeMap<(&str, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut offsets_of: BTreeMap<(&str, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut seen: HashMap<&str, HashSet<u64>> = HashMap::new();
    let mut max_read: HashMap<&str, u64> = HashMap::new();
    for s in &h.sends {
        if let (Outcome::Ok, Some(o)) = (s.outcome, s.offset) {
            at_offset.entry((s.key.as_str(), o)).or_default().insert(s.value);
            offsets_of.entry((s.key.as_str(), s.value)).or_default().insert(o);
        }
    }
    let mut unexpected: BTreeSet<(&str, u64)> = BTreeSet::new();
    let mut aborted: BTreeSet<(&str, u64)> = BTreeSet::new();
    let mut values_read = 0;
    for (key, offset, value, source) in read_records(h) {
        values_read += 1;
        at_offset.entry((key, offset)).or_default().insert(value);
        offsets_of.entry((key, value)).or_default().insert(offset);
        seen.entry(key).or_default().insert(value);
        let m = max_read.entry(key).or_insert(offset);
        *m = (*m).max(offset);
        match sent.get(&value) {
            Some(s) if s.key == key => {
                if s.outcome == Outcome::Fail && aborted.insert((key, value)) {
                    counts.flag("I4", || format!("{key}: value {value} at offset {offset} ({source}) was refused"));
                }
            }
            _ => {
                if unexpected.insert((key, value)) {
                    counts.flag("I5", || {
                        format!("{key}: value {value} at offset {offset} ({source}) was never sent there")
                    });
                }
            }
        }
    }

    // I1: an acknowledged value that a read should have covered but none contained. Offsets below the
    // log start of the key's final read were removed by retention.
    let final_start: HashMap<&str, u64> = h.final_reads.iter().map(|r| (r.key.as_str(), r.start)).collect();
    let (mut unseen, mut expired) = (0, 0);
    for s in &h.sends {
        let (Outcome::Ok, Some(o)) = (s.outcome, s.offset) else { continue };
        if seen.get(&s.key[..]).is_some_and(|v| v.contains(&s.value)) {
            continue;
        }
        if final_start.get(&s.key[..]).is_some_and(|start| o < *start) {
            expired += 1;
            continue;
        }
        if max_read.get(&s.key[..]).is_some_and(|m| *m >= o) {
            counts.flag("I1", || {
                format!("{}: value {} acknowledged at offset {o} is missing from every read", s.key, s.value)
            });
        } else {
            unseen += 1;
        }
    }

    // I2 and I3.
    for ((key, offset), values) in &at_offset {
        if values.len() > 1 {
            counts.flag("I2", || format!("{key}: offset {offset} holds values {values:?}"));
        }
    }
    let mut info_duplicates = 0;
    for ((key, value), offsets) in &offsets_of {
        if offsets.len() > 1 {
            // Values nobody sent, or sent and refused, are I5 or I4 already.
            match sent.get(value) {
                Some(s) if s.outcome == Outcome::Info => info_duplicates += 1,
                Some(s) if s.outcome == Outcome::Ok => {
                    counts.flag("I3", || format!("{key}: value {value} at offsets {offsets:?}"))
                }
                _ => {}
            }
        }
    }

    // I6: one producer's acknowledged sends to one key land in send order.
    let mut by_producer: BTreeMap<(u64, &str), Vec<&SendOp>> = BTreeMap::new();
    for s in h.sends.iter().filter(|s| s.outcome == Outcome::Ok && s.offset.is_some()) {
        by_producer.entry((s.process, s.key.as_str())).or_default().push(s);
    }
    for ((process, key), mut sends) in by_producer {
        sends.sort_by(|a, b| a.start.total_cmp(&b.start));
        for w in sends.windows(2) {
            if let (Some(a), Some(b)) = (w[0].offset, w[1].offset)
                && b <= a
            {
                counts.flag("I6", || {
                    format!(
                        "{key}: process {process} sent {} (offset {a}) before {} (offset {b})",
                        w[0].value, w[1].value
                    )
                });
            }
        }
    }

    // I7: an assign-mode consumer's polls of a key continue where the previous one stopped.
    let mut polls: BTreeMap<(u64, &str), Vec<&crate::history::Poll>> = BTreeMap::new();
    for p in &h.polls {
        polls.entry((p.consumer, p.key.as_str())).or_default().push(p);
    }
    for ((consumer, key), mut ps) in polls {
        ps.sort_by(|a, b| a.start.total_cmp(&b.start));
        let mut last: Option<u64> = None;
        for p in ps {
            if p.reset {
                // After an assign, seek or crash the next record is the one asked for.
                last = p.from.checked_sub(1);
                if p.from == 0 && p.records.first().is_some_and(|(o, _)| *o != 0) {
                    counts.flag("I7", || {
                        format!("{key}: consumer {consumer} asked for offset 0 and got {:?}", p.records.first())
                    });
                }
            }
            for (o, _) in &p.records {
                match last {
                    Some(l) if *o > l + 1 => {
                        counts.flag("I7", || format!("{key}: consumer {consumer} skipped from offset {l} to {o}"))
                    }
                    Some(l) if *o <= l => {
                        counts.flag("I7", || format!("{key}: consumer {consumer} went back from offset {l} to {o}"))
                    }
                    _ => {}
                }
                last = Some(*o);
            }
        }
    }

    // I7 for the final reads: each reads its key from its log start with no gap.
    for r in &h.final_reads {
        if let Some((expect, o)) = (r.start..).zip(r.records.iter().map(|(o, _)| *o)).find(|(e, o)| e != o) {
            counts.flag("I7", || format!("{}: the final read expected offset {expect} and got {o}", r.key));
        }
    }

    // I8: every replica of a key holds the same value at each offset both hold, and no gaps.
    let mut replicas: BTreeMap<&str, Vec<&crate::history::Read>> = BTreeMap::new();
    for r in &h.replica_reads {
        replicas.entry(&r.key).or_default().push(r);
    }
    for (key, reads) in replicas {
        let mut reference: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        let mut diverged = None;
        for r in &reads {
            let node = r.node.unwrap_or(0);
            let end = r.records.last().map_or(r.start, |(o, _)| o + 1);
            if r.records.first().is_some_and(|(o, _)| *o != r.start) || end < r.expected_end {
                diverged.get_or_insert_with(|| {
                    format!(
                        "{key}: node {node}'s replica holds offsets {:?}..{end} after the convergence wait, not {}..{}",
                        r.records.first().map(|(o, _)| *o),
                        r.start,
                        r.expected_end
                    )
                });
            }
            if let Some(w) = r.records.windows(2).find(|w| w[1].0 != w[0].0 + 1) {
                diverged.get_or_insert_with(|| {
                    format!("{key}: node {node}'s replica jumps from offset {} to {}", w[0].0, w[1].0)
                });
            }
            for (o, v) in &r.records {
                match reference.get(o) {
                    Some((other_node, other)) if other != v => {
                        diverged.get_or_insert_with(|| {
                            format!("{key}: offset {o} holds {v} on node {node} but {other} on node {other_node}")
                        });
                    }
                    Some(_) => {}
                    None => {
                        reference.insert(*o, (node, *v));
                    }
                }
            }
        }
        if let Some(example) = diverged {
            counts.flag("I8", || example);
        }
    }

    // I9: ListOffsets(latest) begun after an acknowledgement at offset o answers more than o, and the high
    // watermark never goes back between reads that do not overlap.
    let mut acks: BTreeMap<&str, Vec<(f64, u64)>> = BTreeMap::new();
    for s in &h.sends {
        if let (Outcome::Ok, Some(o)) = (s.outcome, s.offset) {
            acks.entry(&s.key).or_default().push((s.end, o));
        }
    }
    let mut reads: BTreeMap<&str, Vec<&crate::history::OffsetsRead>> = BTreeMap::new();
    for r in &h.offsets_reads {
        reads.entry(&r.key).or_default().push(r);
    }
    for (key, mut rs) in reads {
        let mut key_acks = acks.remove(key).unwrap_or_default();
        key_acks.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut ended: Vec<(f64, u64)> = rs.iter().map(|r| (r.end, r.latest)).collect();
        ended.sort_by(|a, b| a.0.total_cmp(&b.0));
        rs.sort_by(|a, b| a.start.total_cmp(&b.start));
        let (mut ai, mut ei) = (0, 0);
        let (mut max_ack, mut max_seen): (Option<u64>, Option<u64>) = (None, None);
        for r in rs {
            while ai < key_acks.len() && key_acks[ai].0 < r.start {
                max_ack = max_ack.max(Some(key_acks[ai].1));
                ai += 1;
            }
            while ei < ended.len() && ended[ei].0 < r.start {
                max_seen = max_seen.max(Some(ended[ei].1));
                ei += 1;
            }
            if let Some(o) = max_ack
                && r.latest <= o
            {
                counts.flag("I9", || {
                    format!("{key}: latest offset {} at {:.3}s after an ack at offset {o}", r.latest, r.start)
                });
            }
            if let Some(m) = max_seen
                && r.latest < m
            {
                counts.flag("I9", || {
                    format!("{key}: high watermark went back from {m} to {} at {:.3}s", r.latest, r.start)
                });
            }
        }
    }

    // I11.
    for l in &h.node_log_lines {
        counts.flag("I11", || format!("node {}: {}", l.node, l.line));
    }

    let count = |o: Outcome| h.sends.iter().filter(|s| s.outcome == o).count() as u64;
    // In INVARIANTS order (the map sorts "I11" before "I2").
    let mut anomalies: Vec<Anomaly> = counts.0.into_values().collect();
    anomalies.sort_by_key(|a| INVARIANTS.iter().position(|(id, _)| *id == a.id));
    Checked {
        anomalies,
        unseen,
        expired,
        keys_cut: final_start.values().filter(|s| **s > 0).count() as u64,
        highest_log_start: final_start.values().copied().max().unwrap_or(0),
        info_duplicates,
        sends_ok: count(Outcome::Ok),
        sends_fail: count(Outcome::Fail),
        sends_info: count(Outcome::Info),
        values_read,
    }
}
