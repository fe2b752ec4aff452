//! The `compose` target: the `flotilla` image under docker-compose, one container per node on a private
//! network of the run's own.
//!
//! The harness writes the compose file into the work directory (its own project name, subnet and volumes)
//! and drives the containers through the docker CLI: `docker kill -s KILL`, `docker stop`, `docker start`,
//! `docker pause` / `unpause`. A cut Raft link `A -> B` is an iptables rule in A's network namespace
//! (entered from the host with `nsenter`, so the image needs no tools) dropping what A sends to B's
//! port: the connections A dials to B stall, as with the local target's proxies. Clients on the host
//! reach the containers' addresses over the docker bridge. Only this run's containers, network and
//! volumes are touched, and `stop_all` removes them.
//!
//! Faults the kernel or the `FROM scratch` image cannot play inside a container are played from the host:
//! - packet faults (S7): this kernel has no `tc netem`, so a run with packet faults routes every Raft link
//!   `A -> B` (`FLOTILLA_RAFT_PEER_ROUTES`) through a [`Proxy`] of the harness listening on the network's
//!   gateway address, which delays and loses what crosses it and also cuts the link;
//! - data directories of other kinds (S9, S14): the lazy filesystem and the small volume are made on the
//!   host ([`DataDirs`]) and bind-mounted at `/data`;
//! - clocks (S8): the host's libfaketime and each node's clock directory are bind-mounted read-only and
//!   preloaded, as on the local target.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::history::NodeLogLine;
use crate::host::{CLOCK_FILE, DataDirs, FakeClocks, STORAGE_FAILED, faketime_env};
use crate::lazyfs::{DiskFaults, Lost};
use crate::proxy::{PacketFaults, Proxy};
use crate::scenario::DataDir;
use crate::target::{Setup, Target, panics_in};

/// The image `deploy/build-image.sh` builds.
pub const IMAGE: &str = "flotilla:latest";
const PORT: u16 = 9401;
/// Where the host's libfaketime and a node's clock directory appear inside its container.
const FAKETIME_IN_CONTAINER: &str = "/usr/lib/faketime/libfaketimeMT.so.1";
const CLOCK_IN_CONTAINER: &str = "/run/flotilla-clock";

pub struct ComposeCluster {
    project: String,
    file: PathBuf,
    dir: PathBuf,
    compose: Vec<String>,
    /// id -> container address.
    ips: BTreeMap<u64, String>,
    /// Nodes the nemesis stopped (so a node found down otherwise exited on its own).
    down: BTreeSet<u64>,
    /// Paused nodes, each with how: `true` when by SIGSTOP to its process (the cgroup freezer failed).
    paused: BTreeMap<u64, bool>,
    /// Cut links (from, to), whether or not `from` is running now (re-applied when it starts).
    cuts: BTreeSet<(u64, u64)>,
    /// The proxy of each Raft link, in runs with packet faults; their links are cut there, not by iptables.
    proxies: BTreeMap<(u64, u64), Proxy>,
    /// Data directories made on the host and bind-mounted; `None` for the deployment's named volumes.
    dirs: Option<DataDirs>,
    clocks: Option<FakeClocks>,
    /// How many storage failures each node had logged when its disk was filled or failed.
    disk_fault_at: BTreeMap<u64, usize>,
    unexpected_exits: Vec<NodeLogLine>,
    /// Each node's log, saved before the containers are removed.
    saved_logs: BTreeMap<u64, String>,
    stopped: bool,
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&run(Command::new("docker").args(args))?.stdout).trim().to_owned())
}

/// `docker compose` where the plugin exists, else the standalone `docker-compose`.
fn compose_command() -> anyhow::Result<Vec<String>> {
    if Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!("neither `docker compose` nor docker-compose is installed")
}

/// What one node's container gets besides the common settings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Bind mounts (`host:container[:ro]`); with none for `/data`, the node gets a named volume there.
    pub mounts: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A YAML double-quoted string, with `$` doubled so compose does not interpolate it. The strings are
/// paths and settings the harness makes, printable ASCII.
fn quoted(s: &str) -> String {
    format!("{:?}", s.replace('$', "$$"))
}

/// The compose file of one node per `specs` entry on `subnet` (`a.b.c`), project `project`.
pub fn compose_file(project: &str, subnet: &str, specs: &BTreeMap<u64, NodeSpec>) -> String {
    let initial: Vec<String> = specs.keys().map(|id| format!("{id}={subnet}.{}:{PORT}", 10 + id)).collect();
    let mut out = String::from("# Written by flotilla-harness for one run; removed with the run.\nservices:\n");
    let mut named = Vec::new();
    for (id, spec) in specs {
        let ip = format!("{subnet}.{}", 10 + id);
        let mut env = vec![
            ("FLOTILLA_NODE_ID".to_string(), id.to_string()),
            ("FLOTILLA_DATA_DIR".into(), "/data".into()),
            ("FLOTILLA_LISTEN".into(), format!("{ip}:{PORT}")),
            ("FLOTILLA_INITIAL_CLUSTER".into(), initial.join(",")),
            ("FLOTILLA_RETENTION_CHECK_INTERVAL_MS".into(), "1000".into()),
        ];
        env.extend(spec.env.iter().cloned());
        let mut mounts: Vec<String> = spec.mounts.iter().map(|m| quoted(m)).collect();
        if !spec.mounts.iter().any(|m| m.split(':').nth(1) == Some("/data")) {
            mounts.insert(0, quoted(&format!("node{id}-data:/data")));
            named.push(*id);
        }
        out.push_str(&format!(
            "  node{id}:\n    image: {IMAGE}\n    container_name: {project}-node{id}\n    restart: \"no\"\n    environment:\n"
        ));
        for (k, v) in env {
            out.push_str(&format!("      {k}: {}\n", quoted(&v)));
        }
        out.push_str(&format!(
            "    networks: {{ net: {{ ipv4_address: {ip} }} }}\n    volumes: [{}]\n",
            mounts.join(", ")
        ));
    }
    out.push_str(&format!("networks:\n  net:\n    ipam:\n      config: [{{ subnet: {subnet}.0/24 }}]\n"));
    if !named.is_empty() {
        out.push_str("volumes:\n");
        for id in named {
            out.push_str(&format!("  node{id}-data:\n"));
        }
    }
    out
}

impl ComposeCluster {
    /// Writes the compose file under `dir` and starts `n` nodes (at most 200), with what `setup` asks for.
    pub async fn start(n: u64, dir: &Path, seed: u64, setup: Setup) -> anyhow::Result<ComposeCluster> {
        if !(1..=200).contains(&n) {
            bail!("--nodes must be between 1 and 200");
        }
        // Bind-mount sources must be absolute: compose reads a relative one as a volume name.
        let dir = &std::path::absolute(dir)?;
        docker(&["info", "--format", "{{.ServerVersion}}"]).context("the compose target needs a Docker engine")?;
        docker(&["image", "inspect", "--format", "{{.Id}}", IMAGE]).with_context(|| {
            format!("image {IMAGE} is missing; build it with FLOTILLA_IMAGE_PROFILE=dev deploy/build-image.sh")
        })?;
        let compose = compose_command()?;
        let pid = u64::from(std::process::id());
        let project = format!("flotilla-h{}-{pid}", seed % 100_000);
        // A /24 of 10.231.0.0/16 chosen by the run, away from docker's default pools.
        let subnet = format!("10.231.{}", (seed ^ pid) % 250 + 1);
        let ids: Vec<u64> = (1..=n).collect();
        let ips: BTreeMap<u64, String> = ids.iter().map(|&id| (id, format!("{subnet}.{}", 10 + id))).collect();
        let dirs = match setup.data_dir {
            DataDir::Plain => None,
            kind => Some(DataDirs::make(kind, dir, ids.iter().copied())?),
        };
        let clocks = if setup.fake_clocks { Some(FakeClocks::make(dir, ids.iter().copied())?) } else { None };
        let gateway: IpAddr = format!("{subnet}.1").parse()?;
        // Proxy ports are picked before the network (and so the gateway address) exists: free on loopback.
        let mut links = BTreeMap::new();
        if setup.packet_faults {
            for &from in &ids {
                for &to in ids.iter().filter(|&&to| to != from) {
                    let port = flotilla_cli::unused_port(IpAddr::from([127, 0, 0, 1]))?;
                    links.insert((from, to), SocketAddr::new(gateway, port));
                }
            }
        }
        let mut specs = BTreeMap::new();
        for &id in &ids {
            let mut spec = NodeSpec::default();
            if let Some(dirs) = &dirs {
                spec.mounts.push(format!("{}:/data", dirs.path(id)?.display()));
                spec.env.extend(dirs.broker_env().into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
            }
            if let Some(clocks) = &clocks {
                spec.mounts.push(format!("{}:{FAKETIME_IN_CONTAINER}:ro", clocks.lib().display()));
                spec.mounts.push(format!("{}:{CLOCK_IN_CONTAINER}:ro", clocks.dir(id)?.display()));
                let file = Path::new(CLOCK_IN_CONTAINER).join(CLOCK_FILE);
                spec.env.extend(
                    faketime_env(Path::new(FAKETIME_IN_CONTAINER), &file).into_iter().map(|(k, v)| (k.to_owned(), v)),
                );
            }
            let routes: Vec<String> =
                links.iter().filter(|((from, _), _)| *from == id).map(|((_, to), a)| format!("{to}={a}")).collect();
            if !routes.is_empty() {
                spec.env.push(("FLOTILLA_RAFT_PEER_ROUTES".into(), routes.join(",")));
            }
            specs.insert(id, spec);
        }
        let file = dir.join("docker-compose.yml");
        std::fs::write(&file, compose_file(&project, &subnet, &specs))?;
        let mut cluster = ComposeCluster {
            project,
            file,
            dir: dir.to_path_buf(),
            compose,
            ips,
            down: BTreeSet::new(),
            paused: BTreeMap::new(),
            cuts: BTreeSet::new(),
            proxies: BTreeMap::new(),
            dirs,
            clocks,
            disk_fault_at: BTreeMap::new(),
            unexpected_exits: Vec::new(),
            saved_logs: BTreeMap::new(),
            stopped: false,
        };
        // The network first, so the proxies can listen on its gateway; then the nodes.
        cluster.compose(&["up", "--no-start"]).context("creating the compose stack")?;
        for (&(from, to), &listen) in &links {
            let target: SocketAddr = format!("{}:{PORT}", cluster.ip(to)?).parse()?;
            let proxy = Proxy::start(listen, target)
                .await
                .with_context(|| format!("cannot listen on {listen} for the Raft link {from}->{to}"))?;
            cluster.proxies.insert((from, to), proxy);
        }
        cluster.compose(&["start"]).context("starting the compose stack")?;
        Ok(cluster)
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..]).arg("-f").arg(&self.file).arg("-p").arg(&self.project).args(args);
        run(&mut cmd)
    }

    fn container(&self, id: u64) -> String {
        format!("{}-node{id}", self.project)
    }

    fn ip(&self, id: u64) -> anyhow::Result<&str> {
        self.ips.get(&id).map(String::as_str).with_context(|| format!("no node {id}"))
    }

    /// The pid of the node's container on the host, if it runs.
    fn pid(&self, id: u64) -> anyhow::Result<Option<u32>> {
        let pid: u32 = docker(&["inspect", "--format", "{{.State.Pid}}", &self.container(id)])?.parse()?;
        Ok((pid != 0).then_some(pid))
    }

    /// Adds (`-A`) or deletes (`-D`) the rule cutting `from` -> `to` in `from`'s network namespace.
    fn iptables(&self, from: u64, to: u64, op: &str) -> anyhow::Result<()> {
        let Some(pid) = self.pid(from)? else { return Ok(()) };
        let port = PORT.to_string();
        run(Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "iptables", op, "OUTPUT", "-d"]).args([
            self.ip(to)?,
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "DROP",
        ]))?;
        Ok(())
    }

    fn dirs(&self) -> anyhow::Result<&DataDirs> {
        self.dirs.as_ref().context("this run's nodes keep their data on named volumes: only S9 and S14 make their own")
    }

    /// How many storage failures node `id` has logged (0 if its log cannot be read).
    fn storage_failures(&self, id: u64) -> usize {
        match Command::new("docker").args(["logs", &self.container(id)]).output() {
            Ok(out) => [&out.stdout, &out.stderr]
                .iter()
                .map(|b| String::from_utf8_lossy(b).matches(STORAGE_FAILED).count())
                .sum(),
            Err(_) => 0,
        }
    }

    fn mark_disk_fault(&mut self, id: u64) {
        if !self.disk_fault_at.contains_key(&id) {
            let count = self.storage_failures(id);
            self.disk_fault_at.insert(id, count);
        }
    }

    fn running(&self, id: u64) -> anyhow::Result<bool> {
        Ok(docker(&["inspect", "--format", "{{.State.Running}}", &self.container(id)])? == "true")
    }

    fn unpause(&mut self, id: u64) -> anyhow::Result<()> {
        match self.paused.remove(&id) {
            Some(false) => {
                docker(&["unpause", &self.container(id)])?;
            }
            Some(true) => {
                if let Some(pid) = self.pid(id)? {
                    run(Command::new("kill").args(["-CONT", &pid.to_string()]))?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// `docker pause` (the cgroup freezer), tried three times: under load the freezer can time out
    /// ("unable to freeze"). Then SIGSTOP to the container's process from the host, which the broker,
    /// its pid namespace's init, cannot refuse from an ancestor namespace. Returns whether it took SIGSTOP.
    fn pause(&self, id: u64) -> anyhow::Result<bool> {
        let container = self.container(id);
        let mut last = None;
        for _ in 0..3 {
            match docker(&["pause", &container]) {
                Ok(_) => return Ok(false),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let Some(pid) = self.pid(id)? else {
            return Err(last.unwrap_or_else(|| anyhow::anyhow!("{container} is not running")));
        };
        eprintln!("flotilla-harness: docker pause {container} failed ({last:?}); SIGSTOP to pid {pid} instead");
        run(Command::new("kill").args(["-STOP", &pid.to_string()]))?;
        Ok(true)
    }

    fn save_logs(&mut self) {
        for id in self.ids() {
            let out = Command::new("docker").args(["logs", &self.container(id)]).output();
            if let Ok(out) = out {
                let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                let _ = std::fs::write(self.dir.join(format!("node-{id}.log")), &text);
                self.saved_logs.insert(id, text);
            }
        }
    }
}

impl Target for ComposeCluster {
    fn name(&self) -> &'static str {
        "compose"
    }

    fn ids(&self) -> Vec<u64> {
        self.ips.keys().copied().collect()
    }

    fn addr(&self, id: u64) -> Option<String> {
        self.ips.get(&id).map(|ip| format!("{ip}:{PORT}"))
    }

    fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.unpause(id)?;
        // A node already down (it exited on its own) stays down; `start_node` reports that exit.
        if self.running(id)? {
            docker(&["kill", "--signal", "KILL", &self.container(id)])?;
            self.down.insert(id);
        }
        Ok(())
    }

    fn terminate(&mut self, id: u64, grace: Duration) -> anyhow::Result<()> {
        self.unpause(id)?;
        if self.running(id)? {
            docker(&["stop", "--time", &grace.as_secs().max(1).to_string(), &self.container(id)])?;
            self.down.insert(id);
        }
        Ok(())
    }

    fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        if self.running(id)? {
            return Ok(());
        }
        if !self.down.contains(&id) {
            let status =
                docker(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &self.container(id)])?;
            self.unexpected_exits
                .push(NodeLogLine { node: id, line: format!("exited on its own ({status}); restarted") });
        }
        docker(&["start", &self.container(id)])?;
        self.down.remove(&id);
        // A new container process has a fresh network namespace: its cuts are put back.
        let cuts: Vec<(u64, u64)> = self.cuts.iter().filter(|(from, _)| *from == id).copied().collect();
        for (from, to) in cuts {
            self.iptables(from, to, "-A")?;
        }
        Ok(())
    }

    fn set_paused(&mut self, id: u64, paused: bool) -> anyhow::Result<()> {
        if !paused {
            return self.unpause(id);
        }
        if !self.down.contains(&id) && !self.paused.contains_key(&id) {
            let by_signal = self.pause(id)?;
            self.paused.insert(id, by_signal);
        }
        Ok(())
    }

    fn set_cut(&mut self, from: u64, to: u64, cut: bool) -> anyhow::Result<()> {
        if let Some(proxy) = self.proxies.get(&(from, to)) {
            proxy.set_cut(cut);
            return Ok(());
        }
        if cut && self.cuts.insert((from, to)) {
            self.iptables(from, to, "-A")?;
        } else if !cut && self.cuts.remove(&(from, to)) {
            self.iptables(from, to, "-D")?;
        }
        Ok(())
    }

    fn set_packet_faults(&mut self, from: u64, to: u64, faults: PacketFaults) -> anyhow::Result<()> {
        match self.proxies.get(&(from, to)) {
            Some(proxy) => {
                proxy.set_packet_faults(faults);
                Ok(())
            }
            None => {
                bail!("the Raft link {from}->{to} has no proxy: only runs with packet faults route links through one")
            }
        }
    }

    fn set_clock(&mut self, id: u64, offset: f64) -> anyhow::Result<()> {
        FakeClocks::of(&mut self.clocks)?.set(id, offset)
    }

    fn strobe_clock(&mut self, id: u64, offset: f64, period: Duration) -> anyhow::Result<()> {
        FakeClocks::of(&mut self.clocks)?.strobe(id, offset, period)
    }

    fn fill_disk(&mut self, id: u64, leave: u64) -> anyhow::Result<()> {
        self.mark_disk_fault(id);
        self.dirs()?.fill(id, leave)
    }

    fn set_disk_faults(&mut self, id: u64, faults: DiskFaults) -> anyhow::Result<()> {
        self.mark_disk_fault(id);
        self.dirs()?.set_faults(id, faults)
    }

    /// Puts the disk right; a node that stopped on a storage failure since the fault is started again.
    fn heal_disk(&mut self, id: u64) -> anyhow::Result<()> {
        let healed = self.dirs()?.heal(id);
        let before = self.disk_fault_at.remove(&id).unwrap_or(0);
        if !self.down.contains(&id) && self.storage_failures(id) > before {
            // The broker exits right after it logs the failure; give it the moment to finish.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while self.running(id)? && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !self.running(id)? {
                self.down.insert(id);
            }
        }
        self.start_node(id)?;
        healed
    }

    /// Drops what the node's lazy filesystem holds unfsynced, once its container has stopped.
    fn lose_unfsynced(&mut self, id: u64) -> anyhow::Result<Lost> {
        if self.running(id)? {
            bail!("node {id} is running: kill it before dropping its unfsynced writes");
        }
        // The container's process is gone and reaped once `docker wait` returns.
        docker(&["wait", &self.container(id)])?;
        self.dirs()?.lose_unfsynced(id)
    }

    fn heal_all(&mut self) -> anyhow::Result<()> {
        for (from, to) in std::mem::take(&mut self.cuts) {
            self.iptables(from, to, "-D")?;
        }
        for proxy in self.proxies.values() {
            proxy.set_cut(false);
            proxy.set_packet_faults(PacketFaults::default());
        }
        if let Some(clocks) = &mut self.clocks {
            clocks.reset_all()?;
        }
        for id in self.ids() {
            self.unpause(id)?;
            self.start_node(id)?;
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        if self.stopped {
            return;
        }
        for id in self.ids() {
            let _ = self.unpause(id);
        }
        let _ = self.compose(&["stop", "--timeout", "5"]);
        self.save_logs();
        if let Err(e) = self.compose(&["down", "--volumes"]) {
            eprintln!("flotilla-harness: could not remove compose project {}: {e:#}", self.project);
            // No container may keep the host's mounts busy when they are released below.
            for id in self.ids() {
                let _ = docker(&["rm", "--force", &self.container(id)]);
            }
        }
        // Only now that no container uses them.
        if let Some(dirs) = &mut self.dirs {
            dirs.release();
        }
        self.clocks = None;
        self.proxies.clear();
        self.stopped = true;
    }

    fn panic_lines(&self) -> Vec<NodeLogLine> {
        let mut out = self.unexpected_exits.clone();
        for (id, text) in &self.saved_logs {
            out.extend(panics_in(*id, text));
        }
        out
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compose_file_gives_every_node_its_address_volume_and_the_whole_initial_cluster() {
        let mut specs: BTreeMap<u64, NodeSpec> = (1..=3).map(|id| (id, NodeSpec::default())).collect();
        let file = compose_file("p", "10.231.7", &specs);
        for id in 1..=3 {
            assert!(file.contains(&format!("container_name: p-node{id}")), "{file}");
            assert!(file.contains(&format!("ipv4_address: 10.231.7.{}", 10 + id)), "{file}");
            assert!(file.contains(&format!("\"node{id}-data:/data\"")), "{file}");
            assert!(file.contains(&format!("  node{id}-data:\n")), "{file}");
        }
        assert!(file.contains("\"1=10.231.7.11:9401,2=10.231.7.12:9401,3=10.231.7.13:9401\""), "{file}");
        assert!(file.contains("subnet: 10.231.7.0/24"), "{file}");

        // A node whose data directory the harness made gets it bind-mounted instead of a named volume.
        specs.insert(
            2,
            NodeSpec {
                mounts: vec!["/w/node-2:/data".into(), "/lib/ft.so:/usr/lib/ft.so:ro".into()],
                env: vec![("LD_PRELOAD".into(), "/usr/lib/ft.so".into())],
            },
        );
        let file = compose_file("p", "10.231.7", &specs);
        assert!(file.contains("volumes: [\"/w/node-2:/data\", \"/lib/ft.so:/usr/lib/ft.so:ro\"]"), "{file}");
        assert!(file.contains("LD_PRELOAD: \"/usr/lib/ft.so\""), "{file}");
        assert!(!file.contains("node2-data"), "{file}");
        assert!(file.contains("  node1-data:\n"), "{file}");
    }
}
