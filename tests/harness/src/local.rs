//! The `local` target: N `flotilla-broker` processes on 127.0.0.x, each peer link through a [`Proxy`].
//!
//! Node `i` listens on 127.0.0.(10+i). Node A's Raft traffic to node B goes through proxy (A, B), so a
//! partition cuts Raft links only: clients and request forwarding still reach every node, as in Jepsen's
//! iptables rules on the Raft port. Processes are killed, stopped and continued by pid; only processes
//! this target started are ever signalled.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::history::NodeLogLine;
use crate::lazyfs::{LazyMount, Lost};
use crate::proxy::{PacketFaults, Proxy};
use crate::scenario::DataDir;
use crate::target::{Target, panics_in};

pub struct Node {
    pub id: u64,
    pub addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    /// libfaketime's timestamp file: the node's wall-clock offset (S8).
    clock: PathBuf,
    routes: String,
    child: Option<Child>,
    paused: bool,
    /// Where the node's log stood when its disk was filled: an exit on a storage failure logged after it
    /// is the expected end of a node with a full disk, not an unexpected exit.
    filled_at: Option<u64>,
}

pub struct LocalCluster {
    pub nodes: BTreeMap<u64, Node>,
    proxies: BTreeMap<(u64, u64), Proxy>,
    /// Nodes that exited without being told to, with how.
    unexpected_exits: Vec<NodeLogLine>,
    broker: PathBuf,
    initial_cluster: String,
    /// Data directories mounted as volumes of their own (S14), unmounted when the cluster stops.
    volumes: Vec<PathBuf>,
    /// Flags every broker gets besides the usual ones.
    extra_args: Vec<String>,
    /// Data directories served by a lazy filesystem (S9), by node; unmounted when the cluster stops.
    lazy: BTreeMap<u64, LazyMount>,
    /// libfaketime, preloaded into every broker when the run has clock faults (S8).
    faketime: Option<PathBuf>,
    /// Threads strobing a node's clock, by node.
    strobes: BTreeMap<u64, Strobe>,
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

/// Where Debian and others put libfaketime's multi-threaded variant; `FLOTILLA_FAKETIME_LIB` overrides.
const FAKETIME_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib64/faketime/libfaketimeMT.so.1",
];

fn faketime_lib() -> anyhow::Result<PathBuf> {
    if let Some(lib) = std::env::var_os("FLOTILLA_FAKETIME_LIB") {
        return Ok(PathBuf::from(lib));
    }
    match FAKETIME_LIBS.iter().map(PathBuf::from).find(|p| p.exists()) {
        Some(lib) => Ok(lib),
        None => bail!("clock faults need libfaketime (Debian: apt-get install libfaketime; deploy/prereqs.sh does)"),
    }
}

/// Writes a libfaketime offset ("+600.250" seconds) atomically: the broker may read the file at any time.
fn write_clock(path: &Path, offset: f64) -> anyhow::Result<()> {
    let tmp = path.with_extension("clock.tmp");
    std::fs::write(&tmp, format!("{offset:+.3}\n"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The free-space floor brokers get on volumes of their own.
const VOLUME_MIN_FREE: &str = "32MiB";
const FILLER: &str = "harness-filler";

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

fn node_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8))
}

/// Sends `signal` (e.g. "-STOP") to a process this harness started.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(signal).arg(pid.to_string()).status().context("running kill")?;
    if !status.success() {
        bail!("kill {signal} {pid} failed");
    }
    Ok(())
}

impl LocalCluster {
    /// Starts `n` nodes (at most 200) with their data under `dir`, each data directory as `data_dir` says:
    /// a tmpfs that `fill_disk` fills, or a lazy filesystem whose unfsynced writes `lose_unfsynced` drops.
    /// With `fake_clocks`, every broker runs under libfaketime, its wall clock set through `set_clock`.
    pub async fn start(
        n: u64,
        dir: &Path,
        broker: PathBuf,
        data_dir: DataDir,
        fake_clocks: bool,
    ) -> anyhow::Result<LocalCluster> {
        if !(1..=200).contains(&n) {
            bail!("--nodes must be between 1 and 200");
        }
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            addrs.insert(id, SocketAddr::new(node_ip(id), flotilla_cli::unused_port(node_ip(id))?));
        }
        let initial_cluster = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        let mut proxies = BTreeMap::new();
        for &from in addrs.keys() {
            for (&to, &target) in &addrs {
                if from != to {
                    let proxy = Proxy::start(SocketAddr::new(node_ip(from), 0), target).await?;
                    proxies.insert((from, to), proxy);
                }
            }
        }
        let mut nodes = BTreeMap::new();
        for (&id, &addr) in &addrs {
            let routes = proxies
                .iter()
                .filter(|((from, _), _)| *from == id)
                .map(|((_, to), p)| format!("{to}={}", p.addr))
                .collect::<Vec<_>>()
                .join(",");
            let node = Node {
                id,
                addr,
                data_dir: dir.join(format!("node-{id}")),
                log: dir.join(format!("node-{id}.log")),
                clock: dir.join(format!("node-{id}.clock")),
                routes,
                child: None,
                paused: false,
                filled_at: None,
            };
            nodes.insert(id, node);
        }
        let mut cluster = LocalCluster {
            nodes,
            proxies,
            unexpected_exits: Vec::new(),
            broker,
            initial_cluster,
            volumes: Vec::new(),
            extra_args: Vec::new(),
            lazy: BTreeMap::new(),
            faketime: None,
            strobes: BTreeMap::new(),
        };
        if fake_clocks {
            cluster.faketime = Some(faketime_lib()?);
            for node in cluster.nodes.values() {
                write_clock(&node.clock, 0.0)?;
            }
        }
        match data_dir {
            DataDir::Plain => {}
            DataDir::Volume(bytes) => {
                cluster.extra_args = vec!["--min-free-bytes".into(), VOLUME_MIN_FREE.into()];
                let dirs: Vec<PathBuf> = cluster.nodes.values().map(|n| n.data_dir.clone()).collect();
                for dir in dirs {
                    // Recorded first: Drop unmounts whatever was mounted if a later step fails.
                    mount_volume(&dir, bytes)?;
                    cluster.volumes.push(dir);
                }
            }
            DataDir::Lazy => {
                for (&id, node) in &cluster.nodes {
                    let backing = dir.join(format!("node-{id}.backing"));
                    cluster.lazy.insert(id, LazyMount::mount(&backing, &node.data_dir)?);
                }
            }
        }
        for id in 1..=n {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    fn node(&mut self, id: u64) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))
    }

    fn stop_strobes(&mut self) {
        for (_, strobe) in std::mem::take(&mut self.strobes) {
            strobe.stop();
        }
    }

    fn unmount_volumes(&mut self) {
        for dir in self.volumes.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

impl Target for LocalCluster {
    fn name(&self) -> &'static str {
        "local"
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn addr(&self, id: u64) -> Option<String> {
        self.nodes.get(&id).map(|n| n.addr.to_string())
    }

    /// Starts a node that is not running (its data kept).
    fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let broker = self.broker.clone();
        let cluster = self.initial_cluster.clone();
        let extra_args = self.extra_args.clone();
        let faketime = self.faketime.clone();
        let node = self.node(id)?;
        let exited = match node.child.as_mut() {
            Some(child) => child.try_wait()?,
            None => None,
        };
        if let Some(status) = exited {
            node.child = None;
            let line = format!("exited on its own ({status}); restarted");
            self.unexpected_exits.push(NodeLogLine { node: id, line });
        }
        let node = self.node(id)?;
        if node.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = Command::new(&broker);
        if let Some(lib) = faketime {
            // Only the wall clock is faked, re-read every second; Raft's timers run on the monotonic one.
            command
                .env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &node.clock)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        let child = command
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen")
            .arg(node.addr.to_string())
            .arg("--initial-cluster")
            .arg(&cluster)
            .arg("--raft-peer-routes")
            .arg(&node.routes)
            // Scenarios with retention (S17) want cuts often; without retention configs a pass is cheap.
            .args(["--retention-check-interval-ms", "1000"])
            .args(&extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", broker.display()))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// kill -9.
    fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        node.paused = false;
        Ok(())
    }

    /// SIGTERM, then kill -9 if the node has not stopped within `grace`.
    fn terminate(&mut self, id: u64, grace: Duration) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let Some(mut child) = node.child.take() else { return Ok(()) };
        if node.paused {
            signal(child.id(), "-CONT")?;
            node.paused = false;
        }
        signal(child.id(), "-TERM")?;
        let deadline = Instant::now() + grace;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGSTOP (true) or SIGCONT (false).
    fn set_paused(&mut self, id: u64, paused: bool) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if let Some(child) = &node.child
            && node.paused != paused
        {
            signal(child.id(), if paused { "-STOP" } else { "-CONT" })?;
            node.paused = paused;
        }
        Ok(())
    }

    /// Cuts or heals the Raft link `from` -> `to`.
    fn set_cut(&mut self, from: u64, to: u64, cut: bool) -> anyhow::Result<()> {
        if let Some(p) = self.proxies.get(&(from, to)) {
            p.set_cut(cut);
        }
        Ok(())
    }

    /// Delays and loses what crosses the Raft link `from` -> `to`, in its proxy.
    fn set_packet_faults(&mut self, from: u64, to: u64, faults: PacketFaults) -> anyhow::Result<()> {
        if let Some(p) = self.proxies.get(&(from, to)) {
            p.set_packet_faults(faults);
        }
        Ok(())
    }

    fn set_clock(&mut self, id: u64, offset: f64) -> anyhow::Result<()> {
        if self.faketime.is_none() {
            bail!("this run's brokers were started without libfaketime: only runs with clock faults set clocks");
        }
        if let Some(strobe) = self.strobes.remove(&id) {
            strobe.stop();
        }
        write_clock(&self.node(id)?.clock, offset)
    }

    fn strobe_clock(&mut self, id: u64, offset: f64, period: Duration) -> anyhow::Result<()> {
        self.set_clock(id, offset)?;
        let path = self.node(id)?.clock.clone();
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

    /// Writes a filler file into the node's volume until it is full, then gives back `leave` bytes.
    fn fill_disk(&mut self, id: u64, leave: u64) -> anyhow::Result<()> {
        let volumes = self.volumes.clone();
        let node = self.node(id)?;
        if !volumes.contains(&node.data_dir) {
            bail!("node {id}'s data directory is not a volume of its own: only S14 fills disks");
        }
        node.filled_at = Some(std::fs::metadata(&node.log).map_or(0, |m| m.len()));
        let path = node.data_dir.join(FILLER);
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

    /// Removes the filler; a node that exited on the storage failure since is started again.
    fn free_disk(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let path = node.data_dir.join(FILLER);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        let since = node.filled_at.take().unwrap_or(0);
        if let Some(child) = node.child.as_mut()
            && child.try_wait()?.is_some()
        {
            let log = std::fs::read(&node.log).unwrap_or_default();
            let after = String::from_utf8_lossy(log.get(since as usize..).unwrap_or_default());
            if after.contains("storage failed") {
                node.child = None;
                node.paused = false;
            }
        }
        self.start_node(id)
    }

    /// Drops what the node's lazy filesystem holds unfsynced. The node must have been killed (and reaped):
    /// its last requests to the filesystem were then answered or dropped, so none lands after the loss.
    fn lose_unfsynced(&mut self, id: u64) -> anyhow::Result<Lost> {
        if self.node(id)?.child.is_some() {
            bail!("node {id} is running: kill it before dropping its unfsynced writes");
        }
        match self.lazy.get(&id) {
            Some(mount) => Ok(mount.lose_unfsynced()),
            None => bail!("node {id}'s data directory is not a lazy filesystem: only S9 drops unfsynced writes"),
        }
    }

    /// Heals every link, continues every paused node and starts every stopped one.
    fn heal_all(&mut self) -> anyhow::Result<()> {
        for p in self.proxies.values() {
            p.set_cut(false);
            p.set_packet_faults(PacketFaults::default());
        }
        if self.faketime.is_some() {
            for id in self.ids() {
                self.set_clock(id, 0.0)?;
            }
        }
        for id in self.ids() {
            self.set_paused(id, false)?;
            self.start_node(id)?;
        }
        Ok(())
    }

    /// Stops every node (continued first if paused): SIGTERM, then kill -9 after a grace period.
    fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.terminate(id, Duration::from_secs(5));
        }
        self.unmount_volumes();
        self.lazy.clear();
        self.stop_strobes();
    }

    /// Lines of the node logs that report a panic or a failed assertion, and nodes that exited on their own.
    fn panic_lines(&self) -> Vec<NodeLogLine> {
        let mut out = self.unexpected_exits.clone();
        for node in self.nodes.values() {
            let Ok(text) = std::fs::read_to_string(&node.log) else { continue };
            out.extend(panics_in(node.id, &text));
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.unmount_volumes();
        // Only now that no broker is left on them.
        self.lazy.clear();
        self.stop_strobes();
    }
}
