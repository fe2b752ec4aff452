//! Scenarios by name (FAILOVER.md section 2) and the faults each runs.

use anyhow::bail;

use crate::nemesis::FaultKind;

pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    pub faults: &'static [FaultKind],
    /// Partitions per topic unless `--partitions` says otherwise.
    pub partitions: u32,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "S1", title: "baseline, no faults", faults: &[], partitions: 4 },
    Scenario { name: "S2", title: "crash loop (kill -9, often a leader)", faults: &[FaultKind::Kill], partitions: 4 },
    Scenario { name: "S3", title: "whole-cluster crash", faults: &[FaultKind::KillAll], partitions: 4 },
    Scenario { name: "S4", title: "pause (stale leader)", faults: &[FaultKind::Pause], partitions: 4 },
    Scenario { name: "S5", title: "pause + kill", faults: &[FaultKind::Kill, FaultKind::Pause], partitions: 4 },
    Scenario { name: "S6", title: "network partitions", faults: &[FaultKind::Partition], partitions: 4 },
    Scenario { name: "S16", title: "rolling bounce chasing the leader", faults: &[FaultKind::Bounce], partitions: 4 },
    Scenario {
        name: "S19",
        title: "multi-raft scale: 1,000 partitions under kill, pause and partitions",
        faults: &[FaultKind::Kill, FaultKind::Pause, FaultKind::Partition],
        partitions: 334,
    },
    Scenario {
        name: "S20",
        title: "general chaos",
        faults: &[FaultKind::Kill, FaultKind::Term, FaultKind::Pause, FaultKind::Partition, FaultKind::KillAll],
        partitions: 4,
    },
];

/// Scenarios of FAILOVER.md that need fault primitives the local target does not have yet.
const NOT_YET: &[(&str, &str)] = &[
    ("S7", "packet faults need tc netem (compose target)"),
    ("S8", "clock faults need libfaketime"),
    ("S9", "losing unfsynced writes needs a lazyfs data directory"),
    ("S14", "disk faults need a small volume or a faulty filesystem"),
    ("S15", "membership changes do not exist yet"),
    ("S17", "retention does not purge logs yet, so no follower needs a snapshot"),
    ("S18", "client crashes mid-request are not scripted yet"),
];

pub fn all() -> &'static [Scenario] {
    SCENARIOS
}

pub fn find(name: &str) -> anyhow::Result<&'static Scenario> {
    let upper = name.to_ascii_uppercase();
    if let Some(s) = SCENARIOS.iter().find(|s| s.name == upper) {
        return Ok(s);
    }
    if let Some((_, why)) = NOT_YET.iter().find(|(n, _)| *n == upper) {
        bail!("scenario {upper} cannot run yet: {why}");
    }
    let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
    bail!("unknown scenario {name:?}; known: {}", known.join(", "))
}

pub fn not_yet() -> &'static [(&'static str, &'static str)] {
    NOT_YET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_are_found_by_name_and_missing_ones_say_why() {
        assert_eq!(find("s6").expect("S6").faults, &[FaultKind::Partition]);
        let e = find("S9").err().expect("S9 is not runnable yet").to_string();
        assert!(e.contains("lazyfs"), "{e}");
        assert!(find("S99").is_err());
    }
}
