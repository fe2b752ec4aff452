//! The broker's memory budget (`--memory-budget`) and how it is split.
//!
//! The budget caps what grows with load and with the number of partitions: RocksDB's memtables (one
//! write-buffer cap for all column families), its one shared block cache, the decoded tail caches of all
//! Raft groups together, and the produce requests in flight (queued on a proposer or in Raft, not yet
//! acknowledged). A produce waits for its bytes; one that cannot get them within the produce timeout is
//! refused with `THROTTLED` before anything is written. The rest of the budget is headroom for what is not
//! counted: the runtime, connection buffers, fetch responses being sent, allocator slack.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A budget below this cannot hold a useful cache and a few in-flight megabyte-sized batches.
pub const MEMORY_BUDGET_MIN: u64 = 128 << 20;
/// The default budget.
pub const MEMORY_BUDGET_DEFAULT: u64 = 1 << 30;

/// How a budget is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub budget: u64,
    /// RocksDB memtables, all column families together.
    pub write_buffers: usize,
    /// RocksDB's block cache, shared by every column family.
    pub block_cache: usize,
    /// Decoded Raft log tails of all groups together.
    pub tail_cache: usize,
    /// Produce request bytes accepted and not yet acknowledged.
    pub produce_in_flight: usize,
}

impl MemoryPlan {
    /// A quarter to memtables, an eighth each to the block cache, the tail caches and produce requests in
    /// flight; three eighths stay free for what is not counted.
    pub fn new(budget: u64) -> anyhow::Result<Self> {
        if budget < MEMORY_BUDGET_MIN {
            bail!("a memory budget of {} is below the minimum of {}", human(budget), human(MEMORY_BUDGET_MIN));
        }
        let part = |n: u64| usize::try_from(budget / n).unwrap_or(usize::MAX);
        Ok(Self {
            budget,
            write_buffers: part(4),
            block_cache: part(8),
            tail_cache: part(8),
            produce_in_flight: part(8),
        })
    }
}

/// Parses a byte size: a number with an optional unit (`K`, `KiB`, `M`, `MiB`, `G`, `GiB`; all binary).
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().with_context(|| format!("{s:?} is not a size like 512MiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => bail!("unknown size unit {other:?} in {s:?}; use KiB, MiB or GiB"),
    };
    number.checked_mul(1 << shift).with_context(|| format!("{s:?} is too large"))
}

fn human(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Permits are kibibytes, so any budget fits a `u32` count per request.
const PERMIT_BYTES: usize = 1024;

/// The produce bytes in flight, as semaphore permits.
pub struct ProduceMemory {
    permits: Arc<Semaphore>,
    total: u32,
}

impl ProduceMemory {
    pub fn new(bytes: usize) -> Self {
        let total = u32::try_from(bytes / PERMIT_BYTES).unwrap_or(u32::MAX).max(1);
        Self { permits: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// Waits up to `wait` for room for a request of `bytes`. A request larger than the whole allowance
    /// waits for all of it, so it runs alone rather than never.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Option<OwnedSemaphorePermit> {
        let want = u32::try_from(bytes.div_ceil(PERMIT_BYTES)).unwrap_or(u32::MAX).clamp(1, self.total);
        // Without a timer when the bytes are free. This cannot pass a waiter: released permits go to the
        // queued waiters first, so none are free while one waits.
        if let Ok(permit) = self.permits.clone().try_acquire_many_owned(want) {
            return Some(permit);
        }
        tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(want)).await.ok()?.ok()
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        (self.total as usize - self.permits.available_permits()) * PERMIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("1024").expect("plain"), 1024);
        assert_eq!(parse_bytes("512MiB").expect("MiB"), 512 << 20);
        assert_eq!(parse_bytes("2g").expect("g"), 2 << 30);
        assert_eq!(parse_bytes(" 64 KiB ").expect("spaces"), 64 << 10);
        assert!(parse_bytes("lots").expect_err("no number").to_string().contains("not a size"));
        assert!(parse_bytes("5 parsecs").expect_err("unit").to_string().contains("unknown size unit"));
        assert!(parse_bytes("99999999999TiB").expect_err("overflow").to_string().contains("too large"));
    }

    #[test]
    fn the_plan_splits_the_budget_and_refuses_a_tiny_one() {
        let plan = MemoryPlan::new(1 << 30).expect("1 GiB");
        assert_eq!(plan.write_buffers, 256 << 20);
        assert_eq!(plan.block_cache + plan.tail_cache + plan.produce_in_flight, 384 << 20);
        let counted = plan.write_buffers + plan.block_cache + plan.tail_cache + plan.produce_in_flight;
        assert!(counted as u64 <= plan.budget * 5 / 8);
        assert!(MemoryPlan::new(1 << 20).expect_err("too small").to_string().contains("below the minimum"));
    }

    #[tokio::test]
    async fn produce_memory_makes_requests_wait_and_gives_up_after_the_wait() {
        let memory = ProduceMemory::new(64 << 10);
        let first = memory.reserve(40 << 10, Duration::from_secs(1)).await.expect("room");
        assert_eq!(memory.in_use(), 40 << 10);
        assert!(memory.reserve(40 << 10, Duration::from_millis(20)).await.is_none(), "no room until released");
        drop(first);
        assert!(memory.reserve(40 << 10, Duration::from_secs(1)).await.is_some(), "room again");
        // Larger than everything: waits for all of it instead of forever.
        assert!(memory.reserve(1 << 20, Duration::from_secs(1)).await.is_some());
    }
}
