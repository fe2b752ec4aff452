//! The checker's self-test: a clean synthetic history must pass, and the same history with each anomaly
//! planted must be flagged for that anomaly ("tests for tests", FAILOVER.md 1.4).

use crate::checker::{Checked, check};
use crate::history::{History, NodeLogLine, OffsetsRead, Outcome, Poll, Read, SendOp};

const KEY: &str = "t/0";
const OTHER: &str = "t/1";

fn send(process: u64, key: &str, value: u64, outcome: Outcome, offset: Option<u64>, at: f64) -> SendOp {
    SendOp { process, key: key.into(), value, outcome, offset, cut_short: false, start: at, end: at + 0.5 }
}

/// Ten acknowledged values on each of two keys, read back by polls, final reads and three replicas.
fn clean() -> History {
    let mut h = History::default();
    for i in 0..10u64 {
        h.sends.push(send(1, KEY, i + 1, Outcome::Ok, Some(i), i as f64));
        h.sends.push(send(2, OTHER, i + 11, Outcome::Ok, Some(i), i as f64 + 0.1));
    }
    h.sends.push(send(2, OTHER, 100, Outcome::Fail, None, 20.0));
    h.sends.push(send(2, OTHER, 101, Outcome::Info, None, 21.0));
    let log = |base: u64| (0..10u64).map(|o| (o, base + o)).collect::<Vec<_>>();
    h.polls.push(Poll {
        consumer: 1,
        key: KEY.into(),
        from: 0,
        records: log(1)[..5].to_vec(),
        reset: true,
        start: 30.0,
        end: 30.1,
    });
    h.polls.push(Poll {
        consumer: 1,
        key: KEY.into(),
        from: 5,
        records: log(1)[5..].to_vec(),
        reset: false,
        start: 31.0,
        end: 31.1,
    });
    for (key, base) in [(KEY, 1), (OTHER, 11)] {
        h.final_reads.push(Read { key: key.into(), node: None, start: 0, records: log(base), expected_end: 10 });
        for node in 1..=3 {
            h.replica_reads.push(Read {
                key: key.into(),
                node: Some(node),
                start: 0,
                records: log(base),
                expected_end: 10,
            });
        }
    }
    h.offsets_reads.push(OffsetsRead { key: KEY.into(), latest: 3, start: 2.6, end: 2.7 });
    h.offsets_reads.push(OffsetsRead { key: KEY.into(), latest: 10, start: 40.0, end: 40.1 });
    h
}

fn poll(consumer: u64, from: u64, records: &[(u64, u64)], reset: bool, at: f64) -> Poll {
    Poll { consumer, key: KEY.into(), from, records: records.to_vec(), reset, start: at, end: at + 0.1 }
}

fn final_read<'h>(h: &'h mut History, key: &str) -> &'h mut Read {
    h.final_reads.iter_mut().find(|r| r.key == key).expect("the clean history reads every key")
}

/// Each planted anomaly: (invariant, what was planted, how).
#[allow(clippy::type_complexity)]
fn plants() -> Vec<(&'static str, &'static str, fn(&mut History))> {
    vec![
        ("I1", "an acknowledged value missing from every read", |h| {
            for r in h.final_reads.iter_mut().chain(h.replica_reads.iter_mut()) {
                if r.key == KEY {
                    r.records.retain(|(_, v)| *v != 3);
                }
            }
            for p in &mut h.polls {
                p.records.retain(|(_, v)| *v != 3);
            }
        }),
        ("I2", "one offset holding two values", |h| {
            h.sends.push(send(3, KEY, 50, Outcome::Info, None, 12.0));
            h.polls.push(Poll {
                consumer: 2,
                key: KEY.into(),
                from: 4,
                records: vec![(4, 50)],
                reset: true,
                start: 32.0,
                end: 32.1,
            });
        }),
        ("I3", "an acknowledged value at two offsets", |h| {
            h.sends.push(send(1, KEY, 50, Outcome::Ok, Some(10), 12.0));
            final_read(h, KEY).records.extend([(10, 50), (11, 50)]);
        }),
        ("I4", "a refused value read back", |h| {
            final_read(h, OTHER).records.push((10, 100));
        }),
        ("I5", "a value nobody sent", |h| {
            final_read(h, KEY).records.push((10, 777));
        }),
        ("I5", "a value read on another key than it was sent to", |h| {
            final_read(h, KEY).records.push((10, 11));
        }),
        ("I6", "a producer's later send at a lower offset", |h| {
            h.sends.push(send(1, KEY, 51, Outcome::Ok, Some(11), 12.0));
            h.sends.push(send(1, KEY, 52, Outcome::Ok, Some(10), 13.0));
            final_read(h, KEY).records.extend([(10, 52), (11, 51)]);
        }),
        ("I7", "a poll that skips offsets", |h| {
            h.polls.push(poll(2, 0, &[(0, 1), (1, 2)], true, 33.0));
            h.polls.push(poll(2, 2, &[(3, 4)], false, 34.0));
        }),
        ("I7", "a poll that goes back", |h| {
            h.polls.push(poll(2, 0, &[(0, 1), (1, 2)], true, 33.0));
            h.polls.push(poll(2, 2, &[(1, 2)], false, 34.0));
        }),
        ("I7", "a seek answered from another offset", |h| {
            h.polls.push(poll(2, 5, &[(7, 8)], true, 33.0));
        }),
        ("I7", "a final read with a gap", |h| {
            final_read(h, KEY).records.remove(3);
        }),
        ("I8", "a replica missing the committed tail", |h| {
            let r = h.replica_reads.iter_mut().find(|r| r.key == OTHER && r.node == Some(1)).expect("replica");
            r.records.truncate(8);
        }),
        ("I8", "replicas that disagree", |h| {
            let r = h.replica_reads.iter_mut().find(|r| r.key == OTHER && r.node == Some(2)).expect("replica");
            r.records.truncate(5);
            r.records.push((5, 101));
        }),
        ("I8", "a replica with a hole", |h| {
            let r = h.replica_reads.iter_mut().find(|r| r.key == OTHER && r.node == Some(3)).expect("replica");
            r.records.remove(4);
        }),
        ("I9", "a latest offset that misses an earlier acknowledgement", |h| {
            h.offsets_reads.push(OffsetsRead { key: KEY.into(), latest: 7, start: 41.0, end: 41.1 });
        }),
        ("I9", "a high watermark that goes back", |h| {
            // On a key with no acknowledgements, so only the regression can be flagged.
            h.offsets_reads.push(OffsetsRead { key: "t/2".into(), latest: 5, start: 1.0, end: 1.1 });
            h.offsets_reads.push(OffsetsRead { key: "t/2".into(), latest: 4, start: 2.0, end: 2.1 });
        }),
        ("I11", "a panic in a node's log", |h| {
            h.node_log_lines
                .push(NodeLogLine { node: 2, line: "thread 'tokio-runtime-worker' panicked at x.rs:1:1".into() });
        }),
    ]
}

/// One self-test case and whether the checker judged it right.
pub struct Case {
    pub name: String,
    pub passed: bool,
    pub checked: Checked,
}

/// Runs the self-test: the clean history first, then one case per planted anomaly.
pub fn run() -> Vec<Case> {
    let clean_checked = check(&clean());
    let mut cases = vec![Case {
        name: "clean history: no anomaly".into(),
        passed: clean_checked.clean() && clean_checked.unseen == 0,
        checked: clean_checked,
    }];
    for (id, what, plant) in plants() {
        let mut h = clean();
        plant(&mut h);
        let checked = check(&h);
        cases.push(Case { name: format!("{id} flags {what}"), passed: checked.count(id) > 0, checked });
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_passes_clean_histories_and_flags_every_planted_anomaly() {
        for case in run() {
            assert!(case.passed, "{}: {:?}", case.name, case.checked.anomalies);
        }
    }

    #[test]
    fn every_invariant_has_a_planted_case() {
        let planted: Vec<&str> = plants().iter().map(|(id, _, _)| *id).collect();
        for (id, _) in crate::checker::INVARIANTS {
            assert!(planted.contains(&id), "no self-test case plants {id}");
        }
    }

    #[test]
    fn duplicates_of_unknown_sends_are_allowed_and_counted_apart() {
        let mut h = clean();
        h.sends.push(send(1, KEY, 60, Outcome::Info, None, 12.0));
        final_read(&mut h, KEY).records.extend([(10, 60), (11, 60)]);
        let checked = check(&h);
        assert!(checked.clean(), "{:?}", checked.anomalies);
        assert_eq!(checked.info_duplicates, 1);
    }

    #[test]
    fn values_retention_removed_are_expired_not_lost_and_reads_start_at_the_log_start() {
        let mut h = clean();
        // Retention cut KEY's first four offsets before anything read them (one replica cut one more): the
        // first poll found its position gone and started over at the log start.
        for p in h.polls.iter_mut().filter(|p| p.key == KEY) {
            p.from = p.from.max(4);
            p.records.retain(|(o, _)| *o >= 4);
        }
        let r = final_read(&mut h, KEY);
        r.start = 4;
        r.records.retain(|(o, _)| *o >= 4);
        for replica in h.replica_reads.iter_mut().filter(|r| r.key == KEY) {
            replica.start = if replica.node == Some(2) { 5 } else { 4 };
            let start = replica.start;
            replica.records.retain(|(o, _)| *o >= start);
        }
        let checked = check(&h);
        assert!(checked.clean(), "{:?}", checked.anomalies);
        assert_eq!(checked.expired, 4);
        assert_eq!((checked.keys_cut, checked.highest_log_start), (1, 4));
        // A value missing above the log start is still lost.
        final_read(&mut h, KEY).records.retain(|(o, _)| *o != 6);
        for r in h.replica_reads.iter_mut().filter(|r| r.key == KEY) {
            r.records.retain(|(o, _)| *o != 6);
        }
        for p in &mut h.polls {
            p.records.retain(|(o, _)| *o != 6);
        }
        let checked = check(&h);
        assert_eq!(checked.count("I1"), 1, "{:?}", checked.anomalies);
    }

    #[test]
    fn values_beyond_every_read_are_unseen_not_lost() {
        let mut h = clean();
        h.sends.push(send(1, KEY, 61, Outcome::Ok, Some(10), 12.0));
        let checked = check(&h);
        assert_eq!(checked.count("I1"), 0);
        assert_eq!(checked.unseen, 1);
    }
}
