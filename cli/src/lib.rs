//! The Flotilla client library: metadata cache, routing to partition leaders, retries with backoff.
//! The CLI, the tests, the failover harness and the benchmark use it.
//!
//! # Layout
//! - [`client`]: the `Client` type.
//! - [`bench`]: the load generators behind `flotilla bench`.
//! - [`failover`]: B10, failover under load on a private cluster it starts and kills.
//! - [`broker_binary`]: where the `flotilla-broker` binary is, for `flotilla dev` and the harness;
//!   [`spawn_broker`] starts one node of a local cluster with it, on a port from [`unused_port`], with
//!   [`worker_threads_per_broker`] threads when its brokers share the machine.
pub mod bench;
pub mod client;
pub mod failover;

/// The `flotilla-broker` binary: beside the running executable (as Cargo and the image place it), else on
/// `PATH`.
pub fn broker_binary() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let beside = exe.with_file_name("flotilla-broker");
    if beside.exists() {
        return Ok(beside);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("flotilla-broker");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    anyhow::bail!("flotilla-broker was not found next to {} or on PATH", exe.display())
}

/// The worker threads each of `brokers` brokers on this machine gets: the machine's cores shared out, at
/// least one each. Every broker defaults to one thread per core, so three of them on two cores run six
/// threads that wake one another for every Raft round. With one each (same-sitting runs) the brokers spent
/// 2-10% less CPU per message and B2 went 66-68 k -> 75 k msgs/s, but fixed-rate tails got longer (B6-20k
/// p99 10-15 ms vs 7-9 ms) while RocksDB's flushes ran at normal priority and could preempt a broker's one
/// thread; with them at nice 19 the tails are alike (B6-20k p99 4.7-5.1 ms vs 4.9-5.3 ms) and one thread
/// keeps a small edge in B2 and B7 (CPU per message and B7's p99.9, 18 ms vs 33-45 ms).
pub fn worker_threads_per_broker(brokers: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    shared_cores(cores, brokers)
}

fn shared_cores(cores: usize, brokers: u64) -> usize {
    (cores / usize::try_from(brokers.max(1)).unwrap_or(usize::MAX)).max(1)
}

/// Starts node `id` of a local cluster from the `broker` binary: data in `data_dir/node-ID`, listening on
/// `listen`, running `worker_threads` threads, output appended to `log`. The process is killed if its
/// handle is dropped. For `flotilla dev` and B10.
#[allow(clippy::too_many_arguments)]
pub fn spawn_broker(
    broker: &std::path::Path,
    id: u64,
    data_dir: &std::path::Path,
    listen: &str,
    initial_cluster: &str,
    metrics_listen: Option<&str>,
    worker_threads: usize,
    log: std::fs::File,
) -> anyhow::Result<tokio::process::Child> {
    use anyhow::Context;
    let mut command = tokio::process::Command::new(broker);
    if let Some(addr) = metrics_listen {
        command.arg("--metrics-listen").arg(addr);
    }
    command.arg("--worker-threads").arg(worker_threads.to_string());
    command
        .arg("--node-id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(data_dir.join(format!("node-{id}")))
        .arg("--listen")
        .arg(listen)
        .arg("--initial-cluster")
        .arg(initial_cluster)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", broker.display()))
}

/// A port on `ip` that nothing listens on now, for a broker about to be started. Ports come from below
/// Linux's ephemeral range (32768-60999): a port the kernel handed out for `bind(0)` is also one it may
/// hand out as the local end of any outgoing connection in the meantime (brokers open many), and the
/// broker then fails to bind it. Each process walks its own stretch of 20000-32767 from a pid-derived
/// start, so concurrent tests and runs rarely even try the same port.
pub fn unused_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(397) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(std::net::SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on {ip} between {LOW} and {}", LOW + SPAN - 1)
}

#[cfg(test)]
mod tests {
    use super::shared_cores;

    #[test]
    fn brokers_sharing_a_machine_share_its_cores_and_get_at_least_one_each() {
        assert_eq!(shared_cores(2, 3), 1);
        assert_eq!(shared_cores(8, 3), 2);
        assert_eq!(shared_cores(16, 5), 3);
        assert_eq!(shared_cores(4, 1), 4);
        assert_eq!(shared_cores(1, 3), 1);
        assert_eq!(shared_cores(4, 0), 4);
    }
}
