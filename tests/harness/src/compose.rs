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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::history::NodeLogLine;
use crate::target::{Target, panics_in};

/// The image `deploy/build-image.sh` builds.
pub const IMAGE: &str = "flotilla:latest";
const PORT: u16 = 9401;

pub struct ComposeCluster {
    project: String,
    file: PathBuf,
    dir: PathBuf,
    compose: Vec<String>,
    /// id -> container address.
    ips: BTreeMap<u64, String>,
    /// Nodes the nemesis stopped (so a node found down otherwise exited on its own).
    down: BTreeSet<u64>,
    paused: BTreeSet<u64>,
    /// Cut links (from, to), whether or not `from` is running now (re-applied when it starts).
    cuts: BTreeSet<(u64, u64)>,
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

/// The compose file of `n` nodes on `subnet` (`a.b.c`), project `project`.
pub fn compose_file(project: &str, subnet: &str, n: u64) -> String {
    let initial: Vec<String> = (1..=n).map(|id| format!("{id}={subnet}.{}:{PORT}", 10 + id)).collect();
    let mut out = String::from("# Written by flotilla-harness for one run; removed with the run.\nservices:\n");
    for id in 1..=n {
        let ip = format!("{subnet}.{}", 10 + id);
        out.push_str(&format!(
            r#"  node{id}:
    image: {IMAGE}
    container_name: {project}-node{id}
    restart: "no"
    environment:
      FLOTILLA_NODE_ID: "{id}"
      FLOTILLA_DATA_DIR: /data
      FLOTILLA_LISTEN: "{ip}:{PORT}"
      FLOTILLA_INITIAL_CLUSTER: "{initial}"
      FLOTILLA_RETENTION_CHECK_INTERVAL_MS: "1000"
    networks: {{ net: {{ ipv4_address: {ip} }} }}
    volumes: ["node{id}-data:/data"]
"#,
            initial = initial.join(",")
        ));
    }
    out.push_str(&format!("networks:\n  net:\n    ipam:\n      config: [{{ subnet: {subnet}.0/24 }}]\nvolumes:\n"));
    for id in 1..=n {
        out.push_str(&format!("  node{id}-data:\n"));
    }
    out
}

impl ComposeCluster {
    /// Writes the compose file under `dir` and starts `n` nodes (at most 200).
    pub fn start(n: u64, dir: &Path, seed: u64) -> anyhow::Result<ComposeCluster> {
        if !(1..=200).contains(&n) {
            bail!("--nodes must be between 1 and 200");
        }
        docker(&["info", "--format", "{{.ServerVersion}}"]).context("the compose target needs a Docker engine")?;
        docker(&["image", "inspect", "--format", "{{.Id}}", IMAGE]).with_context(|| {
            format!("image {IMAGE} is missing; build it with FLOTILLA_IMAGE_PROFILE=dev deploy/build-image.sh")
        })?;
        let compose = compose_command()?;
        let pid = u64::from(std::process::id());
        let project = format!("flotilla-h{}-{pid}", seed % 100_000);
        // A /24 of 10.231.0.0/16 chosen by the run, away from docker's default pools.
        let subnet = format!("10.231.{}", (seed ^ pid) % 250 + 1);
        let file = dir.join("docker-compose.yml");
        std::fs::write(&file, compose_file(&project, &subnet, n))?;
        let ips = (1..=n).map(|id| (id, format!("{subnet}.{}", 10 + id))).collect();
        let cluster = ComposeCluster {
            project,
            file,
            dir: dir.to_path_buf(),
            compose,
            ips,
            down: BTreeSet::new(),
            paused: BTreeSet::new(),
            cuts: BTreeSet::new(),
            unexpected_exits: Vec::new(),
            saved_logs: BTreeMap::new(),
            stopped: false,
        };
        cluster.compose(&["up", "-d"]).context("starting the compose stack")?;
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

    fn running(&self, id: u64) -> anyhow::Result<bool> {
        Ok(docker(&["inspect", "--format", "{{.State.Running}}", &self.container(id)])? == "true")
    }

    fn unpause(&mut self, id: u64) -> anyhow::Result<()> {
        if self.paused.remove(&id) {
            docker(&["unpause", &self.container(id)])?;
        }
        Ok(())
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
        if !self.down.contains(&id) && self.paused.insert(id) {
            docker(&["pause", &self.container(id)])?;
        }
        Ok(())
    }

    fn set_cut(&mut self, from: u64, to: u64, cut: bool) -> anyhow::Result<()> {
        if cut && self.cuts.insert((from, to)) {
            self.iptables(from, to, "-A")?;
        } else if !cut && self.cuts.remove(&(from, to)) {
            self.iptables(from, to, "-D")?;
        }
        Ok(())
    }

    fn heal_all(&mut self) -> anyhow::Result<()> {
        for (from, to) in std::mem::take(&mut self.cuts) {
            self.iptables(from, to, "-D")?;
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
        }
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
        let file = compose_file("p", "10.231.7", 3);
        for id in 1..=3 {
            assert!(file.contains(&format!("container_name: p-node{id}")), "{file}");
            assert!(file.contains(&format!("ipv4_address: 10.231.7.{}", 10 + id)), "{file}");
            assert!(file.contains(&format!("node{id}-data:/data")), "{file}");
        }
        assert!(file.contains("1=10.231.7.11:9401,2=10.231.7.12:9401,3=10.231.7.13:9401"), "{file}");
        assert!(file.contains("subnet: 10.231.7.0/24"), "{file}");
    }
}
