//! Storage-level tests: openraft's conformance suite, durability across a crash or a reopen, and
//! corruption detection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageError};
use tempfile::TempDir;

use flotilla_raft_store::codec::seal_entry;
use flotilla_raft_store::engine::{Cf, Engine, MemEngine, RocksConfig, RocksEngine};
use flotilla_raft_store::keys;
use flotilla_raft_store::log_store::{CommittedSync, LogStore, TailBudget};
use flotilla_raft_store::state_machine::{GroupStateMachine, Mode};
use flotilla_raft_store::types::{Command, Entry, TypeConfig, Vote, log_id};
use flotilla_raft_store::wal::WalSyncer;

fn storage_error(e: io::Error) -> StorageError<TypeConfig> {
    StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn open_store(engine: Arc<dyn Engine>, group: u64) -> io::Result<(LogStore, GroupStateMachine)> {
    open_store_with(engine, group, CommittedSync::Durable)
}

fn open_store_with(
    engine: Arc<dyn Engine>,
    group: u64,
    committed: CommittedSync,
) -> io::Result<(LogStore, GroupStateMachine)> {
    let syncer = WalSyncer::start(engine.clone());
    let log = LogStore::open(group, engine.clone(), syncer, TailBudget::new(8 << 20), committed)?;
    let sm = GroupStateMachine::open(group, Mode::Kv, engine, log.shared().clone())?;
    Ok((log, sm))
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(storage_error)?;
        let engine = RocksEngine::open(dir.path(), &RocksConfig::default()).map_err(|e| storage_error(e.into()))?;
        let (log, sm) = open_store(Arc::new(engine), 7).map_err(storage_error)?;
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let (log, sm) = open_store(Arc::new(MemEngine::new()), 7).map_err(storage_error)?;
        Ok(((), log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_passes_on_rocksdb() {
    Suite::test_all(RocksBuilder).await.expect("openraft storage suite on RocksDB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_passes_in_memory() {
    Suite::test_all(MemBuilder).await.expect("openraft storage suite in memory");
}

/// Polls `cond` until it holds, failing the test after 10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn data_entry(term: u64, index: u64) -> Entry {
    Entry::new_normal(log_id(term, index), Command::new(Bytes::from(format!("entry {index}"))))
}

#[tokio::test]
async fn flushed_entries_vote_and_committed_survive_a_reopen_of_rocksdb() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open"));
        let (mut log, _sm) = open_store(engine, 3).expect("store");
        log.save_vote(&Vote::new_committed(2, 1)).await.expect("vote");
        log.blocking_append((1..=5).map(|i| data_entry(2, i))).await.expect("append");
        log.save_committed(Some(log_id(2, 4))).await.expect("committed");
        // Dropped here without any orderly flush: only what was synced may survive.
    }
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen"));
    let (mut log, _sm) = open_store(engine, 3).expect("store");
    let entries = log.try_get_log_entries(1..6).await.expect("read");
    assert_eq!(entries, (1..=5).map(|i| data_entry(2, i)).collect::<Vec<_>>());
    assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new_committed(2, 1)));
    assert_eq!(log.read_committed().await.expect("committed"), Some(log_id(2, 4)));
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_append_is_acknowledged_before_its_sync() {
    let mem = Arc::new(MemEngine::new());
    let (log, _sm) = open_store(mem.clone(), 1).expect("store");
    mem.pause_syncs(true);
    let mut appender = log.clone();
    let append = tokio::spawn(async move { appender.blocking_append([data_entry(1, 1), data_entry(1, 2)]).await });
    // Readable at once, although not yet durable.
    let mut reader = log.clone();
    wait_until("both entries readable", || {
        let entries = log.shared().entries(1, 3).map(|e| e.len());
        entries.is_ok_and(|n| n == 2)
    })
    .await;
    assert_eq!(reader.try_get_log_entries(1..3).await.expect("read").len(), 2);
    // With the sync blocked the callback must not fire, however long we wait for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!append.is_finished(), "append acknowledged while its sync was blocked");
    assert_eq!(mem.syncs(), 0);
    mem.pause_syncs(false);
    append.await.expect("join").expect("append");
    assert!(mem.syncs() >= 1);
    // Acknowledged means durable: a crash right now keeps both entries.
    mem.crash();
    let (mut reopened, _sm) = open_store(mem.clone(), 1).expect("reopen");
    assert_eq!(reopened.try_get_log_entries(1..3).await.expect("read").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_committed_index_waits_for_no_fsync_and_is_durable_with_the_next_one() {
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store_with(mem.clone(), 1, CommittedSync::Lazy).expect("store");
    log.blocking_append([data_entry(1, 1), data_entry(1, 2)]).await.expect("append");
    mem.pause_syncs(true);
    let syncs = mem.syncs();
    // Returns while every fsync is held: the commit-to-apply path never waits for the disk.
    tokio::time::timeout(Duration::from_secs(10), log.save_committed(Some(log_id(1, 2))))
        .await
        .expect("save_committed waited for an fsync")
        .expect("committed");
    assert_eq!(mem.syncs(), syncs);
    assert_eq!(log.read_committed().await.expect("committed"), Some(log_id(1, 2)));
    mem.crash();
    mem.pause_syncs(false);
    let (mut reopened, _sm) = open_store_with(mem.clone(), 1, CommittedSync::Lazy).expect("reopen");
    assert_eq!(reopened.read_committed().await.expect("committed"), None, "an unsynced committed index survived");
    assert_eq!(reopened.get_log_state().await.expect("state").last_log_id, Some(log_id(1, 2)));
    // The next group commit (here: the next append's) makes it durable.
    reopened.save_committed(Some(log_id(1, 2))).await.expect("committed");
    reopened.blocking_append([data_entry(1, 3)]).await.expect("append");
    mem.crash();
    let (mut again, _sm) = open_store_with(mem.clone(), 1, CommittedSync::Lazy).expect("reopen");
    assert_eq!(again.read_committed().await.expect("committed"), Some(log_id(1, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_committed_index_costs_no_write_of_its_own_and_rides_on_the_next_append() {
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store_with(mem.clone(), 1, CommittedSync::Lazy).expect("store");
    let key = keys::group_tag(1, keys::meta_tag::COMMITTED);
    log.blocking_append([data_entry(1, 1), data_entry(1, 2)]).await.expect("append");
    log.save_committed(Some(log_id(1, 2))).await.expect("committed");
    assert_eq!(log.read_committed().await.expect("committed"), Some(log_id(1, 2)));
    assert_eq!(mem.get(Cf::RaftMeta, &key).expect("read"), None, "the committed index got a write of its own");
    log.blocking_append([data_entry(1, 3)]).await.expect("append");
    assert!(mem.get(Cf::RaftMeta, &key).expect("read").is_some(), "the next append did not carry the committed index");
    // One committed later than any append: a crash keeps the one the last append carried.
    log.save_committed(Some(log_id(1, 3))).await.expect("committed");
    mem.crash();
    let (mut reopened, _sm) = open_store_with(mem.clone(), 1, CommittedSync::Lazy).expect("reopen");
    assert_eq!(reopened.read_committed().await.expect("committed"), Some(log_id(1, 2)));
    assert_eq!(reopened.get_log_state().await.expect("state").last_log_id, Some(log_id(1, 3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_committed_index_survives_a_crash() {
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store(mem.clone(), 1).expect("store");
    log.blocking_append([data_entry(1, 1)]).await.expect("append");
    log.save_committed(Some(log_id(1, 1))).await.expect("committed");
    mem.crash();
    let (mut reopened, _sm) = open_store(mem.clone(), 1).expect("reopen");
    assert_eq!(reopened.read_committed().await.expect("committed"), Some(log_id(1, 1)));
}

#[tokio::test]
async fn a_crash_loses_only_unsynced_writes() {
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store(mem.clone(), 1).expect("store");
    log.blocking_append([data_entry(1, 1)]).await.expect("append");
    // Written but never synced (no callback awaited, syncs blocked): a crash may drop it.
    mem.pause_syncs(true);
    let (tx, _rx) = TypeConfig::oneshot();
    log.append([data_entry(1, 2)], openraft::storage::IOFlushed::signal(tx)).await.expect("append");
    mem.crash();
    mem.pause_syncs(false);
    let (mut reopened, _sm) = open_store(mem.clone(), 1).expect("reopen");
    let state = reopened.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(log_id(1, 1)), "the log after a crash is the synced prefix");
}

#[tokio::test]
async fn a_corrupt_entry_stops_the_group_with_an_error_naming_group_and_index() {
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store(mem.clone(), 42).expect("store");
    log.blocking_append((1..=3).map(|i| data_entry(1, i))).await.expect("append");
    // Evict nothing from the tail cache by reopening: reads then come from the engine.
    let (mut log, _sm) = open_store(mem.clone(), 42).expect("reopen");
    let key = keys::group_u64(42, 2);
    let mut stored = mem.get(Cf::Log, &key).expect("get").expect("present").to_vec();
    let last = stored.len() - 1;
    stored[last] ^= 0x40;
    mem.corrupt(Cf::Log, &key, Bytes::from(stored));
    let err = log.try_get_log_entries(1..4).await.expect_err("corruption must not be served");
    let msg = err.to_string();
    assert!(msg.contains("group 42") && msg.contains("log entry 2"), "{msg}");
    // The entry before it is not served either, nor anything else: the group is stopped.
    let err = log.try_get_log_entries(1..2).await.expect_err("stopped");
    assert!(err.to_string().contains("log entry 2"), "{err}");
    assert!(log.get_log_state().await.is_err());
}

#[tokio::test]
async fn a_crash_after_a_purge_never_leaves_a_log_with_a_silent_hole() {
    // Reclaiming purged files is durable at once (as RocksDB's delete_file_in_range is); the purge marker
    // must therefore be durable before it, or a crash leaves entries gone with no marker saying so.
    let mem = Arc::new(MemEngine::new());
    let (mut log, _sm) = open_store(mem.clone(), 5).expect("store");
    log.blocking_append((1..=5).map(|i| data_entry(1, i))).await.expect("append");
    log.purge(log_id(1, 3)).await.expect("purge");
    mem.crash();
    let (mut reopened, _sm) = open_store(mem.clone(), 5).expect("reopen");
    let state = reopened.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)), "the purge marker survived the crash");
    assert_eq!(reopened.try_get_log_entries(4..6).await.expect("read"), vec![data_entry(1, 4), data_entry(1, 5)]);
}

#[tokio::test]
async fn groups_share_the_tail_cache_budget_and_entries_past_it_are_read_from_the_engine() {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let syncer = WalSyncer::start(engine.clone());
    let budget = TailBudget::new(64 << 10);
    let mut logs = Vec::new();
    for group in 1..=4 {
        logs.push(
            LogStore::open(group, engine.clone(), syncer.clone(), budget.clone(), CommittedSync::Durable).expect("log"),
        );
    }
    for log in &mut logs {
        log.blocking_append((1..=200).map(kb_entry)).await.expect("append");
    }
    // Four groups of 200 KB each against a 64 KB budget: each keeps at most its quarter.
    assert!(budget.used() <= budget.cap(), "cached {} of a {} budget", budget.used(), budget.cap());
    assert!(budget.used() >= budget.cap() / 2, "the budget is used, not starved: {}", budget.used());
    for log in &mut logs {
        let all = log.try_get_log_entries(1..201).await.expect("read");
        assert_eq!(all, (1..=200).map(kb_entry).collect::<Vec<_>>(), "evicted entries come from the engine");
    }
    // A dropped group hands its bytes back.
    let before = budget.used();
    drop(logs.pop());
    assert!(budget.used() < before, "{} after dropping a group, {before} before", budget.used());
}

/// A 1,000-byte data entry of term 1.
fn kb_entry(index: u64) -> Entry {
    Entry::new_normal(log_id(1, index), Command::new(Bytes::from(vec![7u8; 1000])))
}

/// Group 1's log holding `kb_entry` 1 to 200 behind a 64 KB tail cache: the newest ~64 entries are read
/// from the cache, the older ones from the engine.
async fn log_of_200_kb_entries(engine: &Arc<dyn Engine>, syncer: &WalSyncer) -> LogStore {
    let mut log = LogStore::open(1, engine.clone(), syncer.clone(), TailBudget::new(64 << 10), CommittedSync::Durable)
        .expect("log");
    log.blocking_append((1..=200).map(kb_entry)).await.expect("append");
    log
}

#[tokio::test]
async fn entries_read_for_replication_carry_the_bytes_the_log_stored() {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let mut log = log_of_200_kb_entries(&engine, &WalSyncer::start(engine.clone())).await;
    let read = log.limited_get_log_entries(1, 201).await.expect("read");
    assert_eq!(read, (1..=200).map(kb_entry).collect::<Vec<_>>());
    for e in &read {
        let sent = seal_entry(e);
        let stored = engine.get(Cf::Log, &keys::group_u64(1, e.log_id.index)).expect("get").expect("stored");
        assert_eq!(sent, stored, "entry {}", e.log_id.index);
        assert_eq!(seal_entry(e).as_ptr(), sent.as_ptr(), "entry {} is sealed anew for every send", e.log_id.index);
    }
}

#[tokio::test]
async fn replication_reads_stop_at_their_byte_limit_from_the_engine_and_from_the_cache() {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let syncer = WalSyncer::start(engine.clone());
    let mut log = log_of_200_kb_entries(&engine, &syncer).await;
    let indexes = |entries: Vec<Entry>| entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    let shared = log.shared().clone();
    // From the engine: the entry that reaches the limit is the last one.
    assert_eq!(indexes(shared.entries_limited(1, 201, 10_000).expect("read")), (1..=10).collect::<Vec<_>>());
    assert_eq!(indexes(shared.entries_limited(1, 201, 9_500).expect("read")), (1..=10).collect::<Vec<_>>());
    // From the cache.
    assert_eq!(indexes(shared.entries_limited(190, 201, 5_000).expect("read")), (190..=194).collect::<Vec<_>>());
    // Across both.
    assert_eq!(indexes(shared.entries_limited(100, 201, usize::MAX).expect("read")), (100..=200).collect::<Vec<_>>());
    // Never empty, however small the limit.
    assert_eq!(indexes(shared.entries_limited(5, 201, 1).expect("read")), vec![5]);
    // Replication's reads: everything while it is small.
    assert_eq!(log.limited_get_log_entries(1, 201).await.expect("read"), (1..=200).map(kb_entry).collect::<Vec<_>>());

    // Large entries: one AppendEntries carries about APPEND_BYTES_MAX, and a single entry larger than
    // that goes alone.
    let mut big = LogStore::open(2, engine, syncer, TailBudget::new(64 << 10), CommittedSync::Durable).expect("log");
    let sized = |i: u64, bytes: usize| Entry::new_normal(log_id(1, i), Command::new(Bytes::from(vec![1u8; bytes])));
    let limit = flotilla_raft_store::log_store::APPEND_BYTES_MAX;
    big.blocking_append([sized(1, limit + 1), sized(2, 10), sized(3, limit / 2), sized(4, limit / 2), sized(5, 10)])
        .await
        .expect("append");
    assert_eq!(indexes(big.limited_get_log_entries(1, 6).await.expect("read")), vec![1]);
    assert_eq!(indexes(big.limited_get_log_entries(2, 6).await.expect("read")), vec![2, 3, 4]);
    assert_eq!(indexes(big.limited_get_log_entries(5, 6).await.expect("read")), vec![5]);
}
