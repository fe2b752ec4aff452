//! The RocksDB [`Engine`]: one database per node, one column family per [`Cf`].
//!
//! The WAL is flushed by hand (`manual_wal_flush`): a `write` only appends to RocksDB's in-memory WAL
//! buffer and memtable, and [`Engine::sync_wal`] writes and fsyncs the buffer for every write before it.
//! That is what lets one fsync cover the appends of every group on the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, ReadOptions, SliceTransform,
    WriteOptions,
};

use super::{Cf, Engine, EngineError, EngineMemory, LogGarbage, Op, WriteBatch, WriteStalls};
use crate::keys::GROUP_PREFIX_BYTES;

/// Tunables of the node's RocksDB.
#[derive(Debug, Clone)]
pub struct RocksConfig {
    /// Cap on all memtables together.
    pub write_buffer_bytes_max: usize,
    /// The one block cache every column family shares.
    pub block_cache_bytes: usize,
    /// Forces memtable flushes once the WAL holds this much, so old WAL files can be deleted.
    pub wal_bytes_max: u64,
    pub background_jobs: i32,
    /// Memtable flushes and compactions write their files with direct I/O (O_DIRECT), where the data
    /// directory takes it ([`direct_writes_work`]).
    pub direct_writes: bool,
    /// Bytes per second that memtable flushes and compactions may write, if capped. On a disk whose
    /// throughput is throttled, their bursts used its budget and the group commit's fsyncs waited
    /// behind them for hundreds of milliseconds; spread out, they leave room for the WAL. Too low a cap
    /// makes flushes fall behind the produce load, and writes then stall.
    pub background_write_bytes_per_sec: Option<u64>,
}

impl Default for RocksConfig {
    fn default() -> Self {
        Self {
            write_buffer_bytes_max: 128 << 20,
            block_cache_bytes: 64 << 20,
            wal_bytes_max: 512 << 20,
            background_jobs: 2,
            direct_writes: true,
            background_write_bytes_per_sec: None,
        }
    }
}

/// Whether files in `dir` can be written with direct I/O: open one with O_DIRECT and write one aligned
/// block. Some filesystems refuse O_DIRECT (tmpfs before Linux 6.6, some FUSE filesystems), and RocksDB
/// would only find out at its first memtable flush, which would then fail and stop the store.
fn direct_writes_work(dir: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let probe = dir.join(".direct-io-probe");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&probe)
        .and_then(|mut file| {
            let buffer = vec![0u8; 2 * BLOCK];
            let start = buffer.as_ptr().align_offset(BLOCK);
            let block = buffer.get(start..start.saturating_add(BLOCK)).ok_or(std::io::ErrorKind::InvalidInput)?;
            file.write_all(block)
        });
    let _ = std::fs::remove_file(&probe);
    written.is_ok()
}

/// Log entries of this many bytes or more are stored in blob files, out of the compactions' way.
/// Smaller ones (blank and membership entries, a lone small record) stay in the SSTs, where a read
/// needs no second file.
const LOG_BLOB_MIN_BYTES: u64 = 4096;

/// LZ4's acceleration for blob files (RocksDB reads a negative level as one). LZ4 at its default was 13%
/// of broker CPU in B7 with batching producers. At 8 it compressed the benchmarks' half-random values
/// 2.2 times as fast, to the same size (1.96:1), and B7 with batching producers spent 25.4-27.5 against
/// 26.0-29.8 us of broker CPU per message (3 runs each, alternated). Data that compresses well loses
/// some ratio (JSON text 8.2:1 against 9.7:1), a few more bytes of what is left.
const LOG_BLOB_LZ4_ACCELERATION: u32 = 8;

/// Obsolete WAL files kept for reuse as new WALs.
const WAL_FILES_RECYCLED: usize = 2;

/// A node's RocksDB.
pub struct RocksEngine {
    db: DB,
    cache: Cache,
    path: PathBuf,
    /// Whether the log's blob garbage collection is on (see [`Engine::reclaim_garbage`]).
    blob_gc: AtomicBool,
}

fn backend(e: rocksdb::Error) -> EngineError {
    EngineError::Backend(e.into_string())
}

fn cf_options(cf: Cf, cache: &Cache) -> Options {
    let mut o = Options::default();
    // Without this each column family would get a block cache of its own, outside the node's budget.
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(cache);
    match cf {
        Cf::Log => {
            // Every key starts with the group id: prefix bloom filters and seeks stay inside one group.
            o.set_prefix_extractor(SliceTransform::create_fixed_prefix(GROUP_PREFIX_BYTES));
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_target_file_size_base(128 << 20);
            // Key-value separation (RocksDB's integrated BlobDB): an entry of LOG_BLOB_MIN_BYTES or more
            // goes, at its memtable flush, to a blob file, and the SST keeps its key and a reference to
            // it, so compactions rewrite references, not payloads. Every flush spans every group's keys,
            // so leveled compaction had rewritten each payload several times: B7 with batching producers
            // gained 30-39% and spent 21-25% less broker CPU per message (see ARCHITECTURE.md).
            o.set_enable_blob_files(true);
            o.set_min_blob_size(LOG_BLOB_MIN_BYTES);
            o.set_blob_compression_type(DBCompressionType::Lz4);
            // A blob file goes once every blob in it is garbage (its keys purged, then compacted away).
            // Garbage collection relocates the live blobs of the oldest quarter of the files when
            // compactions meet them, so a group that keeps its log does not pin every newer file's space;
            // it starts off and runs only while enough of the blob bytes are garbage
            // (`Engine::reclaim_garbage`): in a log that only grows it copied live blobs for nothing.
            o.set_enable_blob_gc(false);
            // While it runs, oldest files half garbage or more get compactions of their own, so their space
            // comes back without waiting for writes to bring compactions their way.
            o.set_blob_gc_force_threshold(0.5);
            // Blobs read through the node's one cache, within its budget.
            o.set_blob_cache(cache);
        }
        Cf::OffsetIdx | Cf::Kv => {
            t.set_bloom_filter(10.0, false);
            o.set_compression_type(DBCompressionType::Lz4);
        }
        Cf::RaftMeta | Cf::SmMeta => {}
    }
    o.set_block_based_table_factory(&t);
    o
}

impl RocksEngine {
    /// `batch` as RocksDB's WriteBatch, sized up front: growing its buffer would copy every value already
    /// in it again.
    fn rocks_batch(&self, batch: &WriteBatch) -> Result<rocksdb::WriteBatch, EngineError> {
        let mut wb = rocksdb::WriteBatch::with_capacity_bytes(batch_capacity(batch));
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => wb.put_cf(self.handle(*cf)?, key, value),
                Op::Delete { cf, key } => wb.delete_cf(self.handle(*cf)?, key),
                Op::DeleteRange { cf, from, to } => wb.delete_range_cf(self.handle(*cf)?, from, to),
            }
        }
        Ok(wb)
    }

    /// Opens (creating if missing) the node's database at `path`.
    pub fn open(path: impl AsRef<Path>, config: &RocksConfig) -> Result<Self, EngineError> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|e| EngineError::Backend(format!("{}: {e}", path.display())))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_manual_wal_flush(true);
        opts.set_max_background_jobs(config.background_jobs);
        opts.set_db_write_buffer_size(config.write_buffer_bytes_max);
        opts.set_max_total_wal_size(config.wal_bytes_max);
        opts.set_wal_bytes_per_sync(1 << 20);
        // Reuse old WAL files instead of creating and deleting them: a group commit's fdatasync then
        // overwrites blocks already allocated, with no inode or journal update. A fresh WAL file at each
        // memtable switch (and the unlink of the old one, with its discard) made the fdatasyncs around the
        // switch wait on ext4 journal commits: 20-50 ms stalls, every few seconds under load, on every node.
        opts.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        opts.set_bytes_per_sync(1 << 20);
        // Memtable flushes and compactions write past the page cache. Through it, their tens of MB at a
        // time were copied into fresh pages and then written back in bursts that the group commit's
        // fdatasyncs queued behind: B7 with batching producers gave 85-89 MB/s with a p99 of 220-260 ms
        // buffered, 104-109 MB/s and 62-65 ms direct (2 runs each, alternated). Reads stay buffered.
        let direct = config.direct_writes && direct_writes_work(&path);
        if config.direct_writes && !direct {
            tracing::warn!(
                "{} does not take direct (O_DIRECT) writes: memtable flushes and compactions go through the page cache",
                path.display()
            );
        }
        opts.set_use_direct_io_for_flush_and_compaction(direct);
        // A cap on what flushes and compactions write per second (RocksDB's rate limiter, refilled every
        // 100 ms; the WAL is never held back). See `RocksConfig::background_write_bytes_per_sec`.
        if let Some(rate) = config.background_write_bytes_per_sec {
            opts.set_ratelimiter(i64::try_from(rate).unwrap_or(i64::MAX), 100_000, 10);
        }
        // Memtable flushes of different column families must not reorder what a crash can leave behind.
        opts.set_atomic_flush(true);
        // Flushes and compactions run at the lowest CPU priority (nice 19; RocksDB's thread pools are the
        // process's, so every node's). A memtable flush compresses tens of MB at once, on every node at
        // the same moment (they hold the same data); at normal priority that burst took the cores from the
        // brokers' own threads, and a fixed-rate produce saw a 20-70 ms stall every few seconds. The risk
        // taken: a flush that falls behind stops writes until it ends, and while other work keeps the cores
        // busy a nice-19 flush runs slowly (not a sign of it in any benchmark shape, B8's 1.5 GB fill included).
        let mut env = rocksdb::Env::new().map_err(backend)?;
        env.lower_high_priority_thread_pool_cpu_priority();
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf, &cache)));
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(backend)?;
        let engine = Self { db, cache, path, blob_gc: AtomicBool::new(false) };
        // rust-rocksdb has no setter for the blob files' compression options; RocksDB takes them by name.
        let level = format!("{{level=-{LOG_BLOB_LZ4_ACCELERATION}}}");
        engine.db.set_options_cf(engine.handle(Cf::Log)?, &[("blob_compression_opts", &level)]).map_err(backend)?;
        // Garbage left from before a restart is collected from the start.
        engine.reclaim_garbage()?;
        Ok(engine)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, EngineError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| EngineError::Backend(format!("column family {} is missing", cf.name())))
    }
}

/// Bytes RocksDB's encoding of `batch` takes: its 12-byte header, and per operation the data plus at most
/// 16 bytes of tag, column family id and length varints.
fn batch_capacity(batch: &WriteBatch) -> usize {
    let data: usize = batch
        .ops()
        .iter()
        .map(|op| match op {
            Op::Put { key, value, .. } => key.len() + value.len(),
            Op::Delete { key, .. } => key.len(),
            Op::DeleteRange { from, to, .. } => from.len() + to.len(),
        })
        .sum();
    12 + data + 16 * batch.ops().len()
}

impl Engine for RocksEngine {
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let wb = self.rocks_batch(&batch)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(wb, &wo).map_err(backend)
    }

    fn sync_wal(&self) -> Result<(), EngineError> {
        self.db.flush_wal(true).map_err(backend)
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Bytes>, EngineError> {
        let v = self.db.get_pinned_cf(self.handle(cf)?, key).map_err(backend)?;
        Ok(v.map(|v| Bytes::copy_from_slice(&v)))
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        // Ranges never cross a group, so the prefix extractor may serve them.
        ro.set_prefix_same_as_start(
            from.len() >= GROUP_PREFIX_BYTES
                && to.len() >= GROUP_PREFIX_BYTES
                && from[..GROUP_PREFIX_BYTES] == to[..GROUP_PREFIX_BYTES],
        );
        // A raw iterator lends each key and value in place; the plain one copied both into fresh boxes.
        let mut iter = self.db.raw_iterator_cf_opt(self.handle(cf)?, ro);
        iter.seek(from);
        while let (Some(k), Some(v)) = (iter.key(), iter.value()) {
            if !visit(k, v) {
                return Ok(());
            }
            iter.next();
        }
        // The iterator stops being valid at the end of the range or at an error; only the status tells.
        iter.status().map_err(backend)
    }

    fn last_in_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Bytes)>, EngineError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(to.to_vec());
        // Seeking to the last key below the upper bound must not go through the prefix extractor: the
        // bound's prefix is the next group's, and a prefix filter would skip files holding this one.
        ro.set_total_order_seek(true);
        let mut it = self.db.raw_iterator_cf_opt(self.handle(cf)?, ro);
        it.seek_to_last();
        if it.valid()
            && let (Some(k), Some(v)) = (it.key(), it.value())
        {
            return Ok(Some((k.to_vec(), Bytes::copy_from_slice(v))));
        }
        it.status().map_err(backend)?;
        Ok(None)
    }

    fn memory_usage(&self) -> EngineMemory {
        let memtables = Cf::ALL
            .iter()
            .filter_map(|cf| self.db.cf_handle(cf.name()))
            .filter_map(|h| self.db.property_int_value_cf(&h, "rocksdb.cur-size-all-mem-tables").ok().flatten())
            .sum();
        EngineMemory { memtables, block_cache: self.cache.get_usage() as u64 }
    }

    /// From RocksDB's own counters, kept whether or not statistics are on: the cumulative stall time of
    /// `rocksdb.dbstats` and the counts of each column family's `rocksdb.cf-write-stall-stats` (the C API
    /// gives both only as text). Reading `rocksdb.dbstats` also restarts the "interval" figures that
    /// RocksDB's periodic stats dump writes to its LOG; the cumulative ones are unaffected.
    fn write_stalls(&self) -> WriteStalls {
        let mut stalls = WriteStalls::default();
        if let Ok(Some(db)) = self.db.property_value("rocksdb.dbstats") {
            stalls.waited = cumulative_stall(&db).unwrap_or_default();
            add_stall_counts(&db, &mut stalls.counts);
        }
        for h in Cf::ALL.iter().filter_map(|cf| self.db.cf_handle(cf.name())) {
            if let Ok(Some(cf)) = self.db.property_value_cf(&h, "rocksdb.cf-write-stall-stats") {
                add_stall_counts(&cf, &mut stalls.counts);
            }
        }
        stalls
    }

    fn reclaim_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<(), EngineError> {
        self.db.delete_file_in_range_cf(self.handle(cf)?, from, to).map_err(backend)
    }

    /// Turns the log's blob garbage collection on or off (a dynamic option: RocksDB rewrites its OPTIONS
    /// file, nothing else) from the garbage RocksDB has counted in the live blob files, which compactions
    /// count as they drop the keys of purged entries. In a 15 s fill of 16 partitions (B7, nothing to
    /// reclaim) collection always on was 9% of a broker's CPU samples, reading live blobs back to copy them.
    fn reclaim_garbage(&self) -> Result<LogGarbage, EngineError> {
        let log = self.handle(Cf::Log)?;
        let property = |name: &str| -> Result<u64, EngineError> {
            Ok(self.db.property_int_value_cf(log, name).map_err(backend)?.unwrap_or(0))
        };
        let blob_bytes = property("rocksdb.live-blob-file-size")?;
        let garbage_bytes = property("rocksdb.live-blob-file-garbage-size")?;
        let collecting = self.blob_gc.load(Ordering::Relaxed);
        let wanted = LogGarbage::wanted(blob_bytes, garbage_bytes, collecting);
        if wanted != collecting {
            let value = if wanted { "true" } else { "false" };
            self.db.set_options_cf(log, &[("enable_blob_garbage_collection", value)]).map_err(backend)?;
            self.blob_gc.store(wanted, Ordering::Relaxed);
            tracing::info!(
                blob_bytes,
                garbage_bytes,
                "log blob garbage collection {}: {garbage_bytes} of {blob_bytes} blob bytes are garbage",
                if wanted { "started" } else { "stopped" }
            );
        }
        Ok(LogGarbage { blob_bytes, garbage_bytes, collecting: wanted })
    }
}

/// The time of `rocksdb.dbstats`'s line "Cumulative stall: 00:00:1.234 H:M:S, 0.1 percent".
fn cumulative_stall(dbstats: &str) -> Option<Duration> {
    let hms = dbstats.lines().find_map(|l| l.strip_prefix("Cumulative stall: "))?.split_once(" H:M:S")?.0;
    let mut parts = hms.split(':');
    let hours: u64 = parts.next()?.parse().ok()?;
    let minutes: u64 = parts.next()?.parse().ok()?;
    let seconds = Duration::try_from_secs_f64(parts.next()?.parse().ok()?).ok()?;
    Some(Duration::from_secs(hours.checked_mul(3600)?.checked_add(minutes.checked_mul(60)?)?) + seconds)
}

/// Adds the counts of a "Write Stall (count): cause-condition: n, ..." line to `counts`, leaving out
/// RocksDB's totals and its breakdown of L0 stalls by whether a compaction was running (both repeat
/// counts already listed).
fn add_stall_counts(text: &str, counts: &mut BTreeMap<(String, String), u64>) {
    let Some(list) = text.lines().find_map(|l| l.strip_prefix("Write Stall (count): ")) else {
        return;
    };
    for (name, n) in list.split(", ").filter_map(|item| item.split_once(": ")) {
        let Ok(n) = n.trim().parse::<u64>() else { continue };
        if name.starts_with("total-") || name.ends_with("-with-ongoing-compaction") {
            continue;
        }
        if let Some((cause, condition)) = name.rsplit_once('-') {
            *counts.entry((cause.to_owned(), condition.to_owned())).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_batch_is_sized_for_everything_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        let mut b = WriteBatch::new();
        b.put(Cf::Log, vec![1; 16], Bytes::from(vec![7u8; 300]));
        b.put(Cf::RaftMeta, vec![2; 9], Bytes::from_static(b"vote"));
        b.delete(Cf::OffsetIdx, vec![3; 16]);
        b.delete_range(Cf::Log, vec![0; 16], vec![1; 16]);
        let wb = e.rocks_batch(&b).expect("batch");
        assert!(wb.size_in_bytes() <= batch_capacity(&b), "{} > {}", wb.size_in_bytes(), batch_capacity(&b));
    }

    #[test]
    fn a_directory_that_takes_no_files_fails_the_direct_write_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!direct_writes_work(&dir.path().join("missing")), "nothing can be opened there");
    }

    #[test]
    fn flushed_and_compacted_files_are_read_back() {
        // Flushes and compactions write with direct I/O where the directory takes it (it does here on
        // ext4 and tmpfs); either way what they wrote must read back.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        for round in 0u8..3 {
            let mut b = WriteBatch::new();
            for i in 0u8..100 {
                b.put(Cf::Log, vec![round, i], Bytes::from(vec![i; 5000]));
            }
            e.write(b).expect("write");
            e.db.flush_cf(e.handle(Cf::Log).expect("cf")).expect("flush");
        }
        e.db.compact_range_cf(e.handle(Cf::Log).expect("cf"), None::<&[u8]>, None::<&[u8]>);
        drop(e);
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen");
        for round in 0u8..3 {
            for i in [0u8, 42, 99] {
                assert_eq!(e.get(Cf::Log, &[round, i]).expect("get"), Some(Bytes::from(vec![i; 5000])));
            }
        }
    }

    /// `len` bytes that do not compress.
    fn noise(len: usize, seed: u8) -> Bytes {
        let mut x = u64::from(seed) | 1 << 40;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn blob_bytes(e: &RocksEngine) -> u64 {
        let log = e.handle(Cf::Log).expect("cf");
        e.db.property_int_value_cf(&log, "rocksdb.total-blob-file-size").expect("property").expect("known property")
    }

    fn flush_log(e: &RocksEngine) {
        e.db.flush_cf(e.handle(Cf::Log).expect("cf")).expect("flush");
    }

    /// Entry `i` of `round`, large enough for a blob file.
    fn blob_entry(round: u8, i: u8) -> Bytes {
        noise(2 * LOG_BLOB_MIN_BYTES as usize, i ^ round)
    }

    /// `rounds` memtable flushes, each of 50 blob-sized entries in each of groups 1 and 2 (keys
    /// `[group, round, i]`).
    fn write_two_groups(e: &RocksEngine, rounds: u8) {
        for round in 0..rounds {
            let mut b = WriteBatch::new();
            for g in [1u8, 2] {
                for i in 0u8..50 {
                    b.put(Cf::Log, vec![g, round, i], blob_entry(round, i));
                }
            }
            e.write(b).expect("write");
            flush_log(e);
        }
    }

    /// A log purge as `LogStore::purge` makes one (a range deletion, then a reclaim of whole files),
    /// followed by a compaction of the whole log.
    fn purge_and_compact(e: &RocksEngine, from: &[u8], to: &[u8]) {
        let mut b = WriteBatch::new();
        b.delete_range(Cf::Log, from.to_vec(), to.to_vec());
        e.write(b).expect("purge");
        e.reclaim_range(Cf::Log, from, to).expect("reclaim");
        e.db.compact_range_cf(e.handle(Cf::Log).expect("cf"), None::<&[u8]>, None::<&[u8]>);
    }

    /// The options the log column family runs with, from the newest OPTIONS file RocksDB wrote.
    fn log_cf_options(dir: &Path) -> String {
        let (_, newest) = std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|f| {
                let path = f.ok()?.path();
                let number = path.file_name()?.to_str()?.strip_prefix("OPTIONS-")?.parse::<u64>().ok()?;
                Some((number, path))
            })
            .max()
            .expect("an OPTIONS file");
        let text = std::fs::read_to_string(newest).expect("read OPTIONS");
        let section = text.split("[CFOptions \"log\"]").nth(1).expect("the log column family's section");
        section.split("\n[").next().unwrap_or_default().to_owned()
    }

    #[test]
    fn log_blob_files_are_compressed_with_lz4_accelerated() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..2 {
            let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
            let log = log_cf_options(dir.path());
            assert!(log.contains("blob_compression_type=kLZ4Compression"), "{log}");
            let opts = log.lines().find(|l| l.trim_start().starts_with("blob_compression_opts=")).expect("blob opts");
            assert!(opts.contains(&format!(";level=-{LOG_BLOB_LZ4_ACCELERATION};")), "{opts}");
            drop(e);
        }
    }

    /// The rate limiter RocksDB says, in its LOG, that it runs with: "(nil)" for none.
    fn logged_rate_limiter(dir: &Path) -> String {
        let log = std::fs::read_to_string(dir.join("LOG")).expect("read LOG");
        let line = log.lines().find(|l| l.contains("Options.rate_limiter:")).expect("rate limiter line");
        line.rsplit(' ').next().unwrap_or_default().to_owned()
    }

    #[test]
    fn background_writes_are_capped_only_when_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open"));
        assert_eq!(logged_rate_limiter(dir.path()), "(nil)");
        let capped = RocksConfig { background_write_bytes_per_sec: Some(32 << 20), ..RocksConfig::default() };
        drop(RocksEngine::open(dir.path(), &capped).expect("reopen"));
        let limiter = logged_rate_limiter(dir.path());
        assert!(limiter.starts_with("0x"), "{limiter}");
    }

    #[test]
    fn stall_figures_are_read_from_rocksdbs_text() {
        let dbstats = "\n** DB Stats **\nUptime(secs): 12.0 total, 1.0 interval\n\
            Cumulative stall: 01:02:3.500 H:M:S, 0.1 percent\n\
            Interval stall: 00:00:0.000 H:M:S, 0.0 percent\n\
            Write Stall (count): write-buffer-manager-limit-stops: 2\n";
        assert_eq!(cumulative_stall(dbstats), Some(Duration::from_millis(3_723_500)));
        assert_eq!(cumulative_stall("Cumulative stall: soon"), None);
        let mut counts = BTreeMap::new();
        add_stall_counts(dbstats, &mut counts);
        let cf = "Write Stall (count): cf-l0-file-count-limit-delays-with-ongoing-compaction: 4, \
            cf-l0-file-count-limit-stops-with-ongoing-compaction: 0, l0-file-count-limit-delays: 5, \
            memtable-limit-stops: 3, total-delays: 5, total-stops: 3\n";
        add_stall_counts(cf, &mut counts);
        add_stall_counts(cf, &mut counts);
        let count = |cause: &str, condition: &str| counts.get(&(cause.to_owned(), condition.to_owned())).copied();
        assert_eq!(count("write-buffer-manager-limit", "stops"), Some(2));
        assert_eq!(count("memtable-limit", "stops"), Some(6));
        assert_eq!(count("l0-file-count-limit", "delays"), Some(10));
        assert_eq!(counts.len(), 3, "totals and the ongoing-compaction breakdown are left out: {counts:?}");
    }

    #[test]
    fn writes_held_back_by_slow_flushes_are_counted_and_timed() {
        // Small memtables and flushes capped far below what the writer puts in: RocksDB stops writes while
        // two memtables wait for their flush, as it did with a cap too low for the produce load.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RocksConfig {
            write_buffer_bytes_max: 256 << 10,
            background_write_bytes_per_sec: Some(1 << 20),
            ..RocksConfig::default()
        };
        let e = RocksEngine::open(dir.path(), &config).expect("open");
        let before = e.write_stalls();
        assert!(before.waited.is_zero() && before.counts.values().all(|n| *n == 0), "{before:?}");
        assert!(before.counts.contains_key(&("memtable-limit".to_owned(), "stops".to_owned())), "{before:?}");
        let mut written = 0usize;
        while e.write_stalls().waited.is_zero() {
            assert!(written < 64 << 20, "64 MiB written at 1 MiB/s of flushes and never a stall");
            let mut b = WriteBatch::new();
            for i in 0u8..16 {
                b.put(Cf::Log, (written + usize::from(i)).to_be_bytes().to_vec(), noise(4096, i));
            }
            e.write(b).expect("write");
            written += 16 * 4096;
        }
        let stalls = e.write_stalls();
        let stops = stalls.counts.get(&("memtable-limit".to_owned(), "stops".to_owned())).copied();
        assert!(stops.is_some_and(|n| n > 0), "{stalls:?}");
    }

    #[test]
    fn large_log_entries_go_to_blob_files_and_read_back_as_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        let big = |g: u8, i: u8| Bytes::from(vec![g ^ i; LOG_BLOB_MIN_BYTES as usize + usize::from(i)]);
        let small = |g: u8, i: u8| Bytes::from(vec![g ^ i; 40]);
        // Two groups, large and small entries interleaved, as blank and membership entries sit among data.
        let mut b = WriteBatch::new();
        for g in [1u8, 2] {
            for i in 0u8..20 {
                b.put(Cf::Log, vec![g, i], if i % 4 == 0 { small(g, i) } else { big(g, i) });
            }
        }
        e.write(b).expect("write");
        assert_eq!(blob_bytes(&e), 0, "nothing is flushed yet");
        flush_log(&e);
        assert!(blob_bytes(&e) > 0, "the large entries went to a blob file");
        drop(e);
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen");
        for g in [1u8, 2] {
            assert_eq!(e.get(Cf::Log, &[g, 5]).expect("get"), Some(big(g, 5)));
            assert_eq!(e.get(Cf::Log, &[g, 8]).expect("get"), Some(small(g, 8)));
            let mut seen = Vec::new();
            e.scan(Cf::Log, &[g, 3], &[g, 10], &mut |k, v| {
                seen.push((k.to_vec(), Bytes::copy_from_slice(v)));
                true
            })
            .expect("scan");
            let expected: Vec<_> =
                (3u8..10).map(|i| (vec![g, i], if i % 4 == 0 { small(g, i) } else { big(g, i) })).collect();
            assert_eq!(seen, expected);
            assert_eq!(e.last_in_range(Cf::Log, &[g], &[g + 1]).expect("last"), Some((vec![g, 19], big(g, 19))));
        }
    }

    #[test]
    fn purged_log_entries_give_their_blob_files_back() {
        // A log purge (retention, a snapshot) is a range deletion and a reclaim of whole files: once
        // compaction has dropped the deleted keys, the blob files holding their payloads must go too.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        write_two_groups(&e, 3);
        let written = blob_bytes(&e);
        assert!(written >= 3 * 100 * 2 * LOG_BLOB_MIN_BYTES, "{written} bytes in blob files");
        purge_and_compact(&e, &[1], &[3]);
        assert_eq!(blob_bytes(&e), 0, "every payload was purged, of {written} bytes");
        assert_eq!(e.get(Cf::Log, &[1, 0, 0]).expect("get"), None);
    }

    #[test]
    fn a_purged_group_gives_space_back_while_another_keeps_its_log() {
        // Every blob file holds the entries of every group flushed together, so one group's purge leaves
        // the files half garbage while the other keeps its log. Once that garbage is counted, garbage
        // collection starts; it relocates the live blobs of the oldest files when compactions meet them,
        // so those files go.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        write_two_groups(&e, 8);
        let written = blob_bytes(&e);
        let before = e.reclaim_garbage().expect("decide");
        assert_eq!((before.garbage_bytes, before.collecting), (0, false), "nothing to reclaim yet: {before:?}");
        purge_and_compact(&e, &[1], &[2]);
        assert_eq!(blob_bytes(&e), written, "without collection the shared files stay whole");
        let after = e.reclaim_garbage().expect("decide");
        assert!(after.collecting && after.garbage_bytes * 3 >= after.blob_bytes, "half is garbage: {after:?}");
        assert!(log_cf_options(dir.path()).contains("enable_blob_garbage_collection=true"));
        // No compaction is asked for: half of the oldest files is garbage, which makes RocksDB schedule
        // compactions of the SSTs that point into them.
        // Collection goes on, the oldest files first, until a tenth or less is garbage; then it stops.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = e.reclaim_garbage().expect("decide");
            if !now.collecting {
                assert!(now.garbage_bytes * 10 <= now.blob_bytes, "{now:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still collecting after 30 s: {now:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let kept = blob_bytes(&e);
        assert!(kept < written * 3 / 4, "{kept} of {written} bytes kept");
        for round in 0u8..8 {
            assert_eq!(
                e.get(Cf::Log, &[2, round, 7]).expect("get"),
                Some(blob_entry(round, 7)),
                "the kept group's entries of round {round}"
            );
        }
    }

    #[test]
    fn garbage_left_before_a_restart_is_collected_from_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
            write_two_groups(&e, 4);
            purge_and_compact(&e, &[1], &[2]);
            assert!(log_cf_options(dir.path()).contains("enable_blob_garbage_collection=false"), "not asked yet");
        }
        let _e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen");
        assert!(log_cf_options(dir.path()).contains("enable_blob_garbage_collection=true"));
    }

    #[test]
    fn a_log_that_only_grows_is_not_garbage_collected() {
        // Collection would copy live blobs for nothing: it stays off however much is written and compacted.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        write_two_groups(&e, 4);
        e.db.compact_range_cf(e.handle(Cf::Log).expect("cf"), None::<&[u8]>, None::<&[u8]>);
        let garbage = e.reclaim_garbage().expect("decide");
        assert_eq!(garbage.blob_bytes, blob_bytes(&e));
        assert!(garbage.blob_bytes > 0 && garbage.garbage_bytes == 0 && !garbage.collecting, "{garbage:?}");
        assert!(log_cf_options(dir.path()).contains("enable_blob_garbage_collection=false"));
    }

    #[test]
    fn garbage_collection_starts_at_a_quarter_of_garbage_and_stops_at_a_tenth() {
        assert!(!LogGarbage::wanted(0, 0, false), "an empty log");
        assert!(!LogGarbage::wanted(1000, 249, false));
        assert!(LogGarbage::wanted(1000, 250, false));
        assert!(LogGarbage::wanted(1000, 101, true), "once on, it runs while more than a tenth is garbage");
        assert!(!LogGarbage::wanted(1000, 100, true));
        assert!(!LogGarbage::wanted(0, 0, true));
        assert!(LogGarbage::wanted(u64::MAX, u64::MAX, false), "no overflow");
    }

    #[test]
    fn synced_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
            let mut b = WriteBatch::new();
            b.put(Cf::Log, vec![0; 16], Bytes::from_static(b"entry"));
            b.put(Cf::RaftMeta, vec![0; 9], Bytes::from_static(b"vote"));
            e.write(b).expect("write");
            e.sync_wal().expect("sync");
        }
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen");
        assert_eq!(e.get(Cf::Log, &[0; 16]).expect("get"), Some(Bytes::from_static(b"entry")));
        assert_eq!(e.get(Cf::RaftMeta, &[0; 9]).expect("get"), Some(Bytes::from_static(b"vote")));
    }

    #[test]
    fn scans_stay_within_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        let key = |g: u64, i: u64| [g.to_be_bytes(), i.to_be_bytes()].concat();
        let mut b = WriteBatch::new();
        for g in 1..=3 {
            for i in 1..=5 {
                b.put(Cf::Log, key(g, i), Bytes::from(format!("{g}/{i}")));
            }
        }
        e.write(b).expect("write");
        let mut seen = vec![];
        e.scan(Cf::Log, &key(2, 2), &key(2, u64::MAX), &mut |_, v| {
            seen.push(String::from_utf8_lossy(v).into_owned());
            true
        })
        .expect("scan");
        assert_eq!(seen, vec!["2/2", "2/3", "2/4", "2/5"]);
        let last = e.last_in_range(Cf::Log, &key(2, 0), &key(2, 4)).expect("last");
        assert_eq!(last.map(|(_, v)| v), Some(Bytes::from_static(b"2/3")));
        assert_eq!(e.last_in_range(Cf::Log, &key(4, 0), &key(4, 9)).expect("last"), None);
    }

    /// The size of the newest WAL file in `dir` (the one being written).
    fn newest_wal_bytes(dir: &Path) -> u64 {
        let entries = std::fs::read_dir(dir).expect("read dir");
        let newest = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .max_by_key(|e| e.file_name());
        newest.map_or(0, |e| e.metadata().expect("metadata").len())
    }

    /// Flushes every column family's memtable, which starts a new WAL file.
    fn flush_all(e: &RocksEngine) {
        let handles: Vec<_> = Cf::ALL.iter().map(|cf| e.handle(*cf).expect("cf")).collect();
        e.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default()).expect("flush");
    }

    /// The nice value of each of this process's threads named `name`.
    fn nice_of_threads(name: &str) -> Vec<i64> {
        let mut nice = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task").filter_map(Result::ok) {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised name start at field 3 (state); nice is field 19.
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            if comm.trim() == name
                && let Some(n) = after_name.split_whitespace().nth(16).and_then(|n| n.parse().ok())
            {
                nice.push(n);
            }
        }
        nice
    }

    /// RocksDB's flush and compaction threads run at the lowest CPU priority, so a flush's burst of
    /// compression does not take the cores from the threads that answer produce requests.
    #[test]
    fn flushes_and_compactions_run_at_the_lowest_cpu_priority() {
        let own: Vec<i64> = nice_of_threads(&std::fs::read_to_string("/proc/thread-self/comm").expect("comm"));
        assert!(own.iter().all(|n| *n < 19), "run the tests at normal priority to check this: {own:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for round in 0u64.. {
            // A pool thread lowers its own priority when it next takes a job: give each pool one.
            let mut b = WriteBatch::new();
            b.put(Cf::Log, round.to_be_bytes().to_vec(), Bytes::from_static(b"entry"));
            e.write(b).expect("write");
            flush_all(&e);
            e.db.compact_range_cf(e.handle(Cf::Log).expect("cf"), None::<&[u8]>, None::<&[u8]>);
            let (flush, compaction) = (nice_of_threads("rocksdb:high"), nice_of_threads("rocksdb:low"));
            if flush.contains(&19) && compaction.contains(&19) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nice of the flush threads {flush:?}, of the compaction threads {compaction:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// WAL files are recycled (a group commit's fdatasync then needs no journal commit), and recovery from
    /// a recycled file replays only what was written to it since its reuse: rounds of records written and
    /// then deleted leave stale puts in old WAL files, and none comes back after a reopen.
    #[test]
    fn recycled_wal_files_are_reused_and_replay_only_their_new_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = |round: u64, i: u64| [round.to_be_bytes(), i.to_be_bytes()].concat();
        let mut reused = false;
        {
            let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open");
            for round in 0..6u64 {
                let mut b = WriteBatch::new();
                for i in 0..500 {
                    b.put(Cf::Log, key(round, i), Bytes::from(vec![b's'; 100]));
                    if round > 0 {
                        b.delete(Cf::Log, key(round - 1, i));
                    }
                }
                e.write(b).expect("write");
                e.sync_wal().expect("sync");
                flush_all(&e);
                // A new WAL file is empty; a recycled one still holds its earlier records.
                reused |= newest_wal_bytes(dir.path()) > 10_000;
            }
            let mut b = WriteBatch::new();
            for i in 0..500 {
                b.delete(Cf::Log, key(5, i));
            }
            b.put(Cf::Log, b"last".to_vec(), Bytes::from_static(b"kept"));
            e.write(b).expect("write");
            e.sync_wal().expect("sync");
        }
        assert!(reused, "a WAL file was reused");
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).expect("reopen");
        assert_eq!(e.get(Cf::Log, b"last").expect("get"), Some(Bytes::from_static(b"kept")));
        // Point reads, not a scan: a stale put replayed into the memtable would be found there first,
        // whereas a scan would merge it with the newer deletes already flushed and hide it.
        for round in 0..6 {
            for i in 0..500 {
                assert_eq!(e.get(Cf::Log, &key(round, i)).expect("get"), None, "record {round}/{i} came back");
            }
        }
    }
}
