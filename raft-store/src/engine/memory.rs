//! An in-memory [`Engine`] for tests that can simulate a crash: writes not covered by a `sync_wal` are
//! dropped by [`MemEngine::crash`], exactly what a power loss does to an unsynced WAL tail.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Condvar, Mutex, MutexGuard};

use bytes::Bytes;

use super::{Cf, Engine, EngineError, Op, WriteBatch};

type Table = BTreeMap<Vec<u8>, Bytes>;

#[derive(Default)]
struct State {
    visible: [Table; 5],
    durable: [Table; 5],
    unsynced: Vec<WriteBatch>,
    syncs: u64,
    /// While set, `sync_wal` blocks (tests use it to prove nothing is acknowledged before a sync).
    sync_paused: bool,
    /// When set, every operation fails as a full or broken disk would.
    failing: Option<String>,
}

/// In-memory engine; share it through an `Arc` to "reopen" the same store after a crash.
#[derive(Default)]
pub struct MemEngine {
    state: Mutex<State>,
    sync_resumed: Condvar,
}

fn apply(tables: &mut [Table; 5], batch: &WriteBatch) {
    for op in batch.ops() {
        match op {
            Op::Put { cf, key, value } => {
                tables[cf.index()].insert(key.clone(), value.clone());
            }
            Op::Delete { cf, key } => {
                tables[cf.index()].remove(key);
            }
            Op::DeleteRange { cf, from, to } => {
                let table = &mut tables[cf.index()];
                let doomed: Vec<Vec<u8>> = table
                    .range::<[u8], _>((Bound::Included(&from[..]), Bound::Excluded(&to[..])))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    table.remove(&k);
                }
            }
        }
    }
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(state: &State) -> Result<(), EngineError> {
        match &state.failing {
            Some(why) => Err(EngineError::Backend(why.clone())),
            None => Ok(()),
        }
    }

    /// Drops every write not covered by a completed `sync_wal`, as a power loss would.
    pub fn crash(&self) {
        let mut s = self.lock();
        s.unsynced.clear();
        s.visible = s.durable.clone();
    }

    /// The value under `key` that a crash now would keep (what the last completed `sync_wal` covered).
    pub fn durable(&self, cf: Cf, key: &[u8]) -> Option<Bytes> {
        self.lock().durable[cf.index()].get(key).cloned()
    }

    /// Number of completed `sync_wal` calls.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Blocks (`true`) or releases (`false`) every `sync_wal`.
    pub fn pause_syncs(&self, paused: bool) {
        self.lock().sync_paused = paused;
        self.sync_resumed.notify_all();
    }

    /// Makes every later operation fail with `why` (`None` heals).
    pub fn set_failing(&self, why: Option<&str>) {
        self.lock().failing = why.map(str::to_owned);
    }

    /// Overwrites a stored value in place, durable and visible, bypassing every check (corruption tests).
    pub fn corrupt(&self, cf: Cf, key: &[u8], value: Bytes) {
        let mut s = self.lock();
        s.visible[cf.index()].insert(key.to_vec(), value.clone());
        s.durable[cf.index()].insert(key.to_vec(), value);
    }
}

impl Engine for MemEngine {
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut s = self.lock();
        Self::check(&s)?;
        apply(&mut s.visible, &batch);
        s.unsynced.push(batch);
        Ok(())
    }

    fn sync_wal(&self) -> Result<(), EngineError> {
        let mut s = self.lock();
        while s.sync_paused {
            s = self.sync_resumed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Self::check(&s)?;
        let pending = std::mem::take(&mut s.unsynced);
        for batch in &pending {
            apply(&mut s.durable, batch);
        }
        s.syncs += 1;
        Ok(())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Bytes>, EngineError> {
        let s = self.lock();
        Self::check(&s)?;
        Ok(s.visible[cf.index()].get(key).cloned())
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        // Copy the range out first so `visit` may call back into the engine.
        let pairs: Vec<(Vec<u8>, Bytes)> = {
            let s = self.lock();
            Self::check(&s)?;
            s.visible[cf.index()]
                .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in pairs {
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last_in_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Bytes)>, EngineError> {
        let s = self.lock();
        Self::check(&s)?;
        Ok(s.visible[cf.index()]
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    /// Like RocksDB's `delete_file_in_range`: the range disappears at once and durably, outside WAL order.
    fn reclaim_range(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<(), EngineError> {
        let mut s = self.lock();
        Self::check(&s)?;
        let mut batch = WriteBatch::new();
        batch.delete_range(cf, from.to_vec(), to.to_vec());
        apply(&mut s.visible, &batch);
        apply(&mut s.durable, &batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_exactly_the_unsynced_writes() {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::Log, b"a".to_vec(), Bytes::from_static(b"1"));
        e.write(b).expect("write");
        e.sync_wal().expect("sync");
        let mut b = WriteBatch::new();
        b.put(Cf::Log, b"b".to_vec(), Bytes::from_static(b"2"));
        b.delete(Cf::Log, b"a".to_vec());
        e.write(b).expect("write");
        assert_eq!(e.get(Cf::Log, b"b").expect("get"), Some(Bytes::from_static(b"2")));
        e.crash();
        assert_eq!(e.get(Cf::Log, b"a").expect("get"), Some(Bytes::from_static(b"1")));
        assert_eq!(e.get(Cf::Log, b"b").expect("get"), None);
    }

    #[test]
    fn range_delete_and_reverse_seek() {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(Cf::Kv, vec![i], Bytes::from(vec![i]));
        }
        b.delete_range(Cf::Kv, vec![2], vec![5]);
        e.write(b).expect("write");
        let mut seen = vec![];
        e.scan(Cf::Kv, &[0], &[10], &mut |k, _| {
            seen.push(k[0]);
            true
        })
        .expect("scan");
        assert_eq!(seen, vec![0, 1, 5, 6, 7, 8, 9]);
        let last = e.last_in_range(Cf::Kv, &[0], &[5]).expect("seek");
        assert_eq!(last.map(|(k, _)| k), Some(vec![1]));
    }
}
