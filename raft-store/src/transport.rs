//! Raft transport over tonic: every group of a node talks to a peer node over one HTTP/2 connection.
//!
//! The client side is a [`PeerPool`] (one lazily connected channel per peer, shared by all groups) and a
//! per-group [`GroupNetworkFactory`] that openraft asks for clients. Replication streams (openraft's
//! `stream_append`: several AppendEntries in flight, answered in order) do not take an HTTP/2 stream
//! each: every group's replication stream towards one peer is a numbered stream inside that peer's one
//! `AppendStreams` call (an [`AppendMux`]), and whatever frames of whichever groups are ready when the
//! connection can send go out as one message ([`Multiplex`]); the replies come back the same way.
//! Heartbeats do not take a stream either: the heartbeat clients of all groups towards one peer queue
//! them for that peer's [`send_beats`] task, which sends whatever has queued as one `Heartbeat` batch.
//! The server side, [`RaftTransportService`], routes each message to the group it names through a
//! [`GroupLookup`].
//!
//! Conversions between openraft's types and the protobuf messages live here and only here.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::SelectAll;
use futures::task::AtomicWaker;
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
use tokio::sync::mpsc;
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
/// How long a peer's append connection may take to be set up (the peer answers with headers at once).
const APPEND_SETUP_TIMEOUT: Duration = Duration::from_secs(2);
/// AppendEntries of one replication stream sent and not yet answered. The sender holds back the next
/// until a reply comes; the receiver refuses a stream that goes past it. Matches the pipeline depth
/// openraft's `Raft::stream_append` keeps on the receiving side.
const APPENDS_IN_FLIGHT_MAX: usize = 64;
/// Payload bytes packed into one multiplexed message beyond its first frame.
const FRAMES_BYTES_MAX: usize = 1 << 20;
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
        entries: req.entries.iter().map(codec::seal_entry).collect(),
        leader_commit: req.leader_commit.as_ref().map(pb_log_id),
    }
}

fn from_pb_append(req: pb::AppendRequest) -> Result<AppendEntriesRequest<TypeConfig>, Status> {
    let entries = req
        .entries
        .iter()
        .map(|sealed| {
            codec::unseal_entry(sealed, None)
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
    beat_stats: Arc<BatchStats>,
    /// Each peer's append connection, replaced once it has failed.
    muxes: Mutex<HashMap<(NodeId, String), Arc<AppendMux>>>,
    append_stats: Arc<BatchStats>,
}

/// Items sent (heartbeats, append frames), and the messages they went in, to every peer together.
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    items: AtomicU64,
}

impl BatchStats {
    /// (messages, items) sent so far.
    pub fn snapshot(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.items.load(Ordering::Relaxed))
    }

    fn count(&self, items: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(items as u64, Ordering::Relaxed);
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
            muxes: Mutex::new(HashMap::new()),
            append_stats: Arc::default(),
        })
    }

    /// Heartbeat batches and heartbeats sent.
    pub fn beat_stats(&self) -> &BatchStats {
        &self.beat_stats
    }

    /// Multiplexed append messages and the frames (requests and stream ends) they carried.
    pub fn append_stats(&self) -> &BatchStats {
        &self.append_stats
    }

    /// The append connection towards `target`, set up on first use and again after it failed.
    fn mux(&self, target: NodeId, addr: &str) -> Result<Arc<AppendMux>, String> {
        let mut muxes = self.muxes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mux) = muxes.get(&(target, addr.to_owned()))
            && !mux.routes.is_closed()
        {
            return Ok(mux.clone());
        }
        let client = self.client(target, addr)?;
        let mux = AppendMux::start(client, self.append_stats.clone());
        muxes.insert((target, addr.to_owned()), mux.clone());
        Ok(mux)
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
    stats: Arc<BatchStats>,
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
        stats.count(sent);
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
        Err(status) => Outcome::Error(rpc_error_of(&status)),
    };
    pb::HeartbeatOutcome { outcome: Some(outcome) }
}

fn from_pb_outcome(outcome: pb::HeartbeatOutcome) -> Result<pb::AppendReply, Status> {
    use pb::heartbeat_outcome::Outcome;
    match outcome.outcome {
        Some(Outcome::Reply(reply)) => Ok(reply),
        Some(Outcome::Error(e)) => Err(status_of(e)),
        None => Err(Status::internal("empty heartbeat outcome")),
    }
}

fn rpc_error_of(status: &Status) -> pb::RpcError {
    pb::RpcError { code: status.code() as i32, message: status.message().to_owned() }
}

fn status_of(e: pb::RpcError) -> Status {
    Status::new(tonic::Code::from_i32(e.code), e.message)
}

// ---- multiplexing ------------------------------------------------------------------------------

/// Frames of many streams on one: each stream is polled in turn, and everything ready goes out as one
/// batch (up to [`FRAMES_BYTES_MAX`] after the first frame). Streams come in through `opened` while
/// it runs; a stream that ends leaves. The multiplex ends once `opened` is closed and every stream
/// has ended. Both ends of an append connection send through one: the requests of the replication
/// streams, and the replies to them.
struct Multiplex<T> {
    opened: mpsc::UnboundedReceiver<BoxStream<'static, T>>,
    open: SelectAll<BoxStream<'static, T>>,
    closed: bool,
    bytes: fn(&T) -> usize,
    /// Frames gathered before the task yielded, and their bytes.
    held: Vec<T>,
    held_bytes: usize,
}

impl<T> Multiplex<T> {
    fn new(opened: mpsc::UnboundedReceiver<BoxStream<'static, T>>, bytes: fn(&T) -> usize) -> Self {
        Self { opened, open: SelectAll::new(), closed: false, bytes, held: Vec::new(), held_bytes: 0 }
    }
}

// Nothing in a multiplex is ever pinned in place: held frames are moved out whole.
impl<T> Unpin for Multiplex<T> {}

impl<T> Stream for Multiplex<T> {
    type Item = Vec<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<T>>> {
        let this = &mut *self;
        while !this.closed {
            match this.opened.poll_recv(cx) {
                Poll::Ready(Some(stream)) => this.open.push(stream),
                Poll::Ready(None) => this.closed = true,
                Poll::Pending => break,
            }
        }
        let yielded = !this.held.is_empty();
        let mut batch = std::mem::take(&mut this.held);
        let mut bytes = std::mem::take(&mut this.held_bytes);
        while bytes < FRAMES_BYTES_MAX {
            match this.open.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    bytes += (this.bytes)(&item);
                    batch.push(item);
                }
                // No stream is ready, or none is open (then `opened` holds the waker).
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if !batch.is_empty() && !yielded && bytes < FRAMES_BYTES_MAX {
            // Let the tasks ready to run go first: other groups about to send (woken together by one
            // fsync, or by one batch of replies) usually join this batch instead of each costing a
            // message. Not a guarantee: the body's reader may poll again at once, and tasks the WAL
            // syncer thread woke wait in the runtime's shared queue, which a worker visits less often.
            this.held = batch;
            this.held_bytes = bytes;
            cx.waker().wake_by_ref();
            Poll::Pending
        } else if !batch.is_empty() {
            Poll::Ready(Some(batch))
        } else if this.closed && this.open.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

fn request_frame_bytes(frame: &pb::AppendFrame) -> usize {
    match &frame.body {
        Some(pb::append_frame::Body::Request(req)) => req.entries.iter().map(Bytes::len).sum(),
        _ => 0,
    }
}

/// Replies are a few bytes each: only the count bounds a batch of them.
fn reply_frame_bytes(_: &pb::AppendReplyFrame) -> usize {
    64
}

/// How many of a replication stream's requests are out unanswered; the sender waits at the limit.
struct Window {
    in_flight: AtomicUsize,
    waker: AtomicWaker,
}

impl Window {
    fn new() -> Arc<Self> {
        Arc::new(Self { in_flight: AtomicUsize::new(0), waker: AtomicWaker::new() })
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// A reply came: the sender may send one more. (A peer that answers more than it was sent cannot
    /// wrap the count.)
    fn answered(&self) {
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.waker.wake();
    }
}

/// A replication stream's requests, held back while [`APPENDS_IN_FLIGHT_MAX`] are unanswered.
struct Windowed<S> {
    input: S,
    window: Arc<Window>,
}

impl<S: Stream + Unpin> Stream for Windowed<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.window.in_flight() >= APPENDS_IN_FLIGHT_MAX {
            self.window.waker.register(cx.waker());
            // A reply that came between the check and the registration woke nobody: check again.
            if self.window.in_flight() >= APPENDS_IN_FLIGHT_MAX {
                return Poll::Pending;
            }
        }
        let item = self.input.poll_next_unpin(cx);
        if let Poll::Ready(Some(_)) = &item {
            self.window.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        item
    }
}

/// Where the replies of each open replication stream of one append connection go. `None` once the
/// connection has failed: every stream open then was failed, and no new one may open.
struct Routes(Mutex<Option<HashMap<u64, ReplySender>>>);

type ReplySender = mpsc::UnboundedSender<Result<pb::AppendReply, Status>>;

impl Routes {
    fn is_closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    fn open(&self, stream: u64, replies: ReplySender) -> bool {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(routes) => {
                routes.insert(stream, replies);
                true
            }
            None => false,
        }
    }

    fn close(&self, stream: u64) {
        if let Some(routes) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            routes.remove(&stream);
        }
    }

    /// Hands each reply to its stream. A stream's error or end is its last frame: its route goes, so
    /// its reply receiver ends after what it was given.
    fn dispatch(&self, frames: Vec<pb::AppendReplyFrame>) {
        use pb::append_reply_frame::Body;
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(routes) = guard.as_mut() else { return };
        for frame in frames {
            match frame.body {
                Some(Body::Reply(reply)) => {
                    if let Some(route) = routes.get(&frame.stream) {
                        let _ = route.send(Ok(reply));
                    }
                }
                Some(Body::Error(e)) => {
                    if let Some(route) = routes.remove(&frame.stream) {
                        let _ = route.send(Err(status_of(e)));
                    }
                }
                Some(Body::End(_)) => {
                    routes.remove(&frame.stream);
                }
                None => {
                    if let Some(route) = routes.remove(&frame.stream) {
                        let _ = route.send(Err(Status::internal("empty append reply frame")));
                    }
                }
            }
        }
    }

    /// The connection failed: every open stream gets `status`, and the routes close for good.
    fn fail_all(&self, status: &Status) {
        let routes = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        for route in routes.into_iter().flat_map(HashMap::into_values) {
            let _ = route.send(Err(status.clone()));
        }
    }
}

/// One peer's append connection: one `AppendStreams` call carrying the replication streams of every
/// group on this node with a replica there. Its task ([`run_mux`]) sends the streams' frames through a
/// [`Multiplex`] and hands each reply to its stream; when the call fails, every open stream fails with
/// it and the pool starts a new connection for the next stream.
struct AppendMux {
    /// The frames of newly opened replication streams, for the connection's multiplex.
    opened: mpsc::UnboundedSender<BoxStream<'static, pb::AppendFrame>>,
    routes: Arc<Routes>,
    next_stream: AtomicU64,
}

impl AppendMux {
    fn start(client: RaftTransportClient<Channel>, stats: Arc<BatchStats>) -> Arc<Self> {
        let (opened, frames) = mpsc::unbounded_channel();
        let routes = Arc::new(Routes(Mutex::new(Some(HashMap::new()))));
        tokio::spawn(run_mux(client, Multiplex::new(frames, request_frame_bytes), routes.clone(), stats));
        Arc::new(Self { opened, routes, next_stream: AtomicU64::new(0) })
    }
}

/// Runs one append connection until it fails or its multiplex ends (the pool and every stream are gone).
async fn run_mux(
    mut client: RaftTransportClient<Channel>,
    frames: Multiplex<pb::AppendFrame>,
    routes: Arc<Routes>,
    stats: Arc<BatchStats>,
) {
    let requests = frames.map(move |frames| {
        stats.count(frames.len());
        pb::AppendFrames { frames }
    });
    // Setting the call up waits for the peer to accept it; a peer that does not answer within the
    // limit is treated as unreachable, and openraft backs off before its next stream.
    let failure = match tokio::time::timeout(APPEND_SETUP_TIMEOUT, client.append_streams(requests)).await {
        Err(_) => Status::unavailable(format!("append connection not accepted within {APPEND_SETUP_TIMEOUT:?}")),
        Ok(Err(status)) => status,
        Ok(Ok(response)) => {
            let mut replies = response.into_inner();
            loop {
                match replies.message().await {
                    Ok(Some(batch)) => routes.dispatch(batch.frames),
                    Ok(None) => break Status::unavailable("the peer ended the append connection"),
                    Err(status) => break status,
                }
            }
        }
    };
    routes.fail_all(&failure);
}

/// The receiving half of one replication stream, as openraft sees it. Dropping it closes the stream:
/// its route goes, and its requests end with an `end` frame so that the peer ends its side too.
struct OpenStream {
    replies: mpsc::UnboundedReceiver<Result<pb::AppendReply, Status>>,
    window: Arc<Window>,
    routes: Arc<Routes>,
    stream: u64,
    /// Dropped with the stream: ends its requests in the multiplex.
    _closing: tokio::sync::oneshot::Sender<()>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.routes.close(self.stream);
    }
}

impl OpenStream {
    /// The next reply. A stream with requests out that gets no reply for a whole
    /// [`APPEND_RESPONSE_TIMEOUT`] fails: a request unanswered for one to two timeouts (one, if it was
    /// out when the wait began). An idle stream may stay quiet.
    async fn next(&mut self) -> Option<Result<pb::AppendReply, Status>> {
        let mut waiting = self.window.in_flight() > 0;
        let next = loop {
            match tokio::time::timeout(APPEND_RESPONSE_TIMEOUT, self.replies.recv()).await {
                Ok(next) => break next,
                Err(_) if waiting && self.window.in_flight() > 0 => {
                    break Some(Err(Status::deadline_exceeded("append reply timed out")));
                }
                // Requests that went out during this wait get a whole timeout of their own.
                Err(_) => waiting = self.window.in_flight() > 0,
            }
        };
        if let Some(Ok(_)) = &next {
            self.window.answered();
        }
        next
    }
}

/// Hands openraft the clients of one group.
pub struct GroupNetworkFactory {
    group: GroupId,
    pool: Arc<PeerPool>,
    /// Per peer: the pause of this group's replication streams after failed ones, shared by every client
    /// of the group towards that peer, so that an answered heartbeat ends it.
    retries: HashMap<NodeId, Arc<PeerRetry>>,
}

impl GroupNetworkFactory {
    pub fn new(group: GroupId, pool: Arc<PeerPool>) -> Self {
        Self { group, pool, retries: HashMap::new() }
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
    fn network(&mut self, target: NodeId, node: &BasicNode, heartbeats: bool) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            self_id: self.pool.self_id,
            target,
            addr: node.addr.clone(),
            client: self.pool.client(target, &node.addr),
            beats: if heartbeats { self.pool.beats(target, &node.addr).ok() } else { None },
            pool: self.pool.clone(),
            retry: self.retries.entry(target).or_default().clone(),
        }
    }
}

/// One group's client towards one peer.
pub struct GroupNetwork {
    group: GroupId,
    self_id: NodeId,
    target: NodeId,
    /// The peer's membership address (the pool maps it to its Raft route).
    addr: String,
    /// For votes, snapshots and leader transfers.
    client: Result<RaftTransportClient<Channel>, String>,
    /// Set for a heartbeat client: its appends join the peer's heartbeat batches.
    beats: Option<BeatQueue>,
    /// Its replication streams join the peer's append connection.
    pool: Arc<PeerPool>,
    /// When the group's next replication stream to the peer may start, after streams that failed.
    retry: Arc<PeerRetry>,
}

/// The first pause before a group's next replication stream to a peer after one failed; it doubles with
/// each further failure up to [`STREAM_RETRY_PAUSE_MAX`], and a reply or an answered heartbeat ends it.
const STREAM_RETRY_PAUSE_FIRST: Duration = Duration::from_millis(10);
const STREAM_RETRY_PAUSE_MAX: Duration = Duration::from_millis(500);

/// A group's failed replication streams towards one peer, and when the next may start.
///
/// openraft opens a new stream as soon as one fails, and its own backoff sleeps only before each request
/// it hands a stream (the first included), which a stream that fails before it asks for one (the peer
/// refuses connections) never gets to. Without this pause a leader retried a stopped peer in a hot loop,
/// with a warning and a progress report to the Raft core for each failed stream: over 200 k of them in
/// the 5 s one peer of a 3-node cluster was down, and with a 300-partition topic the two surviving
/// brokers spent 0.9 of a core each on it (0.13 with the pause). Any failed stream starts the pause (a
/// refused connection, a reply that timed out, an error from the peer). The stream is handed to openraft
/// at once and the pause is its wait for a first reply, which openraft races against its cancel signal,
/// so a replication task told to stop does not sit it out. A reply on a stream, or an answered heartbeat
/// of the group to that peer, ends the pause ([`PeerRetry`]): a peer that came back gets its entries at
/// its first heartbeat (every 250 ms), not when a pause of up to 500 ms runs out.
#[derive(Debug, Default)]
struct StreamRetry {
    failures: u32,
    last_failure: Option<tokio::time::Instant>,
}

impl StreamRetry {
    fn failed(&mut self, now: tokio::time::Instant) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(now);
    }

    fn answered(&mut self) {
        *self = StreamRetry::default();
    }

    /// When the next stream may start; None: at once.
    fn next_start(&self) -> Option<tokio::time::Instant> {
        let doublings = self.failures.saturating_sub(1).min(16);
        let pause = STREAM_RETRY_PAUSE_FIRST.saturating_mul(1 << doublings).min(STREAM_RETRY_PAUSE_MAX);
        self.last_failure.map(|at| at + pause)
    }
}

/// One group's [`StreamRetry`] towards one peer, shared by its replication and heartbeat clients, and the
/// signal that wakes a stream waiting out its pause when the pause ends early.
#[derive(Debug, Default)]
struct PeerRetry {
    state: Mutex<StreamRetry>,
    resumed: tokio::sync::Notify,
}

impl PeerRetry {
    fn lock(&self) -> std::sync::MutexGuard<'_, StreamRetry> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self) {
        self.lock().failed(tokio::time::Instant::now());
    }

    /// The peer answered: any pause ends, and a stream waiting it out starts now.
    fn answered(&self) {
        let mut state = self.lock();
        if state.failures > 0 {
            state.answered();
            drop(state);
            self.resumed.notify_waiters();
        }
    }

    /// Waits until the next stream may start: its pause ran out, or the peer answered meanwhile.
    async fn until_next_start(&self) {
        loop {
            // Registered before the state is read, so an answer between the two still wakes it.
            let resumed = self.resumed.notified();
            let mut resumed = std::pin::pin!(resumed);
            resumed.as_mut().enable();
            let Some(at) = self.lock().next_start() else { return };
            if at <= tokio::time::Instant::now() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = resumed => {}
            }
        }
    }
}

/// The first pause before asking a peer that does not host the group (yet) for its vote again; it
/// doubles up to [`VOTE_RETRY_PAUSE_MAX`].
const VOTE_RETRY_PAUSE_FIRST: Duration = Duration::from_millis(5);
const VOTE_RETRY_PAUSE_MAX: Duration = Duration::from_millis(100);

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
        let deadline = tokio::time::Instant::now() + ttl;
        let mut pause = VOTE_RETRY_PAUSE_FIRST;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let reply = loop {
            match tokio::time::timeout(left(), client.vote(req)).await {
                Err(_) => return Err(self.timeout(RPCTypes::Vote, ttl)),
                // A peer creates a new group's replica when it applies the topic's creation, which may
                // be just after the bootstrapping node campaigned: ask again while the election lasts,
                // instead of failing the vote and leaving the new group leaderless for a whole election
                // timeout. (NotFound means the peer never looked at the request, so asking again is safe.)
                // The pause must end before the deadline.
                Ok(Err(status)) if status.code() == tonic::Code::NotFound && left() > pause => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(VOTE_RETRY_PAUSE_MAX);
                }
                Ok(reply) => break reply.map_err(rpc_error)?.into_inner(),
            }
        };
        let vote = from_pb_vote(reply.vote.as_ref()).map_err(rpc_error)?;
        Ok(VoteResponse::new(vote, reply.last_log_id.as_ref().map(from_pb_log_id), reply.granted))
    }
}

/// Opens one replication stream of `group` on the append connection towards `target`; `retry` learns
/// whether its replies come.
fn open_replication_stream<S>(
    pool: &PeerPool,
    group: GroupId,
    target: NodeId,
    addr: &str,
    input: S,
    retry: Arc<PeerRetry>,
) -> Result<AppendReplies<'static>, RPCError<TypeConfig>>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    let mux = pool.mux(target, addr).map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
    let stream = mux.next_stream.fetch_add(1, Ordering::Relaxed);
    let (route, replies) = mpsc::unbounded_channel();
    if !mux.routes.open(stream, route) {
        return Err(RPCError::Unreachable(Unreachable::from_string("the append connection failed")));
    }
    let (closing, closed) = tokio::sync::oneshot::channel();
    let window = Window::new();
    let requests = Windowed { input: input.map(move |req| pb_append(group, &req)), window: window.clone() };
    let frames = requests
        .map(move |req| pb::AppendFrame { stream, body: Some(pb::append_frame::Body::Request(req)) })
        .take_until(closed)
        .chain(futures::stream::once(async move {
            pb::AppendFrame { stream, body: Some(pb::append_frame::Body::End(true)) }
        }));
    let open = OpenStream { replies, window, routes: mux.routes.clone(), stream, _closing: closing };
    if mux.opened.send(Box::pin(frames)).is_err() {
        return Err(RPCError::Unreachable(Unreachable::from_string("the append connection failed")));
    }
    // Only the stream's first reply and its error touch `retry` (a later reply has nothing to end: the
    // first one did, and since then only heartbeats' answers, which end pauses too, and this stream's
    // own failure can have changed it), so later replies, the replication path proper, take no lock.
    let replies = futures::stream::unfold((open, retry, false), |(mut open, retry, answered)| async move {
        let item = match open.next().await? {
            Ok(reply) => from_pb_append_reply(reply).map_err(rpc_error),
            Err(status) => Err(rpc_error(status)),
        };
        match &item {
            Ok(_) if answered => {}
            Ok(_) => retry.answered(),
            Err(_) => retry.failed(),
        }
        let answered = answered || item.is_ok();
        Some((item, (open, retry, answered)))
    });
    Ok(until_error(replies))
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
        let (group, self_id, target, retry) = (self.group, self.self_id, self.target, self.retry.clone());
        let ttl = option.soft_ttl();
        let replies = input.then(move |req| {
            let (beats, retry) = (beats.clone(), retry.clone());
            async move {
                let (reply, outcome) = tokio::sync::oneshot::channel();
                if beats.send(Beat { request: pb_append(group, &req), reply }).is_err() {
                    return Err(RPCError::Unreachable(Unreachable::from_string("the heartbeat sender stopped")));
                }
                match tokio::time::timeout(ttl, outcome).await {
                    Err(_) => Err(timed_out(self_id, target, RPCTypes::AppendEntries, ttl)),
                    Ok(Err(_)) => Err(RPCError::Network(NetworkError::from_string("heartbeat dropped unanswered"))),
                    Ok(Ok(Err(status))) => Err(rpc_error(status)),
                    Ok(Ok(Ok(reply))) => {
                        let reply = from_pb_append_reply(reply).map_err(rpc_error);
                        if reply.is_ok() {
                            retry.answered();
                        }
                        reply
                    }
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
        let retry = self.retry.clone();
        let paused = retry.lock().next_start().is_some();
        let (pool, group, target, addr) = (self.pool.clone(), self.group, self.target, self.addr.clone());
        let open = move |retry: Arc<PeerRetry>| {
            let opened = open_replication_stream(&pool, group, target, &addr, input, retry.clone());
            if opened.is_err() {
                retry.failed();
            }
            opened
        };
        Box::pin(async move {
            if !paused {
                return open(retry);
            }
            // The pause is the reply stream's wait for its first item: openraft waits for replies and for
            // its cancel signal together, so a replication task that must stop (its leader stepped down)
            // does not sit out the pause.
            let delayed = futures::stream::once(async move {
                retry.until_next_start().await;
                open(retry).unwrap_or_else(|e| Box::pin(futures::stream::iter([Err(e)])))
            })
            .flatten();
            Ok(Box::pin(delayed) as AppendReplies<'s>)
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

/// One replication stream of an append connection, as its receiver keeps it.
enum Inbound {
    /// Requests go to the group's `Raft::stream_append` through `requests`; `fail` ends the stream
    /// with an error after the replies to what it was given.
    Open {
        group: GroupId,
        requests: mpsc::Sender<AppendEntriesRequest<TypeConfig>>,
        fail: Option<tokio::sync::oneshot::Sender<Status>>,
    },
    /// The stream failed here; its later frames are dropped until the sender ends it.
    Failed,
}

fn reply_frame(stream: u64, body: pb::append_reply_frame::Body) -> pb::AppendReplyFrame {
    pb::AppendReplyFrame { stream, body: Some(body) }
}

fn error_frame(stream: u64, status: &Status) -> pb::AppendReplyFrame {
    reply_frame(stream, pb::append_reply_frame::Body::Error(rpc_error_of(status)))
}

/// Receives the frames of one append connection and runs each replication stream in it: a stream's
/// first request opens it on the group it names (its replies join the connection's reply multiplex
/// through `opened`), later requests follow in order, an `end` frame closes it. A failed stream gets
/// one error frame and nothing else; the connection and its other streams go on. Ends with the
/// connection's input, which ends every stream's requests (their replies still go out).
async fn demux<L: GroupLookup>(
    lookup: Arc<L>,
    mut incoming: Streaming<pb::AppendFrames>,
    opened: mpsc::UnboundedSender<BoxStream<'static, pb::AppendReplyFrame>>,
) {
    use pb::append_frame::Body;
    let mut streams: HashMap<u64, Inbound> = HashMap::new();
    while let Ok(Some(batch)) = incoming.message().await {
        for frame in batch.frames {
            let stream = frame.stream;
            match frame.body {
                Some(Body::Request(req)) => match streams.get_mut(&stream) {
                    None => {
                        let inbound = open_stream(&*lookup, stream, req, &opened);
                        streams.insert(stream, inbound);
                    }
                    Some(Inbound::Open { group, requests, fail }) => {
                        let parsed = if req.group_id == *group {
                            from_pb_append(req)
                        } else {
                            Err(Status::invalid_argument(format!(
                                "append stream {stream} of group {group} got a request for group {}",
                                req.group_id
                            )))
                        };
                        let refused = match parsed.map(|req| requests.try_send(req)) {
                            Ok(Ok(())) => None,
                            Err(status) => Some(status),
                            Ok(Err(mpsc::error::TrySendError::Full(_))) => Some(Status::resource_exhausted(format!(
                                "append stream {stream} of group {group} has more than {APPENDS_IN_FLIGHT_MAX} requests unanswered"
                            ))),
                            // The group's stream ended on its own (a conflict or a higher vote ends it);
                            // its replies end it on the sender's side too.
                            Ok(Err(mpsc::error::TrySendError::Closed(_))) => {
                                Some(Status::cancelled("the stream has ended"))
                            }
                        };
                        if let Some(status) = refused {
                            if let Some(fail) = fail.take() {
                                let _ = fail.send(status);
                            }
                            streams.insert(stream, Inbound::Failed);
                        }
                    }
                    Some(Inbound::Failed) => {}
                },
                // Dropping the stream's request sender ends its input; its replies then end it. A stream
                // that ended before its first request (openraft ends one when a newer replication job
                // replaces it) opened nothing here: it gets its end at once, or its sender would wait for
                // replies forever.
                Some(Body::End(_)) => {
                    if streams.remove(&stream).is_none() {
                        send_last(&opened, reply_frame(stream, pb::append_reply_frame::Body::End(true)));
                    }
                }
                // Malformed: the stream fails, whether open here or not yet.
                None => {
                    let status = Status::invalid_argument("empty append frame");
                    match streams.remove(&stream) {
                        Some(Inbound::Open { fail: Some(fail), .. }) => {
                            let _ = fail.send(status);
                        }
                        Some(_) => {}
                        None => send_last(&opened, error_frame(stream, &status)),
                    }
                    streams.insert(stream, Inbound::Failed);
                }
            }
        }
    }
}

/// Sends a stream's last frame (its error or end) when nothing else of it is left to send.
fn send_last(opened: &mpsc::UnboundedSender<BoxStream<'static, pb::AppendReplyFrame>>, frame: pb::AppendReplyFrame) {
    let _ = opened.send(Box::pin(futures::stream::iter([frame])));
}

/// Opens replication stream `stream` on the group its first request names.
fn open_stream<L: GroupLookup>(
    lookup: &L,
    stream: u64,
    first: pb::AppendRequest,
    opened: &mpsc::UnboundedSender<BoxStream<'static, pb::AppendReplyFrame>>,
) -> Inbound {
    let group = first.group_id;
    let failed = |status: Status| {
        send_last(opened, error_frame(stream, &status));
        Inbound::Failed
    };
    let Some(raft) = lookup.raft(group) else {
        return failed(Status::not_found(format!("group {group} is not hosted here")));
    };
    let first = match from_pb_append(first) {
        Ok(req) => req,
        Err(status) => return failed(status),
    };
    let (requests, input) = mpsc::channel(APPENDS_IN_FLIGHT_MAX);
    if requests.try_send(first).is_err() {
        return failed(Status::internal("a new append stream refused its first request"));
    }
    let (fail, failure) = tokio::sync::oneshot::channel::<Status>();
    let input = tokio_stream::wrappers::ReceiverStream::new(input);
    use pb::append_reply_frame::Body;
    let replies = Box::pin(raft.stream_append(input))
        .map(move |r| match r {
            Ok(result) => reply_frame(stream, Body::Reply(pb_append_reply(result))),
            Err(fatal) => error_frame(stream, &fatal_status(fatal)),
        })
        // After the replies: the stream's error if it failed here, else its end.
        .chain(futures::stream::once(async move {
            match failure.await {
                Ok(status) => error_frame(stream, &status),
                Err(_) => reply_frame(stream, Body::End(true)),
            }
        }));
    let _ = opened.send(Box::pin(replies));
    Inbound::Open { group, requests, fail: Some(fail) }
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

    type AppendStreamsStream = BoxStream<'static, Result<pb::AppendReplyFrames, Status>>;

    /// One peer's append connection. Answered with headers at once: the sender pushes its first frame
    /// only once the call is set up, so waiting for it here would deadlock until the sender's timeout.
    async fn append_streams(
        &self,
        request: Request<Streaming<pb::AppendFrames>>,
    ) -> Result<TonicResponse<Self::AppendStreamsStream>, Status> {
        let (opened, replies) = mpsc::unbounded_channel();
        tokio::spawn(demux(self.lookup.clone(), request.into_inner(), opened));
        let replies = Multiplex::new(replies, reply_frame_bytes).map(|frames| Ok(pb::AppendReplyFrames { frames }));
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
    use openraft::entry::RaftEntry;

    #[test]
    fn a_received_entry_is_stored_as_the_bytes_that_came_over_the_wire() {
        let entries = vec![
            Entry::new_normal(log_id(2, 7), crate::types::Command::new(Bytes::from_static(b"records"))),
            Entry::new_normal(log_id(2, 8), crate::types::Command::new(Bytes::from_static(b"more"))),
        ];
        let req = AppendEntriesRequest { vote: Vote::new(2, 1), prev_log_id: None, entries, leader_commit: None };
        let wire = pb_append(5, &req);
        let received = from_pb_append(wire.clone()).expect("decoded");
        assert_eq!(received.entries, req.entries);
        for (entry, sent) in received.entries.iter().zip(&wire.entries) {
            assert_eq!(codec::seal_entry(entry).as_ptr(), sent.as_ptr(), "entry {} sealed again", entry.log_id);
        }
    }

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
        let stats = Arc::new(BatchStats::default());
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

    fn frame(stream: u64, bytes: usize) -> pb::AppendFrame {
        let mut req = heartbeat(7);
        req.entries = vec![Bytes::from(vec![0u8; bytes])];
        pb::AppendFrame { stream, body: Some(pb::append_frame::Body::Request(req)) }
    }

    fn streams_of(batch: &[pb::AppendFrame]) -> Vec<u64> {
        batch.iter().map(|f| f.stream).collect()
    }

    #[tokio::test]
    async fn a_multiplex_sends_what_is_ready_as_one_batch_keeping_each_streams_order() {
        let (opened, rx) = mpsc::unbounded_channel::<BoxStream<'static, pb::AppendFrame>>();
        let mut mux = Multiplex::new(rx, request_frame_bytes);
        opened.send(Box::pin(futures::stream::iter([frame(1, 10), frame(1, 20)]))).expect("open");
        opened.send(Box::pin(futures::stream::iter([frame(2, 30)]))).expect("open");
        let batch = mux.next().await.expect("a batch");
        let mut ones = batch.iter().filter(|f| f.stream == 1).map(request_frame_bytes);
        assert_eq!((ones.next(), ones.next()), (Some(10), Some(20)), "stream 1 in its order");
        assert_eq!(streams_of(&batch).len(), 3, "everything ready went in one batch");
        // Both streams ended; the multiplex waits for more until its opener is gone.
        assert!(futures::poll!(mux.next()).is_pending());
        drop(opened);
        assert!(mux.next().await.is_none());
    }

    #[tokio::test]
    async fn frames_ready_while_a_multiplex_yields_join_its_batch() {
        let (opened, rx) = mpsc::unbounded_channel::<BoxStream<'static, pb::AppendFrame>>();
        let mut mux = Multiplex::new(rx, request_frame_bytes);
        let (late, late_frames) = mpsc::unbounded_channel();
        opened.send(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(late_frames))).expect("open");
        opened.send(Box::pin(futures::stream::iter([frame(1, 10)]))).expect("open");
        // The first poll finds one frame and yields, holding it, so the tasks ready to run go first.
        assert!(futures::poll!(mux.next()).is_pending(), "the multiplex yields before sending");
        // One of them sends too: its frame goes out with the held one, in one batch.
        late.send(frame(2, 20)).expect("send");
        let batch = futures::poll!(mux.next());
        assert!(matches!(&batch, Poll::Ready(Some(b)) if streams_of(b) == [1, 2]), "one batch of both: {batch:?}");
        // With nothing held, a lone frame is held once again and then sent alone.
        late.send(frame(2, 30)).expect("send");
        assert!(futures::poll!(mux.next()).is_pending());
        assert_eq!(mux.next().await.map(|b| streams_of(&b)), Some(vec![2]));
    }

    #[tokio::test]
    async fn a_multiplex_batch_stops_once_it_holds_its_byte_limit() {
        let (opened, rx) = mpsc::unbounded_channel::<BoxStream<'static, pb::AppendFrame>>();
        let mut mux = Multiplex::new(rx, request_frame_bytes);
        let half = FRAMES_BYTES_MAX / 2;
        opened.send(Box::pin(futures::stream::iter([frame(1, half), frame(1, half), frame(1, half)]))).expect("open");
        drop(opened);
        assert_eq!(mux.next().await.expect("a batch").len(), 2);
        assert_eq!(mux.next().await.expect("a batch").len(), 1);
        assert!(mux.next().await.is_none());
    }

    #[tokio::test]
    async fn a_replication_stream_is_held_back_while_its_window_is_full() {
        let window = Window::new();
        let mut requests =
            Windowed { input: futures::stream::iter(0..APPENDS_IN_FLIGHT_MAX + 10), window: window.clone() };
        for expected in 0..APPENDS_IN_FLIGHT_MAX {
            assert_eq!(requests.next().await, Some(expected));
        }
        assert!(futures::poll!(requests.next()).is_pending(), "the window is full");
        window.answered();
        assert_eq!(requests.next().await, Some(APPENDS_IN_FLIGHT_MAX), "a reply lets one more out");
        assert!(futures::poll!(requests.next()).is_pending());
        // A peer answering more than it was sent cannot wrap the count and close the window.
        for _ in 0..APPENDS_IN_FLIGHT_MAX + 5 {
            window.answered();
        }
        assert_eq!(window.in_flight(), 0);
        assert_eq!(requests.next().await, Some(APPENDS_IN_FLIGHT_MAX + 1));
    }

    /// A replication stream's receiving half, with the sender that feeds it replies.
    fn open_stream_for_test() -> (OpenStream, Arc<Window>, ReplySender) {
        let (route, replies) = mpsc::unbounded_channel();
        let routes = Arc::new(Routes(Mutex::new(Some(HashMap::new()))));
        assert!(routes.open(1, route.clone()));
        let window = Window::new();
        let (closing, _) = tokio::sync::oneshot::channel();
        (OpenStream { replies, window: window.clone(), routes, stream: 1, _closing: closing }, window, route)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_while_its_stream_waited_idle_still_times_out() {
        let (mut open, window, _route) = open_stream_for_test();
        // Idle: no request out, no timeout, however long it waits.
        let idle = tokio::time::timeout(APPEND_RESPONSE_TIMEOUT * 10, open.next()).await;
        assert!(idle.is_err(), "an idle stream stays open: {idle:?}");
        // The wait begins idle, then a request goes out and is never answered.
        let next = open.next();
        tokio::pin!(next);
        assert!(futures::poll!(&mut next).is_pending());
        window.in_flight.fetch_add(1, Ordering::AcqRel);
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(APPEND_RESPONSE_TIMEOUT * 10, next).await {
            Ok(Some(Err(status))) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
            other => panic!("expected the unanswered request to time out, got {other:?}"),
        }
        assert!(started.elapsed() <= APPEND_RESPONSE_TIMEOUT * 2, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_in_time_is_handed_over_and_counted() {
        let (mut open, window, route) = open_stream_for_test();
        window.in_flight.fetch_add(1, Ordering::AcqRel);
        let reply = pb::AppendReply { result: Some(pb::append_reply::Result::MatchedEmpty(true)) };
        route.send(Ok(reply)).expect("send");
        assert_eq!(open.next().await.expect("a reply").expect("ok"), reply);
        assert_eq!(window.in_flight(), 0);
    }

    fn append_request() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: Vote::new(1, 1), prev_log_id: None, entries: Vec::new(), leader_commit: None }
    }

    /// Opens a replication stream of `group` to node 2 at `addr` and returns its first reply.
    async fn first_reply(
        pool: &Arc<PeerPool>,
        group: GroupId,
        addr: &str,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        let mut network = GroupNetworkFactory::new(group, pool.clone()).network(2, &BasicNode::new(addr), false);
        let input = futures::stream::iter([append_request()]);
        let mut replies = network.stream_append(input, RPCOption::new(Duration::from_secs(1))).await.ok()?;
        replies.next().await
    }

    #[tokio::test]
    async fn replication_streams_of_unknown_groups_fail_alone_and_share_one_connection() {
        let addr = serve_no_groups().await;
        let pool = PeerPool::new(1, HashMap::new());
        for group in [7, 8, 9] {
            match first_reply(&pool, group, &addr).await {
                Some(Err(RPCError::Unreachable(e))) => {
                    assert!(e.to_string().contains(&format!("group {group} ")), "{e}")
                }
                other => panic!("group {group}: expected an unreachable group, got {other:?}"),
            }
        }
        let muxes = pool.muxes.lock().expect("muxes");
        assert_eq!(muxes.len(), 1, "one connection to the peer");
        assert!(muxes.values().all(|m| !m.routes.is_closed()), "the connection outlives its failed streams");
        let (messages, frames) = pool.append_stats().snapshot();
        assert!(messages >= 1 && frames >= 3, "three requests went out: {messages} messages, {frames} frames");
    }

    #[tokio::test]
    async fn a_replication_stream_that_ends_before_its_first_request_ends_its_replies_too() {
        let addr = serve_no_groups().await;
        let pool = PeerPool::new(1, HashMap::new());
        let mut network = GroupNetworkFactory::new(7, pool.clone()).network(2, &BasicNode::new(&addr), false);
        // openraft ends a stream without a request when a newer replication job replaces it, and then
        // waits for the stream's replies to end before it starts the next one.
        let input = futures::stream::empty::<AppendEntriesRequest<TypeConfig>>();
        let mut replies = network.stream_append(input, RPCOption::new(Duration::from_secs(1))).await.expect("stream");
        let end = tokio::time::timeout(Duration::from_secs(30), replies.next()).await;
        assert!(matches!(end, Ok(None)), "the replies end: {end:?}");
        // The connection serves the next stream.
        match first_reply(&pool, 8, &addr).await {
            Some(Err(RPCError::Unreachable(e))) => assert!(e.to_string().contains("group 8 "), "{e}"),
            other => panic!("expected an unreachable group, got {other:?}"),
        }
        assert_eq!(pool.muxes.lock().expect("muxes").len(), 1, "one connection to the peer");
    }

    #[tokio::test]
    async fn an_empty_frame_fails_its_stream_even_before_the_stream_opened() {
        let addr = serve_no_groups().await;
        let pool = PeerPool::new(1, HashMap::new());
        let mut client = pool.client(2, &addr).expect("client");
        let frames =
            futures::stream::iter([pb::AppendFrames { frames: vec![pb::AppendFrame { stream: 5, body: None }] }])
                .chain(futures::stream::pending());
        let mut replies = client.append_streams(frames).await.expect("call").into_inner();
        let batch = tokio::time::timeout(Duration::from_secs(30), replies.message())
            .await
            .expect("an answer, not a wait")
            .expect("a message")
            .expect("not the end");
        match batch.frames.as_slice() {
            [pb::AppendReplyFrame { stream: 5, body: Some(pb::append_reply_frame::Body::Error(e)) }] => {
                assert_eq!(status_of(e.clone()).code(), tonic::Code::InvalidArgument, "{e:?}")
            }
            other => panic!("expected stream 5's error, got {other:?}"),
        }
    }

    /// The one append connection `pool` has opened.
    fn only_connection(pool: &PeerPool) -> Arc<AppendMux> {
        pool.muxes.lock().expect("muxes").values().next().cloned().expect("a connection")
    }

    /// Opens a replication stream of `network` to a peer that refuses connections, sees it fail, and
    /// returns the connection it failed on.
    async fn fail_one_stream(network: &mut GroupNetwork, pool: &PeerPool, option: &RPCOption) -> Arc<AppendMux> {
        let mut replies =
            network.stream_append(futures::stream::iter([append_request()]), option.clone()).await.expect("stream");
        assert!(matches!(replies.next().await, Some(Err(RPCError::Unreachable(_)))), "the peer refuses connections");
        drop(replies);
        only_connection(pool)
    }

    #[test]
    fn a_group_pauses_longer_after_each_failed_stream_and_not_at_all_after_a_reply() {
        let t0 = tokio::time::Instant::now();
        let mut retry = StreamRetry::default();
        assert_eq!(retry.next_start(), None, "the first stream starts at once");
        let mut pauses = Vec::new();
        for _ in 0..8 {
            retry.failed(t0);
            pauses.push(retry.next_start().map(|at| at - t0));
        }
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(pauses, [ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(500), ms(500)]);
        retry.answered();
        assert_eq!(retry.next_start(), None, "a reply ends the pause");
        retry.failed(t0);
        assert_eq!(retry.next_start(), Some(t0 + STREAM_RETRY_PAUSE_FIRST), "and restarts the doubling");
    }

    #[tokio::test]
    async fn a_group_whose_stream_failed_waits_before_it_opens_the_next() {
        // The peer refuses connections: each stream fails before openraft hands it a request, so
        // openraft's own backoff, which sleeps before each request, never ran, and it opened the next
        // stream at once, again and again.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let addr = addr.to_string();
        let pool = PeerPool::new(1, HashMap::new());
        let mut network = GroupNetworkFactory::new(7, pool.clone()).network(2, &BasicNode::new(&addr), false);
        let retry = network.retry.clone();
        let option = RPCOption::new(Duration::from_secs(1));
        let failed = fail_one_stream(&mut network, &pool, &option).await;
        let connection = || only_connection(&pool);

        // On a stopped clock, with the pause at its longest (six more failures) so that the test's own
        // slowness cannot end it, the next stream is handed over at once and opens when its pause ends.
        tokio::time::pause();
        let next_start = {
            let mut retry = retry.lock();
            assert!(retry.next_start().is_some(), "the failed stream starts a pause");
            for _ in 0..6 {
                retry.failed(tokio::time::Instant::now());
            }
            retry.next_start().expect("a pause")
        };
        let left = next_start - tokio::time::Instant::now();
        let mut replies =
            network.stream_append(futures::stream::iter([append_request()]), option).await.expect("stream");
        assert!(futures::poll!(replies.next()).is_pending());
        assert!(Arc::ptr_eq(&failed, &connection()), "the next stream opened at once");
        tokio::time::advance(left.saturating_sub(Duration::from_millis(1))).await;
        assert!(futures::poll!(replies.next()).is_pending());
        assert!(Arc::ptr_eq(&failed, &connection()), "the next stream opened before its pause ended");
        // Timers fire on whole milliseconds: the pause ends within the next two.
        tokio::time::advance(Duration::from_millis(2)).await;
        let _ = futures::poll!(replies.next());
        assert!(!Arc::ptr_eq(&failed, &connection()), "the next stream opens, on a new connection");
    }

    #[tokio::test]
    async fn a_reply_ends_the_pause_of_a_group_whose_streams_failed() {
        // A peer that takes the connection and never answers: the stream stays open, and the test gives
        // it its reply.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let pool = PeerPool::new(1, HashMap::new());
        let mut network = GroupNetworkFactory::new(7, pool.clone()).network(2, &BasicNode::new(&addr), false);
        let retry = network.retry.clone();
        let option = RPCOption::new(Duration::from_secs(1));
        let mut replies =
            network.stream_append(futures::stream::iter([append_request()]), option).await.expect("stream");
        for _ in 0..3 {
            retry.failed();
        }
        let mux = only_connection(&pool);
        let matched = pb::AppendReply { result: Some(pb::append_reply::Result::MatchedEmpty(true)) };
        mux.routes.dispatch(vec![pb::AppendReplyFrame {
            stream: 0,
            body: Some(pb::append_reply_frame::Body::Reply(matched)),
        }]);
        assert!(matches!(replies.next().await, Some(Ok(Ok(None)))), "the reply is handed over");
        assert_eq!(retry.lock().next_start(), None, "a reply ends the pause");
        drop(listener);
    }

    #[tokio::test]
    async fn an_answered_heartbeat_ends_the_pause_of_the_groups_streams_to_that_peer() {
        // The peer refuses replication connections; the group's heartbeats to it go through a queue the
        // test answers, as a peer that came back would.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let node = BasicNode::new(addr.to_string());
        let pool = PeerPool::new(1, HashMap::new());
        let mut factory = GroupNetworkFactory::new(7, pool.clone());
        let mut replication = factory.network(2, &node, false);
        let mut heartbeats = factory.network(2, &node, true);
        let (queue, mut beats) = tokio::sync::mpsc::unbounded_channel();
        heartbeats.beats = Some(queue);
        let option = RPCOption::new(Duration::from_secs(1));
        let failed = fail_one_stream(&mut replication, &pool, &option).await;
        let connection = || only_connection(&pool);

        // On a stopped clock, with the pause at its longest, the next stream waits it out.
        tokio::time::pause();
        for _ in 0..6 {
            replication.retry.failed();
        }
        let pause_end = replication.retry.lock().next_start().expect("a pause");
        let mut replies =
            replication.stream_append(futures::stream::iter([append_request()]), option.clone()).await.expect("stream");
        assert!(futures::poll!(replies.next()).is_pending());
        assert!(Arc::ptr_eq(&failed, &connection()), "the next stream waits out its pause");

        let mut answers =
            heartbeats.stream_append(futures::stream::iter([append_request()]), option).await.expect("beats");
        let matched = pb::AppendReply { result: Some(pb::append_reply::Result::MatchedEmpty(true)) };
        let (answer, ()) = tokio::join!(answers.next(), async {
            let beat = beats.recv().await.expect("the group's heartbeat");
            beat.reply.send(Ok(matched)).expect("the heartbeat waits for its answer");
        });
        assert!(matches!(answer, Some(Ok(Ok(None)))), "the heartbeat is answered");
        let _ = futures::poll!(replies.next());
        assert!(!Arc::ptr_eq(&failed, &connection()), "the stream opens once a heartbeat is answered");
        assert!(tokio::time::Instant::now() < pause_end, "and not because its pause ran out");
    }

    #[tokio::test]
    async fn a_replication_stream_to_an_unreachable_peer_fails_and_the_next_one_reconnects() {
        // Nothing listens here once the listener is dropped.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let addr = addr.to_string();
        let pool = PeerPool::new(1, HashMap::new());
        match first_reply(&pool, 7, &addr).await {
            Some(Err(RPCError::Unreachable(_))) => {}
            other => panic!("expected an unreachable peer, got {other:?}"),
        }
        let failed = only_connection(&pool);
        assert!(failed.routes.is_closed(), "the failed connection is closed");
        let next = pool.mux(2, &addr).expect("mux");
        assert!(!Arc::ptr_eq(&failed, &next), "the next stream gets a new connection");
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
