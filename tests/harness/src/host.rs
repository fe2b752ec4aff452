//! What the harness makes on the host for each node, whichever target runs it: the node's data directory
//! of the scenario's kind, and its fake wall clock (S8). The local target hands these paths to its broker
//! processes; the compose target bind-mounts them into the containers, so every fault below works the same
//! on both.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::lazyfs::{DiskFaults, LazyMount, Lost};
use crate::scenario::DataDir;

/// The free-space floor brokers get on volumes of their own.
const VOLUME_MIN_FREE: &str = "32MiB";
/// What a broker logs when its storage fails, just before it exits: the expected end of a node whose
/// disk gave out.
pub const STORAGE_FAILED: &str = "storage failed";
const FILLER: &str = "harness-filler";

/// Every node's data directory on the host.
pub struct DataDirs {
    kind: DataDir,
    dirs: BTreeMap<u64, PathBuf>,
    /// Lazy filesystems serving the data directories, by node.
    lazy: BTreeMap<u64, LazyMount>,
    /// Where each node's volume is mounted: the backing directory its lazy mount serves.
    volumes: BTreeMap<u64, PathBuf>,
}

/// Mounts a tmpfs of `bytes` on `dir`.
fn mount_volume(dir: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "flotilla-harness"])
        .arg(dir)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("cannot mount a {bytes}-byte tmpfs on {} (scenarios that fill disks need root)", dir.display());
    }
    Ok(())
}

impl DataDirs {
    /// Makes `node-<id>` under `dir` for every id, of kind `kind`.
    pub fn make(kind: DataDir, dir: &Path, ids: impl IntoIterator<Item = u64>) -> anyhow::Result<DataDirs> {
        let mut out = DataDirs { kind, dirs: BTreeMap::new(), lazy: BTreeMap::new(), volumes: BTreeMap::new() };
        for id in ids {
            let data = dir.join(format!("node-{id}"));
            let backing = dir.join(format!("node-{id}.backing"));
            match kind {
                DataDir::Plain => std::fs::create_dir_all(&data)?,
                DataDir::Lazy => {
                    out.lazy.insert(id, LazyMount::mount(&backing, &data)?);
                }
                DataDir::LazyVolume(bytes) => {
                    // Recorded at once: Drop unmounts whatever was mounted if a later step fails.
                    mount_volume(&backing, bytes)?;
                    out.volumes.insert(id, backing.clone());
                    out.lazy.insert(id, LazyMount::mount(&backing, &data)?);
                }
            }
            out.dirs.insert(id, data);
        }
        Ok(out)
    }

    /// Node `id`'s data directory.
    pub fn path(&self, id: u64) -> anyhow::Result<&Path> {
        self.dirs.get(&id).map(PathBuf::as_path).with_context(|| format!("no node {id}"))
    }

    /// Flags every broker needs on these directories.
    pub fn broker_env(&self) -> Vec<(&'static str, &'static str)> {
        match self.kind {
            DataDir::LazyVolume(_) => vec![("FLOTILLA_MIN_FREE_BYTES", VOLUME_MIN_FREE)],
            DataDir::Plain | DataDir::Lazy => Vec::new(),
        }
    }

    fn volume(&self, id: u64) -> anyhow::Result<&Path> {
        match self.volumes.get(&id) {
            Some(v) => Ok(v),
            None => bail!("node {id}'s data directory is not a volume of its own: only S14 fills disks"),
        }
    }

    fn lazy(&self, id: u64, what: &str) -> anyhow::Result<&LazyMount> {
        match self.lazy.get(&id) {
            Some(m) => Ok(m),
            None => bail!("node {id}'s data directory is not a lazy filesystem: only S9 and S14 {what}"),
        }
    }

    /// Writes a filler file into node `id`'s volume until it is full, then gives back `leave` bytes.
    /// The filler is written to the backing volume directly, not through the lazy mount (which would
    /// hold it in memory until an fsync), so it takes the space at once; the broker sees it as
    /// `harness-filler` in its data directory.
    pub fn fill(&self, id: u64, leave: u64) -> anyhow::Result<()> {
        let path = self.volume(id)?.join(FILLER);
        let mut filler = OpenOptions::new().create(true).append(true).open(&path)?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match filler.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
            }
        }
        let len = filler.metadata()?.len();
        filler.set_len(len.saturating_sub(leave))?;
        Ok(())
    }

    /// Makes node `id`'s disk fail or slow down (S14); `DiskFaults::default()` heals it.
    pub fn set_faults(&self, id: u64, faults: DiskFaults) -> anyhow::Result<()> {
        self.lazy(id, "fail disks")?.set_faults(faults);
        Ok(())
    }

    /// Puts node `id`'s disk right: every fault cleared, the filler removed.
    pub fn heal(&self, id: u64) -> anyhow::Result<()> {
        if let Some(mount) = self.lazy.get(&id) {
            mount.set_faults(DiskFaults::default());
        }
        if let Some(volume) = self.volumes.get(&id) {
            let path = volume.join(FILLER);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        Ok(())
    }

    /// Drops what node `id`'s lazy filesystem holds unfsynced. Call it only once the node's process is
    /// gone: its last requests to the filesystem were then answered or dropped, so none lands after.
    pub fn lose_unfsynced(&self, id: u64) -> anyhow::Result<Lost> {
        Ok(self.lazy(id, "drop unfsynced writes")?.lose_unfsynced())
    }

    /// Unmounts everything. Call it only once no broker uses the directories.
    pub fn release(&mut self) {
        self.lazy.clear();
        for (_, volume) in std::mem::take(&mut self.volumes) {
            let _ = Command::new("umount").arg("-l").arg(&volume).status();
        }
    }
}

impl Drop for DataDirs {
    fn drop(&mut self) {
        self.release();
    }
}

/// Where Debian and others put libfaketime's multi-threaded variant; `FLOTILLA_FAKETIME_LIB` overrides.
const FAKETIME_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib64/faketime/libfaketimeMT.so.1",
];

fn faketime_lib() -> anyhow::Result<PathBuf> {
    if let Some(lib) = std::env::var_os("FLOTILLA_FAKETIME_LIB") {
        // Absolute: the compose target bind-mounts it.
        return Ok(std::path::absolute(lib)?);
    }
    match FAKETIME_LIBS.iter().map(PathBuf::from).find(|p| p.exists()) {
        Some(lib) => Ok(lib),
        None => bail!("clock faults need libfaketime (Debian: apt-get install libfaketime; deploy/prereqs.sh does)"),
    }
}

/// The name of the offset file in each node's clock directory.
pub const CLOCK_FILE: &str = "offset";

/// Writes a libfaketime offset ("+600.250" seconds) atomically: the broker may read the file at any time.
/// The file is replaced by a rename inside its directory, so a directory bind-mounted into a container
/// shows the new file.
fn write_clock(path: &Path, offset: f64) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset:+.3}\n"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The environment that runs a broker under libfaketime with its wall clock read from `clock_file`.
/// Only the wall clock is faked, re-read every second; Raft's timers run on the monotonic one.
pub fn faketime_env(lib: &Path, clock_file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", clock_file.display().to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ("FAKETIME_CACHE_DURATION", "1".into()),
    ]
}

struct Strobe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Strobe {
    /// Stops the strobing thread and waits for it: no write of the clock file comes after.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Every node's wall-clock offset, each in a directory of its own (`clock-<id>/offset`).
pub struct FakeClocks {
    lib: PathBuf,
    dirs: BTreeMap<u64, PathBuf>,
    /// Threads strobing a node's clock, by node.
    strobes: BTreeMap<u64, Strobe>,
}

impl FakeClocks {
    /// Finds libfaketime and sets every node's clock right.
    pub fn make(dir: &Path, ids: impl IntoIterator<Item = u64>) -> anyhow::Result<FakeClocks> {
        let mut clocks = FakeClocks { lib: faketime_lib()?, dirs: BTreeMap::new(), strobes: BTreeMap::new() };
        for id in ids {
            let d = dir.join(format!("clock-{id}"));
            std::fs::create_dir_all(&d)?;
            write_clock(&d.join(CLOCK_FILE), 0.0)?;
            clocks.dirs.insert(id, d);
        }
        Ok(clocks)
    }

    /// A run's clocks, or why it has none.
    pub fn of(clocks: &mut Option<FakeClocks>) -> anyhow::Result<&mut FakeClocks> {
        clocks
            .as_mut()
            .context("this run's brokers were started without libfaketime: only runs with clock faults set clocks")
    }

    pub fn lib(&self) -> &Path {
        &self.lib
    }

    /// Node `id`'s clock directory.
    pub fn dir(&self, id: u64) -> anyhow::Result<&Path> {
        self.dirs.get(&id).map(PathBuf::as_path).with_context(|| format!("no node {id}"))
    }

    /// Sets node `id`'s wall clock `offset` seconds off; 0 puts it right. Stops a strobe.
    pub fn set(&mut self, id: u64, offset: f64) -> anyhow::Result<()> {
        if let Some(strobe) = self.strobes.remove(&id) {
            strobe.stop();
        }
        write_clock(&self.dir(id)?.join(CLOCK_FILE), offset)
    }

    /// Flips node `id`'s wall clock between `offset` and right every `period`, until `set`.
    pub fn strobe(&mut self, id: u64, offset: f64, period: Duration) -> anyhow::Result<()> {
        self.set(id, offset)?;
        let path = self.dir(id)?.join(CLOCK_FILE);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut off = true;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(period);
                off = !off;
                let _ = write_clock(&path, if off { offset } else { 0.0 });
            }
        });
        self.strobes.insert(id, Strobe { stop, thread });
        Ok(())
    }

    /// Puts every clock right.
    pub fn reset_all(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.dirs.keys().copied().collect();
        ids.into_iter().try_for_each(|id| self.set(id, 0.0))
    }
}

impl Drop for FakeClocks {
    fn drop(&mut self) {
        for (_, strobe) in std::mem::take(&mut self.strobes) {
            strobe.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_file_is_replaced_whole_and_reads_as_a_faketime_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CLOCK_FILE);
        write_clock(&path, -600.25).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "-600.250\n");
        write_clock(&path, 0.0).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "+0.000\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, [CLOCK_FILE], "no temporary file is left beside it");
    }
}
