//! Prometheus metrics: served as text at `--metrics-listen`.
//!
//! Request metrics are recorded where requests are served ([`crate::service`]); Raft, high-watermark and
//! storage metrics are sampled once a second by [`run_collector`]. Labels are bounded: topic and partition
//! (one series per partition hosted here), group id, node id. Nothing is recorded per record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::broker::Broker;

/// How often Raft and storage state is sampled.
const COLLECT_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder and its HTTP listener on the current runtime.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
        .context("metrics buckets")?
        // An fsync takes ~0.25 ms on this kind of disk: finer buckets at the bottom, up to a stall of 1 s.
        .set_buckets_for_metric(
            Matcher::Full(flotilla_raft_store::wal::FSYNC_LATENCY_HISTOGRAM.to_owned()),
            &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0],
        )
        .context("fsync latency buckets")?
        .install()
        .with_context(|| format!("cannot serve metrics on {listen}"))
}

/// A request kind with per-partition metrics.
#[derive(Clone, Copy)]
pub enum RequestKind {
    Produce,
    Fetch,
}

impl RequestKind {
    fn name(self) -> &'static str {
        match self {
            RequestKind::Produce => "produce",
            RequestKind::Fetch => "fetch",
        }
    }
}

/// One request kind's handles for one topic-partition.
struct KindHandles {
    ok: Counter,
    latency: Histogram,
    records: Counter,
    bytes: Counter,
}

/// The request metrics of one topic-partition, registered once: recording then costs a few atomic adds,
/// not a registry lookup with label strings per request.
pub struct PartitionMetrics {
    labels: [(&'static str, String); 2],
    produce: KindHandles,
    fetch: KindHandles,
}

impl PartitionMetrics {
    fn new(topic: &str, partition: u32) -> Self {
        let labels = [("topic", topic.to_owned()), ("partition", partition.to_string())];
        let kind = |kind: RequestKind| {
            let name = kind.name();
            let mut ok = labels.to_vec();
            ok.push(("outcome", "ok".to_owned()));
            KindHandles {
                ok: counter!(format!("flotilla_{name}_requests_total"), &ok),
                latency: histogram!(format!("flotilla_{name}_latency_seconds"), &labels),
                records: counter!(format!("flotilla_{name}_records_total"), &labels),
                bytes: counter!(format!("flotilla_{name}_bytes_total"), &labels),
            }
        };
        let (produce, fetch) = (kind(RequestKind::Produce), kind(RequestKind::Fetch));
        Self { labels, produce, fetch }
    }

    fn handles(&self, kind: RequestKind) -> &KindHandles {
        match kind {
            RequestKind::Produce => &self.produce,
            RequestKind::Fetch => &self.fetch,
        }
    }

    /// Counts a served request by its outcome (`None`: ok; else the error's code) and records its latency.
    pub fn served(&self, kind: RequestKind, started: Instant, error: Option<&str>) {
        let handles = self.handles(kind);
        match error {
            None => handles.ok.increment(1),
            Some(code) => {
                let mut labels = self.labels.to_vec();
                labels.push(("outcome", code.to_owned()));
                counter!(format!("flotilla_{}_requests_total", kind.name()), &labels).increment(1);
            }
        }
        handles.latency.record(started.elapsed().as_secs_f64());
    }

    /// Counts records and bytes a request produced or fetched.
    pub fn moved(&self, kind: RequestKind, records: u64, bytes: u64) {
        let handles = self.handles(kind);
        handles.records.increment(records);
        handles.bytes.increment(bytes);
    }
}

/// Every topic-partition's [`PartitionMetrics`] on this node, made on first use.
#[derive(Default)]
pub struct RequestMetrics {
    by_topic: Mutex<HashMap<String, Vec<Option<Arc<PartitionMetrics>>>>>,
}

impl RequestMetrics {
    pub fn partition(&self, topic: &str, partition: u32) -> Arc<PartitionMetrics> {
        let mut by_topic = self.by_topic.lock().unwrap_or_else(|p| p.into_inner());
        if !by_topic.contains_key(topic) {
            by_topic.insert(topic.to_owned(), Vec::new());
        }
        let slots = by_topic.get_mut(topic).expect("inserted above");
        let i = partition as usize;
        if slots.len() <= i {
            slots.resize(i + 1, None);
        }
        slots[i].get_or_insert_with(|| Arc::new(PartitionMetrics::new(topic, partition))).clone()
    }
}

/// Samples Raft, high-watermark and storage state every second until `stop` fires.
pub async fn run_collector(broker: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let me = broker.config.node_id;
    loop {
        let sync = broker.node.sync_stats();
        counter!("flotilla_storage_fsyncs_total").absolute(sync.syncs);
        counter!("flotilla_storage_fsync_jobs_total").absolute(sync.jobs);
        counter!("flotilla_storage_fsync_entries_total").absolute(sync.entries);
        counter!("flotilla_storage_fsync_bytes_total").absolute(sync.bytes);
        gauge!("flotilla_storage_fsync_seconds_sum").set(sync.sync_nanos_total as f64 / 1e9);
        gauge!("flotilla_storage_fsync_seconds_max").set(sync.sync_nanos_max as f64 / 1e9);
        let (batches, beats) = broker.node.heartbeat_stats();
        counter!("flotilla_raft_heartbeat_batches_total").absolute(batches);
        counter!("flotilla_raft_heartbeats_total").absolute(beats);
        let (messages, frames) = broker.node.append_stats();
        counter!("flotilla_raft_append_messages_total").absolute(messages);
        counter!("flotilla_raft_append_frames_total").absolute(frames);
        // Writes RocksDB held back because its flushes or compactions fell behind (as with a
        // --background-write-rate too low for the load): time in all, and how often by cause.
        let stalls = broker.node.engine().write_stalls();
        counter!("flotilla_storage_write_stall_microseconds_total")
            .absolute(u64::try_from(stalls.waited.as_micros()).unwrap_or(u64::MAX));
        for ((cause, condition), n) in stalls.counts {
            counter!("flotilla_storage_write_stalls_total", "cause" => cause, "condition" => condition).absolute(n);
        }
        let engine = broker.node.engine().memory_usage();
        gauge!("flotilla_memory_budget_bytes").set(broker.config.memory.budget as f64);
        gauge!("flotilla_disk_free_bytes").set(broker.disk.free() as f64);
        gauge!("flotilla_disk_free_floor_bytes").set(broker.disk.floor() as f64);
        gauge!("flotilla_memory_bytes", "use" => "memtables").set(engine.memtables as f64);
        gauge!("flotilla_memory_bytes", "use" => "block_cache").set(engine.block_cache as f64);
        gauge!("flotilla_memory_bytes", "use" => "tail_cache").set(broker.node.tail_budget().used() as f64);
        gauge!("flotilla_memory_bytes", "use" => "produce_in_flight").set(broker.produce_memory.in_use() as f64);
        gauge!("flotilla_raft_groups").set(broker.node.groups().len() as f64);
        let mut leaderships = 0u32;
        for topic in broker.topics() {
            for (partition, p) in topic.partitions.iter().enumerate() {
                let Some(group) = broker.node.group(p.group_id) else { continue };
                let labels = [("topic", topic.name.clone()), ("partition", partition.to_string())];
                let status = group.status(me);
                leaderships += u32::from(status.is_leader);
                gauge!("flotilla_raft_is_leader", &labels).set(if status.is_leader { 1.0 } else { 0.0 });
                gauge!("flotilla_raft_term", &labels).set(status.term as f64);
                gauge!("flotilla_raft_commit_index", &labels).set(status.committed_index as f64);
                gauge!("flotilla_raft_applied_index", &labels).set(status.applied_index as f64);
                let state = group.sm.partition_state();
                gauge!("flotilla_partition_high_watermark", &labels).set(state.high_watermark as f64);
                gauge!("flotilla_partition_log_start_offset", &labels).set(state.log_start_offset as f64);
                gauge!("flotilla_partition_log_bytes", &labels).set(state.log_bytes as f64);
                for (follower, behind) in group.replica_progress() {
                    if follower != me {
                        let mut l = labels.to_vec();
                        l.push(("follower", follower.to_string()));
                        gauge!("flotilla_raft_follower_lag_entries", &l).set(behind as f64);
                    }
                }
            }
        }
        gauge!("flotilla_partition_leaderships").set(f64::from(leaderships));
        tokio::select! {
            _ = tokio::time::sleep(COLLECT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitions_handles_are_made_once_and_kept_apart_from_others() {
        let metrics = RequestMetrics::default();
        let first = metrics.partition("orders", 3);
        assert!(Arc::ptr_eq(&first, &metrics.partition("orders", 3)));
        assert!(!Arc::ptr_eq(&first, &metrics.partition("orders", 0)));
        assert!(!Arc::ptr_eq(&first, &metrics.partition("payments", 3)));
        assert_eq!(first.labels[0].1, "orders");
        assert_eq!(first.labels[1].1, "3");
    }
}
