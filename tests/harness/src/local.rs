//! The `local` target: N `flotilla-broker` processes on 127.0.0.x, each peer link through a [`Proxy`].
//!
//! Node `i` listens on 127.0.0.(10+i). Node A's Raft traffic to node B goes through proxy (A, B), so a
//! partition cuts Raft links only: clients and request forwarding still reach every node, as in Jepsen's
//! iptables rules on the Raft port. Processes are killed, stopped and continued by pid; only processes
//! this target started are ever signalled.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::history::NodeLogLine;
use crate::host::{CLOCK_FILE, DataDirs, FakeClocks, STORAGE_FAILED, faketime_env};
use crate::lazyfs::{DiskFaults, Lost};
use crate::proxy::{PacketFaults, Proxy};
use crate::target::{Setup, Target, panics_in};

pub struct Node {
    pub id: u64,
    pub addr: SocketAddr,
    log: PathBuf,
    routes: String,
    child: Option<Child>,
    paused: bool,
    /// Where the node's log stood when its disk was filled or failed: an exit on a storage failure logged
    /// after it is the expected end of a node whose disk gave out, not an unexpected exit.
    disk_fault_at: Option<u64>,
}

pub struct LocalCluster {
    pub nodes: BTreeMap<u64, Node>,
    proxies: BTreeMap<(u64, u64), Proxy>,
    /// Nodes that exited without being told to, with how.
    unexpected_exits: Vec<NodeLogLine>,
    broker: PathBuf,
    initial_cluster: String,
    dirs: DataDirs,
    /// The nodes' fake wall clocks, when the run has clock faults (S8).
    clocks: Option<FakeClocks>,
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
    /// Starts `n` nodes (at most 200) with their data under `dir`, each data directory of the kind
    /// `setup` names, and every broker under libfaketime if it asks for fake clocks.
    pub async fn start(n: u64, dir: &Path, broker: PathBuf, setup: Setup) -> anyhow::Result<LocalCluster> {
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
                log: dir.join(format!("node-{id}.log")),
                routes,
                child: None,
                paused: false,
                disk_fault_at: None,
            };
            nodes.insert(id, node);
        }
        let dirs = DataDirs::make(setup.data_dir, dir, addrs.keys().copied())?;
        let clocks = if setup.fake_clocks { Some(FakeClocks::make(dir, addrs.keys().copied())?) } else { None };
        let mut cluster =
            LocalCluster { nodes, proxies, unexpected_exits: Vec::new(), broker, initial_cluster, dirs, clocks };
        for id in 1..=n {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    fn node(&mut self, id: u64) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))
    }

    /// Notes where node `id`'s log stands as its disk gives out.
    fn mark_disk_fault(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if node.disk_fault_at.is_none() {
            node.disk_fault_at = Some(std::fs::metadata(&node.log).map_or(0, |m| m.len()));
        }
        Ok(())
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
        let data_dir = self.dirs.path(id)?.to_path_buf();
        let mut env: Vec<(&str, String)> = self.dirs.broker_env().into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        if let Some(clocks) = &self.clocks {
            env.extend(faketime_env(clocks.lib(), &clocks.dir(id)?.join(CLOCK_FILE)));
        }
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
        let child = Command::new(&broker)
            .envs(env)
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(node.addr.to_string())
            .arg("--initial-cluster")
            .arg(&cluster)
            .arg("--raft-peer-routes")
            .arg(&node.routes)
            // Scenarios with retention (S17) want cuts often; without retention configs a pass is cheap.
            .args(["--retention-check-interval-ms", "1000"])
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
        FakeClocks::of(&mut self.clocks)?.set(id, offset)
    }

    fn strobe_clock(&mut self, id: u64, offset: f64, period: Duration) -> anyhow::Result<()> {
        FakeClocks::of(&mut self.clocks)?.strobe(id, offset, period)
    }

    fn fill_disk(&mut self, id: u64, leave: u64) -> anyhow::Result<()> {
        self.mark_disk_fault(id)?;
        self.dirs.fill(id, leave)
    }

    fn set_disk_faults(&mut self, id: u64, faults: DiskFaults) -> anyhow::Result<()> {
        self.mark_disk_fault(id)?;
        self.dirs.set_faults(id, faults)
    }

    /// Puts the disk right; a node that stopped on a storage failure since the fault is started again.
    fn heal_disk(&mut self, id: u64) -> anyhow::Result<()> {
        let healed = self.dirs.heal(id);
        let node = self.node(id)?;
        let since = node.disk_fault_at.take().unwrap_or(0);
        let log = std::fs::read(&node.log).unwrap_or_default();
        let failed = String::from_utf8_lossy(log.get(since as usize..).unwrap_or_default()).contains(STORAGE_FAILED);
        if failed && let Some(child) = node.child.as_mut() {
            // The broker exits right after it logs the failure; give it the moment to finish.
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if child.try_wait()?.is_some() {
                node.child = None;
                node.paused = false;
            }
        }
        self.start_node(id)?;
        healed
    }

    /// Drops what the node's lazy filesystem holds unfsynced. The node must have been killed (and reaped).
    fn lose_unfsynced(&mut self, id: u64) -> anyhow::Result<Lost> {
        if self.node(id)?.child.is_some() {
            bail!("node {id} is running: kill it before dropping its unfsynced writes");
        }
        self.dirs.lose_unfsynced(id)
    }

    /// Heals every link, continues every paused node and starts every stopped one.
    fn heal_all(&mut self) -> anyhow::Result<()> {
        for p in self.proxies.values() {
            p.set_cut(false);
            p.set_packet_faults(PacketFaults::default());
        }
        if let Some(clocks) = &mut self.clocks {
            clocks.reset_all()?;
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
        self.dirs.release();
        self.clocks = None;
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
        // Only now that no broker is left on them.
        self.dirs.release();
    }
}
