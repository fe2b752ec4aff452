//! [`RaftNode`]: the registry of every Raft group hosted by one broker node.
//!
//! A node owns one engine, one [`WalSyncer`], one [`PeerPool`] and a map `GroupId -> Group`. Creating a
//! group writes a small marker (its mode) so a restarted node reopens all its groups; dropping one shuts
//! its Raft down and range-deletes its keys in every column family.
//!
//! Lifecycle: built once at start-up ([`RaftNode::open`]), shared as `Arc<RaftNode>` by the gRPC transport
//! service (through [`GroupLookup`]) and by the broker; [`RaftNode::shutdown`] stops every group.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, Fatal};
use openraft::raft::ReadPolicy;
use openraft::{BasicNode, Config, RaftMetrics, SnapshotPolicy};

use crate::codec;
use crate::engine::{Cf, Engine, WriteBatch};
use crate::keys::{self, GroupId, meta_tag};
use crate::log_store::{CommittedSync, LogStore, TailBudget};
use crate::state_machine::{Cut, GroupStateMachine, Mode, SmShared};
use flotilla_proto::raft::raft_transport_server::RaftTransportServer;

use crate::transport::{GroupLookup, GroupNetworkFactory, PeerPool, RaftTransportService};
use crate::types::{Command, NodeId, Raft, Response, TypeConfig, term_of};
use crate::wal::{SyncStatsSnapshot, WalSyncer};

/// The Raft handle of a group.
pub type GroupRaft = Raft<GroupStateMachine>;

/// Raft timing shared by every group of a node.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTiming {
    /// Hundreds of groups per node: a heartbeat every 250 ms keeps idle cost low. A follower stands for
    /// election once the leader lease (openraft's is the longest election timeout) and then an election
    /// timeout have passed without a word from the leader: 1.5-2 s of silence, six heartbeats or more.
    /// That is most of the time a partition takes to acknowledge again after its leader dies (B10: 1.6-2.1
    /// s; 3.3-4.3 s with timeouts of 1-2 s). No load shape triggered an election by timer at these values.
    fn default() -> Self {
        Self { heartbeat_interval_ms: 250, election_timeout_min_ms: 500, election_timeout_max_ms: 1000 }
    }
}

/// Per-node settings beyond the engine.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub timing: RaftTiming,
    /// Peers whose Raft traffic is dialled at another address than their membership address.
    pub routes: HashMap<NodeId, String>,
    /// Decoded-entry tail cache of all groups together (see [`TailBudget`]).
    pub tail_cache_bytes: usize,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self { timing: RaftTiming::default(), routes: HashMap::new(), tail_cache_bytes: 64 << 20 }
    }
}

/// A replica this many entries behind the leader's last log still counts as caught up.
const REPLICA_LAG_ENTRIES_MAX: u64 = 100;

/// How long sending and installing a snapshot's last segment may take. A kv-mode group's snapshot (the
/// controller's metadata, committed offsets) is its whole map, so this does not shrink with the election
/// timeouts.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 2000;

/// Entries a kv-mode group keeps between snapshots.
const KV_LOGS_PER_SNAPSHOT: u64 = 1000;

impl RaftTiming {
    fn config(&self, group: GroupId, mode: Mode) -> io::Result<Arc<Config>> {
        let (snapshot_policy, keep) = match mode {
            // Log mode snapshots only at retention cuts, and purges right up to each cut.
            Mode::Log => (SnapshotPolicy::Never, 0),
            Mode::Kv => (SnapshotPolicy::LogsSinceLast(KV_LOGS_PER_SNAPSHOT), KV_LOGS_PER_SNAPSHOT),
        };
        let config = Config {
            cluster_name: format!("group-{group}"),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            snapshot_policy,
            max_in_snapshot_log_to_keep: keep,
            max_payload_entries: 1024,
            // A restarted leader must win an election in a new term. Resuming its old term (openraft's
            // default) is unsafe here: a leader replicates entries before its own fsync, so after a power
            // loss (or kill -9: the WAL buffer lives in the process) it can come back without entries that
            // its followers have on disk, and would write other entries under the same log ids, which the
            // followers then keep as matching.
            enable_leader_restore: Some(false),
            // A follower first asks whether it could win. Without it, a follower whose log is behind
            // starts a real election when its timer fires, takes a new term, and makes the up-to-date
            // follower's own election at that term fail: after a leader's crash the group then waits
            // out another election timeout (S2, S16: 5-6 s instead of 3-4 s).
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        config.validate().map(Arc::new).map_err(|e| io::Error::other(format!("raft config: {e}")))
    }
}

/// One hosted group.
#[derive(Clone)]
pub struct Group {
    pub id: GroupId,
    pub mode: Mode,
    pub raft: GroupRaft,
    pub log: LogStore,
    pub sm: Arc<SmShared>,
}

/// Why a write or a linearizable read could not be served by this replica.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// Another replica leads (or none does right now); `leader` names it when known.
    #[error("not the leader of group {group}")]
    NotLeader { group: GroupId, leader: Option<NodeId>, leader_addr: Option<String> },
    /// The commit status is unknown (leadership changed while the entry was in flight).
    #[error("group {group}: the outcome is unknown, the leader changed while the write was in flight")]
    Unknown { group: GroupId, leader: Option<NodeId>, leader_addr: Option<String> },
    /// The group stopped (storage failure) or is shutting down.
    #[error("group {group} is stopped: {reason}")]
    Stopped { group: GroupId, reason: String },
}

/// A plain view of a group's Raft state on this node, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStatus {
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
}

fn leads(m: &RaftMetrics<TypeConfig>, node: NodeId) -> bool {
    m.current_leader == Some(node) && m.state.is_leader()
}

fn serves_reads(m: &RaftMetrics<TypeConfig>, node: NodeId) -> bool {
    leads(m, node) && m.last_applied.as_ref().is_some_and(|applied| term_of(applied) == m.current_term)
}

impl Group {
    /// This replica's view of the group's Raft state.
    pub fn status(&self, me: NodeId) -> GroupStatus {
        self.with_metrics(|m| GroupStatus {
            leader: m.current_leader,
            is_leader: leads(m, me),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: m.local_committed.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
        })
    }

    /// Proposes `command` and waits until it is committed and applied; returns what applying produced.
    pub async fn write(&self, command: Command) -> Result<Response, GroupError> {
        match self.raft.client_write(command).await {
            Ok(resp) => Ok(resp.data),
            Err(e) => {
                let group = self.id;
                if let Some(fwd) = e.forward_to_leader() {
                    let (leader, leader_addr) = (fwd.leader_id, fwd.leader_node.as_ref().map(|n| n.addr.clone()));
                    return Err(match e.api_error() {
                        Some(ClientWriteError::LogEntryDiscarded(_)) => {
                            GroupError::Unknown { group, leader, leader_addr }
                        }
                        _ => GroupError::NotLeader { group, leader, leader_addr },
                    });
                }
                Err(GroupError::Stopped { group, reason: e.to_string() })
            }
        }
    }

    /// Waits until this replica has applied everything committed before the call, confirming with a
    /// quorum that it still leads (ReadIndex). After it returns, reads of the local state are
    /// linearizable.
    pub async fn linearize(&self) -> Result<(), GroupError> {
        let group = self.id;
        self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map_err(|e| match e.forward_to_leader() {
            Some(fwd) => GroupError::NotLeader {
                group,
                leader: fwd.leader_id,
                leader_addr: fwd.leader_node.as_ref().map(|n| n.addr.clone()),
            },
            None => GroupError::Stopped { group, reason: e.to_string() },
        })?;
        Ok(())
    }

    /// Asks the leader (this replica) to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: NodeId) -> io::Result<()> {
        self.raft.trigger().transfer_leader(to).await.map_err(io::Error::other)
    }

    /// Whether the group has a log or vote here (it was bootstrapped or joined).
    pub async fn is_initialized(&self) -> io::Result<bool> {
        self.raft.is_initialized().await.map_err(io::Error::other)
    }

    /// Why the group's Raft core stopped on its own (a storage failure, a panic), if it did. A group
    /// stopped by a shutdown is not failed.
    pub fn failure(&self) -> Option<String> {
        match &self.raft.metrics().borrow_watched().running_state {
            Err(Fatal::Stopped) | Ok(()) => None,
            Err(fatal) => Some(fatal.to_string()),
        }
    }

    /// The leader this replica knows of, and its address. None once the group has failed: its last
    /// known leader may be this very replica, which can no longer serve.
    pub fn leader(&self) -> Option<(NodeId, Option<String>)> {
        self.with_metrics(|m| {
            if m.running_state.is_err() {
                return None;
            }
            let id = m.current_leader?;
            let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone());
            Some((id, addr))
        })
    }

    /// On the leader: how many entries each replica (the leader included, at 0) is behind the leader's
    /// last log entry. Empty elsewhere.
    pub fn replica_progress(&self) -> BTreeMap<NodeId, u64> {
        self.with_metrics(|m| {
            let last = m.last_log_index.unwrap_or(0);
            match &m.replication {
                Some(progress) => progress
                    .iter()
                    .map(|(id, matched)| (*id, last.saturating_sub(matched.map_or(0, |l| l.index))))
                    .collect(),
                None => BTreeMap::new(),
            }
        })
    }

    /// Voters of the group, and which of them the leader sees as caught up to its last log index.
    pub fn replica_status(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        self.with_metrics(|m| {
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let in_sync = match (&m.replication, m.last_log_index) {
                (Some(progress), Some(last)) => progress
                    .iter()
                    .filter(|(_, matched)| matched.is_some_and(|l| l.index + REPLICA_LAG_ENTRIES_MAX >= last))
                    .map(|(id, _)| *id)
                    .collect(),
                _ => Vec::new(),
            };
            (voters, in_sync)
        })
    }

    /// The group's current Raft metrics on this node.
    pub fn metrics(&self) -> RaftMetrics<TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Reads the group's current Raft metrics in place (no copy; do not hold it across an await).
    fn with_metrics<R>(&self, read: impl FnOnce(&RaftMetrics<TypeConfig>) -> R) -> R {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        read(&m)
    }

    /// Whether this node leads the group right now.
    pub fn is_leader(&self, node: NodeId) -> bool {
        self.with_metrics(|m| leads(m, node))
    }

    /// Whether this node leads the group and has applied an entry of its own term, so its applied state
    /// holds every entry any earlier leader committed. Reads are served only then: a log-mode replica's
    /// committed index is not fsynced (`CommittedSync::Lazy`), so a leader elected after a crash may
    /// start applied below the high watermark readers already saw, until its term's first entry commits.
    pub fn serves_reads(&self, node: NodeId) -> bool {
        self.with_metrics(|m| serves_reads(m, node))
    }

    /// Waits up to `timeout` for [`Group::serves_reads`]; returns whether it holds.
    pub async fn wait_serves_reads(&self, node: NodeId, timeout: Duration) -> bool {
        if self.serves_reads(node) {
            return true;
        }
        self.raft.wait(Some(timeout)).metrics(|m| serves_reads(m, node), "leader serves reads").await.is_ok()
    }

    /// Log mode: removes every record below `before_offset` (whole entries only) on this replica.
    /// Snapshots at the cut and lets openraft purge the log up to it. Returns the cut taken, if any.
    pub async fn retention_cut(&self, before_offset: u64) -> io::Result<Option<Cut>> {
        let cut = self.sm.plan_cut(before_offset)?;
        self.take_cut(cut).await
    }

    /// Log mode: applies `retention.ms` (records whose entry's newest timestamp is before `older_than_ms`)
    /// and `retention.bytes` (the log's RecordBatch bytes) on this replica, at whole entries. Each replica
    /// runs it on its own copy, as Kafka replicas delete their own segments.
    pub async fn enforce_retention(
        &self,
        older_than_ms: Option<i64>,
        bytes_max: Option<u64>,
    ) -> io::Result<Option<Cut>> {
        let cut = self.sm.plan_retention(older_than_ms, bytes_max)?;
        self.take_cut(cut).await
    }

    async fn take_cut(&self, cut: Option<Cut>) -> io::Result<Option<Cut>> {
        let Some(cut) = cut else {
            return Ok(None);
        };
        self.raft.trigger().snapshot().await.map_err(io::Error::other)?;
        self.raft
            .wait(Some(std::time::Duration::from_secs(30)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= cut.index), "snapshot at the retention cut")
            .await
            .map_err(io::Error::other)?;
        Ok(Some(cut))
    }
}

/// Every group hosted on this node.
pub struct RaftNode {
    id: NodeId,
    engine: Arc<dyn Engine>,
    syncer: WalSyncer,
    pool: Arc<PeerPool>,
    timing: RaftTiming,
    tail: Arc<TailBudget>,
    groups: RwLock<HashMap<GroupId, Group>>,
}

impl RaftNode {
    /// Opens the node and every group recorded in its engine.
    pub async fn open(id: NodeId, engine: Arc<dyn Engine>, timing: RaftTiming) -> io::Result<Arc<Self>> {
        Self::open_with(id, engine, NodeOptions { timing, ..NodeOptions::default() }).await
    }

    /// [`RaftNode::open`] with every per-node setting.
    pub async fn open_with(id: NodeId, engine: Arc<dyn Engine>, options: NodeOptions) -> io::Result<Arc<Self>> {
        let syncer = WalSyncer::start(engine.clone());
        let pool = PeerPool::new(id, options.routes);
        let node = Arc::new(Self {
            id,
            engine,
            syncer,
            pool,
            timing: options.timing,
            tail: TailBudget::new(options.tail_cache_bytes),
            groups: RwLock::new(HashMap::new()),
        });
        for (group, mode) in node.recorded_groups()? {
            node.start_group(group, mode).await?;
        }
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The groups' shared tail-cache budget.
    pub fn tail_budget(&self) -> &Arc<TailBudget> {
        &self.tail
    }

    /// (batches, heartbeats) this node has sent its peers.
    pub fn heartbeat_stats(&self) -> (u64, u64) {
        self.pool.beat_stats().snapshot()
    }

    /// (messages, frames) this node has sent on its append connections to its peers.
    pub fn append_stats(&self) -> (u64, u64) {
        self.pool.append_stats().snapshot()
    }

    pub fn sync_stats(&self) -> SyncStatsSnapshot {
        self.syncer.stats().snapshot()
    }

    fn recorded_groups(&self) -> io::Result<Vec<(GroupId, Mode)>> {
        let mut found = Vec::new();
        let mut bad = None;
        self.engine.scan(Cf::RaftMeta, &[], &[0xff; 9], &mut |key, value| {
            if key.len() == keys::GROUP_PREFIX_BYTES + 1 && key[keys::GROUP_PREFIX_BYTES] == meta_tag::GROUP_INFO {
                let group = <[u8; 8]>::try_from(&key[..keys::GROUP_PREFIX_BYTES]).ok().map(u64::from_be_bytes);
                let mode = codec::unseal(&Bytes::copy_from_slice(value))
                    .ok()
                    .and_then(|b| b.first().copied())
                    .and_then(Mode::from_tag);
                match (group, mode) {
                    (Some(g), Some(m)) => found.push((g, m)),
                    _ => bad = Some(format!("corrupt group marker under key {key:?}")),
                }
            }
            true
        })?;
        match bad {
            Some(why) => Err(io::Error::other(why)),
            None => Ok(found),
        }
    }

    async fn start_group(&self, group: GroupId, mode: Mode) -> io::Result<Group> {
        let committed_sync = match mode {
            Mode::Log => CommittedSync::Lazy,
            Mode::Kv => CommittedSync::Durable,
        };
        let log = LogStore::open(group, self.engine.clone(), self.syncer.clone(), self.tail.clone(), committed_sync)?;
        let sm = GroupStateMachine::open(group, mode, self.engine.clone(), log.shared().clone())?;
        let sm_shared = sm.shared().clone();
        let network = GroupNetworkFactory::new(group, self.pool.clone());
        let raft = Raft::new(self.id, self.timing.config(group, mode)?, network, log.clone(), sm)
            .await
            .map_err(|e| io::Error::other(format!("group {group}: raft failed to start: {e}")))?;
        let handle = Group { id: group, mode, raft, log, sm: sm_shared };
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(group, handle.clone());
        Ok(handle)
    }

    /// Creates group `group` in `mode` on this node, or returns it if it exists. The group starts with an
    /// empty log; call [`RaftNode::initialize_group`] on one replica, or let a leader add it.
    pub async fn create_group(&self, group: GroupId, mode: Mode) -> io::Result<Group> {
        if let Some(g) = self.group(group) {
            if g.mode != mode {
                return Err(io::Error::other(format!("group {group} exists in mode {:?}", g.mode)));
            }
            return Ok(g);
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftMeta, keys::group_tag(group, meta_tag::GROUP_INFO), codec::seal(&[mode.tag()]));
        self.engine.write(batch)?;
        self.syncer.sync().await?;
        self.start_group(group, mode).await
    }

    /// Bootstraps `group` with `members` as its voters. Only one replica may do this, once.
    pub async fn initialize_group(&self, group: GroupId, members: BTreeMap<NodeId, BasicNode>) -> io::Result<()> {
        let g = self.group(group).ok_or_else(|| io::Error::other(format!("group {group} is not hosted here")))?;
        g.raft.initialize(members).await.map_err(|e| io::Error::other(format!("group {group}: {e}")))
    }

    pub fn group(&self, group: GroupId) -> Option<Group> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    pub fn groups(&self) -> Vec<Group> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The first group whose Raft core stopped on a failure, and why. Every group shares one store, so
    /// one such failure means the node's storage can no longer be trusted to take writes.
    pub fn storage_failure(&self) -> Option<(GroupId, String)> {
        self.groups().iter().find_map(|g| g.failure().map(|why| (g.id, why)))
    }

    /// Takes group `group` off this node at once (it is gone from [`RaftNode::groups`] when this returns)
    /// and returns the work of stopping it and deleting all of its data, to run wherever the caller likes.
    pub fn remove_group(self: &Arc<Self>, group: GroupId) -> impl Future<Output = io::Result<()>> + Send + 'static {
        let removed = self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
        let node = self.clone();
        async move {
            if let Some(g) = removed {
                g.raft.shutdown().await.map_err(|e| io::Error::other(format!("group {group}: shutdown: {e}")))?;
            }
            let (from, to) = keys::group_range(group);
            let mut batch = WriteBatch::new();
            for cf in Cf::ALL {
                batch.delete_range(cf, from.clone(), to.clone());
            }
            node.engine.write(batch)?;
            node.syncer.sync().await?;
            // Dropping files takes RocksDB's mutex and writes its MANIFEST: not on a runtime thread, where
            // it would hold up every group's work on that thread.
            let engine = node.engine.clone();
            tokio::task::spawn_blocking(move || {
                Cf::ALL.into_iter().try_for_each(|cf| engine.reclaim_range(cf, &from, &to))
            })
            .await
            .map_err(|e| io::Error::other(format!("group {group}: reclaiming its files: {e}")))??;
            Ok(())
        }
    }

    /// Before a planned stop: asks every group this node leads to hand leadership to its most caught-up
    /// replica, then waits until it leads none or `limit` passes. Clients then find a new leader at once
    /// instead of waiting out an election timeout (Kafka's controlled shutdown). From the call on, its
    /// groups start no elections of their own. Returns how many groups it led and how many it still
    /// leads.
    pub async fn hand_off_leaderships(&self, limit: Duration) -> (usize, usize) {
        let me = self.id;
        let groups = self.groups();
        for g in &groups {
            g.raft.runtime_config().elect(false);
        }
        let led: Vec<Group> = groups.into_iter().filter(|g| g.is_leader(me)).collect();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let still: Vec<&Group> = led.iter().filter(|g| g.is_leader(me)).collect();
            if still.is_empty() || tokio::time::Instant::now() >= deadline {
                return (led.len(), still.len());
            }
            // Asked again while it still leads: a target that had not flushed the leader's last entry
            // when asked refuses, and a busy group's log moves on.
            for g in still {
                // The replica closest to the leader's log.
                let lag = g.replica_progress();
                let to = lag.iter().filter(|(id, _)| **id != me).min_by_key(|(id, behind)| (**behind, **id));
                if let Some((&to, _)) = to
                    && let Err(e) = g.transfer_leader(to).await
                {
                    tracing::warn!(group = g.id, to, "leader hand-off failed: {e}");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        let groups: Vec<Group> =
            self.groups.write().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, g)| g).collect();
        for g in groups {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = g.id, "shutdown: {e}");
            }
        }
    }
}

/// The transport service holds its node weakly: connection tasks may outlive a stopped node, and must not
/// keep its groups (and the engine under them) alive.
impl GroupLookup for Weak<RaftNode> {
    fn raft(&self, group: GroupId) -> Option<GroupRaft> {
        self.upgrade()?.group(group).map(|g| g.raft)
    }
}

impl RaftNode {
    /// The gRPC service that receives peers' Raft RPCs for every group of this node.
    pub fn transport_service(self: &Arc<Self>) -> RaftTransportServer<RaftTransportService<Weak<RaftNode>>> {
        RaftTransportService::new(Arc::new(Arc::downgrade(self))).into_server()
    }
}
