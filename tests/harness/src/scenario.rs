//! Scenarios by name (FAILOVER.md section 2) and the faults each runs.

use anyhow::bail;

use crate::nemesis::FaultKind;

pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    pub faults: &'static [FaultKind],
    /// Partitions per topic unless `--partitions` says otherwise.
    pub partitions: u32,
    /// Configs of every topic the workload creates.
    pub topic_configs: &'static [(&'static str, &'static str)],
    /// Writers cut sends off mid-request and crash (S18).
    pub client_faults: bool,
    /// A gate: after each fault that stops some nodes (not all), every partition has a live leader
    /// again within this many seconds.
    pub releader_limit: Option<f64>,
}

/// Three times the brokers' longest election timeout (`RaftTiming`'s default, 1 s): FAILOVER.md's bound
/// for re-electing every partition after a crash (S2) or a bounce (S16).
const REELECT_3X: f64 = 3.0;

/// What a node's data directory is: what the run's faults need ([`data_dir_for`]). The harness makes it on the host ([`crate::host::DataDirs`]); the
/// compose target bind-mounts it into the node's container, except `Plain`, which is the deployment's own
/// named volume there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// A directory under the run's work directory.
    Plain,
    /// A [`crate::lazyfs`] mount that holds file data until fsync, which the lose-unfsynced fault drops (S9).
    Lazy,
    /// A lazy mount over a tmpfs of its own of this many bytes (S14): the disk-full fault fills the tmpfs,
    /// the disk-fail and slow-disk faults act through the mount.
    LazyVolume(u64),
}

/// A scenario of 4 partitions per topic, default topic configs, well-behaved clients.
const fn plain(name: &'static str, title: &'static str, faults: &'static [FaultKind]) -> Scenario {
    Scenario { name, title, faults, partitions: 4, topic_configs: &[], client_faults: false, releader_limit: None }
}

const SCENARIOS: &[Scenario] = &[
    plain("S1", "baseline, no faults", &[]),
    Scenario {
        releader_limit: Some(REELECT_3X),
        ..plain("S2", "crash loop (kill -9, often a leader)", &[FaultKind::Kill])
    },
    plain("S3", "whole-cluster crash", &[FaultKind::KillAll]),
    plain("S4", "pause (stale leader)", &[FaultKind::Pause]),
    plain("S5", "pause + kill", &[FaultKind::Kill, FaultKind::Pause]),
    plain("S6", "network partitions", &[FaultKind::Partition]),
    Scenario {
        releader_limit: Some(REELECT_3X),
        ..plain("S16", "rolling bounce chasing the leader", &[FaultKind::Bounce])
    },
    Scenario {
        // About 60 entries of one small record each: with brokers checking retention every second, logs
        // are cut and purged every few seconds, so a follower down for one fault interval must install a
        // snapshot to catch up.
        topic_configs: &[("retention.bytes", "4096")],
        ..plain(
            "S17",
            "snapshot catch-up: retention cuts every few seconds while followers are down or cut off",
            &[FaultKind::Kill, FaultKind::Partition],
        )
    },
    Scenario {
        client_faults: true,
        ..plain(
            "S18",
            "client faults: sends cut off mid-request and writers crashing, under kill -9",
            &[FaultKind::Kill],
        )
    },
    Scenario {
        partitions: 334,
        // Every group has a leader within the recovery gate (FAILOVER.md S19).
        releader_limit: Some(30.0),
        ..plain(
            "S19",
            "multi-raft scale: 1,000 partitions under kill, pause and partitions",
            &[FaultKind::Kill, FaultKind::Pause, FaultKind::Partition],
        )
    },
    plain(
        "S14",
        "disk faults on a leader or a follower: full (ENOSPC), failing (EIO), slow; under kill -9",
        &[FaultKind::DiskFull, FaultKind::DiskFail, FaultKind::DiskSlow, FaultKind::Kill],
    ),
    plain("S7", "packet faults: delay, jitter and loss on Raft links", &[FaultKind::Packet]),
    plain("S8", "clock faults: wall clocks stepped and strobed per node (libfaketime)", &[FaultKind::Clock]),
    plain(
        "S9",
        "lost unfsynced writes: kill -9 one node, or every node, and drop what it had not fsynced",
        &[FaultKind::LoseUnfsynced],
    ),
    plain("S20", "general chaos: every kind of fault, one at a time in a seeded order", &FaultKind::ALL),
];

/// The data directory every node needs for `faults`: a lazy mount over a small volume of its own for disk
/// faults, a lazy mount for lost unfsynced writes, else a plain directory.
pub fn data_dir_for(faults: &[FaultKind]) -> DataDir {
    let disk = [FaultKind::DiskFull, FaultKind::DiskFail, FaultKind::DiskSlow];
    if faults.iter().any(|f| disk.contains(f)) {
        DataDir::LazyVolume(256 << 20)
    } else if faults.contains(&FaultKind::LoseUnfsynced) {
        DataDir::Lazy
    } else {
        DataDir::Plain
    }
}

/// Scenarios of FAILOVER.md that need fault primitives the harness does not have yet.
const NOT_YET: &[(&str, &str)] = &[("S15", "membership changes do not exist yet")];

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
        let e = find("S15").err().expect("S15 is not runnable yet").to_string();
        assert!(e.contains("membership"), "{e}");
        assert!(find("S99").is_err());
    }

    #[test]
    fn data_directories_follow_the_faults_that_need_them() {
        assert_eq!(data_dir_for(&[FaultKind::Kill, FaultKind::Partition]), DataDir::Plain);
        assert_eq!(data_dir_for(find("S9").expect("S9").faults), DataDir::Lazy);
        assert_eq!(data_dir_for(find("S14").expect("S14").faults), DataDir::LazyVolume(256 << 20));
        assert_eq!(data_dir_for(find("S20").expect("S20").faults), DataDir::LazyVolume(256 << 20));
    }
}
