//! The data volume's free space, and the floor under which this node refuses produce requests.
//!
//! RocksDB treats a failed WAL write or fsync as fatal: the node's Raft groups stop and only a restart
//! with free space brings them back. So a leader refuses produce requests with `DISK_FULL`, before
//! anything is written, while the volume under its data directory has less than
//! [`BrokerConfig::min_free_bytes`](crate::broker::BrokerConfig) free. Retention, topic deletion and
//! replication still run, so space can be won back; the refusal lifts by itself once it is. The free
//! space is sampled every [`SAMPLE_INTERVAL`]; the floor must cover what is written between samples.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The default floor: enough for a few seconds of writes at full speed, the memtables' flush and
/// RocksDB's own bookkeeping.
pub const MIN_FREE_DEFAULT: u64 = 256 << 20;

const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The free space of one volume, as last sampled.
pub struct DiskGuard {
    path: PathBuf,
    floor: u64,
    free: AtomicU64,
}

impl DiskGuard {
    /// Watches the volume holding `path`; samples it once now.
    pub fn new(path: PathBuf, floor: u64) -> std::io::Result<Self> {
        let guard = Self { path, floor, free: AtomicU64::new(u64::MAX) };
        guard.sample()?;
        Ok(guard)
    }

    /// Reads the volume's free space (what an unprivileged writer may use) and keeps it.
    pub fn sample(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.path)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        self.free.store(free, Ordering::Relaxed);
        Ok(free)
    }

    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The free bytes, when they are under the floor.
    pub fn short(&self) -> Option<u64> {
        let free = self.free();
        (free < self.floor).then_some(free)
    }
}

/// Samples the volume until `stop` fires, logging when it crosses the floor either way.
pub async fn run(guard: Arc<DiskGuard>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // Starting short is worth a warning too.
    let mut was_short = false;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        match guard.sample() {
            Ok(free) => {
                failing = false;
                let short = free < guard.floor;
                if short && !was_short {
                    tracing::warn!(
                        free,
                        floor = guard.floor,
                        path = %guard.path.display(),
                        "the data volume is under its free-space floor: produce requests are refused"
                    );
                } else if !short && was_short {
                    tracing::info!(free, floor = guard.floor, "the data volume is above its free-space floor again");
                }
                was_short = short;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(path = %guard.path.display(), "cannot read the data volume's free space: {e}");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_is_short_and_zero_never_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let free = DiskGuard::new(dir.path().to_path_buf(), 0).expect("statvfs");
        assert!(free.free() > 0 && free.free() < u64::MAX);
        assert_eq!(free.short(), None);
        let full = DiskGuard::new(dir.path().to_path_buf(), u64::MAX).expect("statvfs");
        assert_eq!(full.short(), Some(full.free()));
        let missing = DiskGuard::new(dir.path().join("missing"), 0);
        assert!(missing.is_err());
    }
}
