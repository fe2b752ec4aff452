//! Where a run's cluster lives: the operations the workload and the nemesis need from a target.
//!
//! [`crate::local::LocalCluster`] runs broker processes on 127.0.0.x with a TCP proxy per Raft link;
//! [`crate::compose::ComposeCluster`] runs the `flotilla` image under docker-compose and cuts links with
//! iptables inside the containers' network namespaces.

use std::time::Duration;

use crate::history::NodeLogLine;

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
    /// Fills node `id`'s data volume until only `leave` bytes are free (S14).
    fn fill_disk(&mut self, id: u64, _leave: u64) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot fill node {id}'s disk (S14 runs on the local target)", self.name())
    }
    /// Frees what `fill_disk` took and starts the node again if the full disk stopped it.
    fn free_disk(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::bail!("the {} target cannot free node {id}'s disk", self.name())
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
