//! In-process clusters of three nodes talking over the real tonic transport on 127.0.0.1, each on its
//! own RocksDB (or on an in-memory store that can lose its unsynced writes): replication of many groups,
//! retention cuts with a follower offline across the cut, and a power loss of every node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use flotilla_raft_store::engine::{Cf, Engine, EngineError, MemEngine, RocksConfig, RocksEngine, WriteBatch};
use flotilla_raft_store::keys;
use flotilla_raft_store::node::{Group, GroupRaft, RaftNode, RaftTiming};
use flotilla_raft_store::partition::{self, ReadError};
use flotilla_raft_store::record_batch::{self, ProducerInfo, Record};
use flotilla_raft_store::state_machine::{Mode, encode_batches};
use flotilla_raft_store::transport::{GroupLookup, RaftTransportService};
use flotilla_raft_store::types::Response;

const TIMING: RaftTiming =
    RaftTiming { heartbeat_interval_ms: 100, election_timeout_min_ms: 500, election_timeout_max_ms: 1000 };
const WAIT: Duration = Duration::from_secs(60);

/// A running node. Its transport server runs on a runtime of its own, so stopping the node drops every
/// connection at once, as the death of a process would.
struct RunningNode {
    node: Arc<RaftNode>,
    /// Raft RPCs this node's server got for groups it did not host.
    unknown_groups: Arc<AtomicUsize>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: std::thread::JoinHandle<()>,
}

struct Cluster {
    _root: TempDir,
    dirs: BTreeMap<u64, PathBuf>,
    addrs: BTreeMap<u64, String>,
    running: BTreeMap<u64, RunningNode>,
    /// In-memory clusters: each node's store, which outlives its processes, and the running process's
    /// view of it.
    stores: BTreeMap<u64, Arc<MemEngine>>,
    disks: BTreeMap<u64, Arc<ProcessDisk>>,
    timing: RaftTiming,
}

/// One process's view of a node's in-memory store. Its fsyncs can be held back, and it dies with the
/// process: every later write and fsync fails, so a dead incarnation's Raft tasks never touch the store
/// that the next incarnation opens.
struct ProcessDisk {
    store: Arc<MemEngine>,
    hold_syncs: AtomicBool,
    dead: AtomicBool,
}

impl ProcessDisk {
    fn new(store: Arc<MemEngine>) -> Arc<Self> {
        Arc::new(Self { store, hold_syncs: AtomicBool::new(false), dead: AtomicBool::new(false) })
    }

    fn alive(&self) -> Result<(), EngineError> {
        match self.dead.load(Ordering::SeqCst) {
            true => Err(EngineError::Backend("the process is dead".into())),
            false => Ok(()),
        }
    }

    /// The machine loses power: the process dies and the store keeps only what was fsynced.
    fn power_loss(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.store.crash();
    }
}

impl Drop for Cluster {
    /// A failed test must not hang on a held fsync: the processes die with the cluster.
    fn drop(&mut self) {
        for disk in self.disks.values() {
            disk.dead.store(true, Ordering::SeqCst);
        }
    }
}

impl Engine for ProcessDisk {
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        self.alive()?;
        self.store.write(batch)
    }

    fn sync_wal(&self) -> Result<(), EngineError> {
        while self.hold_syncs.load(Ordering::SeqCst) && !self.dead.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.alive()?;
        self.store.sync_wal()
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Bytes>, EngineError> {
        self.store.get(cf, key)
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.store.scan(cf, from, to, visit)
    }

    fn last_in_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Bytes)>, EngineError> {
        self.store.last_in_range(cf, from, to)
    }

    fn reclaim_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<(), EngineError> {
        self.alive()?;
        self.store.reclaim_range(cf, from, to)
    }
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
async fn wait_for(what: &str, cond: impl AsyncFnMut() -> bool) {
    wait_within(what, WAIT, cond).await
}

/// Polls `cond` until it holds, failing the test after `limit`.
async fn wait_within(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_engine(dir: &Path) -> Arc<dyn Engine> {
    // A stopped node's engine is released once its last Raft task has finished: retry while it lingers.
    let mut last_err = None;
    for _ in 0..500 {
        match RocksEngine::open(dir, &RocksConfig::default()) {
            Ok(e) => return Arc::new(e),
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not reopen {dir:?}: {last_err:?}");
}

/// A node's groups as its transport server finds them, counting the RPCs for groups it does not host.
struct CountingLookup {
    node: Weak<RaftNode>,
    unknown: Arc<AtomicUsize>,
}

impl GroupLookup for CountingLookup {
    fn raft(&self, group: u64) -> Option<GroupRaft> {
        let raft = self.node.raft(group);
        if raft.is_none() {
            self.unknown.fetch_add(1, Ordering::SeqCst);
        }
        raft
    }
}

/// Serves `node`'s Raft transport on `listener` from a thread of its own; returns its stop signal and
/// thread, and the count of RPCs for groups the node did not host.
fn serve(
    node: &Arc<RaftNode>,
    listener: std::net::TcpListener,
) -> (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>, Arc<AtomicUsize>) {
    let unknown = Arc::new(AtomicUsize::new(0));
    let lookup = CountingLookup { node: Arc::downgrade(node), unknown: unknown.clone() };
    let service = RaftTransportService::new(Arc::new(lookup)).into_server();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("server runtime");
        rt.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = TcpListener::from_std(listener).expect("listener");
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let server = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming);
            tokio::select! {
                r = server => r.expect("raft transport server"),
                _ = stopped => {}
            }
        });
        // Dropping the runtime here cancels every connection task of this server.
    });
    (stop, thread, unknown)
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        Self::start_with(n, false, TIMING).await
    }

    /// A cluster whose nodes keep their data in memory ([`ProcessDisk`]), so a test can cut power.
    async fn start_in_memory(n: u64) -> Cluster {
        Self::start_with(n, true, TIMING).await
    }

    async fn start_with(n: u64, in_memory: bool, timing: RaftTiming) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let root = tempfile::tempdir().expect("tempdir");
        let mut cluster = Cluster {
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            running: BTreeMap::new(),
            stores: BTreeMap::new(),
            disks: BTreeMap::new(),
            timing,
            _root: root,
        };
        for id in 1..=n {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let dir = cluster._root.path().join(format!("node-{id}"));
            cluster.dirs.insert(id, dir.clone());
            cluster.addrs.insert(id, addr);
            if in_memory {
                cluster.stores.insert(id, Arc::new(MemEngine::new()));
            }
            let node = RaftNode::open(id, cluster.engine(id).await, timing).await.expect("open node");
            let (stop, server, unknown_groups) = serve(&node, listener);
            cluster.running.insert(id, RunningNode { node, unknown_groups, stop, server });
        }
        cluster
    }

    /// The store node `id`'s next incarnation opens: its RocksDB, or a fresh process view of its memory.
    async fn engine(&mut self, id: u64) -> Arc<dyn Engine> {
        match self.stores.get(&id) {
            Some(store) => {
                let disk = ProcessDisk::new(store.clone());
                self.disks.insert(id, disk.clone());
                disk
            }
            None => open_engine(&self.dirs[&id]).await,
        }
    }

    fn disk(&self, id: u64) -> &ProcessDisk {
        self.disks.get(&id).expect("an in-memory node")
    }

    fn members(&self) -> BTreeMap<u64, BasicNode> {
        self.addrs.iter().map(|(id, addr)| (*id, BasicNode::new(addr.clone()))).collect()
    }

    fn node(&self, id: u64) -> &Arc<RaftNode> {
        &self.running.get(&id).expect("node running").node
    }

    /// Creates log-mode group `g` on every node; node `g % n + 1` bootstraps it, spreading leaders.
    async fn create_group(&self, g: u64) {
        for r in self.running.values() {
            r.node.create_group(g, Mode::Log).await.expect("create group");
        }
        let first = g % self.addrs.len() as u64 + 1;
        self.node(first).initialize_group(g, self.members()).await.expect("initialize");
    }

    /// The group's handle on its current leader.
    async fn leader(&self, g: u64) -> Group {
        self.leader_and_id(g).await.0
    }

    /// The group's handle on its current leader, and the leader's node id.
    async fn leader_and_id(&self, g: u64) -> (Group, u64) {
        let mut found = None;
        wait_for(&format!("a leader of group {g}"), async || {
            for r in self.running.values() {
                if let Some(group) = r.node.group(g)
                    && group.is_leader(r.node.id())
                {
                    found = Some((group, r.node.id()));
                    return true;
                }
            }
            false
        })
        .await;
        found.expect("leader")
    }

    /// Appends entries `entries` of group `g`, entry `e` holding records `5e` to `5e + 4`.
    async fn append_fives(&self, g: u64, entries: std::ops::Range<u64>) {
        for e in entries {
            let records: Vec<Record> = (e * 5..e * 5 + 5).map(|i| record(g, i)).collect();
            self.append(g, &records).await;
        }
    }

    /// Appends `records` as one entry through the leader; returns the assigned base offset.
    async fn append(&self, g: u64, records: &[Record]) -> u64 {
        let batch = record_batch::build(records, ProducerInfo::NONE);
        loop {
            let leader = self.leader(g).await;
            match leader.raft.client_write(encode_batches(std::slice::from_ref(&batch))).await {
                Ok(resp) => match resp.data {
                    Response::Appended { base_offset, last_offset } => {
                        assert_eq!(last_offset + 1 - base_offset, records.len() as u64);
                        return base_offset;
                    }
                    other => panic!("unexpected response {other:?}"),
                },
                // Leadership moved between the lookup and the write: look again.
                Err(e) if e.forward_to_leader().is_some() => continue,
                Err(e) => panic!("write to group {g} failed: {e}"),
            }
        }
    }

    async fn stop(&mut self, id: u64) {
        let r = self.running.remove(&id).expect("running");
        r.node.shutdown().await;
        let _ = r.stop.send(());
        tokio::task::spawn_blocking(move || r.server.join().expect("server thread")).await.expect("join");
    }

    async fn restart(&mut self, id: u64) {
        let addr = self.addrs[&id].clone();
        let listener = std::net::TcpListener::bind(&addr).expect("rebind");
        let node = RaftNode::open(id, self.engine(id).await, self.timing).await.expect("reopen node");
        let (stop, server, unknown_groups) = serve(&node, listener);
        self.running.insert(id, RunningNode { node, unknown_groups, stop, server });
    }

    async fn shutdown(mut self) {
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

fn record(g: u64, i: u64) -> Record {
    Record {
        key: Some(Bytes::from(format!("key-{}", i % 7))),
        value: Some(Bytes::from(format!("g{g}-value-{i}"))),
        headers: vec![],
        timestamp_ms: 1_700_000_000_000 + i as i64,
    }
}

/// Every record of group `g` readable on node `id` from `from` to the high watermark, as (offset, value).
fn read_all(node: &RaftNode, g: u64, from: u64) -> Vec<(i64, Bytes)> {
    read_all_by(node, g, from, 64 << 10)
}

/// [`read_all`] with reads of at most `max_bytes` each.
fn read_all_by(node: &RaftNode, g: u64, from: u64, max_bytes: usize) -> Vec<(i64, Bytes)> {
    let group = node.group(g).expect("group hosted");
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let (batches, state) = partition::read(&group.sm, next, max_bytes).expect("read");
        for b in &batches {
            for r in record_batch::records(&b.bytes).expect("valid batch") {
                let r = r.expect("record");
                if r.offset >= from as i64 {
                    out.push((r.offset, r.record.value.expect("value")));
                }
            }
            next = b.last_offset + 1;
        }
        if batches.is_empty() || next >= state.high_watermark {
            return out;
        }
    }
}

async fn wait_high_watermark(cluster: &Cluster, g: u64, ids: &[u64], hw: u64) {
    for id in ids {
        let node = cluster.node(*id).clone();
        wait_for(&format!("group {g} on node {id} to reach high watermark {hw}"), async || {
            node.group(g).is_some_and(|grp| grp.sm.partition_state().high_watermark >= hw)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_groups_replicate_ten_thousand_records_densely_to_every_replica() {
    const GROUPS: u64 = 50;
    const ENTRIES_PER_GROUP: u64 = 20;
    const RECORDS_PER_ENTRY: u64 = 10;
    let cluster = Cluster::start(3).await;
    for g in 1..=GROUPS {
        cluster.create_group(g).await;
    }
    // Leaders spread: every node bootstrapped a third of the groups.
    let writers = (1..=GROUPS).map(|g| {
        let cluster = &cluster;
        async move {
            for e in 0..ENTRIES_PER_GROUP {
                let records: Vec<Record> =
                    (0..RECORDS_PER_ENTRY).map(|r| record(g, e * RECORDS_PER_ENTRY + r)).collect();
                let base = cluster.append(g, &records).await;
                assert_eq!(base, e * RECORDS_PER_ENTRY, "group {g}: offsets are dense and in order");
            }
        }
    });
    futures::future::join_all(writers).await;
    let per_group = ENTRIES_PER_GROUP * RECORDS_PER_ENTRY;
    for g in 1..=GROUPS {
        wait_high_watermark(&cluster, g, &[1, 2, 3], per_group).await;
        let expected: Vec<(i64, Bytes)> =
            (0..per_group).map(|i| (i as i64, record(g, i).value.expect("value"))).collect();
        for id in 1..=3 {
            assert_eq!(read_all(cluster.node(id), g, 0), expected, "group {g} on node {id}");
        }
    }
    let stats: Vec<_> = (1..=3).map(|id| cluster.node(id).sync_stats()).collect();
    assert!(stats.iter().all(|s| s.syncs > 0 && s.entries >= GROUPS * ENTRIES_PER_GROUP));
    cluster.shutdown().await;
}

/// A read gathers whole batches until its byte budget is reached, skips the entries that hold no records
/// (a new leader's blank entry), and reads from the engine what its tail cache does not hold (a restarted
/// node's whole log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stop_after_the_batch_reaching_their_budget_and_skip_entries_without_records() {
    const G: u64 = 4;
    let mut cluster = Cluster::start(3).await;
    cluster.create_group(G).await;
    cluster.append_fives(G, 0..10).await;
    // A new term: its leader's blank entry lands between the two halves of the records.
    let (_, old) = cluster.leader_and_id(G).await;
    let (led, _) = cluster.node(old).hand_off_leaderships(Duration::from_secs(10)).await;
    assert_eq!(led, 1, "node {old} handed its leadership off");
    cluster.append_fives(G, 10..20).await;
    wait_high_watermark(&cluster, G, &[1, 2, 3], 100).await;
    // Node 3 restarts: its tail cache starts empty, so every read there goes to the engine.
    cluster.stop(3).await;
    cluster.restart(3).await;
    wait_high_watermark(&cluster, G, &[3], 100).await;
    let expected: Vec<(i64, Bytes)> = (0..100).map(|i| (i as i64, record(G, i).value.expect("value"))).collect();
    for id in 1..=3 {
        let group = cluster.node(id).group(G).expect("group");
        let read = |offset: u64, max_bytes: usize| {
            let (batches, _) = partition::read(&group.sm, offset, max_bytes).expect("read");
            batches.iter().map(|b| (b.base_offset, b.last_offset, b.bytes.len())).collect::<Vec<_>>()
        };
        let one: Vec<_> = (0..20).map(|e| read(e * 5, 1)).collect();
        for (e, batches) in (0u64..).zip(&one) {
            assert_eq!(batches.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), [(e * 5, e * 5 + 4)], "node {id}");
        }
        // From the middle of a batch: the batch holding the offset comes whole.
        assert_eq!(read(47, 1), one[9], "node {id}");
        // Across the blank entry, with a budget the 9th and 10th batches reach only with the 11th.
        let budget = one[8][0].2 + one[9][0].2 + 1;
        assert_eq!(read(40, budget), [one[8][0], one[9][0], one[10][0]], "node {id}");
        assert_eq!(read(0, 1 << 20).len(), 20, "node {id}: every batch in one read");
        assert_eq!(read_all_by(cluster.node(id), G, 0, 1), expected, "node {id}, a batch per read");
        assert_eq!(read_all_by(cluster.node(id), G, 0, budget), expected, "node {id}, three batches per read");
    }
    cluster.shutdown().await;
}

/// A lookup by time finds the first record stamped at or after it, inside an entry and past the first
/// chunk of offset-index rows it scans; a time after every record gives the high watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_by_time_finds_the_first_record_at_or_after_it() {
    const G: u64 = 6;
    const ENTRIES: u64 = 300;
    let cluster = Cluster::start(3).await;
    cluster.create_group(G).await;
    // Record i is stamped T0 + i (see `record`), two records per entry.
    for e in 0..ENTRIES {
        cluster.append(G, &[record(G, 2 * e), record(G, 2 * e + 1)]).await;
    }
    wait_high_watermark(&cluster, G, &[1, 2, 3], 2 * ENTRIES).await;
    let t0 = record(G, 0).timestamp_ms;
    for id in 1..=3 {
        let sm = &cluster.node(id).group(G).expect("group").sm;
        let at = |ts: i64| partition::offset_at_time(sm, ts).expect("lookup");
        assert_eq!(at(t0 - 1), 0, "node {id}: before every record");
        assert_eq!(at(t0), 0, "node {id}");
        assert_eq!(at(t0 + 1), 1, "node {id}: the second record of an entry");
        assert_eq!(at(t0 + 555), 555, "node {id}: past the first 256 entries");
        assert_eq!(at(t0 + 599), 599, "node {id}: the last record");
        assert_eq!(at(t0 + 600), 600, "node {id}: after every record, the high watermark");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_offline_across_a_retention_cut_catches_up_and_restarts_serve_from_the_cut() {
    const G: u64 = 9;
    let mut cluster = Cluster::start(3).await;
    cluster.create_group(G).await;
    cluster.append_fives(G, 0..30).await;
    wait_high_watermark(&cluster, G, &[1, 2, 3], 150).await;
    // Take a follower offline.
    let leader_id = cluster.leader(G).await.metrics().id;
    let offline = (1..=3).find(|id| *id != leader_id).expect("a follower");
    cluster.stop(offline).await;
    cluster.append_fives(G, 30..60).await;
    let live: Vec<u64> = (1..=3).filter(|id| *id != offline).collect();
    wait_high_watermark(&cluster, G, &live, 300).await;
    // Retention on every live replica removes everything below offset 200.
    for id in &live {
        let group = cluster.node(*id).group(G).expect("group");
        let cut = group.retention_cut(200).await.expect("cut").expect("a cut below 200");
        assert_eq!(cut.start_offset, 200);
        let node = cluster.node(*id).clone();
        wait_for("the log purged up to the cut", async || {
            let m = node.group(G).expect("group").metrics();
            m.purged.is_some_and(|p| p.index >= cut.index)
        })
        .await;
        assert_eq!(group.sm.partition_state().log_start_offset, 200);
        assert!(matches!(
            partition::read(&group.sm, 0, 1 << 20),
            Err(ReadError::OffsetOutOfRange { log_start_offset: 200, .. })
        ));
    }
    cluster.append_fives(G, 60..70).await;
    let expected: Vec<(i64, Bytes)> = (200..350).map(|i| (i as i64, record(G, i).value.expect("value"))).collect();
    // The follower comes back: the entries it misses are purged, so it installs the snapshot at the cut
    // and then receives the rest of the log. No gap, same records.
    cluster.restart(offline).await;
    wait_high_watermark(&cluster, G, &[offline], 350).await;
    assert_eq!(cluster.node(offline).group(G).expect("group").sm.partition_state().log_start_offset, 200);
    for id in 1..=3 {
        assert_eq!(read_all(cluster.node(id), G, 200), expected, "node {id} after catch-up");
    }
    // A restart after the purge serves from the new start offset.
    let restarted = live[0];
    cluster.stop(restarted).await;
    cluster.restart(restarted).await;
    wait_high_watermark(&cluster, G, &[restarted], 350).await;
    let group = cluster.node(restarted).group(G).expect("group");
    assert_eq!(group.sm.partition_state().log_start_offset, 200);
    assert_eq!(read_all(cluster.node(restarted), G, 200), expected, "node {restarted} after restart");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_stops_the_group_and_the_node_reports_it() {
    let engine = Arc::new(flotilla_raft_store::engine::MemEngine::new());
    let node = RaftNode::open(1, engine.clone(), TIMING).await.expect("open node");
    node.create_group(4, Mode::Log).await.expect("create group");
    let me = BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]);
    node.initialize_group(4, me).await.expect("initialize");
    let group = node.group(4).expect("group");
    wait_for("a leader", async || group.is_leader(1)).await;
    let batch = record_batch::build(&[record(4, 0)], ProducerInfo::NONE);
    group.raft.client_write(encode_batches(std::slice::from_ref(&batch))).await.expect("write");
    assert_eq!(node.storage_failure(), None);

    engine.set_failing(Some("no space left on device"));
    let failed = group.raft.client_write(encode_batches(std::slice::from_ref(&batch))).await;
    assert!(failed.is_err(), "a write on a failing disk is never acknowledged");
    wait_for("the failure to be reported", async || node.storage_failure().is_some()).await;
    let (g, why) = node.storage_failure().expect("failure");
    assert_eq!(g, 4);
    assert!(why.contains("no space left on device"), "{why}");
    // A failed replica names no leader, so nothing is routed to it.
    assert_eq!(group.leader(), None);
}

/// Every node loses power at once while the leader's newest entry is on its followers' disks but not on
/// its own (its fsync had not run). The restarted leader must not take its old term back: it would write
/// other records under the log ids its followers hold, and they would keep theirs as matching. The
/// replicas would then disagree at one offset (found by the failover harness's S9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_power_loss_a_leader_missing_its_unsynced_tail_does_not_resume_its_term() {
    const G: u64 = 1;
    let mut cluster = Cluster::start_in_memory(3).await;
    cluster.create_group(G).await;
    assert_eq!(cluster.append(G, &[record(G, 0)]).await, 0);
    wait_high_watermark(&cluster, G, &[1, 2, 3], 1).await;

    let (leader, l) = cluster.leader_and_id(G).await;
    let before = leader.metrics().last_log_index.unwrap_or(0);
    cluster.disk(l).hold_syncs.store(true, Ordering::SeqCst);
    let batch = record_batch::build(&[record(G, 1)], ProducerInfo::NONE);
    let raft = leader.raft.clone();
    let write = tokio::spawn(async move { raft.client_write(encode_batches(std::slice::from_ref(&batch))).await });
    let followers: Vec<u64> = (1..=3).filter(|id| *id != l).collect();
    // The leader cannot commit the entry (its own fsync of the commit index is held too), so its
    // followers are asked directly: the entry is in what a power loss would leave of their stores.
    let key = keys::group_u64(G, before + 1);
    wait_for("both followers to have the new entry on disk", async || {
        followers.iter().all(|f| cluster.stores[f].durable(Cf::Log, &key).is_some())
    })
    .await;
    assert_eq!(cluster.stores[&l].durable(Cf::Log, &key), None, "the leader's own copy is not synced");

    for id in 1..=3 {
        cluster.disk(id).power_loss();
    }
    for id in 1..=3 {
        cluster.stop(id).await;
        // Whatever a dying task wrote after the loss never reached the disk either.
        cluster.stores[&id].crash();
    }
    write.abort();
    // The old leader first, so that it could resume before any follower's election timer runs out.
    cluster.restart(l).await;
    for &f in &followers {
        cluster.restart(f).await;
    }

    let offset = cluster.append(G, &[record(G, 2)]).await;
    wait_high_watermark(&cluster, G, &[1, 2, 3], offset + 1).await;
    let logs: BTreeMap<u64, Vec<(i64, Bytes)>> = (1..=3).map(|id| (id, read_all(cluster.node(id), G, 0))).collect();
    let first = &logs[&1];
    assert!(logs.values().all(|log| log == first), "replicas disagree: {logs:?}");
    let values: Vec<&Bytes> = first.iter().map(|(_, v)| v).collect();
    assert_eq!(values.last().map(|v| v.as_ref()), Some(&b"g1-value-2"[..]));
    // The entry the followers had fsynced survives: it was on a majority.
    assert!(values.iter().any(|v| v.as_ref() == b"g1-value-1"), "{logs:?}");
    cluster.shutdown().await;
}

/// A node about to stop hands every leadership to a caught-up replica first (controlled shutdown), so
/// the groups it led keep taking writes without waiting out an election timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_handing_off_its_leaderships_leads_nothing_and_its_groups_keep_taking_writes() {
    let cluster = Cluster::start(3).await;
    let groups: Vec<u64> = (10..16).collect();
    for &g in &groups {
        cluster.create_group(g).await;
        cluster.append(g, &[record(g, 0)]).await;
    }
    // Group g is bootstrapped by node g % 3 + 1, which then leads it: node 1 leads 12 and 15.
    let led_by_1: Vec<u64> =
        groups.iter().copied().filter(|g| cluster.node(1).group(*g).expect("group").is_leader(1)).collect();
    assert!(!led_by_1.is_empty(), "node 1 leads some group before the hand-off");

    let (led, still) = cluster.node(1).hand_off_leaderships(Duration::from_secs(10)).await;
    assert_eq!((led, still), (led_by_1.len(), 0), "every leadership handed off");
    for &g in &groups {
        let (_, id) = cluster.leader_and_id(g).await;
        assert_ne!(id, 1, "group {g} is led elsewhere");
        assert_eq!(cluster.append(g, &[record(g, 1)]).await, 1, "group {g} takes writes");
    }
    cluster.shutdown().await;
}

/// A new group's replicas are created by each node when it applies the group's creation, so the node
/// that bootstraps it may campaign before its peers host it. Their refusals must not cost the group an
/// election timeout: elections here time out after two minutes, far beyond this test's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_campaigning_before_its_peers_host_it_is_led_once_they_do() {
    let slow_elections =
        RaftTiming { heartbeat_interval_ms: 100, election_timeout_min_ms: 120_000, election_timeout_max_ms: 121_000 };
    let cluster = Cluster::start_with(3, false, slow_elections).await;
    let g = 40;
    cluster.node(1).create_group(g, Mode::Log).await.expect("create group");
    cluster.node(1).initialize_group(g, cluster.members()).await.expect("initialize");
    let refused = |id: u64| cluster.running[&id].unknown_groups.load(Ordering::SeqCst);
    wait_for("both peers to refuse a vote for the group they do not host", async || refused(2) >= 1 && refused(3) >= 1)
        .await;
    for id in [2, 3] {
        cluster.node(id).create_group(g, Mode::Log).await.expect("create group");
    }
    wait_within("node 1 to lead the group, well before an election timeout", Duration::from_secs(30), async || {
        cluster.node(1).group(g).is_some_and(|group| group.is_leader(1))
    })
    .await;
    assert_eq!(cluster.append(g, &[record(g, 0)]).await, 0, "the group takes writes");
    cluster.shutdown().await;
}
