//! Retention: every replica drops the records its topic's `retention.ms` and `retention.bytes` expire.
//!
//! Every [`BrokerConfig::retention_check_interval`](crate::broker::BrokerConfig) each partition replica
//! hosted here plans a cut at whole Raft entries from the start of its log: entries whose newest record
//! is older than `retention.ms`, and the oldest entries while the log holds more than `retention.bytes`
//! of RecordBatches. The cut is a log-mode snapshot; openraft then purges the log up to it
//! ([`flotilla_raft_store::node::Group::enforce_retention`]). The log start offset moves up; offsets never
//! change. Topics whose `cleanup.policy` is only `compact` are left alone.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};

use crate::broker::Broker;
use crate::service::now_ms;

/// How long one partition's cut may take before the pass moves on (it is retried next pass).
const CUT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs retention passes until `stop` fires. After each (and once at the start) the storage engine decides
/// whether to collect the log's garbage ([`Engine::reclaim_garbage`](flotilla_raft_store::engine::Engine)):
/// the purges of a pass are what leave garbage in the log's blob files.
pub async fn run(broker: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        reclaim_garbage(&broker).await;
        tokio::select! {
            _ = tokio::time::sleep(broker.config.retention_check_interval) => {}
            _ = stop.changed() => return,
        }
        if !pass(&broker, &mut stop).await {
            return;
        }
    }
}

/// Lets the engine turn its garbage collection on or off (on the blocking pool: turning it rewrites
/// RocksDB's OPTIONS file) and publishes what it found.
async fn reclaim_garbage(broker: &Broker) {
    let engine = broker.node.engine().clone();
    match tokio::task::spawn_blocking(move || engine.reclaim_garbage()).await {
        Ok(Ok(g)) => {
            gauge!("flotilla_storage_log_blob_bytes").set(g.blob_bytes as f64);
            gauge!("flotilla_storage_log_blob_garbage_bytes").set(g.garbage_bytes as f64);
            gauge!("flotilla_storage_log_blob_gc_active").set(if g.collecting { 1.0 } else { 0.0 });
        }
        Ok(Err(e)) => tracing::warn!("could not decide on the log's garbage collection, will retry: {e}"),
        Err(e) => tracing::warn!("the log's garbage collection decision did not finish: {e}"),
    }
}

/// One pass over every partition replica hosted here; false if `stop` fired meanwhile.
async fn pass(broker: &Broker, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    for topic in broker.topics() {
        if !topic.cleanup_deletes() {
            continue;
        }
        let (retention_ms, retention_bytes) = (topic.retention_ms(), topic.retention_bytes());
        if retention_ms.is_none() && retention_bytes.is_none() {
            continue;
        }
        let older_than = retention_ms.map(|ms| now_ms().saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
        for (partition, p) in topic.partitions.iter().enumerate() {
            let Some(group) = broker.node.group(p.group_id) else { continue };
            let cut = tokio::time::timeout(CUT_TIMEOUT, group.enforce_retention(older_than, retention_bytes));
            let outcome = tokio::select! {
                outcome = cut => outcome,
                _ = stop.changed() => return false,
            };
            match outcome {
                Ok(Ok(Some(cut))) => {
                    counter!("flotilla_retention_cuts_total").increment(1);
                    tracing::debug!(topic = %topic.name, partition, log_start = cut.start_offset, "retention cut");
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(topic = %topic.name, partition, "retention cut failed, will retry: {e}");
                }
                Err(_) => {
                    tracing::warn!(topic = %topic.name, partition, "retention cut still running after {CUT_TIMEOUT:?}");
                }
            }
        }
    }
    true
}
