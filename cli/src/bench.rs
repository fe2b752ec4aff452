//! `flotilla bench produce|consume|e2e`: load generators printing throughput and latency.
//!
//! Produce: `producers x in_flight` requests outstanding. Without `--linger-ms` each worker sends one
//! request of `records_per_request` records at a time. With it, each producer is a batching producer, as
//! Kafka clients are: records are appended to an accumulator and a batch goes out when it holds
//! `batch_bytes` or its first record has waited `linger`, with up to `in_flight` batches outstanding.
//! With `--rate` records are due on a fixed schedule and latency counts from the *intended* send time, so
//! a stalled broker shows up as latency instead of silently lowering the offered load (no coordinated
//! omission). Samples taken during the warm-up are dropped. Figures are printed, never asserted.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_proto::broker as pb;
use flotilla_proto::broker::ErrorCode;
use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::Semaphore;

use crate::client::Client;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProduceBench {
    pub topic: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub message_bytes: usize,
    pub producers: u32,
    pub in_flight: u32,
    /// Records per request (a batching producer); 1 = one record per request.
    pub records_per_request: u32,
    /// With a linger, a batching producer (see the module docs).
    pub linger: Option<Duration>,
    /// Fixed aggregate records per second, or as fast as possible.
    pub rate: Option<u64>,
    pub duration: Duration,
    pub warmup: Duration,
}

/// The brokers' resource use over a run (when their pids are known).
#[derive(Debug, Clone, Copy)]
pub struct ServerUsage {
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
}

/// What a benchmark measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub records: u64,
    pub errors: u64,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// What the latency measures: "ack", "fetch" or "end-to-end".
    pub latency_of: &'static str,
    /// Latency in milliseconds: p50, p90, p99, p99.9, max.
    pub latency_ms: [f64; 5],
    pub servers: Option<ServerUsage>,
}

impl Report {
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "msgs_per_sec": self.msgs_per_sec,
            "mb_per_sec": self.mb_per_sec,
            "records": self.records,
            "errors": self.errors,
            "seconds": self.seconds,
            "latency_of": self.latency_of,
            "latency_ms": {
                "p50": self.latency_ms[0], "p90": self.latency_ms[1], "p99": self.latency_ms[2],
                "p999": self.latency_ms[3], "max": self.latency_ms[4],
            },
        });
        if let Some(s) = self.servers {
            v["server_cpu_seconds"] = s.cpu_seconds.into();
            v["server_peak_rss_mb"] = s.peak_rss_mb.into();
            v["server_cpu_us_per_msg"] = self.cpu_us_per_msg().into();
        }
        v
    }

    fn cpu_us_per_msg(&self) -> f64 {
        match self.servers {
            Some(s) if self.records > 0 => s.cpu_seconds * 1e6 / self.records as f64,
            _ => 0.0,
        }
    }

    pub fn line(&self) -> String {
        let l = self.latency_ms;
        let mut line = format!(
            "{:.0} msgs/s ({:.1} MB/s), {} records, {} errors; {} latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            self.msgs_per_sec,
            self.mb_per_sec,
            self.records,
            self.errors,
            self.latency_of,
            l[0],
            l[1],
            l[2],
            l[3],
            l[4]
        );
        if let Some(s) = self.servers {
            line.push_str(&format!(
                "; brokers {:.1} CPU s ({:.1} us/msg), peak RSS {:.0} MB",
                s.cpu_seconds,
                self.cpu_us_per_msg(),
                s.peak_rss_mb
            ));
        }
        line
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Latencies of a run: all of them, and those of the current second (a progress line shows a one-second
/// stall that the whole run's p99 would hide).
struct Latencies {
    all: Histogram<u64>,
    second: Histogram<u64>,
}

/// Counters shared by a benchmark's tasks.
pub(crate) struct Tally {
    latencies: Mutex<Latencies>,
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl Tally {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            latencies: Mutex::new(Latencies { all: new_histogram(), second: new_histogram() }),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub(crate) fn latency(&self, d: Duration) {
        if let Ok(mut h) = self.latencies.lock() {
            let micros = (d.as_micros() as u64).clamp(1, 60_000_000);
            let _ = h.all.record(micros);
            let _ = h.second.record(micros);
        }
    }

    /// Prints a progress line every second to stderr until aborted: that second's rate, p99 and max, and the
    /// p99 so far.
    pub(crate) fn progress(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let tally = self.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = tally.records.load(Ordering::Relaxed);
                let ms = |micros: u64| micros as f64 / 1000.0;
                let (p99, max, p99_so_far) = match tally.latencies.lock() {
                    Ok(mut h) => {
                        let second = (h.second.value_at_quantile(0.99), h.second.max());
                        h.second.reset();
                        (ms(second.0), ms(second.1), ms(h.all.value_at_quantile(0.99)))
                    }
                    Err(_) => (0.0, 0.0, 0.0),
                };
                eprintln!(
                    "  {} msgs/s, p99 {p99:.2} ms, max {max:.2} ms (p99 so far {p99_so_far:.2} ms), errors {}",
                    now.saturating_sub(last),
                    tally.errors.load(Ordering::Relaxed)
                );
                last = now;
            }
        })
    }

    pub(crate) fn report(&self, seconds: f64, latency_of: &'static str, servers: Option<ServerUsage>) -> Report {
        let records = self.records.load(Ordering::Relaxed);
        let h = self.latencies.lock().map(|h| h.all.clone()).unwrap_or_else(|_| new_histogram());
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Report {
            records,
            errors: self.errors.load(Ordering::Relaxed),
            seconds,
            msgs_per_sec: records as f64 / seconds,
            mb_per_sec: self.bytes.load(Ordering::Relaxed) as f64 / seconds / 1e6,
            latency_of,
            latency_ms: [ms(0.5), ms(0.9), ms(0.99), ms(0.999), h.max() as f64 / 1000.0],
            servers,
        }
    }
}

/// How long a benchmark waits for every partition of its topic to have a leader before it starts.
const LEADERS_WAIT: Duration = Duration::from_secs(30);

/// Creates `topic` if it is missing and waits until every partition has a leader, so the measurement
/// does not start inside the new partitions' first elections (OMB waits for its topics alike). Returns the
/// number of partitions. It creates first and takes `TOPIC_EXISTS` as found: asking first would wait out
/// the client's grace for a topic some broker has not learnt of yet (3 s) whenever the topic is new.
async fn ensure_topic(client: &Client, topic: &str, partitions: u32, replication_factor: u32) -> anyhow::Result<u32> {
    match client.create_topic(topic, partitions, replication_factor, vec![]).await {
        Err(e) if e.code != ErrorCode::TopicExists => return Err(e.into()),
        _ => {}
    }
    let deadline = Instant::now() + LEADERS_WAIT;
    loop {
        let info = client.describe_topic(topic).await?;
        let leaderless = info.partitions.iter().filter(|p| p.leader == 0).count();
        if leaderless == 0 {
            return Ok(info.partitions.len() as u32);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{leaderless} partitions of {topic} still have no leader after {LEADERS_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Distinct record values taken in turn, at most this many.
const PAYLOAD_POOL: usize = 64;
/// The share of each value that is random bytes, the rest a filler: OpenMessaging Benchmark's
/// `randomBytesRatio` of 0.5, so a batch compresses about as real data does. Values of one repeated byte
/// shrink to almost nothing under LZ4 and would flatter every stage that compresses or writes them
/// (memtable flushes, compactions, reads of SST files).
const RANDOM_BYTES_RATIO: f64 = 0.5;

/// The record values of a benchmark: a pool of distinct `message_bytes`-long values, each its first half
/// random bytes and the rest a filler, handed out in turn.
#[derive(Clone)]
pub struct Payloads {
    pool: Arc<[Bytes]>,
}

impl Payloads {
    pub fn new(message_bytes: usize) -> Self {
        let random = (message_bytes as f64 * RANDOM_BYTES_RATIO).round() as usize;
        let mut rng = rand::rng();
        let pool = (0..PAYLOAD_POOL)
            .map(|_| {
                let mut value = vec![b'x'; message_bytes];
                rng.fill(&mut value[..random.min(message_bytes)]);
                Bytes::from(value)
            })
            .collect();
        Self { pool }
    }

    /// The `n`th value (the pool taken in turn).
    pub fn get(&self, n: usize) -> Bytes {
        self.pool[n % self.pool.len()].clone()
    }

    /// The `n`th value with its first 8 bytes replaced by `stamp` (big-endian): what e2e and B10 read back.
    /// Values shorter than 8 bytes carry as much of the stamp as fits.
    pub fn stamped(&self, n: usize, stamp: u64) -> Bytes {
        let mut value = self.get(n).to_vec();
        let len = value.len().min(8);
        value[..len].copy_from_slice(&stamp.to_be_bytes()[..len]);
        Bytes::from(value)
    }

    /// The length of every value.
    pub fn message_bytes(&self) -> usize {
        self.pool[0].len()
    }
}

fn payload_record(value: Bytes) -> pb::Record {
    pb::Record { key: None, value: Some(value), headers: vec![], timestamp_ms: 0 }
}

/// Runs the produce benchmark against `client`, printing progress every second to stderr.
pub async fn produce(client: Arc<Client>, bench: ProduceBench, servers: Option<&Brokers>) -> anyhow::Result<Report> {
    let partitions = ensure_topic(&client, &bench.topic, bench.partitions, bench.replication_factor).await?;
    let payloads = Payloads::new(bench.message_bytes);
    let tally = Tally::new();
    let start = Instant::now();
    let measure_from = start + bench.warmup;
    let end = measure_from + bench.duration;
    let meter = Brokers::meter_window(servers, measure_from, end);
    let progress = tally.progress();
    let window = Window { measure_from, end };
    let tasks: Vec<tokio::task::JoinHandle<()>> = match bench.linger {
        None => (0..(bench.producers * bench.in_flight).max(1))
            .map(|w| {
                let workers = (bench.producers * bench.in_flight).max(1);
                let interval = bench.rate.map(|r| {
                    Duration::from_secs_f64(
                        f64::from(workers) * f64::from(bench.records_per_request.max(1)) / r.max(1) as f64,
                    )
                });
                let run = FixedBatches {
                    client: client.clone(),
                    tally: tally.clone(),
                    payloads: payloads.clone(),
                    sent: w as usize,
                    topic: bench.topic.clone(),
                    partition: w % partitions.max(1),
                    records: bench.records_per_request.max(1),
                    interval,
                    first_send: interval.map_or(start, |i| first_due(start, i, w, workers)),
                    window,
                };
                tokio::spawn(run.run())
            })
            .collect(),
        Some(linger) => (0..bench.producers.max(1))
            .map(|p| {
                let interval =
                    bench.rate.map(|r| Duration::from_secs_f64(f64::from(bench.producers.max(1)) / r.max(1) as f64));
                let run = Batching {
                    client: client.clone(),
                    tally: tally.clone(),
                    payloads: payloads.clone(),
                    topic: bench.topic.clone(),
                    partitions,
                    first_partition: p,
                    batch_records: bench.records_per_request.max(1) as usize,
                    linger,
                    in_flight: bench.in_flight.max(1) as usize,
                    interval,
                    first_due: interval.map_or(start, |i| first_due(start, i, p, bench.producers.max(1))),
                    window,
                };
                tokio::spawn(run.run())
            })
            .collect(),
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let usage = meter.await;
    Ok(tally.report(bench.duration.as_secs_f64(), "ack", usage))
}

#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// One worker sending fixed-size requests, one at a time.
struct FixedBatches {
    client: Arc<Client>,
    tally: Arc<Tally>,
    payloads: Payloads,
    /// Values taken from `payloads` so far (started at the worker's number, so workers differ).
    sent: usize,
    topic: String,
    partition: u32,
    records: u32,
    interval: Option<Duration>,
    /// With a rate, when this worker sends first ([`first_due`]).
    first_send: Instant,
    window: Window,
}

/// When worker `worker` of `workers`, each sending every `interval`, sends first: spread evenly over one
/// interval, so together they send at an even pace. (All starting at once would send every worker's
/// record in one burst per interval, and the burst's queueing would count as the broker's latency.)
fn first_due(start: Instant, interval: Duration, worker: u32, workers: u32) -> Instant {
    start + interval.mul_f64(f64::from(worker % workers.max(1)) / f64::from(workers.max(1)))
}

impl FixedBatches {
    async fn run(mut self) {
        let mut next_send = self.first_send;
        while Instant::now() < self.window.end {
            let now = Instant::now();
            if self.interval.is_some() && next_send > now {
                tokio::time::sleep(next_send - now).await;
            }
            let intended = if self.interval.is_some() { next_send } else { Instant::now() };
            let records: Vec<pb::Record> =
                (0..self.records as usize).map(|i| payload_record(self.payloads.get(self.sent + i))).collect();
            self.sent += self.records as usize;
            let result = self.client.produce(&self.topic, Some(self.partition), records).await;
            let done = Instant::now();
            if let Some(interval) = self.interval {
                next_send += interval;
            }
            if intended < self.window.measure_from || done > self.window.end {
                continue;
            }
            match result {
                Ok(_) => {
                    self.tally.records.fetch_add(u64::from(self.records), Ordering::Relaxed);
                    self.tally
                        .bytes
                        .fetch_add(u64::from(self.records) * self.payloads.message_bytes() as u64, Ordering::Relaxed);
                    self.tally.latency(done - intended);
                }
                Err(e) => {
                    self.tally.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("produce failed: {e}");
                }
            }
        }
    }
}

/// A batching producer: an accumulator, a linger, and up to `in_flight` batches outstanding. Batches
/// rotate over the partitions (Kafka's sticky partitioner for keyless records switches per batch).
struct Batching {
    client: Arc<Client>,
    tally: Arc<Tally>,
    payloads: Payloads,
    topic: String,
    partitions: u32,
    first_partition: u32,
    batch_records: usize,
    linger: Duration,
    in_flight: usize,
    interval: Option<Duration>,
    /// With a rate, when this producer's first record is due ([`first_due`]).
    first_due: Instant,
    window: Window,
}

impl Batching {
    async fn run(self) {
        let permits = Arc::new(Semaphore::new(self.in_flight));
        let mut partition = self.first_partition;
        // Records waiting in the accumulator, by intended send time.
        let mut pending: VecDeque<Instant> = VecDeque::new();
        let mut next_due = self.first_due;
        let mut sends = Vec::new();
        let mut taken = 0usize;
        while Instant::now() < self.window.end {
            // Fill the accumulator: records due by now (fixed rate), or a full batch (as fast as possible).
            let now = Instant::now();
            match self.interval {
                Some(interval) => {
                    while next_due <= now {
                        pending.push_back(next_due);
                        next_due += interval;
                    }
                }
                None => {
                    while pending.len() < self.batch_records {
                        pending.push_back(now);
                    }
                }
            }
            let ready = pending.len() >= self.batch_records
                || pending.front().is_some_and(|first| now.duration_since(*first) >= self.linger);
            if !ready {
                let wake = match (pending.front(), self.interval) {
                    (Some(first), Some(_)) => (*first + self.linger).min(next_due),
                    (Some(first), None) => *first + self.linger,
                    (None, _) => next_due,
                };
                tokio::time::sleep_until(wake.into()).await;
                continue;
            }
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let take = pending.len().min(self.batch_records);
            let intended: Vec<Instant> = pending.drain(..take).collect();
            let records: Vec<pb::Record> =
                (taken..taken + intended.len()).map(|n| payload_record(self.payloads.get(n))).collect();
            taken += intended.len();
            let (client, tally, topic, window) =
                (self.client.clone(), self.tally.clone(), self.topic.clone(), self.window);
            let bytes = self.payloads.message_bytes() as u64;
            let p = partition;
            partition = (partition + 1) % self.partitions.max(1);
            sends.push(tokio::spawn(async move {
                let result = client.produce(&topic, Some(p), records).await;
                drop(permit);
                let done = Instant::now();
                if done > window.end {
                    return;
                }
                match result {
                    Ok(_) => {
                        for t in intended.iter().filter(|t| **t >= window.measure_from) {
                            tally.records.fetch_add(1, Ordering::Relaxed);
                            tally.bytes.fetch_add(bytes, Ordering::Relaxed);
                            tally.latency(done - *t);
                        }
                    }
                    Err(e) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("produce failed: {e}");
                    }
                }
            }));
            sends.retain(|s| !s.is_finished());
        }
        for s in sends {
            let _ = s.await;
        }
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ConsumeBench {
    pub topic: String,
    /// Bytes per fetch.
    pub fetch_bytes: u32,
    /// Stop after this long even if the end of the log was not reached.
    pub duration: Duration,
}

/// Reads every partition from its log start to the high watermark it had when the run began, one fetch
/// outstanding per partition; latency is per fetch.
pub async fn consume(client: Arc<Client>, bench: ConsumeBench, servers: Option<&Brokers>) -> anyhow::Result<Report> {
    let partitions = client.describe_topic(&bench.topic).await?.partitions.len() as u32;
    let tally = Tally::new();
    let mut ranges = Vec::new();
    for p in 0..partitions {
        let from = client.list_offsets(&bench.topic, p, pb::OffsetSpec::Earliest, 0).await?;
        let to = client.list_offsets(&bench.topic, p, pb::OffsetSpec::Latest, 0).await?;
        ranges.push((p, from, to));
    }
    let meter = Brokers::meter(servers);
    let start = Instant::now();
    let end = start + bench.duration;
    let progress = tally.progress();
    let mut tasks = Vec::new();
    for (p, from, to) in ranges {
        let (client, tally, topic) = (client.clone(), tally.clone(), bench.topic.clone());
        let fetch_bytes = bench.fetch_bytes;
        tasks.push(tokio::spawn(async move {
            let mut next = from;
            while next < to && Instant::now() < end {
                let asked = Instant::now();
                match client.fetch(&topic, p, next, fetch_bytes, 0).await {
                    Ok(resp) => {
                        tally.latency(asked.elapsed());
                        for r in resp.records.iter().filter(|r| r.offset < to) {
                            tally.records.fetch_add(1, Ordering::Relaxed);
                            let size = r.value.as_ref().map_or(0, Bytes::len) + r.key.as_ref().map_or(0, Bytes::len);
                            tally.bytes.fetch_add(size as u64, Ordering::Relaxed);
                        }
                        match resp.records.last() {
                            Some(r) => next = r.offset + 1,
                            None => break,
                        }
                    }
                    Err(e) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("fetch failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let seconds = start.elapsed().as_secs_f64();
    let usage = meter.map(Meter::usage);
    Ok(tally.report(seconds, "fetch", usage))
}

/// Microseconds since the Unix epoch: the send time carried in an end-to-end record's first 8 bytes.
fn epoch_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Produce-to-consume latency: `producers x in_flight` senders at a fixed `rate` stamp each record with its
/// intended send time; one subscription per partition, from the end of the log, measures the time until it
/// arrives.
pub async fn e2e(client: Arc<Client>, bench: ProduceBench, servers: Option<&Brokers>) -> anyhow::Result<Report> {
    let partitions = ensure_topic(&client, &bench.topic, bench.partitions, bench.replication_factor).await?;
    let rate = bench.rate.unwrap_or(1000).max(1);
    let tally = Tally::new();
    let start = Instant::now();
    let end = start + bench.warmup + bench.duration;
    // The epoch-time stamp of `measure_from`: records stamped earlier are warm-up.
    let measure_from_micros = epoch_micros() + bench.warmup.as_micros() as u64;
    let mut consumers = Vec::new();
    for p in 0..partitions {
        let from = client.list_offsets(&bench.topic, p, pb::OffsetSpec::Latest, 0).await?;
        let (client, tally, topic) = (client.clone(), tally.clone(), bench.topic.clone());
        consumers.push(tokio::spawn(async move {
            let mut next = from;
            while Instant::now() < end {
                let Ok(mut stream) = client.subscribe(&topic, p, next).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let remaining = end.saturating_duration_since(Instant::now());
                let _ = tokio::time::timeout(remaining, async {
                    while let Ok(Some(resp)) = stream.message().await {
                        let now = epoch_micros();
                        for r in &resp.records {
                            next = r.offset + 1;
                            let Some(v) = r.value.as_ref().filter(|v| v.len() >= 8) else { continue };
                            let mut stamp = [0u8; 8];
                            stamp.copy_from_slice(&v[..8]);
                            let sent = u64::from_be_bytes(stamp);
                            if sent >= measure_from_micros {
                                tally.records.fetch_add(1, Ordering::Relaxed);
                                tally.bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
                                tally.latency(Duration::from_micros(now.saturating_sub(sent)));
                            }
                        }
                    }
                })
                .await;
            }
        }));
    }
    let meter = Brokers::meter_window(servers, start + bench.warmup, end);
    let progress = tally.progress();
    // producers x in_flight senders, each on its share of the rate, so a slow acknowledgement does not hold
    // the next record back (its intended time stays on schedule).
    let workers = (bench.producers * bench.in_flight).max(1);
    let interval = Duration::from_secs_f64(f64::from(workers) / rate as f64);
    let payloads = Payloads::new(bench.message_bytes.max(8));
    let mut producers = Vec::new();
    let start = Instant::now();
    for w in 0..workers {
        let (client, tally, topic, payloads) = (client.clone(), tally.clone(), bench.topic.clone(), payloads.clone());
        producers.push(tokio::spawn(async move {
            let mut taken = w as usize;
            let mut next_send = first_due(start, interval, w, workers);
            let mut partition = w % partitions.max(1);
            let origin = (Instant::now(), epoch_micros());
            while Instant::now() < end {
                let now = Instant::now();
                if next_send > now {
                    tokio::time::sleep(next_send - now).await;
                }
                // The intended send time, on the epoch clock the consumers read.
                let stamp = origin.1 + next_send.saturating_duration_since(origin.0).as_micros() as u64;
                let value = payloads.stamped(taken, stamp);
                taken += 1;
                let sent = client.produce(&topic, Some(partition), vec![payload_record(value)]).await;
                if sent.is_err() {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
                partition = (partition + workers) % partitions.max(1);
                next_send += interval;
            }
        }));
    }
    for p in producers {
        let _ = p.await;
    }
    for c in consumers {
        let _ = c.await;
    }
    progress.abort();
    let usage = meter.await;
    Ok(tally.report(bench.duration.as_secs_f64(), "end-to-end", usage))
}

/// Broker processes whose CPU time and memory a benchmark reports: those `flotilla dev` recorded in its
/// data directory (`dev.pids`).
#[derive(Clone)]
pub struct Brokers {
    pids: Vec<u32>,
}

/// CPU ticks per second for /proc accounting (Linux's USER_HZ is 100 on every supported platform).
const CLOCK_TICKS: f64 = 100.0;

impl Brokers {
    /// The brokers `flotilla dev` started with `data_dir`, if it is running.
    pub fn from_dev_dir(data_dir: &Path) -> Option<Brokers> {
        let text = std::fs::read_to_string(data_dir.join(DEV_PIDS_FILE)).ok()?;
        let pids: Vec<u32> = text.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        let alive = pids
            .iter()
            .all(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "flotilla-broker"));
        (alive && !pids.is_empty()).then_some(Brokers { pids })
    }

    /// Starts measuring the brokers' resource use, if they are known.
    fn meter(brokers: Option<&Brokers>) -> Option<Meter<'_>> {
        brokers.map(|b| Meter { brokers: b, cpu_at_start: b.cpu_seconds() })
    }

    /// Measures the brokers' CPU time over a benchmark's measured window, `from` to `to`, if they are
    /// known; await the result once the run is over. The records a run counts are those sent and answered
    /// inside the window, so the CPU charged to them leaves out the warm-up (topic creation, connections)
    /// and the drain of requests still out at its end.
    fn meter_window(
        brokers: Option<&Brokers>,
        from: Instant,
        to: Instant,
    ) -> impl Future<Output = Option<ServerUsage>> + use<> {
        // A task samples the window as it opens and closes, while the benchmark runs.
        let task = brokers.cloned().map(|brokers| {
            tokio::spawn(async move {
                let cpu_seconds = cpu_over(from, to, || brokers.cpu_seconds()).await;
                ServerUsage { cpu_seconds, peak_rss_mb: brokers.peak_rss_mb() }
            })
        });
        async move { task?.await.ok() }
    }

    /// Total CPU seconds of the brokers so far.
    fn cpu_seconds(&self) -> f64 {
        self.pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
    }

    /// The largest broker's peak resident memory so far, in MB.
    fn peak_rss_mb(&self) -> f64 {
        self.pids.iter().filter_map(|p| peak_rss_kb(*p)).fold(0.0, f64::max) / 1024.0
    }
}

/// The brokers' resource use since a benchmark began.
struct Meter<'a> {
    brokers: &'a Brokers,
    cpu_at_start: f64,
}

impl Meter<'_> {
    fn usage(self) -> ServerUsage {
        ServerUsage {
            cpu_seconds: self.brokers.cpu_seconds() - self.cpu_at_start,
            peak_rss_mb: self.brokers.peak_rss_mb(),
        }
    }
}

/// The CPU seconds `cpu` counts from `from` to `to`: sampled as the window opens and as it closes.
async fn cpu_over(from: Instant, to: Instant, cpu: impl Fn() -> f64) -> f64 {
    tokio::time::sleep_until(from.into()).await;
    let at_start = cpu();
    tokio::time::sleep_until(to.into()).await;
    cpu() - at_start
}

/// Where `flotilla dev` records its brokers' pids.
pub const DEV_PIDS_FILE: &str = "dev.pids";

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after its closing parenthesis).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS)
}

fn peak_rss_kb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A named benchmark shape of BENCH.md section 6.
pub enum Scenario {
    /// Produce load (B1-B7); `leader_routing` false sends to any broker and lets it forward (B5).
    Produce { bench: ProduceBench, leader_routing: bool },
    /// Fill a topic with a batching producer for `fill`, then read it all back (B8).
    CatchUp { fill: ProduceBench, read: ConsumeBench },
    /// B10: B6's load on a private cluster whose partition leader is killed and restarted
    /// ([`crate::failover`]).
    Failover,
}

/// The shape of scenario `id` (B1-B8, B10; also B6-5K and B6-20K, B6 at other rates, B7-3, B7 on 3
/// partitions, and B7-64, B7 with a quarter of its window) on `topic`, measuring for `duration` after `warmup`.
pub fn scenario(
    id: &str,
    topic: &str,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<(&'static str, Scenario)> {
    let base = ProduceBench {
        topic: topic.to_owned(),
        partitions: 1,
        replication_factor: 3,
        message_bytes: 1024,
        producers: 1,
        in_flight: 1,
        records_per_request: 1,
        linger: None,
        rate: None,
        duration,
        warmup,
    };
    let produce = |bench: ProduceBench| Scenario::Produce { bench, leader_routing: true };
    Ok(match id.to_ascii_uppercase().as_str() {
        "B1" => ("1 partition, 1 producer, 1 in flight (unloaded ack latency)", produce(base)),
        "B2" => ("1 partition, 1 producer, 256 in flight", produce(ProduceBench { in_flight: 256, ..base })),
        "B3" => ("1 partition, 1 producer, 1024 in flight", produce(ProduceBench { in_flight: 1024, ..base })),
        "B4" => (
            "1 partition, 4 producers x 256, to the leader",
            produce(ProduceBench { producers: 4, in_flight: 256, ..base }),
        ),
        "B5" => (
            "1 partition, 4 producers x 256, to any broker (forwarded)",
            Scenario::Produce { bench: ProduceBench { producers: 4, in_flight: 256, ..base }, leader_routing: false },
        ),
        "B6" => (
            "fixed 10,000 msgs/s, 4 producers, latency from the intended send time",
            produce(ProduceBench { producers: 4, in_flight: 64, rate: Some(10_000), ..base }),
        ),
        // B6's latency curve: the same shape at half and at twice the rate.
        "B6-5K" => (
            "fixed 5,000 msgs/s, 4 producers, latency from the intended send time",
            produce(ProduceBench { producers: 4, in_flight: 64, rate: Some(5_000), ..base }),
        ),
        "B6-20K" => (
            "fixed 20,000 msgs/s, 4 producers, latency from the intended send time",
            produce(ProduceBench { producers: 4, in_flight: 64, rate: Some(20_000), ..base }),
        ),
        // B7 is B4 over more partitions: B4's window (4 x 256), since only equal windows compare (BENCH.md's
        // rule 2), so B4 -> B7-3 -> B7 shows what spreading one load over Raft groups buys.
        "B7" => (
            "16 partitions, 4 producers x 256 in flight, leaders on every node",
            produce(ProduceBench { partitions: 16, producers: 4, in_flight: 256, ..base }),
        ),
        "B7-3" => (
            "3 partitions, 4 producers x 256 in flight, leaders on every node",
            produce(ProduceBench { partitions: 3, producers: 4, in_flight: 256, ..base }),
        ),
        // B7 as tables before 2026-12-07 ran it: a quarter of the window, 16 requests per partition, so
        // nearly every request of a partition rides one Raft entry and the per-entry costs show.
        "B7-64" => (
            "16 partitions, 4 producers x 64 in flight, leaders on every node",
            produce(ProduceBench { partitions: 16, producers: 4, in_flight: 64, ..base }),
        ),
        // B7 as OMB runs it: its Kafka driver's producers batch (linger 1 ms), each batch to one partition.
        "B7-BATCH" => (
            "16 partitions, 4 batching producers: 64 KiB batches, linger 1 ms, 8 in flight each",
            produce(ProduceBench {
                partitions: 16,
                producers: 4,
                records_per_request: 64,
                linger: Some(Duration::from_millis(1)),
                in_flight: 8,
                ..base
            }),
        ),
        "B2-BATCH" => (
            "1 partition, batching producer: 64 KiB batches, linger 1 ms, 8 in flight",
            produce(ProduceBench {
                records_per_request: 64,
                linger: Some(Duration::from_millis(1)),
                in_flight: 8,
                ..base
            }),
        ),
        "B8" => (
            "catch-up read of the whole log from offset 0 (3 partitions filled by a batching producer)",
            Scenario::CatchUp {
                fill: ProduceBench {
                    partitions: 3,
                    producers: 3,
                    records_per_request: 64,
                    linger: Some(Duration::from_millis(1)),
                    in_flight: 8,
                    warmup: Duration::ZERO,
                    ..base
                },
                read: ConsumeBench {
                    topic: topic.to_owned(),
                    fetch_bytes: 1 << 20,
                    duration: Duration::from_secs(120),
                },
            },
        ),
        "B9" => anyhow::bail!("B9 needs consumer groups with committed offsets, which do not exist yet"),
        "B10" => (
            "failover under B6 load (10,000 msgs/s): the leader killed, then restarted; a private 3-node cluster",
            Scenario::Failover,
        ),
        other => anyhow::bail!(
            "unknown scenario {other:?}; known: B1-B8, B2-batch, B6-5k, B6-20k, B7-3, B7-64, B7-batch, B10 (B9 needs consumer groups)"
        ),
    })
}

/// Lowest and highest of `values`, as "a-b" (or "a" when equal), with `digits` decimals.
pub fn range(values: &[f64], digits: usize) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() {
        "-".into()
    } else if format!("{lo:.digits$}") == format!("{hi:.digits$}") {
        format!("{lo:.digits$}")
    } else {
        format!("{lo:.digits$}-{hi:.digits$}")
    }
}

/// One Markdown table row summarising runs of a scenario.
pub fn markdown_row(id: &str, title: &str, runs: &[Report]) -> String {
    let col = |f: &dyn Fn(&Report) -> f64, digits| range(&runs.iter().map(f).collect::<Vec<_>>(), digits);
    let cpu = if runs.iter().all(|r| r.servers.is_some()) { col(&|r| r.cpu_us_per_msg(), 1) } else { "-".into() };
    let rss = if runs.iter().all(|r| r.servers.is_some()) {
        col(&|r| r.servers.map_or(0.0, |s| s.peak_rss_mb), 0)
    } else {
        "-".into()
    };
    format!(
        "| {id} | {title} | {} | {} | {} | {} | {} | {} | {} | {} |",
        col(&|r| r.msgs_per_sec, 0),
        col(&|r| r.mb_per_sec, 1),
        col(&|r| r.latency_ms[0], 2),
        col(&|r| r.latency_ms[2], 2),
        col(&|r| r.latency_ms[3], 2),
        col(&|r| r.errors as f64, 0),
        cpu,
        rss,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_values_are_half_random_and_differ_from_one_another() {
        let payloads = Payloads::new(1024);
        assert_eq!(payloads.message_bytes(), 1024);
        let values: Vec<Bytes> = (0..PAYLOAD_POOL).map(|n| payloads.get(n)).collect();
        assert!(values.iter().all(|v| v.len() == 1024 && v[512..].iter().all(|b| *b == b'x')));
        let distinct: std::collections::HashSet<&[u8]> = values.iter().map(|v| &v[..512]).collect();
        assert_eq!(distinct.len(), PAYLOAD_POOL, "every value of the pool has random bytes of its own");
        // Random halves: nowhere near one repeated byte (a run of 64 equal bytes is practically impossible).
        assert!(values.iter().all(|v| v[..512].windows(64).all(|w| w.iter().any(|b| *b != w[0]))));
        assert_eq!(payloads.get(PAYLOAD_POOL), values[0], "the pool is taken in turn");
        let stamped = payloads.stamped(3, 0x0102_0304_0506_0708);
        assert_eq!((&stamped[..8], &stamped[8..]), (&[1u8, 2, 3, 4, 5, 6, 7, 8][..], &values[3][8..]));
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(peak_rss_kb(pid).is_some_and(|kb| kb > 0.0));
    }

    #[tokio::test]
    async fn broker_cpu_is_charged_over_the_measured_window_only() {
        // A CPU clock that reads 1 s per 10 ms of wall time since the run began: what it counts before the
        // window opens (the warm-up) must not reach the total.
        let began = Instant::now();
        let cpu = move || began.elapsed().as_secs_f64() * 100.0;
        let (from, to) = (began + Duration::from_millis(200), began + Duration::from_millis(300));
        let seconds = cpu_over(from, to, cpu).await;
        assert!(Instant::now() >= to);
        // Sampled no earlier than the window's opening: the 200 ms of warm-up before it (20 s on this
        // clock) are left out, however late either sample comes.
        let whole_run = began.elapsed().as_secs_f64() * 100.0;
        assert!(seconds > 0.0 && seconds <= whole_run - 19.9, "{seconds} of {whole_run}");
    }

    #[test]
    fn every_shape_bench_all_runs_is_known_and_b9_says_why_not() {
        let d = Duration::from_secs(1);
        for id in [
            "B1", "B2", "B3", "B4", "B5", "B6-5k", "B6", "B6-20k", "B7-3", "B7", "B7-64", "B7-batch", "B2-batch", "B8",
            "B10",
        ] {
            assert!(scenario(id, "t", d, d).is_ok(), "{id}");
        }
        // Rate, partitions and window (requests in flight over all producers) of a produce shape.
        let shape = |id| match scenario(id, "t", d, d) {
            Ok((_, Scenario::Produce { bench, .. })) => {
                (bench.rate, bench.partitions, bench.producers * bench.in_flight)
            }
            _ => (None, 0, 0),
        };
        assert_eq!(shape("b6-5k"), (Some(5_000), 1, 256));
        assert_eq!(shape("B6-20K"), (Some(20_000), 1, 256));
        // B7 and B7-3 keep B4's window; B7-64 a quarter of it.
        assert_eq!(shape("B4"), (None, 1, 1024));
        assert_eq!(shape("B7-3"), (None, 3, 1024));
        assert_eq!(shape("B7"), (None, 16, 1024));
        assert_eq!(shape("B7-64"), (None, 16, 256));
        assert!(scenario("B9", "t", d, d).err().is_some_and(|e| e.to_string().contains("consumer groups")));
        assert!(scenario("B11", "t", d, d).is_err());
    }

    #[test]
    fn fixed_rate_workers_start_spread_over_one_interval() {
        let start = Instant::now();
        let interval = Duration::from_millis(256);
        let mut sends: Vec<Duration> = (0..256u32)
            .flat_map(|w| {
                let first = first_due(start, interval, w, 256);
                (0..3u32).map(move |k| (first + interval * k).duration_since(start))
            })
            .collect();
        sends.sort();
        // Together, one send every interval / workers: no two at once, no bursts.
        for pair in sends.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap > Duration::from_micros(999) && gap < Duration::from_micros(1001), "{gap:?}");
        }
        assert_eq!(first_due(start, interval, 0, 1), start);
        assert_eq!(first_due(start, interval, 5, 0), start, "no workers: no spread, no division by zero");
    }
}
