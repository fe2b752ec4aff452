//! Storage benchmark (printed, never asserted): one node's log stores appending with fsync before the
//! callback, through the node-wide group commit. Each group keeps a window of appends in flight, as
//! openraft does while replicating; each entry holds one RecordBatch of 1 KiB records.
//!
//! `cargo bench -p flotilla-raft-store --bench append` (set FLOTILLA_BENCH_SECS to change the duration,
//! FLOTILLA_BENCH_DIR to put the database on another disk).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;

use flotilla_raft_store::engine::{Engine, RocksConfig, RocksEngine};
use flotilla_raft_store::log_store::{CommittedSync, LogStore, TailBudget};
use flotilla_raft_store::record_batch::{self, ProducerInfo, Record};
use flotilla_raft_store::state_machine::encode_batches;
use flotilla_raft_store::types::{Entry, TypeConfig, log_id};
use flotilla_raft_store::wal::WalSyncer;

const RECORD_BYTES: usize = 1024;
const IN_FLIGHT_PER_GROUP: usize = 8;

struct Outcome {
    appends: u64,
    latencies_us: Vec<u64>,
}

async fn run_group(mut log: LogStore, entry_payload: Bytes, deadline: Instant) -> Outcome {
    let mut index = 0u64;
    let mut pending = std::collections::VecDeque::new();
    let mut outcome = Outcome { appends: 0, latencies_us: Vec::new() };
    loop {
        while pending.len() < IN_FLIGHT_PER_GROUP && Instant::now() < deadline {
            index += 1;
            let entry =
                Entry::new_normal(log_id(1, index), flotilla_raft_store::types::Command::new(entry_payload.clone()));
            let (tx, rx) = TypeConfig::oneshot();
            let started = Instant::now();
            log.append([entry], IOFlushed::signal(tx)).await.expect("append");
            pending.push_back((started, rx));
        }
        let Some((started, rx)) = pending.pop_front() else {
            break;
        };
        rx.await.expect("callback").expect("durable");
        outcome.appends += 1;
        outcome.latencies_us.push(started.elapsed().as_micros() as u64);
    }
    outcome
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn scenario(groups: u64, records_per_entry: usize, secs: u64) {
    let base = std::env::var("FLOTILLA_BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open"));
    let syncer = WalSyncer::start(engine.clone());
    let records: Vec<Record> = (0..records_per_entry)
        .map(|i| Record {
            key: None,
            value: Some(Bytes::from(vec![(i % 251) as u8; RECORD_BYTES])),
            headers: vec![],
            timestamp_ms: 0,
        })
        .collect();
    let batch = record_batch::build(&records, ProducerInfo::NONE);
    let payload = encode_batches(&[batch]).data().clone();
    let tail = TailBudget::new(64 << 20);
    let before = syncer.stats().snapshot();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (1..=groups)
        .map(|g| {
            let log = LogStore::open(g, engine.clone(), syncer.clone(), tail.clone(), CommittedSync::Lazy)
                .expect("log store");
            tokio::spawn(run_group(log, payload.clone(), deadline))
        })
        .collect();
    let mut appends = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        let o = t.await.expect("join");
        appends += o.appends;
        latencies.extend(o.latencies_us);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = syncer.stats().snapshot();
    latencies.sort_unstable();
    let syncs = after.syncs - before.syncs;
    let bytes = after.bytes - before.bytes;
    let entries = after.entries - before.entries;
    println!(
        "groups {groups:>2} | entry {:>3} KiB | {:>8.0} appends/s | {:>7.1} MB/s | {:>9.0} records/s | {:>6.0} fsync/s | \
         {:>5.1} entries/fsync | {:>6.0} KiB/fsync | fsync mean {:>5.2} ms | ack p50 {:.2} p99 {:.2} max {:.2} ms",
        payload.len() / 1024,
        appends as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        appends as f64 * records_per_entry as f64 / elapsed,
        syncs as f64 / elapsed,
        entries as f64 / syncs.max(1) as f64,
        bytes as f64 / syncs.max(1) as f64 / 1024.0,
        (after.sync_nanos_total - before.sync_nanos_total) as f64 / syncs.max(1) as f64 / 1e6,
        percentile(&latencies, 0.50) as f64 / 1e3,
        percentile(&latencies, 0.99) as f64 / 1e3,
        latencies.last().copied().unwrap_or(0) as f64 / 1e3,
    );
}

fn main() {
    // `cargo bench` passes flags such as --bench; this harness takes none.
    let secs = std::env::var("FLOTILLA_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        println!("raft-store append benchmark: fsync before every callback, {IN_FLIGHT_PER_GROUP} appends in flight per group, {secs} s each");
        for (groups, records) in [(1, 64), (16, 64), (1, 256), (16, 256)] {
            scenario(groups, records, secs).await;
        }
    });
}
