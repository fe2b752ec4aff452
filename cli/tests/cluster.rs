//! Multi-node tests on real `flotilla-broker` processes listening on 127.0.0.1.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flotilla_broker::partitioner::partition_for_key;
use flotilla_cli::client::Client;
use flotilla_proto::broker as pb;

const WAIT: Duration = Duration::from_secs(60);

fn flotilla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla"))
}

/// The broker binary is built beside the CLI (the broker package's own tests need it).
fn broker_bin() -> PathBuf {
    let path = flotilla_bin().with_file_name("flotilla-broker");
    assert!(path.exists(), "{} is missing: run the whole workspace's tests (cargo test --workspace)", path.display());
    path
}

struct TestCluster {
    dir: tempfile::TempDir,
    addrs: BTreeMap<u64, String>,
    metrics: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    /// Flags every broker started from now on gets as well.
    extra_args: Vec<String>,
    /// Flags one broker gets on top of those.
    node_args: BTreeMap<u64, Vec<String>>,
}

fn free_port() -> u16 {
    flotilla_cli::unused_port(std::net::Ipv4Addr::LOCALHOST.into()).expect("a free port")
}

impl TestCluster {
    fn start(n: u64) -> TestCluster {
        Self::start_with(n, &[])
    }

    fn start_with(n: u64, extra_args: &[&str]) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs: BTreeMap<u64, String> = (1..=n).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let metrics: BTreeMap<u64, String> = (1..=n).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        let mut c = TestCluster { dir, addrs, metrics, procs: BTreeMap::new(), extra_args, node_args: BTreeMap::new() };
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",")
    }

    fn start_node(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("log file");
        let child = Command::new(broker_bin())
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")))
            .args(["--listen", &self.addrs[&id], "--initial-cluster", &self.initial_cluster()])
            .args(["--metrics-listen", &self.metrics[&id]])
            .args(["--retention-check-interval-ms", "200"])
            .args(&self.extra_args)
            .args(self.node_args.get(&id).into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start broker");
        self.procs.insert(id, child);
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn bootstrap(&self) -> String {
        self.addrs.values().cloned().collect::<Vec<_>>().join(",")
    }

    fn client(&self) -> Client {
        Client::new(self.addrs.values().cloned().collect())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.addrs.keys() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default();
            out.push_str(&format!(
                "--- node {id} ---\n{}\n",
                log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    async fn wait_ready(&self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !client.metadata().await.is_ok_and(|m| m.controller_leader != 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for a controller leader\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record(key: &str, value: String) -> pb::Record {
    pb::Record {
        key: Some(Bytes::from(key.to_owned())),
        value: Some(Bytes::from(value)),
        headers: vec![],
        timestamp_ms: 0,
    }
}

/// Every record of a partition from offset 0 to the high watermark.
async fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<pb::FetchedRecord> {
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let resp = client.fetch(topic, partition, next, 1 << 20, 0).await.expect("fetch");
        for r in resp.records {
            next = r.offset + 1;
            out.push(r);
        }
        if next >= resp.high_watermark {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keyed_records_come_back_in_order_dense_and_by_key() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    let info = client.create_topic("orders", 6, 3, vec![]).await.expect("create topic");
    assert_eq!(info.partitions.len(), 6);
    // Wait until every partition has a leader.
    wait_for("partition leaders", async || {
        client.describe_topic("orders").await.is_ok_and(|t| t.partitions.iter().all(|p| p.leader != 0))
    })
    .await;
    const RECORDS: usize = 10_000;
    const KEYS: usize = 50;
    let mut by_partition: BTreeMap<u32, Vec<pb::Record>> = BTreeMap::new();
    for i in 0..RECORDS {
        let key = format!("key-{}", i % KEYS);
        let p = partition_for_key(key.as_bytes(), 6);
        by_partition.entry(p).or_default().push(record(&key, format!("{key}:{i}")));
    }
    for (p, records) in &by_partition {
        let mut expected_offset = 0;
        for chunk in records.chunks(100) {
            let ack = client.produce("orders", Some(*p), chunk.to_vec()).await.expect("produce");
            assert_eq!(ack.base_offset, expected_offset, "partition {p}: offsets are dense");
            expected_offset += chunk.len() as u64;
        }
    }
    let mut total = 0;
    let mut key_partition: BTreeMap<String, u32> = BTreeMap::new();
    for p in 0..6u32 {
        let got = read_partition(&client, "orders", p).await;
        let sent = by_partition.get(&p).cloned().unwrap_or_default();
        assert_eq!(got.len(), sent.len(), "partition {p}: every acknowledged record is read back\n{}", cluster.logs());
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            assert_eq!(g.offset, i as u64, "partition {p}: dense offsets from 0");
            assert_eq!(g.value, s.value, "partition {p}: order kept");
            let key = String::from_utf8_lossy(g.key.as_deref().unwrap_or_default()).into_owned();
            assert_eq!(*key_partition.entry(key).or_insert(p), p, "one key, one partition");
        }
        total += got.len();
    }
    assert_eq!(total, RECORDS);
    // Asked through one node, describe shows each partition as its own leader sees it: all in sync.
    let via_node_1 = Client::new(vec![cluster.addrs[&1].clone()]);
    wait_for("every replica in sync", async || {
        via_node_1.describe_topic("orders").await.is_ok_and(|t| {
            t.partitions
                .iter()
                .all(|p| p.in_sync.len() == 3 && p.high_watermark as usize == by_partition[&p.partition].len())
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_fetch_returns_as_soon_as_a_record_arrives() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = std::sync::Arc::new(cluster.client());
    client.create_topic("events", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("events").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    let poller = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let resp = client.fetch("events", 0, 0, 1 << 20, 20_000).await.expect("fetch");
            (resp, started.elapsed())
        })
    };
    // Whether the record lands before or after the poll parks, the poll must return with it well before
    // its 20 s limit.
    client.produce("events", Some(0), vec![record("k", "hello".into())]).await.expect("produce");
    let (resp, elapsed) = poller.await.expect("join");
    assert_eq!(resp.records.len(), 1);
    assert_eq!(resp.records[0].value.as_deref(), Some(&b"hello"[..]));
    assert!(elapsed < Duration::from_secs(15), "the long poll waited {elapsed:?} instead of returning on arrival");
}

fn cli(cluster: &TestCluster, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(flotilla_bin())
        .arg("--bootstrap")
        .arg(cluster.bootstrap())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_create_produce_consume_describe() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let (ok, out, err) =
        cli(&cluster, &["topic", "create", "greetings", "--partitions", "2", "--replication-factor", "3"], None);
    assert!(ok, "create failed: {err}");
    assert!(out.contains("greetings"), "{out}");
    let (ok, out, err) =
        cli(&cluster, &["produce", "greetings", "--partition", "1", "--header", "source=test"], Some("hello\nworld\n"));
    assert!(ok, "produce failed: {err}\n{}", cluster.logs());
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["partition 1 offset 0", "partition 1 offset 1"]);
    let (ok, out, err) =
        cli(&cluster, &["--output", "json", "consume", "greetings", "--partition", "1", "--max", "2"], None);
    assert!(ok, "consume failed: {err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["value"], "hello");
    assert_eq!(lines[1]["value"], "world");
    assert_eq!(lines[1]["offset"], 1);
    assert_eq!(lines[0]["headers"]["source"], "test");
    let (ok, out, err) = cli(&cluster, &["--output", "json", "topic", "describe", "greetings"], None);
    assert!(ok, "describe failed: {err}");
    let topic: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(topic["name"], "greetings");
    assert_eq!(topic["partitions"].as_array().map(Vec::len), Some(2));
    assert_eq!(topic["partitions"][1]["high_watermark"], 2);
    // Bad input gets a clear message and a non-zero exit, never a panic.
    let (ok, _, err) = cli(&cluster, &["topic", "create", "bad name"], None);
    assert!(!ok && err.contains("invalid topic name"), "{err}");
    let (ok, _, err) = cli(&cluster, &["consume", "missing"], None);
    assert!(!ok && err.contains("unknown topic"), "{err}");
    // An unknown topic is retried for 3 s, not for the whole deadline: a notice of the wait says so.
    assert!(!err.contains(" s more") || err.contains("retrying for up to 1 s more"), "{err}");
    let (ok, _, err) = cli(&cluster, &["produce", "greetings", "--partition", "9", "x"], None);
    assert!(!ok && err.contains("partitions 0 to 1"), "{err}");
    let (ok, _, err) = cli(&cluster, &["consume", "greetings", "--partition", "1", "--from", "99"], None);
    assert!(!ok && err.contains("out of range"), "{err}");
    let (ok, _, err) = cli(&cluster, &["topic", "create", "wide", "--replication-factor", "4"], None);
    assert!(!ok && err.contains("needs 4 live nodes"), "{err}");
    let (ok, _, err) = cli(&cluster, &["topic", "create", "greetings"], None);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(
        &cluster,
        &["topic", "create", "small", "--replication-factor", "3", "--config", "max.message.bytes=200"],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&cluster, &["produce", "small", &"x".repeat(500)], None);
    assert!(!ok && err.contains("max.message.bytes"), "{err}");
    let (ok, out, err) = cli(&cluster, &["produce", "small", "fits"], None);
    assert!(ok && out.contains("offset 0"), "{err}");
    // A deleted topic is gone for every command.
    let (ok, _, err) = cli(&cluster, &["topic", "delete", "small"], None);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&cluster, &["topic", "describe", "small"], None);
    assert!(!ok && err.contains("unknown topic"), "{err}");
}

/// Produces unique values one per request until `target` are acknowledged, recording each ack.
async fn produce_acked(client: &Client, topic: &str, from: u64, target: usize, acks: &mut Vec<(u64, String)>) {
    let mut next = from;
    while acks.len() < target {
        let value = format!("v{next}");
        next += 1;
        match client.produce(topic, Some(0), vec![record("k", value.clone())]).await {
            Ok(ack) => acks.push((ack.base_offset, value)),
            // Outcome unknown or no leader for the whole retry deadline: never counted as acknowledged.
            Err(e) => eprintln!("produce of {value} not acknowledged: {e}"),
        }
    }
}

fn check_acks(read: &[pb::FetchedRecord], acks: &[(u64, String)], logs: &str) {
    for (offset, value) in acks {
        let found = read.get(*offset as usize).and_then(|r| r.value.clone());
        assert_eq!(found.as_deref(), Some(value.as_bytes()), "acknowledged {value} missing at offset {offset}\n{logs}");
        let copies = read.iter().filter(|r| r.value.as_deref() == Some(value.as_bytes())).count();
        assert_eq!(copies, 1, "acknowledged {value} appears {copies} times");
    }
    for (i, r) in read.iter().enumerate() {
        assert_eq!(r.offset, i as u64, "offsets are dense");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_produce_loses_no_acknowledged_record() {
    let mut cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("ledger", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("ledger").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    let mut acks = Vec::new();
    produce_acked(&client, "ledger", 0, 50, &mut acks).await;
    let leader = client.describe_topic("ledger").await.expect("describe").partitions[0].leader;
    cluster.kill(leader);
    // Production resumes once the survivors elect a leader (the client retries meanwhile).
    produce_acked(&client, "ledger", 1_000, 150, &mut acks).await;
    cluster.start_node(leader);
    let read = read_partition(&client, "ledger", 0).await;
    check_acks(&read, &acks, &cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_node_keeps_all_acknowledged_data_and_the_high_watermark() {
    let mut cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("durable", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("durable").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    let mut acks = Vec::new();
    produce_acked(&client, "durable", 0, 100, &mut acks).await;
    let before = client.list_offsets("durable", 0, pb::OffsetSpec::Latest, 0).await.expect("latest");
    assert!(before >= 100);
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    wait_for("the partition to recover", async || {
        client.list_offsets("durable", 0, pb::OffsetSpec::Latest, 0).await.is_ok_and(|hw| hw >= before)
    })
    .await;
    let read = read_partition(&client, "durable", 0).await;
    check_acks(&read, &acks, &cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_return_to_preferred_leaders_after_a_restarted_node_catches_up() {
    let mut cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("balanced", 6, 3, vec![]).await.expect("create");
    let leaderships = async |client: &Client| -> BTreeMap<u64, u32> {
        let md = client.metadata().await.expect("metadata");
        let mut per_node = BTreeMap::new();
        for p in md.topics.iter().flat_map(|t| t.partitions.iter()) {
            if p.leader != 0 {
                *per_node.entry(p.leader).or_insert(0) += 1;
            }
        }
        per_node
    };
    let even = BTreeMap::from([(1, 2), (2, 2), (3, 2)]);
    wait_for("an even spread of leaders", async || leaderships(&client).await == even).await;
    // Node 1's partitions move to the survivors while it is down.
    cluster.kill(1);
    let survivors = Client::new(vec![cluster.addrs[&2].clone(), cluster.addrs[&3].clone()]);
    wait_for("the survivors to lead everything", async || {
        leaderships(&survivors).await.values().sum::<u32>() == 6 && !leaderships(&survivors).await.contains_key(&1)
    })
    .await;
    for p in 0..6 {
        survivors
            .produce("balanced", Some(p), vec![record("k", format!("while node 1 was down {p}"))])
            .await
            .expect("produce");
    }
    cluster.start_node(1);
    // Once node 1 has caught up, each node leads its preferred share again.
    wait_for("leadership back to preferred leaders", async || leaderships(&client).await == even).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_tails_records_as_they_commit() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("tail", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("tail").await.is_ok_and(|t| t.partitions[0].leader != 0)).await;
    client.produce("tail", Some(0), vec![record("k", "before".into())]).await.expect("produce");
    let mut stream = client.subscribe("tail", 0, 0).await.expect("subscribe");
    for i in 0..3 {
        client.produce("tail", Some(0), vec![record("k", format!("after {i}"))]).await.expect("produce");
    }
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let resp = tokio::time::timeout(WAIT, stream.message()).await.expect("in time").expect("stream").expect("open");
        seen.extend(resp.records.into_iter().map(|r| (r.offset, r.value.unwrap_or_default())));
    }
    let expected: Vec<(u64, Bytes)> = ["before", "after 0", "after 1", "after 2"]
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, Bytes::from(v.to_string())))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_broker_promptly_and_it_restarts_with_its_data() {
    let mut cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("graceful", 1, 3, vec![]).await.expect("create");
    let ack = client.produce("graceful", Some(0), vec![record("k", "kept".into())]).await.expect("produce");
    let mut child = cluster.procs.remove(&2).expect("node 2");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    // Peer connections stay open (Raft streams), so a shutdown that waits for them to drain never ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "broker 2 ignored SIGTERM for 20 s\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "broker 2 exited with {exit}\n{}", cluster.logs());
    cluster.start_node(2);
    let only_node_2 = Client::new(vec![cluster.addrs[&2].clone()]);
    wait_for("node 2 back with the record", async || {
        only_node_2.metadata().await.is_ok_and(|m| {
            m.topics.iter().any(|t| t.name == "graceful" && t.partitions[0].high_watermark > ack.base_offset)
        })
    })
    .await;
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
    assert!(status.success(), "kill {signal} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_to_a_stopped_leader_ends_by_its_deadline_and_later_ones_reach_the_new_leader() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let deadline = Duration::from_secs(8);
    let client = cluster.client().with_deadline(deadline);
    client.create_topic("paused", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("paused").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    // The client's produce stream to the leader is open, and the leader cached.
    client.produce("paused", Some(0), vec![record("k", "before".into())]).await.expect("produce");
    let leader = client.describe_topic("paused").await.expect("describe").partitions[0].leader;
    // SIGSTOP: the leader's TCP connections stay open, but nothing on them is ever answered.
    signal(&cluster.procs[&leader], "-STOP");
    let mut acked = false;
    for attempt in 0..20 {
        let sent = client.produce("paused", Some(0), vec![record("k", format!("during-{attempt}"))]);
        let outcome = tokio::time::timeout(deadline * 3, sent).await;
        assert!(outcome.is_ok(), "a produce outlived its {deadline:?} deadline by far (attempt {attempt})");
        if outcome.is_ok_and(|r| r.is_ok()) {
            acked = true;
            break;
        }
    }
    let logs = cluster.logs();
    signal(&cluster.procs[&leader], "-CONT");
    assert!(acked, "no produce was acknowledged by a new leader while the old one was stopped\n{logs}");
}

/// A TCP proxy in front of one broker whose connections can be cut, and whose new connections can be
/// held (accepted, but not yet forwarded) until it is opened again.
struct GatedProxy {
    addr: String,
    open: tokio::sync::watch::Sender<bool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl GatedProxy {
    async fn start(target: String) -> GatedProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (open, gate) = tokio::sync::watch::channel(true);
        let links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let tracked = links.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut gate = gate.clone();
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if gate.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap_or_else(|p| p.into_inner()).push(link);
            }
        });
        GatedProxy { addr, open, links }
    }

    /// Closes every forwarded connection and holds new ones.
    fn cut_and_hold(&self) {
        self.open.send_replace(false);
        for link in self.links.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            link.abort();
        }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_broker_still_accepts_connections_and_hands_off_every_leadership() {
    // Nodes 1 and 3 reach node 2's Raft service only through a proxy.
    let listen_2 = format!("127.0.0.1:{}", free_port());
    let proxy = GatedProxy::start(listen_2.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = BTreeMap::from([
        (1, format!("127.0.0.1:{}", free_port())),
        (2, listen_2),
        (3, format!("127.0.0.1:{}", free_port())),
    ]);
    let metrics = (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
    let route = vec!["--raft-peer-routes".to_string(), format!("2={}", proxy.addr)];
    let node_args = BTreeMap::from([(1, route.clone()), (3, route)]);
    let mut cluster = TestCluster { dir, addrs, metrics, procs: BTreeMap::new(), extra_args: Vec::new(), node_args };
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    // Two replicas per partition: the new leader of a partition node 2 leads needs node 2's vote, so it
    // must reach node 2 while node 2 stops.
    client.create_topic("handed", 6, 2, vec![]).await.expect("create");
    // As node 2 itself sees it: another node's view of a partition it does not host may be stale.
    let node_2 = Client::new(vec![cluster.addrs[&2].clone()]);
    let led_by_2 = async || -> Vec<(u32, u64)> {
        let Ok(md) = node_2.metadata().await else { return Vec::new() };
        let partitions = md.topics.iter().filter(|t| t.name == "handed").flat_map(|t| &t.partitions);
        partitions
            .filter(|p| p.leader == 2)
            .filter_map(|p| p.replicas.iter().find(|r| **r != 2).map(|other| (p.partition, *other)))
            .collect()
    };
    wait_for("node 2 to lead a partition", async || !led_by_2().await.is_empty()).await;
    let handed_over = led_by_2().await;
    // The peers' connections to node 2 are gone, so the candidates the hand-off starts must dial node 2
    // anew, after it has begun to stop.
    proxy.cut_and_hold();
    let mut child = cluster.procs.remove(&2).expect("node 2");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let log_2 = cluster.dir.path().join("node-2.log");
    let log = || std::fs::read_to_string(&log_2).unwrap_or_default();
    wait_for("node 2 to begin its shutdown", async || log().contains("shutting down")).await;
    proxy.open();
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "broker 2 ignored SIGTERM\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With node 2 gone, each of its partitions has one replica left, which can lead only if it won its
    // election during the hand-off.
    for (partition, other) in handed_over {
        let survivor = Client::new(vec![cluster.addrs[&other].clone()]);
        wait_for(&format!("node {other} to lead partition {partition}"), async || {
            survivor.metadata().await.is_ok_and(|m| {
                m.topics
                    .iter()
                    .filter(|t| t.name == "handed")
                    .flat_map(|t| &t.partitions)
                    .any(|p| p.partition == partition && p.leader == other)
            })
        })
        .await;
    }
    // "handed off H of L leaderships"
    let line = log().lines().find(|l| l.contains("handed off")).map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("node 2 did not hand off\n{}", cluster.logs()));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "off").expect("handed off H of L");
    let (handed, led) = (words[at + 1], words[at + 3]);
    assert_ne!(led, "0", "node 2 led nothing when it stopped: {line}");
    assert_eq!(handed, led, "node 2 still led groups when it stopped: {line}\n{}", cluster.logs());
}

/// GETs `path` from `addr` over plain HTTP/1.1 and returns the body.
async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Parses Prometheus text exposition into (series, value); panics on a malformed sample line.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_owned(), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_serves_prometheus_metrics() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("observed", 1, 3, vec![]).await.expect("create");
    let ack = client.produce("observed", Some(0), vec![record("k", "v".into())]).await.expect("produce");
    client.fetch("observed", 0, ack.base_offset, 1 << 20, 0).await.expect("fetch");
    // Gauges are sampled once a second and leadership may move to the preferred leader at any time, so
    // wait until every node's scrape shows the produced record rather than reading one node once.
    let hwm = "flotilla_partition_high_watermark{topic=\"observed\",partition=\"0\"}";
    let produced = "flotilla_produce_records_total{topic=\"observed\",partition=\"0\"}";
    let fetched = "flotilla_fetch_records_total{topic=\"observed\",partition=\"0\"}";
    let mut scrapes: BTreeMap<u64, Vec<(String, f64)>> = BTreeMap::new();
    wait_for("every node's metrics to show the produced record", async || {
        for (id, addr) in &cluster.metrics {
            match http_get(addr, "/metrics").await {
                Some(body) => scrapes.insert(*id, parse_prometheus(&body)),
                None => return false,
            };
        }
        let value = |samples: &[(String, f64)], name: &str| samples.iter().find(|(s, _)| s == name).map(|(_, v)| *v);
        scrapes.values().all(|s| value(s, hwm) == Some(1.0))
            && scrapes.values().filter_map(|s| value(s, produced)).sum::<f64>() == 1.0
            && scrapes.values().filter_map(|s| value(s, fetched)).sum::<f64>() == 1.0
    })
    .await;
    let everywhere = |name: &str| scrapes.values().all(|s| s.iter().any(|(series, _)| series.starts_with(name)));
    let somewhere = |name: &str| scrapes.values().any(|s| s.iter().any(|(series, _)| series.starts_with(name)));
    for name in [
        "flotilla_storage_fsyncs_total",
        // Its own buckets, finer than the other histograms' (which start at 0.5 ms).
        "flotilla_storage_fsync_latency_seconds_bucket{le=\"0.0001\"}",
        "flotilla_storage_write_stall_microseconds_total",
        "flotilla_storage_write_stalls_total{cause=\"memtable-limit\",condition=\"stops\"}",
        "flotilla_storage_log_blob_bytes",
        "flotilla_storage_log_blob_garbage_bytes",
        "flotilla_storage_log_blob_gc_active",
        "flotilla_raft_term",
        "flotilla_partition_leaderships",
        "flotilla_raft_heartbeats_total",
        "flotilla_raft_heartbeat_batches_total",
        "flotilla_raft_append_messages_total",
        "flotilla_raft_append_frames_total",
    ] {
        assert!(everywhere(name), "a node does not export {name}");
    }
    for name in [
        "flotilla_produce_requests_total",
        "flotilla_produce_latency_seconds_bucket",
        "flotilla_fetch_requests_total",
        "flotilla_fetch_bytes_total",
        "flotilla_raft_follower_lag_entries",
    ] {
        assert!(somewhere(name), "no node exports {name}");
    }
    let fsyncs = scrapes.values().filter_map(|s| s.iter().find(|(n, _)| n == "flotilla_storage_fsyncs_total"));
    assert!(fsyncs.clone().count() == 3 && fsyncs.into_iter().all(|(_, v)| *v >= 1.0), "every node has fsynced");
}

/// `flotilla dev --metrics-base-port` gives each broker a metrics endpoint, so a local cluster (and a
/// benchmark on it) can be watched from the brokers' side; and its brokers share the machine's cores
/// rather than each running a thread per core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotilla_dev_serves_each_brokers_metrics_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics_port) = (two_free_ports(), two_free_ports());
    let _broker_beside = broker_bin();
    let mut dev = DevProcess(
        Command::new(flotilla_bin())
            .args(["dev", "--nodes", "2", "--base-port", &port.to_string()])
            .args(["--metrics-base-port", &metrics_port.to_string()])
            .env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start flotilla dev"),
    );
    for metrics in [metrics_port, metrics_port + 1].map(|p| format!("127.0.0.1:{p}")) {
        wait_for(&format!("the metrics of the dev broker at {metrics}"), async || {
            http_get(&metrics, "/metrics").await.is_some_and(|body| body.contains("flotilla_storage_fsyncs_total"))
        })
        .await;
    }
    let threads = format!("tokio worker threads: {}", flotilla_cli::worker_threads_per_broker(2));
    for id in [1, 2] {
        let log = std::fs::read_to_string(dir.path().join(format!("node-{id}.log"))).expect("read the node's log");
        assert!(log.contains(&threads), "node {id} should be {threads}:\n{log}");
    }
    let status = Command::new("kill").arg("-TERM").arg(dev.0.id().to_string()).status().expect("kill");
    assert!(status.success(), "SIGTERM to flotilla dev");
    wait_for("flotilla dev to stop its brokers and exit", async || matches!(dev.0.try_wait(), Ok(Some(_)))).await;
}

/// Two consecutive ports nothing listens on now (`flotilla dev` gives its brokers ports from a base up).
fn two_free_ports() -> u16 {
    let mut previous = free_port();
    for _ in 0..1000 {
        let next = free_port();
        if next == previous + 1 {
            return previous;
        }
        previous = next;
    }
    panic!("no two consecutive free ports")
}

/// A `flotilla dev` process, stopped (SIGTERM: it stops its brokers) if a failed test leaves it running.
struct DevProcess(Child);

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_produce_reports_throughput_and_latency_as_json() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let args = [
        "--output",
        "json",
        "bench",
        "produce",
        "--topic",
        "b",
        "--in-flight",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0",
    ];
    let (ok, out, err) = cli(&cluster, &args, None);
    assert!(ok, "bench failed: {err}\n{}", cluster.logs());
    // The topic is new: creating it must not wait out the grace for a topic no broker knows yet (3 s,
    // told after 2 s), as asking whether it exists first did.
    assert!(!err.contains("waiting for the cluster"), "{err}");
    // A second run finds the topic there.
    let (ok, again, err) = cli(&cluster, &args, None);
    assert!(ok && !err.contains("waiting for the cluster"), "bench on an existing topic failed: {err}");
    assert!(serde_json::from_str::<serde_json::Value>(again.trim()).is_ok(), "{again}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert!(report["msgs_per_sec"].as_f64().is_some_and(|v| v > 0.0), "{report}");
    assert!(report["mb_per_sec"].as_f64().is_some(), "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_ms"][p].as_f64().is_some_and(|v| v > 0.0), "{p} missing: {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_replica_still_routes_and_describes_the_partition() {
    // Four nodes, replication factor 2: every node lacks replicas of some partitions.
    let cluster = TestCluster::start(4);
    cluster.wait_ready().await;
    let via_node_1 = Client::new(vec![cluster.addrs[&1].clone()]);
    let info = via_node_1.create_topic("spread", 4, 2, vec![]).await.expect("create");
    assert!(info.partitions.iter().any(|p| !p.replicas.contains(&1)), "node 1 must lack some partition");
    wait_for("every partition's leader, as seen through node 1", async || {
        via_node_1.describe_topic("spread").await.is_ok_and(|t| t.partitions.iter().all(|p| p.leader != 0))
    })
    .await;
    // Straight to node 1, bypassing the client's routing: node 1 forwards to a replica of the partition.
    let foreign = info.partitions.iter().find(|p| !p.replicas.contains(&1)).expect("a partition without node 1");
    let mut raw =
        flotilla_proto::broker::flotilla_client::FlotillaClient::connect(format!("http://{}", cluster.addrs[&1]))
            .await
            .expect("connect");
    let req = pb::ProduceRequest {
        topic: "spread".into(),
        partition: Some(foreign.partition),
        records: vec![record("k", "forwarded".into())],
        forwarded: false,
    };
    let acks = raw.produce(req).await.expect("node 1 forwards a partition it does not host").into_inner().acks;
    assert_eq!(acks[0].base_offset, 0);
    for p in 0..4 {
        if p == foreign.partition {
            continue;
        }
        let ack = via_node_1.produce("spread", Some(p), vec![record("k", format!("p{p}"))]).await.expect("produce");
        assert_eq!(ack.base_offset, 0);
        let got = via_node_1.fetch("spread", p, 0, 1 << 20, 0).await.expect("fetch");
        assert_eq!(got.records[0].value.as_deref(), Some(format!("p{p}").as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_into_a_closed_pipe_stops_quietly() {
    use std::io::{BufRead, BufReader};
    let cluster = TestCluster::start(1);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("piped", 1, 1, vec![]).await.expect("create");
    // More than a pipe buffer of output, so the reader's early exit breaks the pipe mid-write.
    for batch in 0..4 {
        let records = (0..500).map(|i| record("k", format!("{batch}-{i}-{}", "v".repeat(100)))).collect();
        client.produce("piped", Some(0), records).await.expect("produce");
    }
    let mut child = Command::new(flotilla_bin())
        .args(["--bootstrap", &cluster.bootstrap(), "consume", "piped", "--from", "earliest"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("read one line");
    assert!(first.starts_with("0\t0\t"), "{first}");
    // The reader (dropped above) is gone, as with `| head -1`.
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `flotilla cluster status | grep -q "controller leader"` made the CLI panic ("failed printing to stdout:
/// Broken pipe") and exit 101, which failed the compose test under `pipefail`: every command that prints
/// must end quietly, with success, when its reader has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printing_command_into_a_closed_pipe_exits_quietly() {
    let cluster = TestCluster::start(1);
    cluster.wait_ready().await;
    cluster.client().create_topic("closed", 3, 1, vec![]).await.expect("create");
    let commands: [&[&str]; 5] = [
        &["cluster", "status"],
        &["topic", "list"],
        &["topic", "describe", "closed"],
        &["--output", "json", "topic", "describe", "closed"],
        &["topic", "create", "closed-2", "--partitions", "2", "--replication-factor", "1"],
    ];
    for args in commands {
        let mut child = Command::new(flotilla_bin())
            .arg("--bootstrap")
            .arg(cluster.bootstrap())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run flotilla");
        // The reader is gone before the command has its answer to print, as `| grep -q` is when it
        // matched an earlier line.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: exit {:?}: {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The command whose output nobody read still did its work.
    let t = cluster.client().describe_topic("closed-2").await.expect("created despite the closed pipe");
    assert_eq!(t.partitions.len(), 2);
}

/// The number of Raft groups the broker whose metrics listen on `addr` hosts, once it has sampled them.
async fn hosted_groups(addr: &str) -> Option<f64> {
    let text = http_get(addr, "/metrics").await?;
    parse_prometheus(&text).into_iter().find(|(series, _)| series == "flotilla_raft_groups").map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_drops_its_groups_everywhere_and_its_name_can_be_reused_from_offset_zero() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    let mut before = BTreeMap::new();
    for (id, addr) in &cluster.metrics {
        let mut groups = None;
        wait_for("the first metrics sample", async || {
            groups = hosted_groups(addr).await;
            groups.is_some()
        })
        .await;
        before.insert(*id, groups.unwrap_or_default());
    }
    client.create_topic("doomed", 6, 3, vec![]).await.expect("create");
    for p in 0..6 {
        client.produce("doomed", Some(p), vec![record("k", format!("old-{p}"))]).await.expect("produce");
    }
    for (id, addr) in &cluster.metrics {
        wait_for("every node to host the topic's groups", async || hosted_groups(addr).await == Some(before[id] + 6.0))
            .await;
    }
    client.delete_topic("doomed").await.expect("delete");
    // A topic created at once gets leaders and takes writes while the old groups go.
    client.create_topic("doomed", 6, 3, vec![]).await.expect("create again");
    for p in 0..6 {
        let ack = client.produce("doomed", Some(p), vec![record("k", format!("new-{p}"))]).await.expect("produce");
        assert_eq!(ack.base_offset, 0, "partition {p} of the new topic starts at offset 0");
        let read = read_partition(&client, "doomed", p).await;
        let values: Vec<_> = read.iter().map(|r| r.value.clone().unwrap_or_default()).collect();
        assert_eq!(values, vec![Bytes::from(format!("new-{p}"))], "partition {p} holds only the new record");
    }
    // Every node stopped the old groups and deleted them, and hosts the new ones.
    let node_logs = || {
        cluster
            .addrs
            .keys()
            .map(|id| std::fs::read_to_string(cluster.dir.path().join(format!("node-{id}.log"))).unwrap_or_default())
    };
    wait_for("all 3 nodes to drop all 6 of the deleted topic's groups", async || {
        node_logs().map(|log| log.matches("dropped the group of a deleted topic").count()).sum::<usize>() == 18
    })
    .await;
    assert!(node_logs().all(|log| !log.contains("dropping the group of a deleted topic failed")), "{}", cluster.logs());
    for (id, addr) in &cluster.metrics {
        wait_for("every node's metrics to count only the new topic's groups", async || {
            hosted_groups(addr).await == Some(before[id] + 6.0)
        })
        .await;
    }
}

fn sized(value_bytes: usize, i: usize, timestamp_ms: i64) -> pb::Record {
    let mut value = format!("v{i:04}-").into_bytes();
    value.resize(value_bytes, b'.');
    pb::Record { key: None, value: Some(Bytes::from(value)), headers: vec![], timestamp_ms }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_time_and_by_size_moves_the_log_start_on_every_replica_and_keeps_offsets() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let config = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];

    // By time: ten records stamped an hour ago, then five fresh ones, under a half-hour retention.
    client.create_topic("aged", 1, 3, config("retention.ms", "1800000")).await.expect("create aged");
    for i in 0..10 {
        client.produce("aged", Some(0), vec![sized(100, i, now - 3_600_000)]).await.expect("old record");
    }
    for i in 10..15 {
        client.produce("aged", Some(0), vec![sized(100, i, 0)]).await.expect("fresh record");
    }
    // By size: twenty entries of 570-600 bytes under a 3,000-byte limit: as in Kafka, the oldest go while
    // the log stays at or above the limit, so five or six stay.
    client.create_topic("sized", 1, 3, config("retention.bytes", "3000")).await.expect("create sized");
    for i in 0..20 {
        client.produce("sized", Some(0), vec![sized(500, i, 0)]).await.expect("sized record");
    }

    let start_of = async |topic: &str| {
        let info = client.describe_topic(topic).await.expect("describe");
        (info.partitions[0].log_start_offset, info.partitions[0].high_watermark)
    };
    wait_for("the expired records to go", async || start_of("aged").await.0 == 10).await;
    wait_for("the log to shrink to its size limit", async || start_of("sized").await.0 >= 14).await;
    let (start, hw) = start_of("sized").await;
    assert_eq!(hw, 20);
    assert!((14..=15).contains(&start), "at least 3,000 bytes of 570-600-byte batches stay; the log starts at {start}");

    // What remains reads back at its own offsets; reading below the start is refused.
    for (topic, start, first_value) in [("aged", 10, "v0010-"), ("sized", start, &*format!("v{start:04}-"))] {
        let resp = client.fetch(topic, 0, start, 1 << 20, 0).await.expect("fetch from the start");
        assert_eq!(resp.log_start_offset, start);
        assert_eq!(resp.records.first().map(|r| r.offset), Some(start));
        let value = resp.records.first().and_then(|r| r.value.clone()).unwrap_or_default();
        assert!(value.starts_with(first_value.as_bytes()), "{topic}: first value {value:?}");
        let err = client.fetch(topic, 0, 0, 1 << 20, 0).await.expect_err("below the log start");
        assert_eq!(err.code, pb::ErrorCode::OffsetOutOfRange, "{err}");
    }
    // Every replica cut its own copy; a replica read from 0 starts at the replica's log start.
    for addr in cluster.addrs.values() {
        wait_for("each replica to cut its copy", async || {
            client
                .read_replica(addr, "aged", 0, 0, 1 << 20)
                .await
                .is_ok_and(|r| r.log_start_offset == 10 && r.records.first().is_some_and(|rec| rec.offset == 10))
        })
        .await;
    }
    // Offsets go on from the high watermark.
    let ack = client.produce("sized", Some(0), vec![sized(500, 20, 0)]).await.expect("produce after the cut");
    assert_eq!(ack.base_offset, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_short_of_disk_space_refuses_produce_writes_nothing_and_recovers_once_space_is_back() {
    // No volume here has a thousand TiB free: every node is under its floor from the start.
    let mut cluster = TestCluster::start_with(3, &["--min-free-bytes", "1000TiB"]);
    cluster.wait_ready().await;
    let client = cluster.client().with_deadline(Duration::from_secs(2));
    client.create_topic("full", 1, 3, vec![]).await.expect("topics can still be created");
    let err = client.produce("full", Some(0), vec![record("k", "lost?".into())]).await.expect_err("refused");
    assert_eq!(err.code, pb::ErrorCode::DiskFull, "{err}");
    assert!(err.message.contains("nothing was written") && err.message.contains("--min-free-bytes"), "{err}");
    let info = client.describe_topic("full").await.expect("describe");
    assert_eq!(info.partitions[0].high_watermark, 0);

    // Space comes back (here: the floor goes down): the same partition takes writes from offset 0.
    cluster.extra_args.clear();
    for id in 1..=3 {
        cluster.kill(id);
        cluster.start_node(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    let ack = client.produce("full", Some(0), vec![record("k", "kept".into())]).await.expect("produce");
    assert_eq!(ack.base_offset, 0);
    let resp = client.fetch("full", 0, 0, 1 << 20, 0).await.expect("fetch");
    let values: Vec<_> = resp.records.iter().filter_map(|r| r.value.clone()).collect();
    assert_eq!(values, vec![Bytes::from("kept")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_produces_to_one_partition_land_in_call_order_at_dense_offsets() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("piped", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("piped").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    // The first produce learns the leader and opens the stream; the rest go out at once, more of them
    // than the stream's queue and the broker's in-flight limit hold.
    client.produce("piped", Some(0), vec![record("k", "first".into())]).await.expect("produce");
    let n = 3_000;
    let sends = (0..n).map(|i| client.produce("piped", Some(0), vec![record("k", format!("v{i}"))]));
    let acks: Vec<u64> =
        futures::future::join_all(sends).await.into_iter().map(|a| a.expect("produce").base_offset).collect();
    assert_eq!(acks, (1..=n as u64).collect::<Vec<_>>(), "each produce's offset follows the order of the calls");
    let read = read_partition(&client, "piped", 0).await;
    assert_eq!(read.len(), n + 1);
    for (i, r) in read.iter().skip(1).enumerate() {
        assert_eq!(r.value.as_deref(), Some(format!("v{i}").as_bytes()), "offset {}", r.offset);
    }
    // Through a broker that does not lead the partition: it forwards on its own produce stream to the
    // leader, and the order holds.
    let leader = client.describe_topic("piped").await.expect("describe").partitions[0].leader;
    let other = cluster.addrs.iter().find(|(id, _)| **id != leader).map(|(_, a)| a.clone()).expect("a follower");
    let via_follower = Client::new(vec![other]).with_leader_routing(false);
    via_follower.produce("piped", Some(0), vec![record("k", "forwarded first".into())]).await.expect("produce");
    let sends = (0..n).map(|i| via_follower.produce("piped", Some(0), vec![record("k", format!("f{i}"))]));
    let acks: Vec<u64> =
        futures::future::join_all(sends).await.into_iter().map(|a| a.expect("produce").base_offset).collect();
    let from = n as u64 + 2;
    assert_eq!(acks, (from..from + n as u64).collect::<Vec<_>>(), "forwarded produces keep the order of the calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_answers_each_request_by_id_and_a_bad_one_breaks_nothing() {
    let cluster = TestCluster::start(3);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("streamed", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("streamed").await.is_ok_and(|t| t.partitions[0].leader != 0))
        .await;
    // To the leader: a broker that does not lead the partition forwards each request on its own, in no
    // particular order.
    let leader = client.describe_topic("streamed").await.expect("describe").partitions[0].leader;
    let mut raw =
        flotilla_proto::broker::flotilla_client::FlotillaClient::connect(format!("http://{}", cluster.addrs[&leader]))
            .await
            .expect("connect");
    let produce = |topic: &str, records: Vec<pb::Record>| pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(0),
        records,
        forwarded: false,
    };
    let requests = vec![
        pb::ProduceStreamRequest { id: 7, request: None },
        pb::ProduceStreamRequest { id: 8, request: Some(produce("no-such-topic", vec![record("k", "x".into())])) },
        pb::ProduceStreamRequest { id: 9, request: Some(produce("streamed", vec![record("k", "kept".into())])) },
        pb::ProduceStreamRequest { id: 10, request: Some(produce("streamed", vec![])) },
        pb::ProduceStreamRequest { id: 11, request: Some(produce("streamed", vec![record("k", "also".into())])) },
    ];
    let mut replies =
        raw.produce_stream(tokio_stream::iter(requests)).await.expect("open a produce stream").into_inner();
    let mut by_id = BTreeMap::new();
    while let Some(reply) = replies.message().await.expect("the stream ends cleanly once every request is answered") {
        assert!(by_id.insert(reply.id, reply.result).is_none(), "one reply per request");
    }
    let code = |id: u64| match &by_id[&id] {
        Some(pb::produce_stream_reply::Result::Error(e)) => pb::ErrorCode::try_from(e.code).expect("a known code"),
        other => panic!("request {id} should have failed: {other:?}"),
    };
    let offset = |id: u64| match &by_id[&id] {
        Some(pb::produce_stream_reply::Result::Response(r)) => r.acks[0].base_offset,
        other => panic!("request {id} should have been acknowledged: {other:?}"),
    };
    assert_eq!(by_id.len(), 5);
    assert_eq!(code(7), pb::ErrorCode::InvalidRequest);
    assert_eq!(code(8), pb::ErrorCode::UnknownTopic);
    assert_eq!(code(10), pb::ErrorCode::EmptyBatch);
    assert_eq!((offset(9), offset(11)), (0, 1));
    let read = read_partition(&client, "streamed", 0).await;
    let values: Vec<_> = read.iter().map(|r| r.value.clone().unwrap_or_default()).collect();
    assert_eq!(values, [Bytes::from("kept"), Bytes::from("also")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_larger_than_the_produce_memory_is_served_without_throttling() {
    // 128 MiB budget: 16 MiB for produce bytes in flight, less than the 40 requests of ~900 KB below, so
    // later requests wait for earlier ones to commit and give their memory back.
    let cluster = TestCluster::start_with(3, &["--memory-budget", "128MiB"]);
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_topic("big", 1, 3, vec![]).await.expect("create");
    wait_for("a leader", async || client.describe_topic("big").await.is_ok_and(|t| t.partitions[0].leader != 0)).await;
    let leader = client.describe_topic("big").await.expect("describe").partitions[0].leader;
    let mut raw =
        flotilla_proto::broker::flotilla_client::FlotillaClient::connect(format!("http://{}", cluster.addrs[&leader]))
            .await
            .expect("connect")
            .max_encoding_message_size(64 << 20);
    let requests: Vec<_> = (0..40u64)
        .map(|id| pb::ProduceStreamRequest {
            id,
            request: Some(pb::ProduceRequest {
                topic: "big".into(),
                partition: Some(0),
                records: vec![sized(900_000, id as usize, 0)],
                forwarded: false,
            }),
        })
        .collect();
    let mut replies = raw.produce_stream(tokio_stream::iter(requests)).await.expect("open").into_inner();
    let mut offsets = Vec::new();
    while let Some(reply) = replies.message().await.expect("the stream ends cleanly") {
        match reply.result {
            Some(pb::produce_stream_reply::Result::Response(r)) => offsets.push((reply.id, r.acks[0].base_offset)),
            other => panic!("request {} was refused: {other:?}", reply.id),
        }
    }
    offsets.sort();
    assert_eq!(offsets, (0..40u64).map(|i| (i, i)).collect::<Vec<_>>(), "every request acknowledged, in order");
}
