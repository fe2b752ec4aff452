//! Group commit: one thread per node makes the writes of every Raft group durable.
//!
//! Log stores write their entries to the engine without syncing (visible at once, durable later) and then
//! queue a [`SyncJob`] here. The syncer thread blocks for the first job, drains every job already queued,
//! calls [`Engine::sync_wal`] once, and only then completes each job in queue order. While one fsync runs
//! the next group of jobs gathers, so throughput follows the arrival rate rather than the fsync rate.
//! Jobs submitted on the runtime reach the thread only once their worker has run the other tasks ready
//! with them ([`WalSyncer::submit`]), so the appends of many groups set going by one event share an
//! fsync even when the thread was idle (in B7, 5.2 appends per fsync against 2.0 when each woke it).
//!
//! Architecture Invariant: a job completes successfully only after a `sync_wal` that began after the job
//! was queued, hence after the write it covers returned. Once a sync fails the syncer is poisoned and fails
//! every later job: after a failed fsync the kernel may have dropped dirty pages, so no later fsync can
//! vouch for earlier writes.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::Engine;

/// What to do once a job's writes are durable (or can never be).
pub type Completion = Box<dyn FnOnce(Result<(), io::Error>) + Send>;

/// A request to make earlier writes durable.
pub struct SyncJob {
    /// Raft entries covered (for statistics).
    pub entries: u64,
    /// Bytes covered (for statistics).
    pub bytes: u64,
    pub done: Completion,
}

/// Counters of the syncer; the broker exports them as metrics.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub syncs: AtomicU64,
    pub jobs: AtomicU64,
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub sync_nanos_total: AtomicU64,
    pub sync_nanos_max: AtomicU64,
}

/// A snapshot of [`SyncStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStatsSnapshot {
    pub syncs: u64,
    pub jobs: u64,
    pub entries: u64,
    pub bytes: u64,
    pub sync_nanos_total: u64,
    pub sync_nanos_max: u64,
}

impl SyncStats {
    pub fn snapshot(&self) -> SyncStatsSnapshot {
        SyncStatsSnapshot {
            syncs: self.syncs.load(Ordering::Relaxed),
            jobs: self.jobs.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            sync_nanos_total: self.sync_nanos_total.load(Ordering::Relaxed),
            sync_nanos_max: self.sync_nanos_max.load(Ordering::Relaxed),
        }
    }
}

/// Handle to the node's syncer thread. When the last handle is dropped the thread completes every queued
/// job and exits, and the drop waits for it, so the engine is released deterministically; if a hand-off
/// ([`WalSyncer::submit`]) is still on its way, its task holds the thread and does the same once it has
/// handed its jobs over (or when its runtime drops it).
#[derive(Clone)]
pub struct WalSyncer {
    inner: Arc<SyncerThread>,
    stats: Arc<SyncStats>,
}

struct SyncerThread {
    tx: Option<Sender<Vec<SyncJob>>>,
    thread: Option<JoinHandle<()>>,
    /// Jobs submitted on a runtime thread and not yet handed to the syncer: see [`WalSyncer::submit`].
    pending: std::sync::Mutex<Vec<SyncJob>>,
}

impl SyncerThread {
    /// Sends every pending job to the syncer thread as one batch. The batch is taken and sent under the
    /// lock, so batches reach the thread in the order their jobs were submitted, even when two hand-offs
    /// run at once on different workers: jobs complete in submission order, as openraft expects of a
    /// group's flushes. Jobs that cannot be sent fail once the lock is released.
    fn hand_off_pending(&self) {
        let unsent = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return;
            }
            let jobs = std::mem::take(&mut *pending);
            match &self.tx {
                Some(tx) => tx.send(jobs).err().map(|mpsc::SendError(jobs)| jobs),
                None => Some(jobs),
            }
        };
        if let Some(jobs) = unsent {
            fail_all(jobs);
        }
    }
}

fn fail_all(jobs: Vec<SyncJob>) {
    for job in jobs {
        (job.done)(Err(io::Error::other("the WAL sync thread has stopped")));
    }
}

/// Hands the pending jobs to the syncer when dropped: by the hand-off task after its one yield, or with
/// the task if the runtime drops it unpolled (shutting down), so no job is ever left behind.
struct HandOff(Arc<SyncerThread>);

impl Drop for HandOff {
    fn drop(&mut self) {
        self.0.hand_off_pending();
    }
}

impl Drop for SyncerThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(handle) = self.thread.take() {
            // A completion running on the syncer thread may drop the last handle: never join oneself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl WalSyncer {
    pub fn start(engine: Arc<dyn Engine>) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SyncStats::default());
        let thread_stats = stats.clone();
        let spawned =
            std::thread::Builder::new().name("flotilla-wal-sync".into()).spawn(move || run(engine, rx, thread_stats));
        let thread = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // The receiver is gone with the closure, so every job fails instead of hanging.
                tracing::error!("could not start the WAL sync thread: {e}");
                None
            }
        };
        Self {
            inner: Arc::new(SyncerThread { tx: Some(tx), thread, pending: std::sync::Mutex::new(Vec::new()) }),
            stats,
        }
    }

    /// Queues a job; `job.done` runs on the syncer thread once the sync covering it finishes.
    ///
    /// On a tokio runtime the job is not handed to the syncer at once: the first job since the last
    /// hand-off spawns a task that yields once and then hands over every job submitted meanwhile. A
    /// yielded task runs after the tasks already ready on its worker, so the appends of every group that
    /// one fsync, one batch of replies or one read of the sockets set going join a single fsync, and
    /// the syncer thread is woken once for them rather than by each. Off a runtime the job goes at once,
    /// with whatever is pending ahead of it. Either way jobs complete in the order they were submitted.
    pub fn submit(&self, job: SyncJob) {
        let first = {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(job);
            pending.len() == 1
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if first => {
                let hand_off = HandOff(self.inner.clone());
                runtime.spawn(async move {
                    tokio::task::yield_now().await;
                    drop(hand_off);
                });
            }
            // A hand-off is already on its way and takes this job too.
            Ok(_) => {}
            // Off a runtime: at once, behind whatever is pending.
            Err(_) => self.inner.hand_off_pending(),
        }
    }

    /// Makes every earlier write durable and waits for it.
    pub async fn sync(&self) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(SyncJob {
            entries: 0,
            bytes: 0,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.await.unwrap_or_else(|_| Err(io::Error::other("the WAL sync thread has stopped")))
    }

    pub fn stats(&self) -> &Arc<SyncStats> {
        &self.stats
    }
}

/// Upper bound on jobs completed by one fsync, so one sync never holds callbacks for long.
const JOBS_PER_SYNC_MAX: usize = 8192;

/// The histogram of every fsync's latency, in seconds (Prometheus `flotilla_storage_fsync_latency_seconds`).
pub const FSYNC_LATENCY_HISTOGRAM: &str = "flotilla_storage_fsync_latency_seconds";

/// An fsync at least this slow is logged: every acknowledgement of its node waited for it.
const SLOW_SYNC: Duration = Duration::from_millis(100);
/// At most one line about slow fsyncs per this time; the next line counts those not logged.
const SLOW_SYNC_LINE_EVERY: Duration = Duration::from_secs(10);

/// Decides when a slow fsync gets a log line: a stalling disk shows in the broker's log, with the time
/// to set against the host's and RocksDB's own, without a line per fsync while it stalls.
#[derive(Debug, Default)]
struct SlowSyncs {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl SlowSyncs {
    /// Counts a sync that took `took`, ending at `now`. When a line is due, returns how many slow syncs it
    /// reports (this one and those not logged since the last line).
    fn note(&mut self, took: Duration, now: Instant) -> Option<u64> {
        if took < SLOW_SYNC {
            return None;
        }
        self.unlogged += 1;
        if self.last_line.is_some_and(|last| now.saturating_duration_since(last) < SLOW_SYNC_LINE_EVERY) {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

fn run(engine: Arc<dyn Engine>, rx: Receiver<Vec<SyncJob>>, stats: Arc<SyncStats>) {
    let latency = metrics::histogram!(FSYNC_LATENCY_HISTOGRAM);
    let mut slow = SlowSyncs::default();
    let mut poisoned: Option<String> = None;
    let mut jobs: Vec<SyncJob> = Vec::new();
    while let Ok(first) = rx.recv() {
        // Logged once this sync's jobs are completed: a log on the stalled disk must not hold them up.
        let mut slow_line = None;
        jobs.extend(first);
        while jobs.len() < JOBS_PER_SYNC_MAX {
            match rx.try_recv() {
                Ok(more) => jobs.extend(more),
                Err(_) => break,
            }
        }
        let result = match &poisoned {
            Some(why) => Err(why.clone()),
            None => {
                let started = Instant::now();
                let r = engine.sync_wal();
                let took = started.elapsed();
                latency.record(took.as_secs_f64());
                let nanos = took.as_nanos() as u64;
                stats.sync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
                stats.sync_nanos_max.fetch_max(nanos, Ordering::Relaxed);
                slow_line = slow.note(took, Instant::now()).map(|count| (took, count, jobs.len()));
                r.map_err(|e| {
                    let why = format!("WAL sync failed; refusing all later syncs: {e}");
                    tracing::error!("{why}");
                    poisoned = Some(why.clone());
                    why
                })
            }
        };
        if result.is_ok() {
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            stats.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            stats.entries.fetch_add(jobs.iter().map(|j| j.entries).sum(), Ordering::Relaxed);
            stats.bytes.fetch_add(jobs.iter().map(|j| j.bytes).sum(), Ordering::Relaxed);
        }
        for job in jobs.drain(..) {
            (job.done)(result.clone().map_err(io::Error::other));
        }
        if let Some((took, count, jobs)) = slow_line {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                jobs,
                "slow fsync: {took:.0?}, {count} of at least {SLOW_SYNC:?} since the last such line; every \
                 acknowledgement of this node waits for them (the disk is slow or busy)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Cf, MemEngine, WriteBatch};
    use bytes::Bytes;
    use std::sync::atomic::AtomicBool;

    #[tokio::test]
    async fn no_job_completes_before_its_sync() {
        let engine = Arc::new(MemEngine::new());
        let syncer = WalSyncer::start(engine.clone());
        engine.pause_syncs(true);
        let mut b = WriteBatch::new();
        b.put(Cf::Log, b"k".to_vec(), Bytes::from_static(b"v"));
        engine.write(b).expect("write");
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let flag = done.clone();
        syncer.submit(SyncJob {
            entries: 1,
            bytes: 2,
            done: Box::new(move |r| {
                flag.store(true, Ordering::SeqCst);
                let _ = tx.send(r.is_ok());
            }),
        });
        // The sync is blocked: give the syncer thread every chance to (wrongly) complete the job.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
        assert!(!done.load(Ordering::SeqCst), "job completed while its sync was blocked");
        assert_eq!(engine.syncs(), 0);
        engine.pause_syncs(false);
        assert!(rx.await.expect("completion"));
        assert!(engine.syncs() >= 1);
        engine.crash();
        assert_eq!(engine.get(Cf::Log, b"k").expect("get"), Some(Bytes::from_static(b"v")));
        let s = syncer.stats().snapshot();
        assert_eq!((s.entries, s.bytes), (1, 2));
    }

    #[test]
    fn slow_syncs_are_logged_at_most_once_per_interval_and_counted_in_between() {
        let mut slow = SlowSyncs::default();
        let t0 = Instant::now();
        assert_eq!(slow.note(Duration::from_millis(99), t0), None, "not slow");
        assert_eq!(slow.note(SLOW_SYNC, t0), Some(1), "the first slow one is logged");
        assert_eq!(slow.note(Duration::from_millis(300), t0 + Duration::from_secs(1)), None);
        assert_eq!(slow.note(Duration::from_millis(120), t0 + Duration::from_secs(9)), None);
        assert_eq!(slow.note(Duration::from_millis(5), t0 + SLOW_SYNC_LINE_EVERY), None, "a fast one is not");
        assert_eq!(slow.note(Duration::from_millis(150), t0 + SLOW_SYNC_LINE_EVERY), Some(3), "and those between");
        assert_eq!(slow.note(Duration::from_millis(150), t0 + SLOW_SYNC_LINE_EVERY * 3), Some(1));
    }

    /// A job whose completion reports on a std channel, for callers off the runtime.
    fn job(tx: &std::sync::mpsc::Sender<bool>) -> SyncJob {
        let tx = tx.clone();
        SyncJob {
            entries: 1,
            bytes: 1,
            done: Box::new(move |r| {
                let _ = tx.send(r.is_ok());
            }),
        }
    }

    /// A job of one entry whose completion runs `then` and reports on the returned receiver.
    fn awaited_job(then: impl FnOnce() + Send + 'static) -> (SyncJob, tokio::sync::oneshot::Receiver<bool>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = SyncJob {
            entries: 1,
            bytes: 1,
            done: Box::new(move |r| {
                then();
                let _ = tx.send(r.is_ok());
            }),
        };
        (job, rx)
    }

    #[test]
    fn jobs_submitted_on_the_runtime_before_their_task_yields_share_one_sync() {
        let engine = Arc::new(MemEngine::new());
        let syncer = WalSyncer::start(engine.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            // Several groups' appends set going by one event, before the worker moves on.
            let mut done = Vec::new();
            for _ in 0..5 {
                let (job, rx) = awaited_job(|| ());
                syncer.submit(job);
                done.push(rx);
            }
            for rx in done {
                assert_eq!(rx.await, Ok(true));
            }
        });
        let s = syncer.stats().snapshot();
        assert_eq!((s.syncs, s.jobs), (1, 5), "one fsync for the five");
        assert_eq!(engine.syncs(), 1);
    }

    #[test]
    fn jobs_submitted_off_the_runtime_or_left_by_a_runtime_that_stopped_still_complete() {
        let engine = Arc::new(MemEngine::new());
        let syncer = WalSyncer::start(engine.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        syncer.submit(job(&tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "off the runtime: sent at once");
        // The hand-off task is spawned but never polled: the runtime is dropped before it runs.
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async { syncer.submit(job(&tx)) });
        drop(runtime);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "handed off as the runtime stopped");
        // And a syncer dropped with a hand-off still pending completes its jobs before it goes.
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            syncer.submit(job(&tx));
        });
        drop(syncer);
        drop(runtime);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "completed after the last handle went");
    }

    #[test]
    fn each_submitters_jobs_complete_in_the_order_it_submitted_them() {
        let engine = Arc::new(MemEngine::new());
        let syncer = WalSyncer::start(engine);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().expect("runtime");
        let completed = Arc::new(std::sync::Mutex::new(Vec::new()));
        const SUBMITTERS: usize = 8;
        const JOBS: usize = 500;
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for submitter in 0..SUBMITTERS {
                let (syncer, completed) = (syncer.clone(), completed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut last = None;
                    for seq in 0..JOBS {
                        let completed = completed.clone();
                        let (job, rx) = awaited_job(move || completed.lock().expect("lock").push((submitter, seq)));
                        syncer.submit(job);
                        // Several jobs in flight, some handed off together, some on their own.
                        if seq % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                        last = Some(rx);
                    }
                    last.expect("jobs").await
                }));
            }
            for task in tasks {
                assert_eq!(task.await.expect("task"), Ok(true));
            }
        });
        // Off the runtime too, behind everything pending.
        let (tx, rx) = std::sync::mpsc::channel();
        syncer.submit(job(&tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        let completed = completed.lock().expect("lock");
        for submitter in 0..SUBMITTERS {
            let order: Vec<usize> = completed.iter().filter(|(s, _)| *s == submitter).map(|(_, q)| *q).collect();
            assert_eq!(order, (0..JOBS).collect::<Vec<_>>(), "submitter {submitter}");
        }
    }

    #[tokio::test]
    async fn a_failed_sync_poisons_every_later_job() {
        let engine = Arc::new(MemEngine::new());
        let syncer = WalSyncer::start(engine.clone());
        engine.set_failing(Some("disk full"));
        assert!(syncer.sync().await.is_err());
        engine.set_failing(None);
        let err = syncer.sync().await.expect_err("poisoned");
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
