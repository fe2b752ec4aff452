//! Raft transport over tonic: every group of a node talks to a peer node over one HTTP/2 connection.
//!
//! The client side is a [`PeerPool`] (one lazily connected channel per peer, shared by all groups) and a
//! per-group [`GroupNetworkFactory`] that openraft asks for clients. Replication uses a bidirectional
//! `StreamAppend` stream, so several AppendEntries are in flight at once and answered in order. Heartbeats
//! do not take a stream each: the heartbeat clients of all groups towards one peer queue them for that
//! peer's [`send_beats`] task, which sends whatever has queued as one `Heartbeat` batch. The server
//! side, [`RaftTransportService`], routes each message to the group it names through a [`GroupLookup`].
//!
//! Conversions between openraft's types and the protobuf messages live here and only here.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::BasicNode;
use openraft::RaftNetworkV2;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response as TonicResponse, Status, Streaming};

use flotilla_proto::raft as pb;
use flotilla_proto::raft::raft_transport_client::RaftTransportClient;
use flotilla_proto::raft::raft_transport_server::RaftTransport;

use crate::codec::{self, Reader};
use crate::keys::GroupId;
use crate::node::GroupRaft;
use crate::types::{Entry, LogId, NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote, log_id, term_of};

/// Largest message either side accepts: AppendEntries batches and snapshots stay well below it.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// A response to an in-flight append not heard within this time fails the stream (e.g. a paused peer).
const APPEND_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a replication stream may take to be set up (the peer answers with headers at once).
const APPEND_SETUP_TIMEOUT: Duration = Duration::from_secs(2);
/// A heartbeat batch not answered within this time fails its heartbeats (a paused or cut-off peer).
const BATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// The receiver's time for one heartbeat of a batch: the others do not wait for a slower group.
const BEAT_BUDGET: Duration = Duration::from_millis(500);

// ---- conversions -------------------------------------------------------------------------------

fn pb_log_id(id: &LogId) -> pb::LogId {
    pb::LogId { term: term_of(id), index: id.index }
}

fn from_pb_log_id(id: &pb::LogId) -> LogId {
    log_id(id.term, id.index)
}

fn pb_vote(v: &Vote) -> pb::Vote {
    pb::Vote { term: v.leader_id.term, node_id: v.leader_id.voted_for, committed: v.committed }
}

fn from_pb_vote(v: Option<&pb::Vote>) -> Result<Vote, Status> {
    let v = v.ok_or_else(|| Status::invalid_argument("missing vote"))?;
    let mut vote = Vote::new(v.term, v.node_id);
    vote.committed = v.committed;
    Ok(vote)
}

fn pb_append(group: GroupId, req: &AppendEntriesRequest<TypeConfig>) -> pb::AppendRequest {
    pb::AppendRequest {
        group_id: group,
        vote: Some(pb_vote(&req.vote)),
        prev_log_id: req.prev_log_id.as_ref().map(pb_log_id),
        entries: req.entries.iter().map(|e| codec::seal(&codec::encode_entry(e))).collect(),
        leader_commit: req.leader_commit.as_ref().map(pb_log_id),
    }
}

fn from_pb_append(req: pb::AppendRequest) -> Result<AppendEntriesRequest<TypeConfig>, Status> {
    let entries = req
        .entries
        .iter()
        .map(|sealed| {
            codec::unseal(sealed)
                .and_then(|body| codec::decode_entry(body, None))
                .map_err(|e| Status::data_loss(format!("group {}: received entry is corrupt: {e}", req.group_id)))
        })
        .collect::<Result<Vec<Entry>, Status>>()?;
    Ok(AppendEntriesRequest {
        vote: from_pb_vote(req.vote.as_ref())?,
        prev_log_id: req.prev_log_id.as_ref().map(from_pb_log_id),
        entries,
        leader_commit: req.leader_commit.as_ref().map(from_pb_log_id),
    })
}

fn pb_append_reply(r: StreamAppendResult<TypeConfig>) -> pb::AppendReply {
    use pb::append_reply::Result as R;
    let result = match r {
        Ok(Some(id)) => R::Matched(pb_log_id(&id)),
        Ok(None) => R::MatchedEmpty(true),
        Err(StreamAppendError::Conflict(id)) => R::Conflict(pb_log_id(&id)),
        Err(StreamAppendError::HigherVote(v)) => R::HigherVote(pb_vote(&v)),
    };
    pb::AppendReply { result: Some(result) }
}

fn from_pb_append_reply(r: pb::AppendReply) -> Result<StreamAppendResult<TypeConfig>, Status> {
    use pb::append_reply::Result as R;
    match r.result {
        Some(R::Matched(id)) => Ok(Ok(Some(from_pb_log_id(&id)))),
        Some(R::MatchedEmpty(_)) => Ok(Ok(None)),
        Some(R::Conflict(id)) => Ok(Err(StreamAppendError::Conflict(from_pb_log_id(&id)))),
        Some(R::HigherVote(v)) => Ok(Err(StreamAppendError::HigherVote(from_pb_vote(Some(&v))?))),
        None => Err(Status::internal("empty append reply")),
    }
}

fn pb_membership(meta: &SnapshotMeta) -> Bytes {
    let mut out = bytes::BytesMut::new();
    codec::put_stored_membership(&mut out, &meta.last_membership);
    codec::seal(&out)
}

// ---- client side -------------------------------------------------------------------------------

/// One lazily connected channel per peer node, shared by every group on this node.
pub struct PeerPool {
    self_id: NodeId,
    /// Peers whose Raft traffic is dialled at another address than their membership address (a proxy,
    /// a NAT); the membership address still names the node everywhere else.
    routes: HashMap<NodeId, String>,
    channels: Mutex<HashMap<(NodeId, String), Channel>>,
    /// Each peer's heartbeat queue, drained by its [`send_beats`] task.
    beats: Mutex<HashMap<(NodeId, String), BeatQueue>>,
    beat_stats: Arc<BeatStats>,
}

/// Heartbeats sent, and the batches they went in, to every peer together.
#[derive(Debug, Default)]
pub struct BeatStats {
    batches: AtomicU64,
    beats: AtomicU64,
}

impl BeatStats {
    /// (batches, heartbeats) sent so far.
    pub fn snapshot(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.beats.load(Ordering::Relaxed))
    }
}

/// One group's heartbeat, waiting for its peer's next batch.
struct Beat {
    request: pb::AppendRequest,
    reply: tokio::sync::oneshot::Sender<Result<pb::AppendReply, Status>>,
}

type BeatQueue = tokio::sync::mpsc::UnboundedSender<Beat>;

impl PeerPool {
    pub fn new(self_id: NodeId, routes: HashMap<NodeId, String>) -> Arc<Self> {
        Arc::new(Self {
            self_id,
            routes,
            channels: Mutex::new(HashMap::new()),
            beats: Mutex::new(HashMap::new()),
            beat_stats: Arc::default(),
        })
    }

    pub fn beat_stats(&self) -> &BeatStats {
        &self.beat_stats
    }

    /// The heartbeat queue towards `target`, its sending task started on first use. The queue needs no
    /// bound: each group's heartbeat worker waits for its beat's outcome before it sends the next, so a
    /// queue holds at most one beat per group.
    fn beats(&self, target: NodeId, addr: &str) -> Result<BeatQueue, String> {
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = beats.get(&(target, addr.to_owned())) {
            return Ok(queue.clone());
        }
        let client = self.client(target, addr)?;
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(send_beats(client, rx, self.beat_stats.clone()));
        beats.insert((target, addr.to_owned()), queue.clone());
        Ok(queue)
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<RaftTransportClient<Channel>, String> {
        let addr = self.routes.get(&target).map_or(addr, String::as_str);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&(target, addr.to_owned())) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("node {target} has an invalid address {addr:?}: {e}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .keep_alive_while_idle(true)
                    .http2_adaptive_window(true);
                let c = endpoint.connect_lazy();
                channels.insert((target, addr.to_owned()), c.clone());
                c
            }
        };
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}

/// Sends one peer's heartbeats: whatever queued while the previous batch was out goes as the next batch,
/// so batches grow with the load and an idle link sends each beat at once. Ends when the pool is gone.
async fn send_beats(
    mut client: RaftTransportClient<Channel>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Beat>,
    stats: Arc<BeatStats>,
) {
    while let Some(first) = queue.recv().await {
        let mut beats = vec![first];
        while let Ok(beat) = queue.try_recv() {
            beats.push(beat);
        }
        // A beat whose worker gave up waiting (it timed out while an earlier batch was out) is stale.
        beats.retain(|b| !b.reply.is_closed());
        if beats.is_empty() {
            continue;
        }
        let (heartbeats, replies): (Vec<_>, Vec<_>) = beats.into_iter().map(|b| (b.request, b.reply)).unzip();
        let sent = heartbeats.len();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.beats.fetch_add(sent as u64, Ordering::Relaxed);
        let outcomes = match tokio::time::timeout(BATCH_TIMEOUT, client.heartbeat(pb::HeartbeatBatch { heartbeats }))
            .await
        {
            Ok(Ok(reply)) => Ok(reply.into_inner().outcomes),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(format!("heartbeat batch not answered within {BATCH_TIMEOUT:?}"))),
        };
        match outcomes {
            Ok(outcomes) if outcomes.len() == sent => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(from_pb_outcome(outcome));
                }
            }
            Ok(outcomes) => {
                let status = Status::internal(format!("{} outcomes for a batch of {sent} heartbeats", outcomes.len()));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }
}

fn pb_outcome(result: Result<pb::AppendReply, Status>) -> pb::HeartbeatOutcome {
    use pb::heartbeat_outcome::Outcome;
    let outcome = match result {
        Ok(reply) => Outcome::Reply(reply),
        Err(status) => {
            Outcome::Error(pb::HeartbeatError { code: status.code() as i32, message: status.message().to_owned() })
        }
    };
    pb::HeartbeatOutcome { outcome: Some(outcome) }
}

fn from_pb_outcome(outcome: pb::HeartbeatOutcome) -> Result<pb::AppendReply, Status> {
    use pb::heartbeat_outcome::Outcome;
    match outcome.outcome {
        Some(Outcome::Reply(reply)) => Ok(reply),
        Some(Outcome::Error(e)) => Err(Status::new(tonic::Code::from_i32(e.code), e.message)),
        None => Err(Status::internal("empty heartbeat outcome")),
    }
}

/// Hands openraft the clients of one group.
pub struct GroupNetworkFactory {
    group: GroupId,
    pool: Arc<PeerPool>,
}

impl GroupNetworkFactory {
    pub fn new(group: GroupId, pool: Arc<PeerPool>) -> Self {
        Self { group, pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupNetwork {
        self.network(target, node, false)
    }

    /// Heartbeats (and the leader's lease probes for linearizable reads) go through the peer's batch.
    async fn new_heartbeat_client(&mut self, target: NodeId, node: &BasicNode) -> GroupNetwork {
        self.network(target, node, true)
    }
}

impl GroupNetworkFactory {
    fn network(&self, target: NodeId, node: &BasicNode, heartbeats: bool) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            self_id: self.pool.self_id,
            target,
            client: self.pool.client(target, &node.addr),
            beats: if heartbeats { self.pool.beats(target, &node.addr).ok() } else { None },
        }
    }
}

/// One group's client towards one peer.
pub struct GroupNetwork {
    group: GroupId,
    self_id: NodeId,
    target: NodeId,
    client: Result<RaftTransportClient<Channel>, String>,
    /// Set for a heartbeat client: its appends join the peer's heartbeat batches.
    beats: Option<BeatQueue>,
}

fn timed_out(id: NodeId, target: NodeId, action: RPCTypes, ttl: Duration) -> RPCError<TypeConfig> {
    RPCError::Timeout(Timeout { action, id, target, timeout: ttl })
}

fn rpc_error(status: Status) -> RPCError<TypeConfig> {
    match status.code() {
        // Unreachable makes openraft back off; a peer that does not host the group (yet, or any more)
        // must not be retried in a hot loop either.
        tonic::Code::Unavailable | tonic::Code::NotFound => RPCError::Unreachable(Unreachable::new(&status)),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl GroupNetwork {
    fn client(&self) -> Result<RaftTransportClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    fn timeout(&self, action: RPCTypes, ttl: Duration) -> RPCError<TypeConfig> {
        timed_out(self.self_id, self.target, action, ttl)
    }

    async fn vote_rpc(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        let req = pb::VoteRequest {
            group_id: self.group,
            vote: Some(pb_vote(&rpc.vote)),
            last_log_id: rpc.last_log_id.as_ref().map(pb_log_id),
            leadership_transfer: rpc.leadership_transfer,
            pre_vote,
        };
        let ttl = option.soft_ttl();
        let reply = tokio::time::timeout(ttl, client.vote(req))
            .await
            .map_err(|_| self.timeout(RPCTypes::Vote, ttl))?
            .map_err(rpc_error)?
            .into_inner();
        let vote = from_pb_vote(reply.vote.as_ref()).map_err(rpc_error)?;
        Ok(VoteResponse::new(vote, reply.last_log_id.as_ref().map(from_pb_log_id), reply.granted))
    }
}

/// The replies to a stream of appends, in order.
type AppendReplies<'s> = BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

/// The stream ends after its first error, as openraft expects.
fn until_error<'s, T: Send + 's>(
    items: impl Stream<Item = Result<T, RPCError<TypeConfig>>> + Send + 's,
) -> BoxStream<'s, Result<T, RPCError<TypeConfig>>> {
    Box::pin(items.scan(false, |failed, item| {
        if *failed {
            return futures::future::ready(None);
        }
        *failed = item.is_err();
        futures::future::ready(Some(item))
    }))
}

impl GroupNetwork {
    /// A heartbeat client's appends: each joins the peer's next heartbeat batch, in turn.
    fn beat_stream<'s, S>(
        &self,
        beats: BeatQueue,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<AppendReplies<'s>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let (group, self_id, target) = (self.group, self.self_id, self.target);
        let ttl = option.soft_ttl();
        let replies = input.then(move |req| {
            let beats = beats.clone();
            async move {
                let (reply, outcome) = tokio::sync::oneshot::channel();
                if beats.send(Beat { request: pb_append(group, &req), reply }).is_err() {
                    return Err(RPCError::Unreachable(Unreachable::from_string("the heartbeat sender stopped")));
                }
                match tokio::time::timeout(ttl, outcome).await {
                    Err(_) => Err(timed_out(self_id, target, RPCTypes::AppendEntries, ttl)),
                    Ok(Err(_)) => Err(RPCError::Network(NetworkError::from_string("heartbeat dropped unanswered"))),
                    Ok(Ok(Err(status))) => Err(rpc_error(status)),
                    Ok(Ok(Ok(reply))) => from_pb_append_reply(reply).map_err(rpc_error),
                }
            }
        });
        Box::pin(async move { Ok(until_error(replies)) })
    }
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = Bytes;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut replies = self.stream_append(futures::stream::iter([rpc]), option).await?;
        match replies.next().await {
            Some(Ok(result)) => Ok(AppendEntriesResponse::from(result)),
            Some(Err(e)) => Err(e),
            None => Err(RPCError::Network(NetworkError::from_string("append stream closed without a reply"))),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if let Some(beats) = self.beats.clone() {
            return self.beat_stream(beats, input, option);
        }
        Box::pin(async move {
            let mut client = self.client()?;
            let group = self.group;
            let in_flight = Arc::new(AtomicUsize::new(0));
            let sent = in_flight.clone();
            let requests = input.map(move |req| {
                sent.fetch_add(1, Ordering::SeqCst);
                pb_append(group, &req)
            });
            // Setting a stream up waits for the peer to accept it: openraft's RPC time (3/4 of a heartbeat)
            // is too short for a loaded peer, and each stream given up on resets an HTTP/2 stream, which
            // the peer's server counts against its reset-flood guard.
            let ttl = option.soft_ttl().max(APPEND_SETUP_TIMEOUT);
            let replies = tokio::time::timeout(ttl, client.stream_append(requests))
                .await
                .map_err(|_| self.timeout(RPCTypes::AppendEntries, ttl))?
                .map_err(rpc_error)?
                .into_inner();
            let stream = futures::stream::unfold((replies, in_flight), |(mut replies, in_flight)| async move {
                // Time out only while a request waits for its reply; an idle stream may stay quiet.
                let next = if in_flight.load(Ordering::SeqCst) > 0 {
                    match tokio::time::timeout(APPEND_RESPONSE_TIMEOUT, replies.message()).await {
                        Ok(r) => r,
                        Err(_) => Err(Status::deadline_exceeded("append reply timed out")),
                    }
                } else {
                    replies.message().await
                };
                match next {
                    Ok(Some(reply)) => {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        let item = from_pb_append_reply(reply).map_err(rpc_error);
                        Some((item, (replies, in_flight)))
                    }
                    Ok(None) => None,
                    Err(status) => Some((Err(rpc_error(status)), (replies, in_flight))),
                }
            });
            Ok(until_error(stream))
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(rpc, option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(rpc, option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let req = pb::SnapshotRequest {
            group_id: self.group,
            vote: Some(pb_vote(&vote)),
            last_log_id: snapshot.meta.last_log_id.as_ref().map(pb_log_id),
            membership: pb_membership(&snapshot.meta),
            data: snapshot.snapshot,
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = client.install_snapshot(req) => {
                let reply = reply.map_err(rpc_error)?.into_inner();
                let vote = from_pb_vote(reply.vote.as_ref()).map_err(rpc_error)?;
                Ok(SnapshotResponse::new(vote))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        let pb_req = pb::TransferLeaderRequest {
            group_id: self.group,
            from: Some(pb_vote(req.from_leader())),
            to: *req.to_node_id(),
            last_log_id: req.last_log_id().map(pb_log_id),
        };
        let ttl = option.soft_ttl();
        let reply = tokio::time::timeout(ttl, client.transfer_leader(pb_req))
            .await
            .map_err(|_| self.timeout(RPCTypes::TransferLeader, ttl))?
            .map_err(rpc_error)?
            .into_inner();
        use openraft::raft::TransferLeaderError;
        use pb::transfer_leader_reply::Result as R;
        match reply.result {
            Some(R::Done(_)) => Ok(Ok(())),
            Some(R::VoteChanged(actual)) => Ok(Err(TransferLeaderError::VoteChanged {
                expected: *req.from_leader(),
                actual: from_pb_vote(Some(&actual)).map_err(rpc_error)?,
            })),
            Some(R::LogNotFlushed(_)) => {
                Ok(Err(TransferLeaderError::LogNotFlushed { expected: req.last_log_id().copied(), actual: None }))
            }
            None => Err(RPCError::Network(NetworkError::from_string("empty transfer-leader reply"))),
        }
    }
}

// ---- server side -------------------------------------------------------------------------------

/// Finds the local Raft of a group.
pub trait GroupLookup: Send + Sync + 'static {
    fn raft(&self, group: GroupId) -> Option<GroupRaft>;
}

/// The gRPC service receiving peers' Raft RPCs.
pub struct RaftTransportService<L> {
    lookup: Arc<L>,
}

impl<L: GroupLookup> RaftTransportService<L> {
    pub fn new(lookup: Arc<L>) -> Self {
        Self { lookup }
    }

    /// The tonic service, with the message size limits raised for AppendEntries batches and snapshots.
    pub fn into_server(self) -> pb::raft_transport_server::RaftTransportServer<Self> {
        pb::raft_transport_server::RaftTransportServer::new(self)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    fn raft(&self, group: GroupId) -> Result<GroupRaft, Status> {
        self.lookup.raft(group).ok_or_else(|| Status::not_found(format!("group {group} is not hosted here")))
    }

    /// One heartbeat of a batch, answered within [`BEAT_BUDGET`].
    async fn beat(&self, beat: pb::AppendRequest) -> pb::HeartbeatOutcome {
        let group = beat.group_id;
        let reply = async {
            let raft = self.raft(group)?;
            let req = from_pb_append(beat)?;
            let mut replies = Box::pin(raft.stream_append(futures::stream::iter([req])));
            match replies.next().await {
                Some(Ok(result)) => Ok(pb_append_reply(result)),
                Some(Err(fatal)) => Err(fatal_status(fatal)),
                None => Err(Status::internal(format!("group {group} did not answer a heartbeat"))),
            }
        };
        let result = tokio::time::timeout(BEAT_BUDGET, reply).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!("group {group} did not answer a heartbeat within {BEAT_BUDGET:?}")))
        });
        pb_outcome(result)
    }
}

fn fatal_status(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft group stopped: {e}"))
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::AppendReply, Status>> + Send>>;

fn failed(status: Status) -> ReplyStream {
    Box::pin(futures::stream::once(async move { Err(status) }))
}

/// The replies to one append stream. Its first message names the group; the stream belongs to it.
async fn append_replies<L: GroupLookup>(lookup: Arc<L>, mut incoming: Streaming<pb::AppendRequest>) -> ReplyStream {
    let first = match incoming.message().await {
        Ok(Some(m)) => m,
        Ok(None) => return Box::pin(futures::stream::empty()),
        Err(status) => return failed(status),
    };
    let group = first.group_id;
    let Some(raft) = lookup.raft(group) else {
        return failed(Status::not_found(format!("group {group} is not hosted here")));
    };
    let first = match from_pb_append(first) {
        Ok(req) => req,
        Err(status) => return failed(status),
    };
    // A malformed later message ends the input; its error follows the replies to the requests before it.
    let (err_tx, err_rx) = tokio::sync::oneshot::channel::<Status>();
    let mut err_tx = Some(err_tx);
    let rest = incoming
        .map(move |m| {
            let parsed = m.and_then(|m| {
                if m.group_id == group {
                    from_pb_append(m)
                } else {
                    Err(Status::invalid_argument(format!("append stream of group {group} got group {}", m.group_id)))
                }
            });
            match parsed {
                Ok(req) => Some(req),
                Err(status) => {
                    if let Some(tx) = err_tx.take() {
                        let _ = tx.send(status);
                    }
                    None
                }
            }
        })
        .take_while(|m| futures::future::ready(m.is_some()))
        .filter_map(futures::future::ready);
    let requests = futures::stream::iter([first]).chain(rest);
    let replies = Box::pin(raft.stream_append(requests))
        .map(|r| match r {
            Ok(result) => Ok(pb_append_reply(result)),
            Err(fatal) => Err(fatal_status(fatal)),
        })
        .chain(futures::stream::once(async move { err_rx.await.ok() }).filter_map(|e| async move { e.map(Err) }));
    Box::pin(replies)
}

#[tonic::async_trait]
impl<L: GroupLookup> RaftTransport for RaftTransportService<L> {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatBatch>,
    ) -> Result<TonicResponse<pb::HeartbeatReplies>, Status> {
        let beats = request.into_inner().heartbeats.into_iter().map(|b| self.beat(b));
        let outcomes = futures::future::join_all(beats).await;
        Ok(TonicResponse::new(pb::HeartbeatReplies { outcomes }))
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<TonicResponse<Self::StreamAppendStream>, Status> {
        // Answer with headers at once: the sender may push its first request only after the stream is
        // set up, so waiting for it here would deadlock until the sender's timeout.
        let lookup = self.lookup.clone();
        let replies = futures::stream::once(append_replies(lookup, request.into_inner())).flatten();
        Ok(TonicResponse::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<TonicResponse<pb::VoteReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group_id)?;
        let mut rpc = VoteRequest::new(from_pb_vote(req.vote.as_ref())?, req.last_log_id.as_ref().map(from_pb_log_id));
        rpc.leadership_transfer = req.leadership_transfer;
        let resp = if req.pre_vote { raft.pre_vote(rpc).await } else { raft.vote(rpc).await }.map_err(fatal_status)?;
        Ok(TonicResponse::new(pb::VoteReply {
            vote: Some(pb_vote(&resp.vote)),
            granted: resp.vote_granted,
            last_log_id: resp.last_log_id.as_ref().map(pb_log_id),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<TonicResponse<pb::SnapshotReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group_id)?;
        let vote = from_pb_vote(req.vote.as_ref())?;
        let membership = codec::unseal(&req.membership)
            .and_then(|body| codec::read_stored_membership(&mut Reader::new(body)))
            .map_err(|e| Status::data_loss(format!("group {}: snapshot membership is corrupt: {e}", req.group_id)))?;
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                last_log_id: req.last_log_id.as_ref().map(from_pb_log_id),
                last_membership: membership,
            },
            snapshot: req.data,
        };
        let resp = raft.install_full_snapshot(vote, snapshot).await.map_err(fatal_status)?;
        Ok(TonicResponse::new(pb::SnapshotReply { vote: Some(pb_vote(&resp.vote)) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<TonicResponse<pb::TransferLeaderReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group_id)?;
        let rpc = TransferLeaderRequest::new(
            from_pb_vote(req.from.as_ref())?,
            req.to,
            req.last_log_id.as_ref().map(from_pb_log_id),
        );
        use openraft::raft::TransferLeaderError;
        use pb::transfer_leader_reply::Result as R;
        let result = match raft.handle_transfer_leader(rpc).await.map_err(fatal_status)? {
            Ok(()) => R::Done(true),
            Err(TransferLeaderError::VoteChanged { actual, .. }) => R::VoteChanged(pb_vote(&actual)),
            Err(TransferLeaderError::LogNotFlushed { .. }) => R::LogNotFlushed(true),
        };
        Ok(TonicResponse::new(pb::TransferLeaderReply { result: Some(result) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that hosts no group: every heartbeat it gets is for a group it does not know.
    struct NoGroups;

    impl GroupLookup for NoGroups {
        fn raft(&self, _group: GroupId) -> Option<GroupRaft> {
            None
        }
    }

    async fn serve_no_groups() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = RaftTransportService::new(Arc::new(NoGroups)).into_server();
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        addr
    }

    fn heartbeat(group: GroupId) -> pb::AppendRequest {
        pb::AppendRequest {
            group_id: group,
            vote: Some(pb::Vote { term: 1, node_id: 1, committed: true }),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    #[tokio::test]
    async fn heartbeats_queued_together_go_in_one_batch_and_each_gets_its_own_outcome() {
        let addr = serve_no_groups().await;
        let pool = PeerPool::new(1, HashMap::new());
        let client = pool.client(2, &addr).expect("client");
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut outcomes = Vec::new();
        for group in [7, 8, 9] {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            queue.send(Beat { request: heartbeat(group), reply }).expect("queue");
            outcomes.push((group, outcome));
        }
        // A beat whose worker stopped waiting is not sent.
        let (reply, gave_up) = tokio::sync::oneshot::channel();
        queue.send(Beat { request: heartbeat(10), reply }).expect("queue");
        drop(gave_up);
        let stats = Arc::new(BeatStats::default());
        let sender = tokio::spawn(send_beats(client, rx, stats.clone()));
        for (group, outcome) in outcomes {
            let status = outcome.await.expect("an outcome").expect_err("no group is hosted");
            assert_eq!(status.code(), tonic::Code::NotFound);
            assert!(status.message().contains(&format!("group {group} ")), "{status:?}");
        }
        assert_eq!(stats.snapshot(), (1, 3));
        // The task ends with its queue.
        drop(queue);
        sender.await.expect("the sender ends");
    }

    #[tokio::test]
    async fn a_heartbeat_batch_to_an_unreachable_peer_fails_each_heartbeat() {
        // Nothing listens here once the listener is dropped.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let pool = PeerPool::new(1, HashMap::new());
        let queue = pool.beats(2, &addr.to_string()).expect("queue");
        let (reply, outcome) = tokio::sync::oneshot::channel();
        queue.send(Beat { request: heartbeat(7), reply }).expect("queue");
        let status = outcome.await.expect("an outcome").expect_err("the peer is down");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        // The same queue serves the next call.
        assert!(pool.beats(2, &addr.to_string()).expect("queue").same_channel(&queue));
    }

    #[test]
    fn heartbeat_outcomes_survive_the_wire() {
        let reply = pb::AppendReply { result: Some(pb::append_reply::Result::MatchedEmpty(true)) };
        assert_eq!(from_pb_outcome(pb_outcome(Ok(reply))).expect("reply"), reply);
        let status = from_pb_outcome(pb_outcome(Err(Status::not_found("gone")))).expect_err("error");
        assert_eq!((status.code(), status.message()), (tonic::Code::NotFound, "gone"));
        assert_eq!(
            from_pb_outcome(pb::HeartbeatOutcome { outcome: None }).expect_err("empty").code(),
            tonic::Code::Internal
        );
    }
}
