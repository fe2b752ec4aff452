//! One harness run: start the cluster, run the workload under the nemesis, heal, read everything back,
//! check the history and judge the gates.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_cli::client::Client;
use flotilla_proto::broker::{self as pb, ErrorCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checker::{self, Checked};
use crate::compose::ComposeCluster;
use crate::history::{self, History, OffsetsRead, Outcome, Poll, Read, SendOp};
use crate::local::LocalCluster;
use crate::nemesis::{self, FaultKind, Heal, Planned};
use crate::scenario::{self, Scenario};
use crate::target::{Setup, Target};

/// How long one operation may take before it counts as unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client retries definite refusals (no leader yet, leader moved) within one operation.
const RETRY_WINDOW: Duration = Duration::from_secs(3);
/// After a fault heals, operations still count as inside its window for this long.
const SETTLE: f64 = 5.0;
/// Recovery gate: every key written and read back within this long of the final heal.
pub const RECOVERY_GATE: f64 = 30.0;
/// Availability gate: the share of sends outside fault windows that must succeed.
pub const AVAILABILITY_GATE: f64 = 0.9;
/// Final reads give up after this long (FAILOVER.md: up to 200 s).
const FINAL_READ_LIMIT: Duration = Duration::from_secs(200);
/// Keys read at once in the final phase (S19 has a thousand): enough to overlap round trips, few enough
/// not to time out on a loaded debug cluster.
const FINAL_READS_PARALLEL: usize = 32;
/// The cluster must accept the first topics within this long of starting.
const SETUP_LIMIT: Duration = Duration::from_secs(90);
/// Replicas get this long after the final reads to converge before they are compared.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

/// Where the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Local,
    Compose,
}

pub struct RunConfig {
    pub scenario: &'static Scenario,
    pub target: TargetKind,
    pub faults: Vec<FaultKind>,
    pub seed: u64,
    pub duration: f64,
    pub nodes: u64,
    pub topics: u32,
    pub partitions: u32,
    pub replication_factor: u32,
    pub rate: f64,
    pub writers: u64,
    pub consumers: u64,
    pub interval: f64,
    pub rotate_after: u64,
    pub work_dir: PathBuf,
    pub broker: PathBuf,
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub kind: FaultKind,
    pub description: String,
    pub start: f64,
    pub end: f64,
    /// For a fault that stopped some nodes but not all: seconds until every partition had a live leader
    /// again (None if not within the hold), counted from the moment the target reported the nodes dead
    /// for a kill -9 (the docker CLI's own latency is not the brokers'), from the signal for a SIGTERM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub releader_s: Option<f64>,
    /// Whether `releader_s` was measured (a fault that stopped some nodes but not all).
    #[serde(skip)]
    pub measured: bool,
    /// A SIGTERM stop: the target waits for the broker to exit before the measurement can start, so
    /// `releader_s` includes the broker's whole graceful shutdown, and the re-election gate leaves it out.
    #[serde(skip)]
    pub graceful: bool,
}

impl FaultEvent {
    /// How long the partitions went without a live leader, as a note for the fault's line ("" when not
    /// measured).
    pub fn releader_note(&self) -> String {
        match (self.measured, self.releader_s) {
            (true, Some(s)) if self.graceful => {
                format!(" (every partition led again {s:.1} s after SIGTERM, the graceful stop included)")
            }
            (true, Some(s)) => format!(" (every partition led again after {s:.1} s)"),
            (true, None) => " (some partition had no live leader all along)".into(),
            (false, _) => String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub scenario: &'static str,
    pub title: &'static str,
    pub seed: u64,
    pub target: &'static str,
    pub nodes: u64,
    pub keys: usize,
    pub duration_s: f64,
    pub schedule: Vec<Planned>,
    pub faults: Vec<FaultEvent>,
    /// Why the nemesis stopped before its schedule ended (a fault it could not inject or heal).
    pub nemesis_error: Option<String>,
    pub polls: usize,
    pub offsets_reads: usize,
    pub recovery_s: Option<f64>,
    pub checked: Checked,
    pub gates: Vec<Gate>,
    pub passed: bool,
    #[serde(skip)]
    pub history: History,
}

/// Seconds since the workload started.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Classifies a failed send once, in code (FAILOVER.md 1.2): `Fail` only for refusals raised before the
/// proposal reached Raft (or committed and refused by every replica alike); anything else may have been
/// applied.
pub fn classify(code: ErrorCode) -> Outcome {
    match code {
        ErrorCode::NotLeader
        | ErrorCode::LeaderNotAvailable
        | ErrorCode::ClusterNotReady
        | ErrorCode::Throttled
        | ErrorCode::DiskFull
        | ErrorCode::UnknownTopic
        | ErrorCode::UnknownPartition
        | ErrorCode::InvalidTopicName
        | ErrorCode::InvalidPartitions
        | ErrorCode::InvalidReplicationFactor
        | ErrorCode::RecordTooLarge
        | ErrorCode::EmptyBatch
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidRequest
        | ErrorCode::NotEnoughReplicas => Outcome::Fail,
        ErrorCode::Timeout
        | ErrorCode::StorageError
        | ErrorCode::Unspecified
        | ErrorCode::TopicExists
        | ErrorCode::OffsetOutOfRange => Outcome::Info,
    }
}

struct Shared {
    client: Client,
    clock: Clock,
    seed: u64,
    history: Mutex<History>,
    /// Every key ever written (all generations of topics).
    all_keys: RwLock<Vec<String>>,
    /// The keys of the newest generation, which writers use.
    current: RwLock<Vec<String>>,
    next_value: AtomicU64,
    sends_this_generation: AtomicU64,
    rotating: AtomicBool,
    generation: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn pick(&self, rng: &mut StdRng, all: bool) -> Option<String> {
        let keys = if all { &self.all_keys } else { &self.current };
        let keys = keys.read().unwrap_or_else(|p| p.into_inner());
        if keys.is_empty() { None } else { Some(keys[rng.random_range(0..keys.len())].clone()) }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends one fresh value to `key` and records the outcome.
    async fn send(&self, client: &Client, process: u64, key: &str) -> SendOp {
        self.send_within(client, process, key, OP_TIMEOUT).await
    }

    /// [`Shared::send`], giving up (and dropping the request mid-flight) after `timeout`; a timeout below
    /// [`OP_TIMEOUT`] marks the send as deliberately cut short.
    async fn send_within(&self, client: &Client, process: u64, key: &str, timeout: Duration) -> SendOp {
        let value = self.next_value.fetch_add(1, Ordering::Relaxed);
        let (topic, partition) = history::split_key(key).unwrap_or((key, 0));
        let record =
            pb::Record { key: None, value: Some(Bytes::from(value.to_string())), headers: vec![], timestamp_ms: 0 };
        let start = self.clock.now();
        let result = tokio::time::timeout(timeout, client.produce(topic, Some(partition), vec![record])).await;
        let (outcome, offset) = match result {
            Err(_) => (Outcome::Info, None),
            Ok(Ok(ack)) => (Outcome::Ok, Some(ack.base_offset)),
            Ok(Err(e)) => (classify(e.code), None),
        };
        let cut_short = timeout < OP_TIMEOUT;
        let send =
            SendOp { process, key: key.to_owned(), value, outcome, offset, cut_short, start, end: self.clock.now() };
        self.history.lock().unwrap_or_else(|p| p.into_inner()).sends.push(send.clone());
        send
    }
}

/// Creates one generation of topics and waits until every partition has a leader; None if `stop` was set
/// first.
async fn create_generation(
    client: &Client,
    stop: &AtomicBool,
    config: &RunConfig,
    generation: u64,
) -> Option<Vec<String>> {
    let mut keys = Vec::new();
    for t in 0..config.topics {
        let name = format!("h{}-g{generation}-t{t}", config.seed % 1_000_000);
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let created = tokio::time::timeout(
                Duration::from_secs(15),
                client.create_topic(&name, config.partitions, config.replication_factor, topic_configs(config)),
            )
            .await;
            match created {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if e.code == ErrorCode::TopicExists => break,
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        keys.extend((0..config.partitions).map(|p| history::key(&name, p)));
    }
    // Wait (bounded) for leaders, so writers do not meet a topic still electing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Ok(Ok(md)) = tokio::time::timeout(Duration::from_secs(5), client.metadata()).await {
            let led: HashSet<String> = md
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().filter(|p| p.leader != 0).map(|p| history::key(&t.name, p.partition)))
                .collect();
            if keys.iter().all(|k| led.contains(k)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Some(keys)
}

/// The scenario's topic configs (S17's small retention.bytes).
fn topic_configs(config: &RunConfig) -> Vec<(String, String)> {
    config.scenario.topic_configs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// The first offset retention kept, as the partition leader reports it.
async fn log_start(client: &Client, topic: &str, partition: u32) -> Option<u64> {
    let listed = tokio::time::timeout(OP_TIMEOUT, client.list_offsets(topic, partition, pb::OffsetSpec::Earliest, 0));
    listed.await.ok()?.ok()
}

async fn rotate(shared: Arc<Shared>, config: Arc<RunConfig>) {
    let generation = shared.generation.load(Ordering::Relaxed) + 1;
    if let Some(keys) = create_generation(&shared.client, &shared.stop, &config, generation).await {
        shared.all_keys.write().unwrap_or_else(|p| p.into_inner()).extend(keys.iter().cloned());
        *shared.current.write().unwrap_or_else(|p| p.into_inner()) = keys;
        shared.generation.store(generation, Ordering::Relaxed);
        shared.sends_this_generation.store(0, Ordering::Relaxed);
    }
    shared.rotating.store(false, Ordering::Relaxed);
}

/// A writer: fresh values to random keys of the current generation at its share of the rate. With client
/// faults (S18) a fifth of its sends get a 1-30 ms deadline, so many are cut off mid-request, and after
/// each of those the writer "crashes": it drops its client and its connections and starts a new one.
async fn writer(shared: Arc<Shared>, config: Arc<RunConfig>, bootstrap: Vec<String>, process: u64) {
    let mut rng = StdRng::seed_from_u64(shared.seed ^ (process << 32));
    let period = Duration::from_secs_f64(config.writers as f64 / config.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let new_client = || Client::new(bootstrap.clone()).with_deadline(RETRY_WINDOW);
    let mut client = new_client();
    while !shared.stopped() {
        tick.tick().await;
        let Some(key) = shared.pick(&mut rng, false) else { continue };
        if config.scenario.client_faults && rng.random_bool(0.2) {
            let deadline = Duration::from_millis(rng.random_range(1..=30));
            if shared.send_within(&client, process, &key, deadline).await.outcome == Outcome::Info {
                client = new_client();
            }
        } else {
            shared.send(&client, process, &key).await;
        }
        let keys = shared.current.read().unwrap_or_else(|p| p.into_inner()).len() as u64;
        let sent = shared.sends_this_generation.fetch_add(1, Ordering::Relaxed) + 1;
        if sent >= config.rotate_after * keys && !shared.rotating.swap(true, Ordering::Relaxed) {
            tokio::spawn(rotate(shared.clone(), config.clone()));
        }
    }
}

/// An assign-mode consumer: polls keys from its own positions; now and then seeks, or crashes and starts
/// over with a new client.
async fn consumer(shared: Arc<Shared>, bootstrap: Vec<String>, id: u64) {
    let mut rng = StdRng::seed_from_u64(shared.seed ^ (id << 40) ^ 0xC0);
    let mut client = Client::new(bootstrap.clone()).with_deadline(RETRY_WINDOW);
    let mut positions: HashMap<String, u64> = HashMap::new();
    let mut reset: HashSet<String> = HashSet::new();
    while !shared.stopped() {
        let Some(key) = shared.pick(&mut rng, true) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let roll: f64 = rng.random();
        if roll < 0.01 {
            client = Client::new(bootstrap.clone()).with_deadline(RETRY_WINDOW);
            positions.clear();
            continue;
        }
        let position = match positions.get(&key) {
            None => {
                reset.insert(key.clone());
                0
            }
            Some(&p) if roll < 0.03 => {
                reset.insert(key.clone());
                rng.random_range(0..=p)
            }
            Some(&p) => p,
        };
        let (topic, partition) = history::split_key(&key).unwrap_or((key.as_str(), 0));
        let start = shared.clock.now();
        let fetched = tokio::time::timeout(OP_TIMEOUT, client.fetch(topic, partition, position, 64 * 1024, 100)).await;
        let resp = match fetched {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if e.code == ErrorCode::OffsetOutOfRange => {
                // Below the log start, retention removed the position: start over from the earliest offset
                // kept, as a consumer with auto.offset.reset=earliest does. Above the high watermark (a new
                // leader still catching up) keep the position and retry.
                match log_start(&client, topic, partition).await {
                    Some(start) if position < start => {
                        positions.insert(key.clone(), start);
                        reset.insert(key.clone());
                    }
                    _ => {
                        positions.insert(key.clone(), position);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                continue;
            }
            _ => {
                positions.insert(key.clone(), position);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let records: Vec<(u64, u64)> =
            resp.records.iter().map(|r| (r.offset, history::parse_value(r.value.as_deref()))).collect();
        positions.insert(key.clone(), records.last().map_or(position, |(o, _)| o + 1));
        if records.is_empty() {
            continue;
        }
        let poll = Poll {
            consumer: id,
            key: key.clone(),
            from: position,
            records,
            reset: reset.remove(&key),
            start,
            end: shared.clock.now(),
        };
        shared.history.lock().unwrap_or_else(|p| p.into_inner()).polls.push(poll);
    }
}

/// W-LIN: `ListOffsets(latest)` against the acknowledgements.
async fn offsets_reader(shared: Arc<Shared>) {
    let mut rng = StdRng::seed_from_u64(shared.seed ^ 0x11_4E);
    while !shared.stopped() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(key) = shared.pick(&mut rng, false) else { continue };
        let (topic, partition) = history::split_key(&key).unwrap_or((key.as_str(), 0));
        let start = shared.clock.now();
        let listed =
            tokio::time::timeout(OP_TIMEOUT, shared.client.list_offsets(topic, partition, pb::OffsetSpec::Latest, 0))
                .await;
        if let Ok(Ok(latest)) = listed {
            let read = OffsetsRead { key, latest, start, end: shared.clock.now() };
            shared.history.lock().unwrap_or_else(|p| p.into_inner()).offsets_reads.push(read);
        }
    }
}

/// Partition leaderships per node, as the cluster reports them (empty if it does not answer).
async fn leaderships(client: &Client) -> BTreeMap<u64, u32> {
    match tokio::time::timeout(Duration::from_secs(2), client.metadata()).await {
        Ok(Ok(md)) => md.nodes.iter().map(|n| (n.node_id, n.leaderships)).collect(),
        _ => BTreeMap::new(),
    }
}

/// Runs the schedule; returns the faults as they happened, and the error that stopped it early, if any.
async fn run_nemesis(
    cluster: Arc<Mutex<Box<dyn Target>>>,
    shared: Arc<Shared>,
    schedule: Vec<Planned>,
    addrs: BTreeMap<u64, String>,
) -> (Vec<FaultEvent>, Option<String>) {
    let mut events = Vec::new();
    let error = nemesis_steps(&cluster, &shared, schedule, &addrs, &mut events).await.err().map(|e| format!("{e:#}"));
    (events, error)
}

/// How long one node's view of one topic may take in the re-election measurement: with 1,000 partitions
/// (S19) a loaded debug broker can take a second to answer.
const METADATA_WAIT: Duration = Duration::from_secs(3);

/// Polls the nodes not in `down` every 100 ms until every partition of the current topics has a live
/// leader outside `down`, as its own replicas see it (each node's local view, which asks no other node: a
/// view merged from other nodes waits on the dead ones); returns the seconds on the run's clock when it
/// did.
async fn every_partition_led(shared: &Shared, addrs: &BTreeMap<u64, String>, down: &[u64]) -> f64 {
    let live: Vec<(u64, String)> =
        addrs.iter().filter(|(id, _)| !down.contains(id)).map(|(id, a)| (*id, a.clone())).collect();
    let client = Arc::new(Client::new(live.iter().map(|(_, a)| a.clone()).collect()));
    loop {
        let topics: BTreeSet<String> = {
            let current = shared.current.read().unwrap_or_else(|p| p.into_inner());
            current.iter().map(|k| history::split_key(k).map_or(k.clone(), |(t, _)| t.to_owned())).collect()
        };
        let mut views = tokio::task::JoinSet::new();
        for (id, addr) in &live {
            for topic in &topics {
                let (client, addr, topic, id) = (client.clone(), addr.clone(), topic.clone(), *id);
                views.spawn(async move {
                    let view = tokio::time::timeout(METADATA_WAIT, client.local_view(&addr, &topic)).await;
                    (id, view)
                });
            }
        }
        // (topic, partition) -> whether one of its live replicas names a live leader outside `down`.
        let mut led: HashMap<(String, u32), bool> = HashMap::new();
        let mut answered = true;
        while let Some(joined) = views.join_next().await {
            let Ok((id, Ok(Ok(info)))) = joined else {
                answered = false;
                continue;
            };
            for p in &info.partitions {
                let entry = led.entry((info.name.clone(), p.partition)).or_insert(false);
                *entry |= p.replicas.contains(&id) && p.leader != 0 && !down.contains(&p.leader);
            }
        }
        if answered && !led.is_empty() && led.values().all(|l| *l) {
            return shared.clock.now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn nemesis_steps(
    cluster: &Mutex<Box<dyn Target>>,
    shared: &Shared,
    schedule: Vec<Planned>,
    addrs: &BTreeMap<u64, String>,
    events: &mut Vec<FaultEvent>,
) -> anyhow::Result<()> {
    for planned in schedule {
        let wait = planned.at - shared.clock.now();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let leaders = leaderships(&shared.client).await;
        let bounces = events.iter().filter(|e: &&FaultEvent| e.kind == FaultKind::Bounce).count();
        let start = shared.clock.now();
        let injected = tokio::task::block_in_place(|| {
            let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
            nemesis::inject(c.as_mut(), &planned, &leaders, bounces)
        })?;
        let graceful = nemesis::stops_gracefully(planned.kind, bounces);
        let stopped_at = if graceful { start } else { shared.clock.now() };
        println!("[{start:7.1}s] {}: {}", planned.kind, injected.description);
        let hold = Duration::from_secs_f64(planned.hold);
        // A fault that stopped some nodes but not all: how long until the rest led every partition.
        let stopped = match &injected.heal {
            Heal::Restart(ids) if ids.len() < addrs.len() => Some(ids.clone()),
            _ => None,
        };
        let releader_s = match &stopped {
            Some(down) => {
                let (led, ()) = tokio::join!(
                    tokio::time::timeout(hold, every_partition_led(shared, addrs, down)),
                    tokio::time::sleep(hold)
                );
                led.ok().map(|at| at - stopped_at)
            }
            None => {
                tokio::time::sleep(hold).await;
                None
            }
        };
        tokio::task::block_in_place(|| {
            let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
            nemesis::heal(c.as_mut(), &injected.heal)
        })?;
        let end = shared.clock.now();
        events.push(FaultEvent {
            kind: planned.kind,
            description: injected.description,
            start,
            end,
            releader_s,
            measured: stopped.is_some(),
            graceful,
        });
        if let Some(e) = events.last() {
            println!("[{end:7.1}s] healed {}{}", planned.kind, e.releader_note());
        }
    }
    Ok(())
}

/// Writes a probe to `key` until one is acknowledged, then reads the key from offset 0 through the highest
/// acknowledged offset. Returns when that completed (seconds on the clock), or None at the deadline.
async fn recover_key(shared: &Shared, client: &Client, key: &str, deadline: Instant) -> Option<f64> {
    loop {
        if Instant::now() > deadline {
            return None;
        }
        if shared.send(client, 0, key).await.outcome == Outcome::Ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = {
        let h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
        h.sends.iter().filter(|s| s.key == key).filter_map(|s| s.offset).max().map_or(0, |o| o + 1)
    };
    let (topic, partition) = history::split_key(key).unwrap_or((key, 0));
    let mut records = Vec::new();
    let mut start = 0;
    let mut next = 0;
    while next < target {
        if Instant::now() > deadline {
            break;
        }
        match tokio::time::timeout(OP_TIMEOUT, client.fetch(topic, partition, next, 1 << 20, 0)).await {
            Ok(Ok(resp)) if !resp.records.is_empty() => {
                for r in &resp.records {
                    records.push((r.offset, history::parse_value(r.value.as_deref())));
                }
                next = records.last().map_or(next, |(o, _)| o + 1);
            }
            Ok(Err(e)) if e.code == ErrorCode::OffsetOutOfRange && next < target => {
                // Retention moved the log start past the read: read again from the new start.
                match log_start(client, topic, partition).await {
                    Some(s) if s > start => {
                        (start, next) = (s, s);
                        records.clear();
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let done = next >= target;
    shared.history.lock().unwrap_or_else(|p| p.into_inner()).final_reads.push(Read {
        key: key.to_owned(),
        node: None,
        start,
        records,
        expected_end: target,
    });
    done.then(|| shared.clock.now())
}

/// W-REPLICA: reads every replica of `key` through the admin RPC once they have all applied `target`
/// offsets (or the deadline passed).
async fn read_replicas(
    shared: &Shared,
    cluster_addrs: &BTreeMap<u64, String>,
    key: &str,
    replicas: &[u64],
    target: u64,
    deadline: Instant,
) {
    let (topic, partition) = history::split_key(key).unwrap_or((key, 0));
    for node in replicas {
        let Some(addr) = cluster_addrs.get(node) else { continue };
        loop {
            let mut records: Vec<(u64, u64)> = Vec::new();
            let mut start = None;
            let mut next = 0;
            loop {
                // A replica read starts at the replica's own log start when retention removed offset `next`.
                let read =
                    tokio::time::timeout(OP_TIMEOUT, shared.client.read_replica(addr, topic, partition, next, 1 << 20))
                        .await;
                let Ok(Ok(resp)) = read else { break };
                start.get_or_insert(resp.log_start_offset);
                for r in &resp.records {
                    records.push((r.offset, history::parse_value(r.value.as_deref())));
                }
                match resp.records.last() {
                    Some(r) if r.offset + 1 < resp.high_watermark => next = r.offset + 1,
                    _ => break,
                }
            }
            // A replica whose whole log was cut ends where it starts.
            let end = records.last().map_or(start.unwrap_or(0), |(o, _)| o + 1);
            if end >= target || Instant::now() > deadline {
                let start = start.unwrap_or(0);
                let read = Read { key: key.to_owned(), node: Some(*node), start, records, expected_end: target };
                shared.history.lock().unwrap_or_else(|p| p.into_inner()).replica_reads.push(read);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs the whole thing: the cluster is stopped before this returns, whatever happened.
pub async fn run(config: RunConfig) -> anyhow::Result<RunReport> {
    // Before any cluster starts: a run too short for every kind of fault to fire could only fail its
    // coverage gate.
    let (planned, interval) = nemesis::schedule(config.seed, &config.faults, config.duration, config.interval);
    let never = nemesis::missing(&config.faults, &planned);
    if !never.is_empty() {
        let names: Vec<&str> = never.iter().map(|k| k.name()).collect();
        anyhow::bail!(
            "{:.0} s is too short for one fault of each of the {} kinds (these would never fire: {}); give a \
             longer --duration or fewer --faults",
            config.duration,
            config.faults.len(),
            names.join(", ")
        );
    }
    if interval < config.interval {
        println!(
            "faults: mean gap {interval:.1} s instead of {:.1} s, so that each of the {} kinds fires in {:.0} s",
            config.interval,
            config.faults.len(),
            config.duration
        );
    }
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.work_dir)?;
    let setup = Setup {
        data_dir: scenario::data_dir_for(&config.faults),
        fake_clocks: config.faults.contains(&FaultKind::Clock),
        packet_faults: config.faults.contains(&FaultKind::Packet),
    };
    let cluster: Box<dyn Target> = match config.target {
        TargetKind::Local => {
            Box::new(LocalCluster::start(config.nodes, &config.work_dir, config.broker.clone(), setup).await?)
        }
        TargetKind::Compose => {
            Box::new(ComposeCluster::start(config.nodes, &config.work_dir, config.seed, setup).await?)
        }
    };
    let target = cluster.name();
    let bootstrap = cluster.bootstrap();
    let addrs: BTreeMap<u64, String> =
        cluster.ids().into_iter().filter_map(|id| cluster.addr(id).map(|a| (id, a))).collect();
    let cluster = Arc::new(Mutex::new(cluster));
    let result = tokio::select! {
        r = drive(config.clone(), cluster.clone(), bootstrap, addrs, target, planned) => r,
        signal = interrupted() => Err(anyhow::anyhow!("stopped by {signal}; the cluster was torn down, nothing was judged")),
    };
    let log_lines = tokio::task::block_in_place(|| {
        let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
        c.stop_all();
        c.panic_lines()
    });
    let mut report = result?;
    report.history.node_log_lines = log_lines;
    report.judge(&config);
    Ok(report)
}

/// Resolves on SIGINT or SIGTERM, with the signal's name: a run stopped from outside (a CI timeout, a
/// person's Ctrl-C) still stops its brokers or containers and releases its mounts.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Without signal handlers the run can only end by itself.
        _ => std::future::pending().await,
    }
}

/// Aborts a task when dropped: the nemesis must not restart a node after the run tore the cluster down.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn drive(
    config: Arc<RunConfig>,
    cluster: Arc<Mutex<Box<dyn Target>>>,
    bootstrap: Vec<String>,
    addrs: BTreeMap<u64, String>,
    target: &'static str,
    schedule: Vec<nemesis::Planned>,
) -> anyhow::Result<RunReport> {
    // Setup: the first generation of topics, with patience (the cluster is still electing).
    let admin = Client::new(bootstrap.clone());
    let never = AtomicBool::new(false);
    let setup = tokio::time::timeout(SETUP_LIMIT, create_generation(&admin, &never, &config, 0)).await;
    let Ok(Some(first)) = setup else {
        anyhow::bail!("the cluster did not accept the first topics within {SETUP_LIMIT:?}; see the node logs")
    };
    let keys = first.len();
    let shared = Arc::new(Shared {
        client: Client::new(bootstrap.clone()).with_deadline(RETRY_WINDOW),
        clock: Clock(Instant::now()),
        seed: config.seed,
        history: Mutex::new(History::default()),
        all_keys: RwLock::new(first.clone()),
        current: RwLock::new(first),
        next_value: AtomicU64::new(1),
        sends_this_generation: AtomicU64::new(0),
        rotating: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    println!(
        "workload: {} keys, {} sends/s by {} writers, {} consumers",
        keys, config.rate, config.writers, config.consumers
    );

    let mut tasks = Vec::new();
    for w in 1..=config.writers {
        tasks.push(tokio::spawn(writer(shared.clone(), config.clone(), bootstrap.clone(), w)));
    }
    for c in 1..=config.consumers {
        tasks.push(tokio::spawn(consumer(shared.clone(), bootstrap.clone(), c)));
    }
    tasks.push(tokio::spawn(offsets_reader(shared.clone())));
    let mut nemesis =
        AbortOnDrop(tokio::spawn(run_nemesis(cluster.clone(), shared.clone(), schedule.clone(), addrs.clone())));

    tokio::time::sleep(Duration::from_secs_f64(config.duration)).await;
    let (faults, nemesis_error) = match (&mut nemesis.0).await {
        Ok(done) => done,
        Err(e) => (Vec::new(), Some(format!("the nemesis task failed: {e}"))),
    };
    if let Some(e) = &nemesis_error {
        println!("nemesis stopped early: {e}");
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    // Heal everything, then write to and read back every key.
    tokio::task::block_in_place(|| cluster.lock().unwrap_or_else(|p| p.into_inner()).heal_all())?;
    let healed = shared.clock.now();
    println!("[{healed:7.1}s] healed everything; final reads");
    let deadline = Instant::now() + FINAL_READ_LIMIT;
    let all_keys = shared.all_keys.read().unwrap_or_else(|p| p.into_inner()).clone();
    let reader = Arc::new(Client::new(bootstrap.clone()).with_deadline(RETRY_WINDOW));
    let mut reads = Vec::new();
    let parallel = Arc::new(tokio::sync::Semaphore::new(FINAL_READS_PARALLEL));
    for key in all_keys.clone() {
        let (shared, reader, parallel) = (shared.clone(), reader.clone(), parallel.clone());
        reads.push(tokio::spawn(async move {
            let _turn = parallel.acquire_owned().await;
            recover_key(&shared, &reader, &key, deadline).await
        }));
    }
    let mut recovered_at: Option<f64> = Some(healed);
    for r in reads {
        let done = r.await.ok().flatten();
        recovered_at = match (recovered_at, done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let recovery_s = recovered_at.map(|t| t - healed);

    // W-REPLICA. The replicas of every key from one metadata read (describing topics key by key costs a
    // round to every leader each time, minutes with 1,000 partitions).
    let converge = Instant::now() + CONVERGE_LIMIT;
    let mut replicas: HashMap<String, Vec<u64>> = HashMap::new();
    while replicas.is_empty() && Instant::now() < converge {
        match tokio::time::timeout(OP_TIMEOUT, shared.client.metadata()).await {
            Ok(Ok(md)) => {
                for t in &md.topics {
                    for p in &t.partitions {
                        replicas.insert(history::key(&t.name, p.partition), p.replicas.clone());
                    }
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let mut targets: HashMap<String, u64> = HashMap::new();
    for s in shared.history.lock().unwrap_or_else(|p| p.into_inner()).sends.iter() {
        if let Some(o) = s.offset {
            let t = targets.entry(s.key.clone()).or_insert(0);
            *t = (*t).max(o + 1);
        }
    }
    let addrs = Arc::new(addrs);
    let mut replica_reads = tokio::task::JoinSet::new();
    for key in all_keys.clone() {
        let target = targets.get(&key).copied().unwrap_or(0);
        let nodes = replicas.get(&key).cloned().unwrap_or_default();
        let (shared, addrs, parallel) = (shared.clone(), addrs.clone(), parallel.clone());
        replica_reads.spawn(async move {
            let _turn = parallel.acquire_owned().await;
            read_replicas(&shared, &addrs, &key, &nodes, target, converge).await
        });
    }
    while replica_reads.join_next().await.is_some() {}

    let history = std::mem::take(&mut *shared.history.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(RunReport {
        scenario: config.scenario.name,
        title: config.scenario.title,
        seed: config.seed,
        target,
        nodes: config.nodes,
        keys: all_keys.len(),
        duration_s: config.duration,
        schedule,
        faults,
        nemesis_error,
        polls: history.polls.len(),
        offsets_reads: history.offsets_reads.len(),
        recovery_s,
        checked: checker::check(&History::default()),
        gates: Vec::new(),
        passed: false,
        history,
    })
}

impl RunReport {
    /// Checks the history and judges the run-level gates.
    fn judge(&mut self, config: &RunConfig) {
        self.checked = checker::check(&self.history);
        let mut gates = Vec::new();
        let fired: BTreeMap<FaultKind, usize> =
            config.faults.iter().map(|k| (*k, self.faults.iter().filter(|f| f.kind == *k).count())).collect();
        gates.push(Gate {
            name: "nemesis",
            passed: self.nemesis_error.is_none(),
            detail: self.nemesis_error.clone().unwrap_or_else(|| "every planned fault injected and healed".into()),
        });
        gates.push(Gate {
            name: "coverage",
            passed: fired.values().all(|n| *n > 0),
            detail: if fired.is_empty() {
                "no faults configured".into()
            } else {
                fired.iter().map(|(k, n)| format!("{k} x{n}")).collect::<Vec<_>>().join(", ")
            },
        });
        let outside = |s: &SendOp| !self.faults.iter().any(|f| s.start < f.end + SETTLE && s.end > f.start);
        let quiet: Vec<&SendOp> =
            self.history.sends.iter().filter(|s| s.process != 0 && !s.cut_short && outside(s)).collect();
        let ok = quiet.iter().filter(|s| s.outcome == Outcome::Ok).count();
        let share = if quiet.is_empty() { 0.0 } else { ok as f64 / quiet.len() as f64 };
        gates.push(Gate {
            name: "availability",
            passed: share >= AVAILABILITY_GATE,
            detail: format!("{ok} of {} sends outside fault windows ok ({:.1}%)", quiet.len(), share * 100.0),
        });
        gates.push(Gate {
            name: "recovery",
            passed: self.recovery_s.is_some_and(|r| r <= RECOVERY_GATE),
            detail: match self.recovery_s {
                Some(r) => format!("every key written and read back {r:.1} s after the final heal"),
                None => "some key was not written or read back before the final-read limit".into(),
            },
        });
        if let Some(limit) = config.scenario.releader_limit {
            let measured: Vec<&FaultEvent> = self.faults.iter().filter(|f| f.measured && !f.graceful).collect();
            let worst = measured.iter().map(|f| f.releader_s.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
            gates.push(Gate {
                name: "re-election",
                passed: worst <= limit,
                detail: format!(
                    "after each of {} kill -9 stops of some nodes, every partition had a live leader within \
                     {limit:.0} s: worst {}",
                    measured.len(),
                    if worst.is_finite() { format!("{worst:.1} s") } else { "never within the hold".into() }
                ),
            });
        }
        let compared: HashSet<&str> = self.history.replica_reads.iter().map(|r| r.key.as_str()).collect();
        gates.push(Gate {
            name: "replicas compared",
            passed: compared.len() == self.keys,
            detail: format!("{} of {} keys had their replicas read", compared.len(), self.keys),
        });
        if config.scenario.client_faults {
            gates.push(Gate {
                name: "unknown sends once",
                passed: self.checked.info_duplicates == 0,
                detail: format!(
                    "{} of {} sends cut off or unknown were read at more than one offset (each must be read once or never)",
                    self.checked.info_duplicates, self.checked.sends_info
                ),
            });
        }
        if !config.scenario.topic_configs.is_empty() {
            // S17 proves nothing unless retention really cut the logs the faults raced.
            gates.push(Gate {
                name: "retention cut",
                passed: self.checked.keys_cut > 0,
                detail: format!(
                    "{} of {} keys' final reads began past offset 0 (log start up to {})",
                    self.checked.keys_cut, self.keys, self.checked.highest_log_start
                ),
            });
        }
        gates.push(Gate {
            name: "final reads complete",
            passed: self.checked.unseen == 0,
            detail: format!("{} acknowledged values unseen", self.checked.unseen),
        });
        self.passed = self.checked.clean() && gates.iter().all(|g| g.passed);
        self.gates = gates;
    }
}
