//! A broker node: its configuration, start-up, the controller bootstrap and the reconciler.
//!
//! Start-up: check the data directory belongs to this node and cluster, open the node's RocksDB and every
//! group recorded in it, join the controller group (group 0, kv mode, voters = the initial cluster; the
//! lowest node id bootstraps it once), start the reconciler, and serve the client API and the Raft
//! transport on one listen address.
//!
//! The reconciler makes the groups hosted here match the controller's assignments: it creates (and, on
//! the preferred leader, bootstraps) the partition groups assigned to this node and drops the groups of
//! deleted topics, freeing their storage. It runs whenever the controller's replica here applies a change,
//! and every few seconds in case an earlier attempt failed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use flotilla_raft_store::engine::{Engine, RocksConfig, RocksEngine};
use flotilla_raft_store::keys::GroupId;
use flotilla_raft_store::node::{Group, NodeOptions, RaftNode, RaftTiming};
use flotilla_raft_store::state_machine::Mode;
use flotilla_raft_store::types::{BasicNode, NodeId};

use crate::controller::{self, CONTROLLER_GROUP, TopicRecord};
use crate::disk::DiskGuard;
use crate::memory::{MemoryPlan, ProduceMemory};
use crate::proposer::Proposers;

/// A broker's configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Every initial node's id and address (this node's included).
    pub initial_cluster: BTreeMap<NodeId, String>,
    pub timing: RaftTiming,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Peers whose Raft traffic goes to another address than the initial cluster's (a proxy, a NAT).
    pub raft_peer_routes: BTreeMap<NodeId, String>,
    /// How the memory budget is split (see [`crate::memory`]).
    pub memory: MemoryPlan,
    /// How often retention runs over the partitions hosted here.
    pub retention_check_interval: Duration,
    /// Produce requests are refused while the data volume has less free space than this (see
    /// [`crate::disk`]).
    pub min_free_bytes: u64,
    /// Bytes per second the node's memtable flushes and compactions may write, if capped
    /// (`--background-write-rate`; see `RocksConfig::background_write_bytes_per_sec`).
    pub background_write_rate: Option<u64>,
}

/// Parses `1=127.0.0.1:9401,2=127.0.0.1:9402`.
pub fn parse_initial_cluster(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    parse_node_addrs(s, "the initial cluster")
}

/// Parses `ID=HOST:PORT,...` (the initial cluster, or `--raft-peer-routes`); `what` names the list in errors.
pub fn parse_node_addrs(s: &str, what: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').with_context(|| format!("entry {part:?} of {what} is not ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("node id {id:?} is not a number"))?;
        if id == 0 {
            bail!("node id 0 is reserved; node ids start at 1");
        }
        let addr = addr.trim();
        addr.parse::<SocketAddr>()
            .with_context(|| format!("address {addr:?} of node {id} is not HOST:PORT with a numeric IP"))?;
        if out.insert(id, addr.to_owned()).is_some() {
            bail!("node id {id} appears twice in {what}");
        }
    }
    if out.is_empty() {
        bail!("{what} is empty");
    }
    Ok(out)
}

impl BrokerConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let Some(own) = self.initial_cluster.get(&self.node_id) else {
            bail!(
                "node {} is not in the initial cluster {:?}; give each node an id listed there",
                self.node_id,
                self.initial_cluster
            );
        };
        if let Some(id) = self.raft_peer_routes.keys().find(|id| !self.initial_cluster.contains_key(id)) {
            bail!("--raft-peer-route names node {id}, which is not in the initial cluster");
        }
        let own: SocketAddr = own.parse().context("own address")?;
        if own.port() != self.listen.port() {
            bail!(
                "node {} listens on port {} but the initial cluster says {}; peers could not reach it",
                self.node_id,
                self.listen.port(),
                own
            );
        }
        Ok(())
    }

    /// A fingerprint of the initial cluster, stored in the data directory.
    fn cluster_fingerprint(&self) -> String {
        self.initial_cluster.iter().map(|(id, addr)| format!("{id}={addr}")).collect::<Vec<_>>().join(",")
    }
}

const IDENTITY_FILE: &str = "flotilla-node";

/// Refuses a data directory written by another node or another cluster; claims a new one.
fn check_data_dir(config: &BrokerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join(IDENTITY_FILE);
    let expected = format!("node_id={}\ninitial_cluster={}\n", config.node_id, config.cluster_fingerprint());
    match std::fs::read_to_string(&path) {
        Ok(found) => {
            let field =
                |name: &str| found.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or("").to_owned();
            if field("node_id") != config.node_id.to_string() {
                bail!(
                    "data directory {} belongs to node {}, not node {}: each node needs its own directory",
                    config.data_dir.display(),
                    field("node_id"),
                    config.node_id
                );
            }
            if field("initial_cluster") != config.cluster_fingerprint() {
                bail!(
                    "data directory {} belongs to a cluster started with initial cluster {}, not {}",
                    config.data_dir.display(),
                    field("initial_cluster"),
                    config.cluster_fingerprint()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::read_dir(&config.data_dir)?.next().is_some() {
                bail!("data directory {} is not empty and is not a Flotilla node's", config.data_dir.display());
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, expected)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&config.data_dir)?.sync_all()?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A running broker node.
pub struct Broker {
    pub config: BrokerConfig,
    pub node: Arc<RaftNode>,
    /// Serialises this node's controller writes (each is also guarded in the state machine).
    pub controller_writes: tokio::sync::Mutex<()>,
    /// Packs concurrent produce requests of each partition led here into one entry.
    pub proposers: Proposers,
    /// The produce bytes accepted and not yet acknowledged.
    pub produce_memory: ProduceMemory,
    /// The data volume's free space and its floor.
    pub disk: Arc<DiskGuard>,
    /// Topics decoded once, each with the stored bytes it was decoded from: a request looks its topic
    /// up on every call, and decoding it each time cost ~3% of a broker's CPU under produce load.
    topic_cache: std::sync::Mutex<HashMap<String, (Bytes, Arc<TopicRecord>)>>,
}

impl Broker {
    /// Opens the node's storage and groups and joins the controller group.
    pub async fn open(config: BrokerConfig) -> anyhow::Result<Arc<Broker>> {
        config.validate()?;
        check_data_dir(&config)?;
        let rocks = RocksConfig {
            write_buffer_bytes_max: config.memory.write_buffers,
            block_cache_bytes: config.memory.block_cache,
            background_write_bytes_per_sec: config.background_write_rate,
            ..RocksConfig::default()
        };
        let engine: Arc<dyn Engine> = Arc::new(
            RocksEngine::open(db_path(&config.data_dir), &rocks)
                .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?,
        );
        let disk = DiskGuard::new(config.data_dir.clone(), config.min_free_bytes)
            .with_context(|| format!("cannot read the free space of {}", config.data_dir.display()))?;
        let options = NodeOptions {
            timing: config.timing,
            routes: config.raft_peer_routes.iter().map(|(id, addr)| (*id, addr.clone())).collect(),
            tail_cache_bytes: config.memory.tail_cache,
        };
        let node = RaftNode::open_with(config.node_id, engine, options).await.context("cannot open raft groups")?;
        let controller = node.create_group(CONTROLLER_GROUP, Mode::Kv).await.context("controller group")?;
        let first = config.initial_cluster.keys().next().copied();
        if first == Some(config.node_id) && !controller.is_initialized().await.context("controller state")? {
            node.initialize_group(CONTROLLER_GROUP, members(&config.initial_cluster, config.initial_cluster.keys()))
                .await
                .context("bootstrapping the controller")?;
            tracing::info!(node = config.node_id, "bootstrapped the controller group");
        }
        Ok(Arc::new(Broker {
            node,
            controller_writes: tokio::sync::Mutex::new(()),
            proposers: Proposers::default(),
            produce_memory: ProduceMemory::new(config.memory.produce_in_flight),
            disk: Arc::new(disk),
            topic_cache: std::sync::Mutex::default(),
            config,
        }))
    }

    pub fn controller(&self) -> anyhow::Result<Group> {
        self.node.group(CONTROLLER_GROUP).context("the controller group is not open")
    }

    /// Topics as this node's controller replica knows them.
    pub fn topics(&self) -> Vec<TopicRecord> {
        let Some(c) = self.node.group(CONTROLLER_GROUP) else { return Vec::new() };
        c.sm.kv_scan(controller::topic_prefix()).iter().filter_map(|(_, v)| TopicRecord::decode(v)).collect()
    }

    /// A topic as this node's controller replica knows it now.
    pub fn topic(&self, name: &str) -> Option<Arc<TopicRecord>> {
        let c = self.node.group(CONTROLLER_GROUP)?;
        let stored = c.sm.kv_get(&controller::topic_key(name));
        let mut cache = self.topic_cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stored) = stored else {
            cache.remove(name);
            return None;
        };
        if let Some((bytes, topic)) = cache.get(name)
            && *bytes == stored
        {
            return Some(topic.clone());
        }
        let topic = Arc::new(TopicRecord::decode(&stored)?);
        cache.insert(name.to_owned(), (stored, topic.clone()));
        Some(topic)
    }

    pub fn node_addr(&self, id: NodeId) -> Option<String> {
        self.config.initial_cluster.get(&id).cloned()
    }

    /// Makes the groups hosted here match the controller's assignments.
    pub async fn reconcile(&self) -> anyhow::Result<()> {
        let me = self.config.node_id;
        let mut desired: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::new();
        let topics = self.topics();
        // Deleted topics leave the cache (a lookup of a missing topic removes it too).
        let names: HashSet<&str> = topics.iter().map(|t| t.name.as_str()).collect();
        self.topic_cache.lock().unwrap_or_else(|p| p.into_inner()).retain(|name, _| names.contains(name.as_str()));
        for topic in topics {
            for p in topic.partitions {
                if p.replicas.contains(&me) {
                    desired.insert(p.group_id, p.replicas);
                }
            }
        }
        for (group_id, replicas) in &desired {
            let group = self.node.create_group(*group_id, Mode::Log).await?;
            // The preferred leader bootstraps the group, once: an initialized group refuses it.
            if replicas.first() == Some(&me) && !group.is_initialized().await? {
                self.node.initialize_group(*group_id, members(&self.config.initial_cluster, replicas.iter())).await?;
            }
        }
        for group in self.node.groups() {
            if group.mode == Mode::Log && !desired.contains_key(&group.id) {
                self.drop_group(group.id);
            }
        }
        Ok(())
    }

    /// Takes the group of a deleted topic off this node and stops and deletes it in the background: a
    /// topic created meanwhile must not wait for its groups behind the old topic's (group ids are never
    /// reused, so the two cannot meet). The next reconcile no longer sees the group.
    fn drop_group(&self, group: GroupId) {
        self.proposers.forget(group);
        let removal = self.node.remove_group(group);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match removal.await {
                Ok(()) => tracing::info!(
                    group,
                    ms = started.elapsed().as_millis() as u64,
                    "dropped the group of a deleted topic"
                ),
                Err(e) => tracing::warn!(group, "dropping the group of a deleted topic failed: {e:#}"),
            }
        });
    }

    /// Runs [`Broker::reconcile`] on every controller change, and every few seconds, until `stop` fires.
    pub async fn run_reconciler(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Ok(controller) = self.controller() else { return };
        let mut changes = controller.sm.subscribe();
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile failed, will retry: {e:#}");
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

fn members<'a>(
    cluster: &BTreeMap<NodeId, String>,
    ids: impl Iterator<Item = &'a NodeId>,
) -> BTreeMap<NodeId, BasicNode> {
    let ids: BTreeSet<NodeId> = ids.copied().collect();
    cluster.iter().filter(|(id, _)| ids.contains(id)).map(|(id, addr)| (*id, BasicNode::new(addr.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, id: NodeId, cluster: &str) -> BrokerConfig {
        let initial_cluster = parse_initial_cluster(cluster).expect("cluster");
        let listen = initial_cluster.get(&id).cloned().unwrap_or_else(|| "127.0.0.1:1".into()).parse().expect("addr");
        BrokerConfig {
            node_id: id,
            data_dir: dir.to_path_buf(),
            listen,
            initial_cluster,
            timing: RaftTiming::default(),
            metrics_listen: None,
            raft_peer_routes: BTreeMap::new(),
            memory: MemoryPlan::new(crate::memory::MEMORY_BUDGET_MIN).expect("plan"),
            retention_check_interval: Duration::from_secs(30),
            min_free_bytes: 0,
            background_write_rate: None,
        }
    }

    #[test]
    fn initial_cluster_parsing_reports_what_is_wrong() {
        let ok = parse_initial_cluster("1=127.0.0.1:9401, 2=127.0.0.1:9402").expect("ok");
        assert_eq!(ok.len(), 2);
        for (bad, says) in [
            ("", "empty"),
            ("1", "ID=HOST:PORT"),
            ("x=127.0.0.1:1", "not a number"),
            ("0=127.0.0.1:1", "reserved"),
            ("1=localhost", "HOST:PORT"),
            ("1=127.0.0.1:1,1=127.0.0.1:2", "twice"),
        ] {
            let e = parse_initial_cluster(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let e = parse_node_addrs("2=127.0.0.1:1,2=127.0.0.1:2", "--raft-peer-routes").expect_err("dup").to_string();
        assert!(e.contains("twice in --raft-peer-routes"), "{e}");
    }

    #[test]
    fn a_node_refuses_another_nodes_or_clusters_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = "1=127.0.0.1:9401,2=127.0.0.1:9402";
        check_data_dir(&config(dir.path(), 1, cluster)).expect("claims a fresh directory");
        check_data_dir(&config(dir.path(), 1, cluster)).expect("accepts its own directory");
        let e = check_data_dir(&config(dir.path(), 2, cluster)).expect_err("other node").to_string();
        assert!(e.contains("belongs to node 1"), "{e}");
        let e = check_data_dir(&config(dir.path(), 1, "1=127.0.0.1:9401")).expect_err("other cluster").to_string();
        assert!(e.contains("belongs to a cluster"), "{e}");
        let e = config(dir.path(), 3, cluster).validate().expect_err("not a member").to_string();
        assert!(e.contains("not in the initial cluster"), "{e}");
    }
}
