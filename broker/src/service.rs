//! The client and admin API (`flotilla.broker.v1.Flotilla`) served by every broker.
//!
//! Routing: a partition request is served by the partition's leader. A broker that does not lead it
//! forwards the request once to the leader it knows of (`forwarded = true`); a forwarded request that
//! still misses the leader, or a request when no leader is known, fails with `NOT_LEADER` (and the
//! leader's address) or `LEADER_NOT_AVAILABLE`, which clients retry. Admin writes go to the controller
//! leader the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_proto::broker as pb;
use flotilla_proto::broker::ErrorCode;
use flotilla_proto::broker::flotilla_client::FlotillaClient;
use flotilla_proto::broker::flotilla_server::Flotilla;
use flotilla_raft_store::node::{Group, GroupError};
use flotilla_raft_store::partition::{self, ReadError};
use flotilla_raft_store::record_batch::{self, ProducerInfo, Record, RecordHeader};
use flotilla_raft_store::state_machine::KvCommand;
use flotilla_raft_store::types::Response;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response as TonicResponse, Status, Streaming};
use tracing::Instrument;

use crate::broker::Broker;
use crate::controller::{self, CONTROLLER_GROUP, TopicRecord};
use crate::error::BrokerError;
use crate::metrics::{RequestKind, RequestMetrics};
use crate::partitioner;
use crate::peers::Peers;
use crate::pipe::Pipes;
use crate::proposer::ProposeError;

/// Metadata key marking an admin request forwarded by another broker.
const FORWARDED_KEY: &str = "flotilla-forwarded";

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_KEY, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// How long a produce waits for its records to commit before answering `TIMEOUT` (outcome unknown).
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on a fetch's long poll.
const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Default and largest `max_bytes` of a fetch.
const FETCH_BYTES_DEFAULT: u32 = 1 << 20;
const FETCH_BYTES_MAX: u32 = 16 << 20;
/// A node this many entries behind the controller leader is reported as lagging.
const LAGGING_ENTRIES: u64 = 100;
/// How long metadata and describe wait for the controller leader's or another leader's view. Short: a
/// node that has just died black-holes its address (no reset), and clients refresh metadata to find the
/// new leaders.
const LEADER_VIEW_WAIT: Duration = Duration::from_secs(1);
/// Records in one produce request.
const PRODUCE_RECORDS_MAX: usize = 100_000;
/// Requests of one produce stream served at once.
const PRODUCE_STREAM_IN_FLIGHT_MAX: usize = 1024;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct FlotillaService {
    broker: Arc<Broker>,
    sticky: Arc<AtomicU32>,
    peers: Arc<Peers>,
    /// Produce streams to other brokers, for forwarding produce requests to partition leaders.
    pipes: Arc<Pipes>,
    request_metrics: Arc<RequestMetrics>,
}

impl FlotillaService {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            sticky: Arc::new(AtomicU32::new(0)),
            peers: Arc::new(Peers::default()),
            pipes: Arc::new(Pipes::default()),
            request_metrics: Arc::new(RequestMetrics::default()),
        }
    }

    /// The gRPC server, with message limits fit for large produce and fetch requests.
    pub fn into_server(self) -> pb::flotilla_server::FlotillaServer<Self> {
        pb::flotilla_server::FlotillaServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn topic(&self, name: &str) -> Result<Arc<TopicRecord>, BrokerError> {
        self.broker
            .topic(name)
            .ok_or_else(|| BrokerError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}")))
    }

    /// Looks up a topic partition and where a request for it is served; `what` names it in errors.
    fn partition_route(&self, topic: &str, partition: u32, forwarded: bool) -> Result<(String, Route), BrokerError> {
        let topic = self.topic(topic)?;
        let what = format!("partition {}/{partition}", topic.name);
        let group = self.partition_group(&topic, partition)?;
        let replicas = topic.partitions.get(partition as usize).map_or(&[][..], |p| &p.replicas[..]);
        let route = route(&self.broker, group, replicas, &what, forwarded)?;
        Ok((what, route))
    }

    fn partition_group(&self, topic: &TopicRecord, partition: u32) -> Result<Option<Group>, BrokerError> {
        let p = topic.partitions.get(partition as usize).ok_or_else(|| {
            BrokerError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {:?} has partitions 0 to {}, not {partition}",
                    topic.name,
                    topic.partitions.len().saturating_sub(1)
                ),
            )
        })?;
        Ok(self.broker.node.group(p.group_id))
    }
}

/// The outcome label of a failed request: its error code, lower case.
fn outcome_label(e: &BrokerError) -> String {
    e.code.as_str_name().to_ascii_lowercase()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Where a request for a group should go instead of here.
enum Route {
    Local(Group),
    Forward(String),
}

/// Where a request for a group goes. `replicas` are the group's assigned replicas, preferred leader first:
/// a broker that hosts none of them sends the request to the preferred replica, which leads the group or
/// knows who does.
fn route(
    broker: &Broker,
    group: Option<Group>,
    replicas: &[u64],
    what: &str,
    forwarded: bool,
) -> Result<Route, BrokerError> {
    let leader_addr = match group {
        Some(group) if group.is_leader(broker.config.node_id) => return Ok(Route::Local(group)),
        Some(group) => group.leader().and_then(|(id, addr)| addr.or_else(|| broker.node_addr(id))),
        None => replicas.first().and_then(|id| broker.node_addr(*id)),
    };
    match leader_addr {
        Some(addr) if !forwarded => Ok(Route::Forward(addr)),
        other => Err(BrokerError::not_leader(what, other)),
    }
}

/// How long a read waits for a new leader to commit its first entry before it is refused.
const READY_WAIT: Duration = Duration::from_secs(1);

/// A leader serves reads once it has applied an entry of its own term (`Group::serves_reads`); before
/// that (a few milliseconds after an election) the read waits, and past [`READY_WAIT`] is refused as
/// retryable, never answered from an applied state older than one a reader may already have seen.
async fn check_serves_reads(group: &Group, me: u64, what: &str) -> Result<(), BrokerError> {
    if group.wait_serves_reads(me, READY_WAIT).await {
        return Ok(());
    }
    Err(BrokerError::new(
        ErrorCode::LeaderNotAvailable,
        format!("{what}: this leader has not yet committed its first entry; retry"),
    ))
}

fn read_error(e: ReadError) -> BrokerError {
    match e {
        ReadError::OffsetOutOfRange { .. } => BrokerError::new(ErrorCode::OffsetOutOfRange, e.to_string()),
        ReadError::Storage(e) => BrokerError::storage(e),
    }
}

fn group_error(what: &str, e: GroupError) -> BrokerError {
    match e {
        GroupError::NotLeader { leader_addr, .. } => BrokerError::not_leader(what, leader_addr),
        GroupError::Unknown { .. } => BrokerError::new(
            ErrorCode::Timeout,
            format!("{what}: leadership changed mid-write; the outcome is unknown"),
        ),
        GroupError::Stopped { reason, .. } => BrokerError::storage(format!("{what}: {reason}")),
    }
}

/// The forwarding side of [`Peers`]: a malformed leader address means no leader can be reached.
fn forward_client(peers: &Peers, addr: &str) -> Result<FlotillaClient<Channel>, BrokerError> {
    peers.client(addr).map_err(|e| BrokerError::new(ErrorCode::LeaderNotAvailable, format!("bad leader address: {e}")))
}

fn to_record(r: pb::Record) -> Record {
    Record {
        key: r.key,
        value: r.value,
        headers: r.headers.into_iter().map(|h| RecordHeader { key: h.key, value: h.value }).collect(),
        timestamp_ms: if r.timestamp_ms == 0 { now_ms() } else { r.timestamp_ms },
    }
}

impl FlotillaService {
    /// Serves one produce request (unary).
    async fn produce_request(&self, req: pb::ProduceRequest) -> Result<pb::ProduceResponse, BrokerError> {
        self.admit_produce(req).await?.await
    }

    /// The first step of a produce, taken in arrival order: checks, and for a request to one partition
    /// its place in the partition's proposer queue here, or on the produce stream to its leader (a
    /// request for several partitions takes each place in the returned future instead). Returns the
    /// rest: waiting for the commit.
    async fn admit_produce(&self, req: pb::ProduceRequest) -> Result<ProduceRest, BrokerError> {
        let topic = self.topic(&req.topic)?;
        if req.records.is_empty() {
            return Err(BrokerError::new(ErrorCode::EmptyBatch, "a produce request needs at least one record"));
        }
        if req.records.len() > PRODUCE_RECORDS_MAX {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!("a produce request holds at most {PRODUCE_RECORDS_MAX} records"),
            ));
        }
        let n = (topic.partitions.len() as u32).max(1);
        // Split by partition, keeping each partition's records in request order.
        let mut by_partition: BTreeMap<u32, Vec<pb::Record>> = BTreeMap::new();
        let sticky = self.sticky.fetch_add(1, Ordering::Relaxed) % n;
        for r in req.records {
            let p = match (req.partition, &r.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partitioner::partition_for_key(key, n),
                (None, None) => sticky,
            };
            by_partition.entry(p).or_default().push(r);
        }
        let forwarded = req.forwarded;
        if by_partition.len() == 1
            && let Some((p, records)) = by_partition.pop_first()
        {
            let ack = self.admit_partition(&topic, p, records, forwarded).await?;
            return Ok(async move { Ok(pb::ProduceResponse { acks: vec![ack.await?] }) }.boxed());
        }
        let service = self.clone();
        Ok(async move {
            let mut acks = Vec::with_capacity(by_partition.len());
            for (p, records) in by_partition {
                acks.push(service.admit_partition(&topic, p, records, forwarded).await?.await?);
            }
            Ok(pb::ProduceResponse { acks })
        }
        .boxed())
    }

    /// The replies of a produce stream. Each request is admitted (`admit_produce`) in the loop, one after
    /// the other in arrival order, so requests for one partition led here keep their order whatever the
    /// runtime's scheduling; the rest of each (the commit) is awaited concurrently, up to
    /// [`PRODUCE_STREAM_IN_FLIGHT_MAX`] at once (then no more is read until one completes: backpressure on
    /// the client through HTTP/2 flow control). Each reply goes out as its request completes. The replies
    /// are polled by the stream's own task: no task or channel per request. Once the input ends (or
    /// breaks), what was read is still answered.
    fn produce_replies(&self, incoming: Streaming<pb::ProduceStreamRequest>) -> ProduceStream {
        let state = (Some(incoming), FuturesUnordered::new(), self.clone());
        let replies = futures::stream::unfold(state, |(mut incoming, mut in_flight, service)| async move {
            loop {
                if incoming.is_none() && in_flight.is_empty() {
                    return None;
                }
                let reading = incoming.is_some() && in_flight.len() < PRODUCE_STREAM_IN_FLIGHT_MAX;
                tokio::select! {
                    biased;
                    Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                        return Some((Ok(reply), (incoming, in_flight, service)));
                    }
                    next = async { incoming.as_mut()?.next().await }, if reading => match next {
                        Some(Ok(m)) => {
                            let id = m.id;
                            let admitted = match m.request {
                                Some(req) => service.admit_produce(req).await,
                                None => Err(BrokerError::new(ErrorCode::InvalidRequest, "a produce stream message needs a request")),
                            };
                            in_flight.push(async move {
                                let result = match admitted {
                                    Ok(rest) => rest.await,
                                    Err(e) => Err(e),
                                };
                                let result = match result {
                                    Ok(response) => pb::produce_stream_reply::Result::Response(response),
                                    Err(e) => pb::produce_stream_reply::Result::Error(e.into()),
                                };
                                pb::ProduceStreamReply { id, result: Some(result) }
                            });
                        }
                        // The client is done sending, or its stream broke: answer what was read.
                        Some(Err(_)) | None => incoming = None,
                    },
                }
            }
        });
        Box::pin(replies)
    }

    /// Admits records for one partition: queues them on the produce stream to the leader if this node
    /// does not lead it, or takes their place in its proposer queue; both without an await. Returns the rest: the acknowledgement.
    async fn admit_partition(
        &self,
        topic: &TopicRecord,
        partition: u32,
        records: Vec<pb::Record>,
        forwarded: bool,
    ) -> Result<PartitionRest, BrokerError> {
        let what = format!("partition {}/{partition}", topic.name);
        let group = self.partition_group(topic, partition)?;
        let replicas = topic.partitions.get(partition as usize).map_or(&[][..], |p| &p.replicas[..]);
        match route(&self.broker, group, replicas, &what, forwarded)? {
            Route::Forward(addr) => {
                let req = pb::ProduceRequest {
                    topic: topic.name.clone(),
                    partition: Some(partition),
                    records,
                    forwarded: true,
                };
                let sent = self.pipes.send(&addr, forward_client(&self.peers, &addr)?, req);
                Ok(async move {
                    sent.await?.acks.into_iter().next().ok_or_else(|| {
                        BrokerError::new(ErrorCode::InvalidRequest, "the leader returned no acknowledgement")
                    })
                }
                .boxed())
            }
            Route::Local(group) => {
                let metrics = self.request_metrics.partition(&topic.name, partition);
                let started = Instant::now();
                let span = tracing::debug_span!("produce", topic = %topic.name, partition);
                let admitted =
                    self.admit_local(topic, partition, &group, records, &what).instrument(span.clone()).await;
                let rest = async move {
                    let result = match admitted {
                        Ok(committed) => committed.await,
                        Err(e) => Err(e),
                    };
                    let failed = result.as_ref().err().map(outcome_label);
                    metrics.served(RequestKind::Produce, started, failed.as_deref());
                    if let Ok((ack, bytes)) = &result {
                        metrics.moved(RequestKind::Produce, u64::from(ack.record_count), *bytes);
                    }
                    result.map(|(ack, _)| ack)
                };
                Ok(rest.instrument(span).boxed())
            }
        }
    }

    /// Checks and queues `records` on the proposer of a partition led here. Returns the rest: the
    /// acknowledgement and the batch size, once committed.
    async fn admit_local(
        &self,
        topic: &TopicRecord,
        partition: u32,
        group: &Group,
        records: Vec<pb::Record>,
        what: &str,
    ) -> Result<impl Future<Output = Result<(pb::PartitionAck, u64), BrokerError>> + Send + use<>, BrokerError> {
        let count = records.len() as u32;
        let records: Vec<Record> = records.into_iter().map(to_record).collect();
        let size = record_batch::encoded_len(&records) as u64;
        if size > topic.max_message_bytes() {
            return Err(BrokerError::new(
                ErrorCode::RecordTooLarge,
                format!("the batch for {what} is {size} bytes; max.message.bytes is {}", topic.max_message_bytes()),
            ));
        }
        if let Some(free) = self.broker.disk.short() {
            return Err(BrokerError::new(
                ErrorCode::DiskFull,
                format!(
                    "{what}: node {} has {free} bytes free on its data volume, under its floor of {} \
                     (--min-free-bytes); nothing was written",
                    self.broker.config.node_id,
                    self.broker.disk.floor()
                ),
            ));
        }
        let Some(reserved) = self.broker.produce_memory.reserve(size as usize, PRODUCE_TIMEOUT).await else {
            return Err(BrokerError::new(
                ErrorCode::Throttled,
                format!("{what}: the broker's memory for produce requests in flight stayed full; nothing was written"),
            ));
        };
        let batch = record_batch::build(&records, ProducerInfo::NONE);
        let proposed = self.broker.proposers.enqueue(group, batch, u64::from(count), reserved);
        let what = what.to_owned();
        Ok(async move {
            let base_offset = tokio::time::timeout(PRODUCE_TIMEOUT, proposed)
                .await
                .map_err(|_| {
                    BrokerError::new(
                        ErrorCode::Timeout,
                        format!("{what}: not committed within {PRODUCE_TIMEOUT:?}; the outcome is unknown"),
                    )
                })?
                .map_err(|e| match e {
                    ProposeError::Group(e) => group_error(&what, e),
                    ProposeError::Rejected(why) => BrokerError::new(ErrorCode::InvalidRequest, why),
                    ProposeError::Closed => BrokerError::not_leader(&what, None),
                    ProposeError::Abandoned => BrokerError::new(
                        ErrorCode::Timeout,
                        format!("{what}: the write was abandoned when leadership moved; the outcome is unknown"),
                    ),
                })?;
            Ok((pb::PartitionAck { partition, base_offset, record_count: count }, size))
        })
    }

    async fn wait_for_data(group: &Group, offset: u64, wait: Duration) {
        let mut state = group.sm.subscribe();
        let _ = tokio::time::timeout(wait, state.wait_for(|s| s.high_watermark > offset)).await;
    }

    /// Reads records from `offset`; returns them and the bytes of the batches they were read from.
    fn read_records(group: &Group, offset: u64, max_bytes: u32) -> Result<(pb::FetchResponse, u64), BrokerError> {
        let (batches, state) = partition::read(&group.sm, offset, max_bytes as usize).map_err(read_error)?;
        let mut records = Vec::new();
        let mut bytes = 0;
        for b in &batches {
            bytes += b.bytes.len() as u64;
            let iter = record_batch::records(&b.bytes).map_err(BrokerError::storage)?;
            for r in iter {
                let r = r.map_err(BrokerError::storage)?;
                if r.offset < offset as i64 {
                    continue;
                }
                records.push(pb::FetchedRecord {
                    offset: r.offset as u64,
                    key: r.record.key,
                    value: r.record.value,
                    headers: r.record.headers.into_iter().map(|h| pb::Header { key: h.key, value: h.value }).collect(),
                    timestamp_ms: r.record.timestamp_ms,
                });
            }
        }
        let response = pb::FetchResponse {
            records,
            high_watermark: state.high_watermark,
            log_start_offset: state.log_start_offset,
        };
        Ok((response, bytes))
    }

    /// Fills in the partitions another broker leads with that leader's own view (in-sync replicas, offsets),
    /// asking each leader once per topic, all at once. A leader that does not answer within
    /// [`LEADER_VIEW_WAIT`] leaves this node's view in place.
    async fn merge_leader_views(&self, topics: &mut [pb::TopicInfo]) {
        let me = self.broker.config.node_id;
        // Leaders known here, and for partitions whose leader is unknown here (no replica on this node),
        // the preferred replica, which leads or knows who does.
        let mut asks: Vec<(usize, u64)> = Vec::new();
        for (i, info) in topics.iter().enumerate() {
            let nodes: BTreeSet<u64> = info
                .partitions
                .iter()
                .filter_map(|p| if p.leader != 0 { Some(p.leader) } else { p.replicas.first().copied() })
                .filter(|id| *id != me)
                .collect();
            asks.extend(nodes.into_iter().map(|node| (i, node)));
        }
        // All at once: a node that just died (its address black-holed) costs one wait, not one per topic.
        let views = futures::future::join_all(asks.into_iter().map(|(i, node)| {
            let name = topics[i].name.clone();
            async move {
                let addr = self.broker.node_addr(node)?;
                let mut client = self.peers.client(&addr).ok()?;
                let req = pb::DescribeTopicRequest { name, forwarded: true };
                let remote = tokio::time::timeout(LEADER_VIEW_WAIT, client.describe_topic(req)).await.ok()?.ok()?;
                Some((i, node, remote.into_inner().partitions))
            }
        }))
        .await;
        for (i, node, partitions) in views.into_iter().flatten() {
            let info = &mut topics[i];
            for r in partitions {
                let Some(p) = info.partitions.iter_mut().find(|p| p.partition == r.partition) else { continue };
                // The leader's own view wins; otherwise fill in what this node did not know.
                if r.leader == node || (p.leader == 0 && r.leader != 0) {
                    *p = r;
                }
            }
        }
    }

    fn controller_route_for(&self, forwarded: bool) -> Result<Route, BrokerError> {
        let group = self.broker.node.group(CONTROLLER_GROUP);
        route(&self.broker, group, &[], "the controller", forwarded)
    }

    /// Where a controller request goes. A request another broker forwarded is never forwarded again, so
    /// two brokers with different views of the leader cannot pass it back and forth.
    fn controller_route<T>(&self, request: &Request<T>) -> Result<Route, BrokerError> {
        self.controller_route_for(request.metadata().contains_key(FORWARDED_KEY))
    }

    async fn create_topic_local(&self, group: &Group, req: pb::CreateTopicRequest) -> Result<TopicRecord, BrokerError> {
        let _serial = self.broker.controller_writes.lock().await;
        group.linearize().await.map_err(|e| group_error("the controller", e))?;
        let configs: BTreeMap<String, String> = req.configs.into_iter().map(|c| (c.key, c.value)).collect();
        // Replicas go only to live nodes: those the controller leader (this node) hears from.
        let progress = group.replica_progress();
        let nodes: Vec<_> =
            self.broker.config.initial_cluster.keys().copied().filter(|id| progress.contains_key(id)).collect();
        let existing = group.sm.kv_get(&controller::topic_key(&req.name));
        let next_group = group.sm.kv_get(b"meta/next_group");
        let (record, command) = controller::create_topic_command(
            &req.name,
            req.partitions,
            req.replication_factor,
            configs,
            &nodes,
            existing.as_ref(),
            next_group.as_ref(),
        )?;
        match group.write(command.encode()).await.map_err(|e| group_error("the controller", e))? {
            Response::Kv(_) => Ok(record),
            Response::Rejected(why) => {
                Err(BrokerError::new(ErrorCode::ClusterNotReady, format!("concurrent change, retry: {why}")))
            }
            other => Err(BrokerError::storage(format!("unexpected controller result {other:?}"))),
        }
    }

    fn topic_info(&self, topic: &TopicRecord) -> pb::TopicInfo {
        let partitions = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let group = self.broker.node.group(p.group_id);
                let (leader, in_sync, state) = match &group {
                    Some(g) => {
                        let (_, in_sync) = g.replica_status();
                        (g.leader().map_or(0, |(id, _)| id), in_sync, g.sm.partition_state())
                    }
                    None => (0, Vec::new(), Default::default()),
                };
                pb::PartitionInfo {
                    partition: i as u32,
                    group_id: p.group_id,
                    replicas: p.replicas.clone(),
                    leader,
                    in_sync,
                    log_start_offset: state.log_start_offset,
                    high_watermark: state.high_watermark,
                }
            })
            .collect();
        pb::TopicInfo {
            name: topic.name.clone(),
            topic_id: topic.topic_id,
            replication_factor: topic.replication_factor,
            configs: topic.configs.iter().map(|(k, v)| pb::TopicConfig { key: k.clone(), value: v.clone() }).collect(),
            partitions,
        }
    }
}

type SubscribeStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FetchResponse, Status>> + Send>>;
type ProduceStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ProduceStreamReply, Status>> + Send>>;
/// What is left of an admitted produce: its commit.
type ProduceRest = BoxFuture<'static, Result<pb::ProduceResponse, BrokerError>>;
type PartitionRest = BoxFuture<'static, Result<pb::PartitionAck, BrokerError>>;

#[tonic::async_trait]
impl Flotilla for FlotillaService {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(&self, request: Request<pb::FetchRequest>) -> Result<TonicResponse<SubscribeStream>, Status> {
        let req = request.into_inner();
        let (what, route) = self.partition_route(&req.topic, req.partition, true)?;
        let group = match route {
            Route::Local(g) => g,
            Route::Forward(addr) => return Err(BrokerError::not_leader(&what, Some(addr)).into()),
        };
        let me = self.broker.config.node_id;
        let max_bytes = if req.max_bytes == 0 { FETCH_BYTES_DEFAULT } else { req.max_bytes.min(FETCH_BYTES_MAX) };
        // Each step waits for records past `next`, reads them, and yields them; it ends the stream once
        // this node no longer leads or the read fails.
        let stream = futures::stream::unfold(Some((group, req.offset)), move |state| {
            let what = what.clone();
            async move {
                let (group, next) = state?;
                loop {
                    if !group.is_leader(me) {
                        let leader = group.leader().and_then(|(_, addr)| addr);
                        return Some((Err(BrokerError::not_leader(&what, leader).into()), None));
                    }
                    if !group.wait_serves_reads(me, READY_WAIT).await {
                        continue;
                    }
                    if group.sm.partition_state().high_watermark <= next {
                        Self::wait_for_data(&group, next, Duration::from_secs(1)).await;
                        continue;
                    }
                    return match Self::read_records(&group, next, max_bytes) {
                        Ok((resp, _)) => {
                            let after = resp.records.last().map_or(next, |r| r.offset + 1);
                            Some((Ok(resp), Some((group, after))))
                        }
                        Err(e) => Some((Err(e.into()), None)),
                    };
                }
            }
        });
        Ok(TonicResponse::new(Box::pin(stream)))
    }

    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<TonicResponse<pb::ProduceResponse>, Status> {
        Ok(TonicResponse::new(self.produce_request(request.into_inner()).await?))
    }

    type ProduceStreamStream = ProduceStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceStreamRequest>>,
    ) -> Result<TonicResponse<ProduceStream>, Status> {
        Ok(TonicResponse::new(self.produce_replies(request.into_inner())))
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<TonicResponse<pb::FetchResponse>, Status> {
        let req = request.into_inner();
        let (what, route) = self.partition_route(&req.topic, req.partition, req.forwarded)?;
        let group = match route {
            Route::Forward(addr) => {
                let forwarded = pb::FetchRequest { forwarded: true, ..req };
                return forward_client(&self.peers, &addr)?.fetch(forwarded).await;
            }
            Route::Local(g) => g,
        };
        check_serves_reads(&group, self.broker.config.node_id, &what).await?;
        let max_bytes = if req.max_bytes == 0 { FETCH_BYTES_DEFAULT } else { req.max_bytes.min(FETCH_BYTES_MAX) };
        let metrics = self.request_metrics.partition(&req.topic, req.partition);
        let started = Instant::now();
        let span = tracing::debug_span!("fetch", topic = %req.topic, partition = req.partition, offset = req.offset);
        let result = async {
            let state = group.sm.partition_state();
            if req.offset == state.high_watermark && req.max_wait_ms > 0 {
                let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(FETCH_WAIT_MAX);
                Self::wait_for_data(&group, req.offset, wait).await;
            }
            Self::read_records(&group, req.offset, max_bytes)
        }
        .instrument(span)
        .await;
        let failed = result.as_ref().err().map(outcome_label);
        metrics.served(RequestKind::Fetch, started, failed.as_deref());
        let (resp, bytes) = result?;
        metrics.moved(RequestKind::Fetch, resp.records.len() as u64, bytes);
        Ok(TonicResponse::new(resp))
    }

    async fn read_replica(
        &self,
        request: Request<pb::ReadReplicaRequest>,
    ) -> Result<TonicResponse<pb::FetchResponse>, Status> {
        let req = request.into_inner();
        let topic = self.topic(&req.topic)?;
        let group = self.partition_group(&topic, req.partition)?.ok_or_else(|| {
            BrokerError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "node {} holds no replica of partition {}/{}",
                    self.broker.config.node_id, topic.name, req.partition
                ),
            )
        })?;
        let max_bytes = if req.max_bytes == 0 { FETCH_BYTES_DEFAULT } else { req.max_bytes.min(FETCH_BYTES_MAX) };
        // Replicas apply retention on their own; a read from below this one's log start begins at it.
        let offset = req.offset.max(group.sm.partition_state().log_start_offset);
        Ok(TonicResponse::new(Self::read_records(&group, offset, max_bytes)?.0))
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<TonicResponse<pb::ListOffsetsResponse>, Status> {
        let req = request.into_inner();
        let (what, route) = self.partition_route(&req.topic, req.partition, req.forwarded)?;
        let group = match route {
            Route::Forward(addr) => {
                let forwarded = pb::ListOffsetsRequest { forwarded: true, ..req };
                return forward_client(&self.peers, &addr)?.list_offsets(forwarded).await;
            }
            Route::Local(g) => g,
        };
        // A deposed leader must not answer from stale state.
        group.linearize().await.map_err(|e| group_error(&what, e))?;
        let state = group.sm.partition_state();
        let offset = match pb::OffsetSpec::try_from(req.spec) {
            Ok(pb::OffsetSpec::Earliest) => state.log_start_offset,
            Ok(pb::OffsetSpec::Latest) => state.high_watermark,
            Ok(pb::OffsetSpec::Timestamp) => {
                // A scan of the offset index, and a read of the entry it finds: off the runtime's threads.
                let (sm, ts) = (group.sm.clone(), req.timestamp_ms);
                tokio::task::spawn_blocking(move || partition::offset_at_time(&sm, ts))
                    .await
                    .map_err(|e| BrokerError::storage(format!("{what}: the lookup by time failed: {e}")))?
                    .map_err(read_error)?
            }
            _ => {
                return Err(BrokerError::new(
                    ErrorCode::InvalidRequest,
                    "offset spec must be earliest, latest or timestamp",
                )
                .into());
            }
        };
        Ok(TonicResponse::new(pb::ListOffsetsResponse { offset }))
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<TonicResponse<pb::CreateTopicResponse>, Status> {
        let route = self.controller_route(&request)?;
        let req = request.into_inner();
        match route {
            Route::Forward(addr) => forward_client(&self.peers, &addr)?.create_topic(forwarded(req)).await,
            Route::Local(group) => {
                let record = self.create_topic_local(&group, req).await?;
                Ok(TonicResponse::new(pb::CreateTopicResponse { topic: Some(self.topic_info(&record)) }))
            }
        }
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<TonicResponse<pb::DeleteTopicResponse>, Status> {
        let route = self.controller_route(&request)?;
        let req = request.into_inner();
        let group = match route {
            Route::Forward(addr) => return forward_client(&self.peers, &addr)?.delete_topic(forwarded(req)).await,
            Route::Local(group) => group,
        };
        let _serial = self.broker.controller_writes.lock().await;
        group.linearize().await.map_err(|e| group_error("the controller", e))?;
        let key = controller::topic_key(&req.name);
        let Some(current) = group.sm.kv_get(&key) else {
            return Err(BrokerError::new(ErrorCode::UnknownTopic, format!("unknown topic {:?}", req.name)).into());
        };
        let command =
            KvCommand::Guarded { guards: vec![(key.clone(), Some(current))], ops: vec![KvCommand::Delete { key }] };
        match group.write(command.encode()).await.map_err(|e| group_error("the controller", e))? {
            Response::Kv(_) => Ok(TonicResponse::new(pb::DeleteTopicResponse {})),
            Response::Rejected(why) => {
                Err(BrokerError::new(ErrorCode::ClusterNotReady, format!("concurrent change, retry: {why}")).into())
            }
            other => Err(BrokerError::storage(format!("unexpected controller result {other:?}")).into()),
        }
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<TonicResponse<pb::ListTopicsResponse>, Status> {
        let topics = self.broker.topics().iter().map(|t| self.topic_info(t)).collect();
        Ok(TonicResponse::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<TonicResponse<pb::TopicInfo>, Status> {
        let req = request.into_inner();
        let topic = self.topic(&req.name)?;
        let mut info = self.topic_info(&topic);
        if !req.forwarded {
            self.merge_leader_views(std::slice::from_mut(&mut info)).await;
        }
        Ok(TonicResponse::new(info))
    }

    async fn metadata(
        &self,
        request: Request<pb::MetadataRequest>,
    ) -> Result<TonicResponse<pb::MetadataResponse>, Status> {
        let req = request.into_inner();
        // Only the controller leader sees every node's replication progress: ask it when it is elsewhere.
        // A controller leader that does not answer soon (it may have just died) leaves this node's view.
        if let Ok(Route::Forward(addr)) = self.controller_route_for(req.forwarded) {
            let mut controller = forward_client(&self.peers, &addr)?;
            let asked = controller.metadata(pb::MetadataRequest { forwarded: true });
            if let Ok(Ok(resp)) = tokio::time::timeout(LEADER_VIEW_WAIT, asked).await {
                return Ok(resp);
            }
        }
        let controller = self.broker.node.group(CONTROLLER_GROUP);
        let controller_leader = controller.as_ref().and_then(|g| g.leader()).map_or(0, |(id, _)| id);
        let progress = controller.as_ref().map(|g| g.replica_progress()).unwrap_or_default();
        let mut topics: Vec<pb::TopicInfo> = self.broker.topics().iter().map(|t| self.topic_info(t)).collect();
        self.merge_leader_views(&mut topics).await;
        let mut leaderships: BTreeMap<u64, u32> = BTreeMap::new();
        for p in topics.iter().flat_map(|t| t.partitions.iter()) {
            if p.leader != 0 {
                *leaderships.entry(p.leader).or_default() += 1;
            }
        }
        let me = self.broker.config.node_id;
        let nodes = self
            .broker
            .config
            .initial_cluster
            .iter()
            .map(|(id, addr)| {
                // The controller leader's replication progress tells who is alive and who lags; without
                // it (no controller leader reachable) a node vouches only for itself.
                let behind = progress.get(id).copied();
                pb::NodeInfo {
                    node_id: *id,
                    addr: addr.clone(),
                    alive: *id == me || behind.is_some(),
                    leaderships: leaderships.get(id).copied().unwrap_or(0),
                    lagging: behind.is_some_and(|b| b > LAGGING_ENTRIES),
                }
            })
            .collect();
        Ok(TonicResponse::new(pb::MetadataResponse { nodes, controller_leader, topics }))
    }
}
