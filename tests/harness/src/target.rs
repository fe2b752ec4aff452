//! Where a run's cluster lives: the operations the workload and the nemesis need from a target.
//!
//! [`crate::local::LocalCluster`] runs broker processes on 127.0.0.x with a TCP proxy per Raft link;
//! [`crate::compose::ComposeCluster`] runs the `flotilla` image under docker-compose and cuts links with
//! iptables inside the containers' network namespaces (or in proxies on the host, for packet faults).
//! Both take data directories and clocks from [`crate::host`].

use std::time::Duration;

use crate::history::NodeLogLine;
use crate::lazyfs::{DiskFaults, Lost};
use crate::proxy::PacketFaults;
use crate::scenario::DataDir;

/// What a run needs of every node besides the broker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// What each node's data directory is.
    pub data_dir: DataDir,
    /// Every broker runs under libfaketime, its wall clock set through `set_clock` (S8).
    pub fake_clocks: bool,
    /// Raft links run through proxies that can delay and lose what crosses them (S7). The local target's
    /// links always do.
    pub packet_faults: bool,
}

pub trait Target: Send {
    /// `local` or `compose`.
    fn name(&self) -> &'static str;
    fn ids(&self) -> Vec<u64>;
    /// The client address of node `id`.
    fn addr(&self, id: u64) -> Option<String>;
    fn bootstrap(&self) -> Vec<String> {
        self.ids().into_iter().filter_map(|id| self.addr(id)).collect()
    }
    /// kill -9 (SIGKILL), the node stays down.
    fn kill(&mut self, id: u64) -> anyhow::Result<()>;
    /// SIGTERM, then SIGKILL if it has not stopped within `grace`.
    fn terminate(&mut self, id: u64, grace: Duration) -> anyhow::Result<()>;
    /// Starts a node that is down, with its data.
    fn start_node(&mut self, id: u64) -> anyhow::Result<()>;
    /// SIGSTOP (true) or SIGCONT (false).
    fn set_paused(&mut self, id: u64, paused: bool) -> anyhow::Result<()>;
    /// Cuts (true) or heals the Raft link `from` -> `to`: the connections `from` dials to `to`.
    fn set_cut(&mut self, from: u64, to: u64, cut: bool) -> anyhow::Result<()>;
    /// Delays and loses the Raft traffic `from` -> `to` (S7); `PacketFaults::default()` clears the link.
    fn set_packet_faults(&mut self, from: u64, to: u64, faults: PacketFaults) -> anyhow::Result<()>;
    /// Sets node `id`'s wall clock `offset` seconds off the machine's; 0 puts it right (S8). Only the wall
    /// clock moves, as when an operator or NTP steps a machine's clock; its monotonic clock does not.
    fn set_clock(&mut self, id: u64, offset: f64) -> anyhow::Result<()>;
    /// Flips node `id`'s wall clock between `offset` and right every `period`, until `set_clock`.
    fn strobe_clock(&mut self, id: u64, offset: f64, period: Duration) -> anyhow::Result<()>;
    /// Fills node `id`'s data volume until only `leave` bytes are free (S14).
    fn fill_disk(&mut self, id: u64, leave: u64) -> anyhow::Result<()>;
    /// Makes node `id`'s disk fail or slow down (S14).
    fn set_disk_faults(&mut self, id: u64, faults: DiskFaults) -> anyhow::Result<()>;
    /// Undoes `fill_disk` and `set_disk_faults`, then starts the node if it is down: a stop on a storage
    /// failure since the fault is expected, any other exit is reported as unexpected.
    fn heal_disk(&mut self, id: u64) -> anyhow::Result<()>;
    /// Drops every write node `id` has not fsynced, as a power loss would (S9). The node must be down.
    fn lose_unfsynced(&mut self, id: u64) -> anyhow::Result<Lost>;
    /// Heals every link, continues every paused node and starts every stopped one.
    fn heal_all(&mut self) -> anyhow::Result<()>;
    /// Stops every node and releases what the target made.
    fn stop_all(&mut self);
    /// Lines of the node logs that report a panic or a failed assertion, and nodes that exited on their own.
    fn panic_lines(&self) -> Vec<NodeLogLine>;
}

/// The log lines that report a panic or a failed assertion.
pub fn panics_in(node: u64, text: &str) -> impl Iterator<Item = NodeLogLine> + '_ {
    text.lines()
        .filter(|l| l.contains("panicked at") || l.contains("assertion failed"))
        .map(move |l| NodeLogLine { node, line: l.chars().take(400).collect() })
}
