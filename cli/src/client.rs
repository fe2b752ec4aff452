//! [`Client`]: talks to a Flotilla cluster through any of its brokers.
//!
//! Partition requests go straight to the partition's leader, learned from metadata and from the leader
//! hints of `NOT_LEADER` errors; stale knowledge heals itself on the next error. Retriable errors
//! (no leader yet, leader moved, node unreachable) are retried with exponential backoff until the
//! request's deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_broker::error::BrokerError;
use flotilla_broker::partitioner::partition_for_key;
use flotilla_broker::peers::Peers;
use flotilla_broker::pipe::Pipes;
use flotilla_proto::broker as pb;
use flotilla_proto::broker::ErrorCode;
use flotilla_proto::broker::flotilla_client::FlotillaClient;
use tonic::transport::Channel;

/// How long a request keeps retrying retriable errors, by default.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// The longest wait between two attempts. Every attempt after a partition's leader dies is refused
/// before Raft (no leader yet) and costs the broker asked little; a long wait is slack after the new
/// leader stands (at 1 s, B10 measured up to a second of it on top of the election).
const BACKOFF_MAX: Duration = Duration::from_millis(250);

pub type Error = BrokerError;

/// How long a request retries before the client says what it is waiting for (see [`Client::with_wait_notice`]).
pub const WAIT_NOTICE_AFTER: Duration = Duration::from_secs(2);

/// Told, once per client, what a request has been retrying for [`WAIT_NOTICE_AFTER`]: the last failure
/// and how long the request may still retry.
pub type WaitNotice = Arc<dyn Fn(&BrokerError, Duration) + Send + Sync>;

/// How long an unknown topic or partition is retried: a broker learns of a new topic when its controller
/// replica applies the creation, a heartbeat or so after the creation was acknowledged elsewhere.
const METADATA_GRACE: Duration = Duration::from_secs(3);

/// Whether a failure may clear up on retry. Every such error is raised before a request reaches Raft, so
/// a retry cannot write twice. An unknown topic or partition counts only within `METADATA_GRACE` of the
/// first attempt (the broker asked may not have applied the topic's creation yet).
fn retriable(e: &BrokerError, since_first: Duration) -> bool {
    match e.code {
        ErrorCode::NotLeader
        | ErrorCode::LeaderNotAvailable
        | ErrorCode::ClusterNotReady
        | ErrorCode::Throttled
        | ErrorCode::DiskFull => true,
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => since_first < METADATA_GRACE,
        _ => false,
    }
}

/// A client of one cluster.
pub struct Client {
    bootstrap: Vec<String>,
    peers: Peers,
    /// (topic, partition) -> leader address.
    leaders: Mutex<HashMap<(String, u32), String>>,
    /// topic -> partition count.
    partitions: Mutex<HashMap<String, u32>>,
    sticky: AtomicU32,
    deadline: Duration,
    /// Go straight to partition leaders (true), or to the bootstrap brokers in turn and let them forward.
    leader_routing: bool,
    /// Which bootstrap broker the next unrouted request starts with.
    next_bootstrap: AtomicU32,
    /// Produce streams, one per broker: produce requests are pipelined on them.
    pipes: Pipes,
    /// Who hears of a long wait, and after how long; `noticed` keeps it to once per client.
    wait_notice: Option<(WaitNotice, Duration)>,
    noticed: AtomicBool,
}

impl Client {
    /// A client that reaches the cluster through `bootstrap` (HOST:PORT of any brokers).
    pub fn new(bootstrap: Vec<String>) -> Self {
        Self {
            bootstrap,
            peers: Peers::default(),
            leaders: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            sticky: AtomicU32::new(0),
            deadline: REQUEST_DEADLINE,
            leader_routing: true,
            next_bootstrap: AtomicU32::new(0),
            pipes: Pipes::default(),
            wait_notice: None,
            noticed: AtomicBool::new(false),
        }
    }

    /// Without leader routing, requests go to the bootstrap brokers in turn, which forward them to the
    /// leader: what a client without metadata pays (benchmark B5).
    pub fn with_leader_routing(mut self, on: bool) -> Self {
        self.leader_routing = on;
        self
    }

    /// Tells `notice` once, when a request has retried for `after`, why it is still waiting: a command
    /// pointed at brokers that are down says so at once rather than after its whole deadline.
    pub fn with_wait_notice(mut self, after: Duration, notice: WaitNotice) -> Self {
        self.wait_notice = Some((notice, after));
        self
    }

    /// How long each request keeps retrying retriable errors ([`REQUEST_DEADLINE`] unless set).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    fn channel(&self, addr: &str) -> Result<FlotillaClient<Channel>, BrokerError> {
        self.peers.client(addr).map_err(|e| BrokerError::new(ErrorCode::InvalidRequest, e))
    }

    /// Runs the unary `call` against `addr` (or a bootstrap broker), as [`Client::retrying_at`] does.
    async fn retrying<T, F, Fut>(
        &self,
        key: Option<(&str, u32)>,
        first: Option<String>,
        mut call: F,
    ) -> Result<T, BrokerError>
    where
        F: FnMut(FlotillaClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.retrying_at(key, first, |addr| {
            let call = self.channel(&addr).map(&mut call);
            async move { call?.await.map_err(|s| BrokerError::from_call(&addr, &s)) }
        })
        .await
    }

    /// Runs `call` against `first` (or a bootstrap broker), retrying retriable failures with backoff and
    /// following leader hints.
    async fn retrying_at<T, F, Fut>(
        &self,
        key: Option<(&str, u32)>,
        first: Option<String>,
        mut call: F,
    ) -> Result<T, BrokerError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let first_attempt = tokio::time::Instant::now();
        let deadline = first_attempt + self.deadline;
        let mut backoff = BACKOFF_FIRST;
        let mut target = first;
        let mut attempt = self.next_bootstrap.fetch_add(1, Ordering::Relaxed) as usize;
        loop {
            let addr = match target.take() {
                Some(a) => a,
                None => match self.bootstrap.get(attempt % self.bootstrap.len().max(1)) {
                    Some(a) => a.clone(),
                    None => return Err(BrokerError::new(ErrorCode::InvalidRequest, "no bootstrap broker given")),
                },
            };
            attempt += 1;
            // No attempt outlives the deadline, even one whose broker never answers (stopped, or cut off
            // without a reset): it ends as an unknown outcome, like a call cut off by a lost connection.
            let err = match tokio::time::timeout_at(deadline, call(addr.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => BrokerError::new(
                    ErrorCode::Timeout,
                    format!("{addr} did not answer within the request deadline of {:?}", self.deadline),
                ),
            };
            if !retriable(&err, first_attempt.elapsed()) || tokio::time::Instant::now() + backoff > deadline {
                if let (ErrorCode::Timeout, Some((topic, partition))) = (err.code, key) {
                    // The leader we asked may be gone or deposed: ask metadata afresh next time.
                    self.leaders.lock().unwrap_or_else(|p| p.into_inner()).remove(&(topic.to_owned(), partition));
                }
                return Err(err);
            }
            if let Some((topic, partition)) = key {
                // Remember where the leader is (or forget a leader that stopped answering).
                let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
                match &err.leader {
                    Some(hint) => leaders.insert((topic.to_owned(), partition), hint.clone()),
                    None => leaders.remove(&(topic.to_owned(), partition)),
                };
            }
            if let Some((notice, after)) = &self.wait_notice
                && first_attempt.elapsed() >= *after
                && !self.noticed.swap(true, Ordering::Relaxed)
            {
                // An unknown topic or partition is retried only within its grace, not to the deadline.
                let until = match err.code {
                    ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => {
                        deadline.min(first_attempt + METADATA_GRACE)
                    }
                    _ => deadline,
                };
                notice(&err, until.saturating_duration_since(tokio::time::Instant::now()));
            }
            if err.code == ErrorCode::NotLeader && self.leader_routing {
                // Go where the hint says, at once.
                target = err.leader.clone();
                if target.is_some() {
                    continue;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Cluster metadata, and a refresh of the leader cache.
    pub async fn metadata(&self) -> Result<pb::MetadataResponse, BrokerError> {
        let md = self
            .retrying(None, None, |mut c| async move {
                c.metadata(pb::MetadataRequest { forwarded: false }).await.map(|r| r.into_inner())
            })
            .await?;
        let addrs: HashMap<u64, String> = md.nodes.iter().map(|n| (n.node_id, n.addr.clone())).collect();
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        for t in &md.topics {
            partitions.insert(t.name.clone(), t.partitions.len() as u32);
            for p in &t.partitions {
                if let Some(addr) = addrs.get(&p.leader) {
                    leaders.insert((t.name.clone(), p.partition), addr.clone());
                }
            }
        }
        Ok(md)
    }

    fn cached_leader(&self, topic: &str, partition: u32) -> Option<String> {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner()).get(&(topic.to_owned(), partition)).cloned()
    }

    /// The partition's leader: from the cache, else from fresh metadata (None if still unknown).
    async fn leader_of(&self, topic: &str, partition: u32) -> Option<String> {
        if !self.leader_routing {
            return None;
        }
        if let Some(addr) = self.cached_leader(topic, partition) {
            return Some(addr);
        }
        let _ = self.metadata().await;
        self.cached_leader(topic, partition)
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, BrokerError> {
        if let Some(n) = self.partitions.lock().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return Ok(*n);
        }
        let info = self.describe_topic(topic).await?;
        let n = info.partitions.len() as u32;
        self.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.to_owned(), n);
        Ok(n)
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        configs: Vec<(String, String)>,
    ) -> Result<pb::TopicInfo, BrokerError> {
        let req = pb::CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            configs: configs.into_iter().map(|(key, value)| pb::TopicConfig { key, value }).collect(),
        };
        let resp = self
            .retrying(None, None, |mut c| {
                let req = req.clone();
                async move { c.create_topic(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        resp.topic.ok_or_else(|| BrokerError::new(ErrorCode::Unspecified, "the broker returned no topic"))
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let req = pb::DeleteTopicRequest { name: name.to_owned() };
        self.retrying(None, None, |mut c| {
            let req = req.clone();
            async move { c.delete_topic(req).await.map(|_| ()) }
        })
        .await
    }

    pub async fn list_topics(&self) -> Result<Vec<pb::TopicInfo>, BrokerError> {
        self.retrying(None, None, |mut c| async move {
            c.list_topics(pb::ListTopicsRequest {}).await.map(|r| r.into_inner().topics)
        })
        .await
    }

    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicInfo, BrokerError> {
        let req = pb::DescribeTopicRequest { name: name.to_owned(), forwarded: false };
        self.retrying(None, None, |mut c| {
            let req = req.clone();
            async move { c.describe_topic(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Produces `records` to one partition: `partition`, else murmur2 of the first record's key, else a
    /// sticky round-robin choice. Returns the acknowledgement (base offset of the first record).
    /// Produces to one broker are pipelined on one produce stream. Those to one partition whose leader
    /// is known are appended in the order of their calls (first polls), unless one is refused and retried.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<pb::Record>,
    ) -> Result<pb::PartitionAck, BrokerError> {
        let n = self.partition_count(topic).await?;
        let partition = match (partition, records.first().and_then(|r| r.key.as_ref())) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, n),
            (None, None) => self.sticky.fetch_add(1, Ordering::Relaxed) % n.max(1),
        };
        let req = pb::ProduceRequest { topic: topic.to_owned(), partition: Some(partition), records, forwarded: false };
        let leader = self.leader_of(topic, partition).await;
        let resp = self
            .retrying_at(Some((topic, partition)), leader, |addr| {
                let sent = self.channel(&addr).map(|client| self.pipes.send(&addr, client, req.clone()));
                async move { sent?.await }
            })
            .await?;
        resp.acks.into_iter().next().ok_or_else(|| BrokerError::new(ErrorCode::Unspecified, "no acknowledgement"))
    }

    /// Records of one partition from `offset`, waiting up to `max_wait_ms` when there are none yet.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<pb::FetchResponse, BrokerError> {
        let req =
            pb::FetchRequest { topic: topic.to_owned(), partition, offset, max_bytes, max_wait_ms, forwarded: false };
        let leader = self.leader_of(topic, partition).await;
        self.retrying(Some((topic, partition)), leader, |mut c| {
            let req = req.clone();
            async move { c.fetch(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A stream of the records of one partition from `offset` on, pushed by its leader as they commit.
    /// The stream ends with an error when leadership moves; subscribe again from the next offset.
    pub async fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<tonic::Streaming<pb::FetchResponse>, BrokerError> {
        let req = pb::FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes: 0,
            max_wait_ms: 0,
            forwarded: false,
        };
        let leader = self.leader_of(topic, partition).await;
        self.retrying(Some((topic, partition)), leader, |mut c| {
            let req = req.clone();
            async move { c.subscribe(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        spec: pb::OffsetSpec,
        timestamp_ms: i64,
    ) -> Result<u64, BrokerError> {
        let req = pb::ListOffsetsRequest {
            topic: topic.to_owned(),
            partition,
            spec: spec as i32,
            timestamp_ms,
            forwarded: false,
        };
        let leader = self.leader_of(topic, partition).await;
        self.retrying(Some((topic, partition)), leader, |mut c| {
            let req = req.clone();
            async move { c.list_offsets(req).await.map(|r| r.into_inner().offset) }
        })
        .await
    }

    /// The topic as the broker at `addr` sees it itself: for the partitions it holds a replica of, the
    /// leader its replica knows, without asking other brokers. Not routed and not retried.
    pub async fn local_view(&self, addr: &str, topic: &str) -> Result<pb::TopicInfo, BrokerError> {
        let req = pb::DescribeTopicRequest { name: topic.to_owned(), forwarded: true };
        let mut c = self.channel(addr)?;
        c.describe_topic(req).await.map(|r| r.into_inner()).map_err(|s| BrokerError::from_call(addr, &s))
    }

    /// The replica of a partition held by the broker at `addr`, from `offset`, up to what it has applied.
    /// Not routed and not retried: it asks that node only.
    pub async fn read_replica(
        &self,
        addr: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Result<pb::FetchResponse, BrokerError> {
        let req = pb::ReadReplicaRequest { topic: topic.to_owned(), partition, offset, max_bytes };
        let mut c = self.channel(addr)?;
        c.read_replica(req).await.map(|r| r.into_inner()).map_err(|s| BrokerError::from_call(addr, &s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_made_before_raft_are_retried_and_unknown_topics_only_briefly() {
        let e = |code| BrokerError::new(code, "x");
        let now = Duration::ZERO;
        assert!(retriable(&e(ErrorCode::NotLeader), now));
        assert!(retriable(&e(ErrorCode::LeaderNotAvailable), now));
        assert!(retriable(&e(ErrorCode::UnknownTopic), now));
        assert!(!retriable(&e(ErrorCode::UnknownTopic), METADATA_GRACE));
        assert!(!retriable(&e(ErrorCode::Timeout), now), "an unknown outcome is never retried");
        assert!(!retriable(&e(ErrorCode::StorageError), now));
        assert!(!retriable(&e(ErrorCode::RecordTooLarge), now));
    }

    #[tokio::test]
    async fn a_long_wait_is_told_once_with_its_cause() {
        // A port nothing listens on: bind one, then close it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").to_string();
        let heard: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
        let sink = heard.clone();
        let client = Client::new(vec![addr.clone()]).with_deadline(Duration::from_secs(2)).with_wait_notice(
            Duration::from_millis(300),
            Arc::new(move |e, left| sink.lock().expect("sink").push((e.to_string(), left))),
        );
        let e = client.metadata().await.expect_err("a closed port answered");
        assert_eq!(e.code, ErrorCode::LeaderNotAvailable, "{e}");
        // A second call that waits as long is not told again.
        assert!(client.metadata().await.is_err());
        let heard = heard.lock().expect("heard");
        assert_eq!(heard.len(), 1, "{heard:?}");
        let (why, left) = &heard[0];
        assert!(why.starts_with(&format!("{addr}: ")) && why.to_lowercase().contains("refused"), "{why}");
        assert!(*left < Duration::from_millis(1700), "told after 300 ms of a 2 s deadline, not before: {left:?}");
    }
}
