//! B10 of BENCH.md: failover under B6 load. Kills the partition leader with SIGKILL while records flow at
//! a fixed rate, restarts it, and reports how long acknowledgements stopped, the latency tail around the
//! election, and whether every acknowledged record is still there.
//!
//! It needs processes it may kill, so it starts its own three brokers on free 127.0.0.1 ports in a
//! temporary directory (the `flotilla-broker` found beside `flotilla` or on PATH) and stops them, by their
//! own handles, when it ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::broker as pb;

use crate::bench::{Report, Tally};
use crate::client::Client;

/// B6's shape: records per second, senders, record size.
const RATE: u64 = 10_000;
const SENDERS: u32 = 256;
const MESSAGE_BYTES: usize = 1024;
/// How long the private cluster gets to elect its controller and the topic's leader.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// What B10 measured.
pub struct FailoverReport {
    pub load: Report,
    pub killed_node: u64,
    pub kill_at_s: f64,
    pub restart_at_s: f64,
    /// The longest time with no acknowledgement completing, from the kill on.
    pub unavailable_ms: f64,
    /// Latency (from the intended send time) p99.9 of sends intended within 5 s after the kill.
    pub p999_after_kill_ms: f64,
    /// Latency p99 of sends intended from the restart on: the killed node's return, as the leader sends it
    /// what it missed.
    pub p99_after_restart_ms: f64,
    pub acked: u64,
    /// Acknowledged records missing from the log (or found with another value) after the run.
    pub lost: u64,
}

impl FailoverReport {
    pub fn line(&self) -> String {
        format!(
            "{}; leader (node {}) killed at {:.1} s, restarted at {:.1} s: no acknowledgement for {:.0} ms, p99.9 after the kill {:.1} ms, p99 after the restart {:.1} ms; {} acknowledged, {} lost",
            self.load.line(),
            self.killed_node,
            self.kill_at_s,
            self.restart_at_s,
            self.unavailable_ms,
            self.p999_after_kill_ms,
            self.p99_after_restart_ms,
            self.acked,
            self.lost
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let mut v = self.load.json();
        v["killed_node"] = self.killed_node.into();
        v["kill_at_s"] = self.kill_at_s.into();
        v["restart_at_s"] = self.restart_at_s.into();
        v["unavailable_ms"] = self.unavailable_ms.into();
        v["p999_after_kill_ms"] = self.p999_after_kill_ms.into();
        v["p99_after_restart_ms"] = self.p99_after_restart_ms.into();
        v["acked"] = self.acked.into();
        v["lost"] = self.lost.into();
        v
    }
}

/// Brokers this benchmark started and may kill.
struct PrivateCluster {
    dir: PathBuf,
    broker: PathBuf,
    addrs: Vec<String>,
    children: Vec<Option<tokio::process::Child>>,
}

impl PrivateCluster {
    fn start(nodes: usize) -> anyhow::Result<Self> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("flotilla-b10-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let addrs = (0..nodes)
            .map(|_| crate::unused_port(std::net::Ipv4Addr::LOCALHOST.into()).map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_, _>>()?;
        let mut c = PrivateCluster {
            dir,
            broker: crate::broker_binary()?,
            addrs,
            children: (0..nodes).map(|_| None).collect(),
        };
        for i in 0..nodes {
            c.spawn(i)?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial: Vec<String> = self.addrs.iter().enumerate().map(|(j, a)| format!("{}={a}", j + 1)).collect();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("node-{}.log", i + 1)))?;
        let id = i as u64 + 1;
        let child = crate::spawn_broker(
            &self.broker,
            id,
            &self.dir,
            &self.addrs[i],
            &initial.join(","),
            None,
            crate::worker_threads_per_broker(self.addrs.len() as u64),
            log,
        )?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Stops every broker (waiting for each) and removes the data.
    async fn stop(mut self) {
        for i in 0..self.children.len() {
            self.kill(i).await;
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One acknowledged send: when it completed, and where its value landed.
struct Ack {
    done_s: f64,
    offset: u64,
    value: u64,
}

/// Runs B10 for `warmup + duration`: the leader is killed a third into the measured time and restarted two
/// thirds in.
pub async fn run(duration: Duration, warmup: Duration) -> anyhow::Result<FailoverReport> {
    let mut cluster = PrivateCluster::start(3)?;
    let client = Arc::new(Client::new(cluster.addrs.clone()));
    let topic = "b10";
    let ready = tokio::time::timeout(READY_LIMIT, async {
        loop {
            if client.create_topic(topic, 1, 3, vec![]).await.is_ok()
                || client.describe_topic(topic).await.is_ok_and(|t| t.partitions.first().is_some_and(|p| p.leader != 0))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    ready.await.map_err(|_| anyhow::anyhow!("the private cluster was not ready within {READY_LIMIT:?}"))?;

    let tally = Tally::new();
    let after_kill = Mutex::new(crate::bench::new_histogram());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let start = Instant::now();
    let end = start + warmup + duration;
    let kill_at = warmup + duration / 3;
    let restart_at = warmup + duration * 2 / 3;
    let after_kill = Arc::new(after_kill);
    let after_restart = Arc::new(Mutex::new(crate::bench::new_histogram()));
    let interval = Duration::from_secs_f64(f64::from(SENDERS) / RATE as f64);
    // Half-random values, as every benchmark shape sends (`bench::Payloads`); the first 8 bytes carry the
    // sender and sequence the loss check looks for.
    let payloads = crate::bench::Payloads::new(MESSAGE_BYTES);
    let mut senders = Vec::new();
    for w in 0..SENDERS {
        let (client, tally, acks) = (client.clone(), tally.clone(), acks.clone());
        let (after_kill, after_restart, payloads) = (after_kill.clone(), after_restart.clone(), payloads.clone());
        senders.push(tokio::spawn(async move {
            // Spread the senders' schedules over one interval.
            let mut next_send = start + interval * w / SENDERS;
            let mut seq = 0u64;
            while next_send < end {
                let now = Instant::now();
                if next_send > now {
                    tokio::time::sleep(next_send - now).await;
                }
                let value = (u64::from(w) << 40) | seq;
                seq += 1;
                let record = pb::Record {
                    key: None,
                    value: Some(payloads.stamped(seq as usize, value)),
                    headers: vec![],
                    timestamp_ms: 0,
                };
                let sent = client.produce(topic, Some(0), vec![record]).await;
                let latency = next_send.elapsed();
                let intended = next_send.duration_since(start);
                match sent {
                    Ok(ack) => {
                        let done_s = start.elapsed().as_secs_f64();
                        acks.lock().unwrap_or_else(|p| p.into_inner()).push(Ack {
                            done_s,
                            offset: ack.base_offset,
                            value,
                        });
                        if intended >= warmup {
                            tally.records.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tally.bytes.fetch_add(MESSAGE_BYTES as u64, std::sync::atomic::Ordering::Relaxed);
                            tally.latency(latency);
                            let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
                            if intended >= kill_at && intended < kill_at + Duration::from_secs(5) {
                                let _ = after_kill.lock().unwrap_or_else(|p| p.into_inner()).record(micros);
                            }
                            if intended >= restart_at {
                                let _ = after_restart.lock().unwrap_or_else(|p| p.into_inner()).record(micros);
                            }
                        }
                    }
                    Err(_) => {
                        tally.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                next_send += interval;
            }
        }));
    }
    let progress = tally.progress();

    tokio::time::sleep_until((start + kill_at).into()).await;
    let leader = client.describe_topic(topic).await.ok().and_then(|t| t.partitions.first().map(|p| p.leader));
    let killed_node = leader.filter(|l| (1..=3).contains(l)).context("no leader known at the kill")?;
    cluster.kill(killed_node as usize - 1).await;
    eprintln!("  killed the leader, node {killed_node}");
    tokio::time::sleep_until((start + restart_at).into()).await;
    cluster.spawn(killed_node as usize - 1)?;
    eprintln!("  restarted node {killed_node}");
    for s in senders {
        let _ = s.await;
    }
    progress.abort();

    let mut acks = std::mem::take(&mut *acks.lock().unwrap_or_else(|p| p.into_inner()));
    acks.sort_by(|a, b| a.done_s.total_cmp(&b.done_s));
    let kill_s = kill_at.as_secs_f64();
    let mut unavailable = 0f64;
    let mut last = kill_s;
    for a in acks.iter().filter(|a| a.done_s >= kill_s) {
        unavailable = unavailable.max(a.done_s - last);
        last = a.done_s;
    }
    let lost = lost_acks(&client, topic, &acks).await;
    cluster.stop().await;
    let lost = lost?;
    let h = after_kill.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let back = after_restart.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(FailoverReport {
        load: tally.report(duration.as_secs_f64(), "ack", None),
        killed_node,
        kill_at_s: kill_s,
        restart_at_s: restart_at.as_secs_f64(),
        unavailable_ms: unavailable * 1000.0,
        p999_after_kill_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
        p99_after_restart_ms: back.value_at_quantile(0.99) as f64 / 1000.0,
        acked: acks.len() as u64,
        lost,
    })
}

/// Reads the partition back and counts acknowledgements whose offset does not hold their value (or was not
/// read within a minute).
async fn lost_acks(client: &Client, topic: &str, acks: &[Ack]) -> anyhow::Result<u64> {
    let mut log: HashMap<u64, u64> = HashMap::with_capacity(acks.len());
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client.fetch(topic, 0, next, 4 << 20, 0).await?;
        for r in &resp.records {
            let v = r.value.as_ref().filter(|v| v.len() >= 8).map(|v| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v[..8]);
                u64::from_be_bytes(b)
            });
            if let Some(v) = v {
                log.insert(r.offset, v);
            }
            next = r.offset + 1;
        }
        if next >= resp.high_watermark || Instant::now() > deadline {
            break;
        }
        if resp.records.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(acks.iter().filter(|a| log.get(&a.offset) != Some(&a.value)).count() as u64)
}
