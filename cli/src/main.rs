//! `flotilla`: the command-line interface of a Flotilla cluster.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_cli::bench::Brokers;
use flotilla_cli::client::{Client, WAIT_NOTICE_AFTER};
use flotilla_proto::broker as pb;
use serde_json::json;

/// `println!` that hands back the write's error instead of panicking: when the reader of our output goes
/// away (`| head`, `| grep -q`), the command ends through `main`, which exits quietly on a broken pipe.
macro_rules! out {
    ($($arg:tt)*) => { writeln!(std::io::stdout(), $($arg)*) };
}

#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about = "Manage and use a Flotilla cluster")]
struct Cli {
    /// Brokers to reach the cluster through: HOST:PORT[,...]
    #[arg(long, global = true, env = "FLOTILLA_BOOTSTRAP", default_value = "127.0.0.1:9401")]
    bootstrap: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local cluster of broker processes in the foreground (Ctrl-C stops it; data is kept).
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value = "./flotilla-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 9401)]
        base_port: u16,
        /// Serve each broker's Prometheus metrics on 127.0.0.1 from this port up (one port per broker).
        #[arg(long)]
        metrics_base_port: Option<u16>,
        /// Worker threads per broker (default: this machine's cores divided among the brokers, at least 1).
        #[arg(long)]
        worker_threads: Option<usize>,
    },
    /// Cluster-wide views.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Manage topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce VALUE, or one record per line of standard input.
    Produce {
        topic: String,
        value: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        partition: Option<u32>,
        /// A record header k=v (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Produce a tombstone (no value).
        #[arg(long)]
        null: bool,
    },
    /// Measure throughput and latency (figures are printed, never asserted).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Print records.
    Consume {
        topic: String,
        #[arg(long)]
        partition: Option<u32>,
        /// earliest, latest, an offset, or @TIMESTAMP_MS.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<u64>,
        /// Keep waiting for new records.
        #[arg(long)]
        follow: bool,
    },
}

/// Options shared by the writing benchmarks.
#[derive(clap::Args, Debug)]
struct LoadArgs {
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of the topic if it has to be created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Requests (batches) outstanding per producer.
    #[arg(long, default_value_t = 1)]
    in_flight: u32,
    /// Bytes per request (a batching producer); default one record per request.
    #[arg(long)]
    batch_bytes: Option<usize>,
    /// Batching producer: send a batch when it is full or its first record has waited this long.
    #[arg(long)]
    linger_ms: Option<f64>,
    /// Fixed aggregate records per second (latency from the intended send time).
    #[arg(long)]
    rate: Option<u64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

impl LoadArgs {
    fn bench(self) -> anyhow::Result<flotilla_cli::bench::ProduceBench> {
        if self.message_bytes == 0 || self.producers == 0 || self.in_flight == 0 || self.duration == 0 {
            bail!("--message-bytes, --producers, --in-flight and --duration must be positive");
        }
        let linger = match self.linger_ms {
            Some(ms) if !(ms >= 0.0 && ms.is_finite()) => bail!("--linger-ms must be zero or more"),
            Some(ms) => Some(Duration::from_secs_f64(ms / 1000.0)),
            None => None,
        };
        let default_batch = if linger.is_some() { 64 * 1024 } else { self.message_bytes };
        let records_per_request = (self.batch_bytes.unwrap_or(default_batch) / self.message_bytes).max(1) as u32;
        Ok(flotilla_cli::bench::ProduceBench {
            topic: self.topic,
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            message_bytes: self.message_bytes,
            producers: self.producers,
            in_flight: self.in_flight,
            records_per_request,
            linger,
            rate: self.rate,
            duration: Duration::from_secs(self.duration),
            warmup: Duration::from_secs(self.warmup),
        })
    }
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Produce load: records of --message-bytes, --producers x --in-flight requests outstanding.
    Produce {
        #[command(flatten)]
        load: LoadArgs,
        /// The data directory of a `flotilla dev` cluster, to report its brokers' CPU and memory.
        #[arg(long, default_value = "./flotilla-data")]
        dev_data_dir: PathBuf,
    },
    /// Read a topic from its start to the high watermark it had when the run began.
    Consume {
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Bytes per fetch.
        #[arg(long, default_value_t = 1 << 20)]
        fetch_bytes: u32,
        /// Stop after this many seconds even if the end was not reached.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value = "./flotilla-data")]
        dev_data_dir: PathBuf,
    },
    /// Run a shape of BENCH.md (B1-B8, B2-batch, B6-5k, B6-20k, B7-3, B7-64, B7-batch, B10) --runs times on fresh topics;
    /// print each run and a Markdown row with the ranges (for docs/BENCHMARKS.md).
    Scenario {
        id: String,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Measured seconds per run (for B8: seconds spent filling the log).
        #[arg(long, default_value_t = 15)]
        duration: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value = "./flotilla-data")]
        dev_data_dir: PathBuf,
    },
    /// Produce-to-consume latency at a fixed --rate (default 1000 msgs/s), one subscription per partition.
    E2e {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value = "./flotilla-data")]
        dev_data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Nodes, controller leader and leaderships.
    Status,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
        /// A topic config k=v (repeatable): retention.ms, retention.bytes, max.message.bytes, cleanup.policy.
        #[arg(long = "config")]
        configs: Vec<String>,
    },
    List,
    Describe {
        name: String,
    },
    Delete {
        name: String,
    },
}

/// A client of the cluster at `bootstrap` that says on stderr, once, why a request is still retrying
/// after [`WAIT_NOTICE_AFTER`] (brokers down, a wrong address): a request retries for 30 s.
fn cluster_client(bootstrap: Vec<String>) -> Client {
    Client::new(bootstrap).with_wait_notice(
        WAIT_NOTICE_AFTER,
        std::sync::Arc::new(|e, left| {
            eprintln!("waiting for the cluster: {e} (retrying for up to {} s more)", left.as_secs_f64().ceil())
        }),
    )
}

fn key_value(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s.split_once('=').with_context(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn text(b: &Option<Bytes>) -> serde_json::Value {
    match b {
        None => serde_json::Value::Null,
        Some(b) => json!(String::from_utf8_lossy(b)),
    }
}

fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    json!({
        "name": t.name,
        "topic_id": t.topic_id,
        "replication_factor": t.replication_factor,
        "configs": t.configs.iter().map(|c| (c.key.clone(), json!(c.value))).collect::<serde_json::Map<_, _>>(),
        "partitions": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader": p.leader,
            "replicas": p.replicas,
            "in_sync": p.in_sync,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
        })).collect::<Vec<_>>(),
    })
}

fn print_topic(t: &pb::TopicInfo, output: Output) -> std::io::Result<()> {
    match output {
        Output::Json => out!("{}", topic_json(t))?,
        Output::Table => {
            let configs: Vec<String> = t.configs.iter().map(|c| format!("{}={}", c.key, c.value)).collect();
            out!(
                "topic {} (id {}, replication factor {}) {}",
                t.name,
                t.topic_id,
                t.replication_factor,
                configs.join(" ")
            )?;
            out!(
                "{:>9}  {:>6}  {:<12}  {:<12}  {:>10}  {:>14}",
                "PARTITION",
                "LEADER",
                "REPLICAS",
                "IN-SYNC",
                "START",
                "HIGH-WATERMARK"
            )?;
            for p in &t.partitions {
                let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                let leader = if p.leader == 0 { "-".to_owned() } else { p.leader.to_string() };
                out!(
                    "{:>9}  {:>6}  {:<12}  {:<12}  {:>10}  {:>14}",
                    p.partition,
                    leader,
                    list(&p.replicas),
                    list(&p.in_sync),
                    p.log_start_offset,
                    p.high_watermark
                )?;
            }
        }
    }
    Ok(())
}

/// Prints one record. A closed stdout (`flotilla consume ... | head`) is an error the caller stops on.
fn print_record(partition: u32, r: &pb::FetchedRecord, output: Output) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            let headers: serde_json::Map<String, serde_json::Value> =
                r.headers.iter().map(|h| (h.key.clone(), text(&h.value))).collect();
            writeln!(
                out,
                "{}",
                json!({
                    "partition": partition,
                    "offset": r.offset,
                    "timestamp_ms": r.timestamp_ms,
                    "key": text(&r.key),
                    "value": text(&r.value),
                    "headers": headers,
                })
            )
        }
        Output::Table => {
            let show =
                |b: &Option<Bytes>| b.as_ref().map_or("null".to_owned(), |b| String::from_utf8_lossy(b).into_owned());
            let headers: Vec<String> = r.headers.iter().map(|h| format!("{}={}", h.key, show(&h.value))).collect();
            writeln!(
                out,
                "{partition}\t{}\t{}\t{}\t{}\t{}",
                r.offset,
                r.timestamp_ms,
                show(&r.key),
                show(&r.value),
                headers.join(",")
            )
        }
    }
}

async fn consume(
    client: &Client,
    topic: &str,
    partition: Option<u32>,
    from: &str,
    max: Option<u64>,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    let info = client.describe_topic(topic).await?;
    let partitions: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => (0..info.partitions.len() as u32).collect(),
    };
    let mut next = Vec::with_capacity(partitions.len());
    for p in &partitions {
        let offset = match from {
            "earliest" => client.list_offsets(topic, *p, pb::OffsetSpec::Earliest, 0).await?,
            "latest" => client.list_offsets(topic, *p, pb::OffsetSpec::Latest, 0).await?,
            ts if ts.starts_with('@') => {
                let ts: i64 = ts[1..].parse().with_context(|| format!("bad timestamp {ts:?}"))?;
                client.list_offsets(topic, *p, pb::OffsetSpec::Timestamp, ts).await?
            }
            offset => offset
                .parse()
                .with_context(|| format!("--from {offset:?}: expected earliest, latest, an offset or @TIMESTAMP_MS"))?,
        };
        next.push(offset);
    }
    let mut printed = 0u64;
    if follow && partitions.len() == 1 {
        // One partition: let its leader push records as they commit.
        let p = partitions[0];
        let mut next = next[0];
        loop {
            let mut stream = client.subscribe(topic, p, next).await?;
            // The stream ends, or fails, when leadership moves: subscribe again from `next`.
            while let Ok(Some(resp)) = stream.message().await {
                for r in &resp.records {
                    print_record(p, r, output)?;
                    next = r.offset + 1;
                    printed += 1;
                    if max.is_some_and(|m| printed >= m) {
                        return Ok(());
                    }
                }
                let _ = std::io::stdout().lock().flush();
            }
        }
    }
    let stdout = std::io::stdout();
    loop {
        let mut caught_up = true;
        for (i, p) in partitions.iter().enumerate() {
            let wait = if follow && partitions.len() == 1 { 1000 } else { 0 };
            let resp = client.fetch(topic, *p, next[i], 1 << 20, wait).await?;
            for r in &resp.records {
                print_record(*p, r, output)?;
                next[i] = r.offset + 1;
                printed += 1;
                if max.is_some_and(|m| printed >= m) {
                    return Ok(());
                }
            }
            if next[i] < resp.high_watermark {
                caught_up = false;
            }
        }
        let _ = stdout.lock().flush();
        if caught_up {
            if !follow {
                return Ok(());
            }
            if partitions.len() > 1 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn dev(
    nodes: u64,
    data_dir: &Path,
    base_port: u16,
    metrics_base_port: Option<u16>,
    worker_threads: Option<usize>,
) -> anyhow::Result<()> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let worker_threads = match worker_threads {
        Some(0) => bail!("--worker-threads must be at least 1"),
        Some(n) => n,
        None => flotilla_cli::worker_threads_per_broker(nodes),
    };
    let ports = |base: u16, what: &str| -> anyhow::Result<Vec<String>> {
        if u64::from(base).saturating_add(nodes - 1) > u64::from(u16::MAX) {
            bail!("{what} {base} leaves no room for {nodes} brokers below port 65536");
        }
        Ok((0..nodes).map(|i| format!("127.0.0.1:{}", u64::from(base) + i)).collect())
    };
    if let Some(metrics) = metrics_base_port
        && u64::from(metrics.abs_diff(base_port)) < nodes
    {
        bail!(
            "--metrics-base-port {metrics} overlaps the brokers' ports from --base-port {base_port} ({nodes} brokers)"
        );
    }
    let broker = flotilla_cli::broker_binary()?;
    let addrs = ports(base_port, "--base-port")?;
    let metrics = metrics_base_port.map(|base| ports(base, "--metrics-base-port")).transpose()?;
    let initial: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    let mut children = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        let log = std::fs::File::create(data_dir.join(format!("node-{id}.log")))?;
        let metrics_listen = metrics.as_ref().map(|m| m[i].as_str());
        children.push(flotilla_cli::spawn_broker(
            &broker,
            id,
            data_dir,
            addr,
            &initial.join(","),
            metrics_listen,
            worker_threads,
            log,
        )?);
    }
    let pids: Vec<String> = children.iter().filter_map(|c| c.id()).map(|p| p.to_string()).collect();
    let pids_file = data_dir.join(flotilla_cli::bench::DEV_PIDS_FILE);
    std::fs::write(&pids_file, pids.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", pids_file.display()))?;
    out!(
        "flotilla dev: {nodes} brokers running, {worker_threads} worker thread(s) each; logs and data in {}",
        data_dir.display()
    )?;
    out!("bootstrap: {}", addrs.join(","))?;
    if let Some(metrics) = &metrics {
        let urls: Vec<String> = metrics.iter().map(|m| format!("http://{m}/metrics")).collect();
        out!("metrics: {}", urls.join(" "))?;
    }
    out!("try: flotilla --bootstrap {} cluster status", addrs[0])?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let exited = async {
        loop {
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    return (i + 1, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        (id, status) = exited => Some((id, status)),
    };
    for c in &children {
        if let Some(pid) = c.id() {
            // SIGTERM lets each broker stop its groups cleanly.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    let _ = std::fs::remove_file(&pids_file);
    if let Some((id, status)) = failed {
        bail!("broker {id} exited ({status}); see {}", data_dir.join(format!("node-{id}.log")).display());
    }
    Ok(())
}

/// `flotilla bench scenario`: `runs` runs of one shape, each on a fresh topic deleted afterwards.
async fn bench_scenario(
    bootstrap: Vec<String>,
    id: &str,
    runs: u32,
    duration: u64,
    warmup: u64,
    dev_data_dir: &Path,
    output: Output,
) -> anyhow::Result<()> {
    use flotilla_cli::bench::{self, Scenario};
    if runs == 0 || duration == 0 {
        bail!("--runs and --duration must be positive");
    }
    let servers = Brokers::from_dev_dir(dev_data_dir);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut reports = Vec::new();
    let mut title = String::new();
    let mut failovers = Vec::new();
    let mut lost = 0u64;
    for run in 1..=runs {
        let topic = format!("bench-{}-{stamp}-{run}", id.to_ascii_lowercase());
        let (t, shape) = bench::scenario(id, &topic, Duration::from_secs(duration), Duration::from_secs(warmup))?;
        title = t.to_owned();
        let admin = cluster_client(bootstrap.clone());
        let report = match shape {
            Scenario::Failover => {
                let f = flotilla_cli::failover::run(Duration::from_secs(duration), Duration::from_secs(warmup)).await?;
                match output {
                    Output::Json => out!("{}", f.json())?,
                    Output::Table => out!("{id} run {run}: {}", f.line())?,
                }
                failovers.push((f.unavailable_ms, f.p999_after_kill_ms, f.p99_after_restart_ms));
                lost += f.lost;
                reports.push(f.load);
                continue;
            }
            Scenario::Produce { bench, leader_routing } => {
                let client = std::sync::Arc::new(cluster_client(bootstrap.clone()).with_leader_routing(leader_routing));
                bench::produce(client, bench, servers.as_ref()).await?
            }
            Scenario::CatchUp { fill, read } => {
                let client = std::sync::Arc::new(cluster_client(bootstrap.clone()));
                let filled = bench::produce(client.clone(), fill, None).await?;
                eprintln!("filled: {}", filled.line());
                bench::consume(client, read, servers.as_ref()).await?
            }
        };
        match output {
            Output::Json => out!("{}", report.json())?,
            Output::Table => out!("{id} run {run}: {}", report.line())?,
        }
        reports.push(report);
        if let Err(e) = admin.delete_topic(&topic).await {
            eprintln!("could not delete {topic}: {e}");
        }
    }
    if !failovers.is_empty() {
        let col = |f: &dyn Fn(&(f64, f64, f64)) -> f64, digits| {
            bench::range(&failovers.iter().map(f).collect::<Vec<_>>(), digits)
        };
        title = format!(
            "{title}; no ack for {} ms, p99.9 after the kill {} ms, p99 after the restart {} ms, {} acknowledged records lost",
            col(&|f| f.0, 0),
            col(&|f| f.1, 1),
            col(&|f| f.2, 1),
            lost
        );
    }
    if output == Output::Table {
        out!("{}", bench::markdown_row(&id.to_ascii_uppercase(), &title, &reports))?;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bootstrap: Vec<String> =
        cli.bootstrap.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if bootstrap.is_empty() {
        bail!("--bootstrap is empty");
    }
    let bootstrap_list = bootstrap.clone();
    let client = cluster_client(bootstrap);
    let output = cli.output;
    match cli.command {
        Command::Dev { nodes, data_dir, base_port, metrics_base_port, worker_threads } => {
            dev(nodes, &data_dir, base_port, metrics_base_port, worker_threads).await?
        }
        Command::Cluster { command: ClusterCommand::Status } => {
            let md = client.metadata().await?;
            match output {
                Output::Json => out!(
                    "{}",
                    json!({
                        "controller_leader": md.controller_leader,
                        "nodes": md.nodes.iter().map(|n| json!({"node_id": n.node_id, "addr": n.addr, "alive": n.alive, "lagging": n.lagging, "leaderships": n.leaderships})).collect::<Vec<_>>(),
                        "topics": md.topics.len(),
                    })
                )?,
                Output::Table => {
                    out!(
                        "controller leader: {}",
                        if md.controller_leader == 0 { "none".to_owned() } else { md.controller_leader.to_string() }
                    )?;
                    out!("{:>4}  {:<22}  {:<6}  {:<7}  {:>11}", "NODE", "ADDRESS", "ALIVE", "LAGGING", "LEADERSHIPS")?;
                    for n in &md.nodes {
                        out!(
                            "{:>4}  {:<22}  {:<6}  {:<7}  {:>11}",
                            n.node_id,
                            n.addr,
                            n.alive,
                            n.lagging,
                            n.leaderships
                        )?;
                    }
                }
            }
        }
        Command::Topic { command } => match command {
            TopicCommand::Create { name, partitions, replication_factor, configs } => {
                let configs = configs.iter().map(|c| key_value(c)).collect::<anyhow::Result<Vec<_>>>()?;
                let t = client.create_topic(&name, partitions, replication_factor, configs).await?;
                print_topic(&t, output)?;
            }
            TopicCommand::List => {
                for t in client.list_topics().await? {
                    match output {
                        Output::Json => out!("{}", topic_json(&t))?,
                        Output::Table => out!(
                            "{}\t{} partitions\treplication factor {}",
                            t.name,
                            t.partitions.len(),
                            t.replication_factor
                        )?,
                    }
                }
            }
            TopicCommand::Describe { name } => print_topic(&client.describe_topic(&name).await?, output)?,
            TopicCommand::Delete { name } => {
                client.delete_topic(&name).await?;
                out!("deleted topic {name}")?;
            }
        },
        Command::Produce { topic, value, key, partition, headers, null } => {
            let headers = headers
                .iter()
                .map(|h| key_value(h).map(|(k, v)| pb::Header { key: k, value: Some(Bytes::from(v)) }))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let values: Vec<Option<String>> = match (value, null) {
                (_, true) => vec![None],
                (Some(v), false) => vec![Some(v)],
                (None, false) => std::io::stdin().lock().lines().map(|l| l.map(Some)).collect::<Result<_, _>>()?,
            };
            for v in values {
                let record = pb::Record {
                    key: key.clone().map(Bytes::from),
                    value: v.map(Bytes::from),
                    headers: headers.clone(),
                    timestamp_ms: 0,
                };
                let ack = client.produce(&topic, partition, vec![record]).await?;
                match output {
                    Output::Json => out!("{}", json!({"partition": ack.partition, "offset": ack.base_offset}))?,
                    Output::Table => out!("partition {} offset {}", ack.partition, ack.base_offset)?,
                }
            }
        }
        Command::Bench { command } => {
            let client = std::sync::Arc::new(client);
            let report = match command {
                BenchCommand::Scenario { id, runs, duration, warmup, dev_data_dir } => {
                    return bench_scenario(bootstrap_list, &id, runs, duration, warmup, &dev_data_dir, output).await;
                }
                BenchCommand::Produce { load, dev_data_dir } => {
                    let servers = Brokers::from_dev_dir(&dev_data_dir);
                    flotilla_cli::bench::produce(client, load.bench()?, servers.as_ref()).await?
                }
                BenchCommand::Consume { topic, fetch_bytes, duration, dev_data_dir } => {
                    if fetch_bytes == 0 || duration == 0 {
                        bail!("--fetch-bytes and --duration must be positive");
                    }
                    let servers = Brokers::from_dev_dir(&dev_data_dir);
                    let bench = flotilla_cli::bench::ConsumeBench {
                        topic,
                        fetch_bytes,
                        duration: Duration::from_secs(duration),
                    };
                    flotilla_cli::bench::consume(client, bench, servers.as_ref()).await?
                }
                BenchCommand::E2e { load, dev_data_dir } => {
                    let servers = Brokers::from_dev_dir(&dev_data_dir);
                    flotilla_cli::bench::e2e(client, load.bench()?, servers.as_ref()).await?
                }
            };
            match output {
                Output::Json => out!("{}", report.json())?,
                Output::Table => out!("{}", report.line())?,
            }
        }
        Command::Consume { topic, partition, from, max, follow } => {
            consume(&client, &topic, partition, &from, max, follow, output).await?
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        // The reader of our output went away (`| head`): stop quietly, as Unix tools do.
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
