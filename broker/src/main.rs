//! `flotilla-broker`: runs one broker node. Settings come from flags, then `FLOTILLA_*` environment
//! variables, then the TOML file given by `--config`, in that order of precedence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use flotilla_broker::broker::{BrokerConfig, parse_initial_cluster, parse_node_addrs};
use flotilla_broker::disk::MIN_FREE_DEFAULT;
use flotilla_broker::memory::{MEMORY_BUDGET_DEFAULT, MemoryPlan, parse_bytes};
use flotilla_raft_store::node::RaftTiming;

#[derive(Parser, Debug)]
#[command(name = "flotilla-broker", version, about = "A Flotilla broker node")]
struct Args {
    /// A TOML file with any of: node_id, data_dir, listen, initial_cluster, log_format, metrics_listen,
    /// raft_peer_routes, memory_budget, retention_check_interval_ms, min_free_bytes, worker_threads,
    /// background_write_rate.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (>= 1, listed in --initial-cluster, never reused).
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    node_id: Option<u64>,
    /// Where this node keeps its data.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address serving clients, admin and Raft.
    #[arg(long, env = "FLOTILLA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Every initial node: ID=HOST:PORT,...
    #[arg(long, env = "FLOTILLA_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT")]
    log_format: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "FLOTILLA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Dial these peers' Raft traffic at other addresses (a proxy, a NAT): ID=HOST:PORT,... Clients and
    /// request forwarding still use the initial cluster's addresses.
    #[arg(long, env = "FLOTILLA_RAFT_PEER_ROUTES")]
    raft_peer_routes: Option<String>,
    /// Memory for memtables, caches and produce requests in flight, e.g. 512MiB or 2GiB (default 1GiB;
    /// resident memory stays near it under sustained load).
    #[arg(long, env = "FLOTILLA_MEMORY_BUDGET")]
    memory_budget: Option<String>,
    /// How often retention (retention.ms, retention.bytes) runs, in milliseconds (default 30000).
    #[arg(long, env = "FLOTILLA_RETENTION_CHECK_INTERVAL_MS")]
    retention_check_interval_ms: Option<u64>,
    /// Refuse produce requests while the data volume has less free space than this, e.g. 1GiB
    /// (default 256MiB): a full disk stops a node's Raft groups until it restarts.
    #[arg(long, env = "FLOTILLA_MIN_FREE_BYTES")]
    min_free_bytes: Option<String>,
    /// Threads that run the broker's tasks (default: one per core, or TOKIO_WORKER_THREADS). Brokers
    /// sharing a machine each want a share of its cores, not all of them (`flotilla dev` divides them).
    #[arg(long, env = "FLOTILLA_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Cap on what memtable flushes and compactions write per second, e.g. 32MiB (default: none). On a
    /// disk with throttled throughput their bursts make every acknowledgement wait; keep the cap below
    /// what the disk sustains beside the WAL and above what the produce load needs flushed.
    #[arg(long, env = "FLOTILLA_BACKGROUND_WRITE_RATE")]
    background_write_rate: Option<String>,
}

/// The `--config` file.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    initial_cluster: Option<String>,
    log_format: Option<String>,
    metrics_listen: Option<SocketAddr>,
    raft_peer_routes: Option<String>,
    memory_budget: Option<String>,
    retention_check_interval_ms: Option<u64>,
    min_free_bytes: Option<String>,
    worker_threads: Option<usize>,
    background_write_rate: Option<String>,
}

/// mimalloc instead of glibc's malloc: a broker allocates and frees small buffers on every request and
/// every Raft message, from many tokio tasks on a few threads, which its per-thread free lists suit.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file: FileConfig = match &args.config {
        None => FileConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?
        }
    };
    let log_format = args.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
    flotilla_broker::logging::init(&log_format)?;
    let missing = |what: &str| {
        format!("--{what} is required (or FLOTILLA_{}, or {what} in --config)", what.to_uppercase().replace('-', "_"))
    };
    let config = BrokerConfig {
        node_id: args.node_id.or(file.node_id).with_context(|| missing("node-id"))?,
        data_dir: args.data_dir.or(file.data_dir).with_context(|| missing("data-dir"))?,
        listen: args.listen.or(file.listen).with_context(|| missing("listen"))?,
        initial_cluster: parse_initial_cluster(
            &args.initial_cluster.or(file.initial_cluster).with_context(|| missing("initial-cluster"))?,
        )?,
        timing: RaftTiming::default(),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        raft_peer_routes: match args.raft_peer_routes.or(file.raft_peer_routes) {
            Some(routes) => parse_node_addrs(&routes, "--raft-peer-routes")?,
            None => Default::default(),
        },
        memory: MemoryPlan::new(match args.memory_budget.or(file.memory_budget) {
            Some(size) => parse_bytes(&size).context("--memory-budget")?,
            None => MEMORY_BUDGET_DEFAULT,
        })?,
        retention_check_interval: Duration::from_millis(
            match args.retention_check_interval_ms.or(file.retention_check_interval_ms) {
                Some(0) => anyhow::bail!("--retention-check-interval-ms must be positive"),
                Some(ms) => ms,
                None => 30_000,
            },
        ),
        min_free_bytes: match args.min_free_bytes.or(file.min_free_bytes) {
            Some(size) => parse_bytes(&size).context("--min-free-bytes")?,
            None => MIN_FREE_DEFAULT,
        },
        background_write_rate: match args.background_write_rate.or(file.background_write_rate) {
            Some(rate) => match parse_bytes(&rate).context("--background-write-rate")? {
                0 => anyhow::bail!("--background-write-rate must be positive (leave it out for no cap)"),
                bytes => Some(bytes),
            },
            None => None,
        },
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    match args.worker_threads.or(file.worker_threads) {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        Some(n) => {
            runtime.worker_threads(n);
        }
        None => {}
    }
    let runtime = runtime.enable_all().build()?;
    tracing::info!(node = config.node_id, "tokio worker threads: {}", runtime.metrics().num_workers());
    let result = runtime.block_on(flotilla_broker::server::run(config, shutdown_signal()));
    // After a storage failure a blocking task may still be stuck in the store: do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
