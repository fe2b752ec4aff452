//! Prometheus metrics: served as text at `--metrics-listen`.
//!
//! Request metrics are recorded where requests are served ([`crate::service`]); Raft, high-watermark and
//! storage metrics are sampled once a second by [`run_collector`]. Labels are bounded: topic and partition
//! (one series per partition hosted here), group id, node id. Nothing is recorded per record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::broker::Broker;

/// How often Raft and storage state is sampled.
const COLLECT_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder and its HTTP listener on the current runtime.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
        .context("metrics buckets")?
        .install()
        .with_context(|| format!("cannot serve metrics on {listen}"))
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
        let engine = broker.node.engine().memory_usage();
        gauge!("flotilla_memory_budget_bytes").set(broker.config.memory.budget as f64);
        gauge!("flotilla_disk_free_bytes").set(broker.disk.free() as f64);
        gauge!("flotilla_disk_free_floor_bytes").set(broker.disk.floor() as f64);
        gauge!("flotilla_memory_bytes", "use" => "memtables").set(engine.memtables as f64);
        gauge!("flotilla_memory_bytes", "use" => "block_cache").set(engine.block_cache as f64);
        gauge!("flotilla_memory_bytes", "use" => "tail_cache").set(broker.node.tail_budget().used() as f64);
        gauge!("flotilla_memory_bytes", "use" => "produce_in_flight").set(broker.produce_memory.in_use() as f64);
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
