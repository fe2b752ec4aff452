//! Where a run's cluster lives: the operations the workload and the nemesis need from a target.
//!
//! [`crate::local::LocalCluster`] runs broker processes on 127.0.0.x with a TCP proxy per Raft link;
//! [`crate::compose::ComposeCluster`] runs the `flotilla` image under docker-compose and cuts links with
//! iptables inside the containers' network namespaces.

use std::time::Duration;

use crate::history::NodeLogLine;
use crate::lazyfs::Lost;
use crate::proxy::PacketFaults;

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
    fn set_packet_faults(&mut self, from: u64, to: u64, _faults: PacketFaults) -> anyhow::Result<()> {
        anyhow::bail!(
            "the {} target cannot delay or lose packets on {from}->{to}: this kernel has no tc netem \
             (S7 runs on the local target)",
            self.name()
        )
    }
    /// Sets node `id`'s wall clock `offset` seconds off the machine's; 0 puts it right (S8). Only the wall
    /// clock moves, as when an operator or NTP steps a machine's clock; its monotonic clock does not.
    fn set_clock(&mut self, id: u64, _offset: f64) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot set node {id}'s clock (S8 runs on the local target)", self.name())
    }
    /// Flips node `id`'s wall clock between `offset` and right every `period`, until `set_clock`.
    fn strobe_clock(&mut self, id: u64, _offset: f64, _period: Duration) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot strobe node {id}'s clock (S8 runs on the local target)", self.name())
    }
    /// Fills node `id`'s data volume until only `leave` bytes are free (S14).
    fn fill_disk(&mut self, id: u64, _leave: u64) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot fill node {id}'s disk (S14 runs on the local target)", self.name())
    }
    /// Frees what `fill_disk` took and starts the node again if the full disk stopped it.
    fn free_disk(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot free node {id}'s disk", self.name())
    }
    /// Drops every write node `id` has not fsynced, as a power loss would (S9). The node must be down.
    fn lose_unfsynced(&mut self, id: u64) -> anyhow::Result<Lost> {
        anyhow::bail!(
            "the {} target cannot drop node {id}'s unfsynced writes (S9 runs on the local target)",
            self.name()
        )
    }
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
