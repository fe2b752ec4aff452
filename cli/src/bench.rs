//! `flotilla bench produce`: a load generator printing throughput and acknowledgement latency.
//!
//! `producers x in_flight` workers each keep one request outstanding, spread over the topic's partitions.
//! Without `--rate` they send as fast as acknowledgements come back. With `--rate` each worker sends on a
//! fixed schedule and latency counts from the *intended* send time, so a stalled broker shows up as
//! latency instead of silently lowering the offered load (no coordinated omission). Samples taken during
//! the warm-up are dropped. Figures are printed, never asserted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proto::broker as pb;
use hdrhistogram::Histogram;

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
    /// Fixed aggregate records per second, or as fast as possible.
    pub rate: Option<u64>,
    pub duration: Duration,
    pub warmup: Duration,
}

/// What it measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub records: u64,
    pub errors: u64,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// Acknowledgement latency in milliseconds: p50, p90, p99, p99.9, max.
    pub latency_ms: [f64; 5],
}

impl Report {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "msgs_per_sec": self.msgs_per_sec,
            "mb_per_sec": self.mb_per_sec,
            "records": self.records,
            "errors": self.errors,
            "seconds": self.seconds,
            "latency_ms": {
                "p50": self.latency_ms[0], "p90": self.latency_ms[1], "p99": self.latency_ms[2],
                "p999": self.latency_ms[3], "max": self.latency_ms[4],
            },
        })
    }

    pub fn line(&self) -> String {
        let l = self.latency_ms;
        format!(
            "{:.0} msgs/s ({:.1} MB/s), {} records, {} errors; ack latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            self.msgs_per_sec, self.mb_per_sec, self.records, self.errors, l[0], l[1], l[2], l[3], l[4]
        )
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

struct Shared {
    histogram: Mutex<Histogram<u64>>,
    records: AtomicU64,
    errors: AtomicU64,
}

/// Runs the produce benchmark against `client`, printing a progress line every second to stderr.
pub async fn produce(client: Arc<Client>, bench: ProduceBench) -> anyhow::Result<Report> {
    match client.describe_topic(&bench.topic).await {
        Ok(_) => {}
        Err(_) => {
            client.create_topic(&bench.topic, bench.partitions, bench.replication_factor, vec![]).await?;
        }
    }
    let partitions = client.describe_topic(&bench.topic).await?.partitions.len() as u32;
    let workers = (bench.producers * bench.in_flight).max(1);
    let payload = Bytes::from(vec![b'x'; bench.message_bytes]);
    let shared = Arc::new(Shared {
        histogram: Mutex::new(new_histogram()),
        records: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + bench.warmup;
    let end = measure_from + bench.duration;
    // Each worker's share of the rate, as the interval between its sends.
    let interval = bench
        .rate
        .map(|r| Duration::from_secs_f64(f64::from(workers) * f64::from(bench.records_per_request) / r.max(1) as f64));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let shared = shared.clone();
        let payload = payload.clone();
        let topic = bench.topic.clone();
        let records_per_request = bench.records_per_request.max(1);
        tasks.push(tokio::spawn(async move {
            let partition = w % partitions.max(1);
            let mut next_send = Instant::now();
            while Instant::now() < end {
                let now = Instant::now();
                if interval.is_some() && next_send > now {
                    tokio::time::sleep(next_send - now).await;
                }
                let intended = if interval.is_some() { next_send } else { Instant::now() };
                let records: Vec<pb::Record> = (0..records_per_request)
                    .map(|_| pb::Record { key: None, value: Some(payload.clone()), headers: vec![], timestamp_ms: 0 })
                    .collect();
                let result = client.produce(&topic, Some(partition), records).await;
                let done = Instant::now();
                if let Some(interval) = interval {
                    next_send += interval;
                }
                if intended < measure_from || done > end {
                    continue;
                }
                match result {
                    Ok(_) => {
                        shared.records.fetch_add(u64::from(records_per_request), Ordering::Relaxed);
                        let micros = (done - intended).as_micros().max(1) as u64;
                        if let Ok(mut h) = shared.histogram.lock() {
                            let _ = h.record(micros.min(60_000_000));
                        }
                    }
                    Err(e) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("produce failed: {e}");
                    }
                }
            }
        }));
    }
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = shared.records.load(Ordering::Relaxed);
                let p99 = shared.histogram.lock().map(|h| h.value_at_quantile(0.99) as f64 / 1000.0).unwrap_or(0.0);
                eprintln!(
                    "  {} msgs/s, p99 so far {:.2} ms, errors {}",
                    now - last,
                    p99,
                    shared.errors.load(Ordering::Relaxed)
                );
                last = now;
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let seconds = bench.duration.as_secs_f64();
    let records = shared.records.load(Ordering::Relaxed);
    let h = shared.histogram.lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        records,
        errors: shared.errors.load(Ordering::Relaxed),
        seconds,
        msgs_per_sec: records as f64 / seconds,
        mb_per_sec: records as f64 * bench.message_bytes as f64 / seconds / 1e6,
        latency_ms: [ms(0.5), ms(0.9), ms(0.99), ms(0.999), h.max() as f64 / 1000.0],
    })
}
