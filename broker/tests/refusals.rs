//! The broker binary refuses bad configuration with a clear message and a non-zero exit.

use std::process::Command;

fn broker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-broker")).args(args).output().expect("run flotilla-broker");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_node_missing_from_the_initial_cluster_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let (ok, err) = broker(&[
        "--node-id",
        "4",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:19499",
        "--initial-cluster",
        "1=127.0.0.1:19401,2=127.0.0.1:19402",
    ]);
    assert!(!ok);
    assert!(err.contains("node 4 is not in the initial cluster"), "{err}");
}

#[test]
fn a_malformed_peer_list_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let (ok, err) = broker(&[
        "--node-id",
        "1",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:19401",
        "--initial-cluster",
        "1=127.0.0.1:19401,2=nowhere",
    ]);
    assert!(!ok);
    assert!(err.contains("is not HOST:PORT"), "{err}");
}

#[test]
fn settings_come_from_the_config_file_and_flags_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broker.toml");
    let data = dir.path().join("d");
    std::fs::write(
        &file,
        format!(
            "node_id = 4\ndata_dir = {:?}\nlisten = \"127.0.0.1:19499\"\ninitial_cluster = \"1=127.0.0.1:19401\"\n",
            data.to_str().expect("utf8")
        ),
    )
    .expect("write config");
    let config = file.to_str().expect("utf8");
    // Every setting from the file: node 4 is not in its initial cluster.
    let (ok, err) = broker(&["--config", config]);
    assert!(!ok && err.contains("node 4 is not in the initial cluster"), "{err}");
    // A flag overrides the file: now node 1, whose port disagrees with --listen from the file.
    let (ok, err) = broker(&["--config", config, "--node-id", "1"]);
    assert!(!ok && err.contains("listens on port 19499"), "{err}");
    std::fs::write(&file, "colour = \"red\"\n").expect("write config");
    let (ok, err) = broker(&["--config", config]);
    assert!(!ok && err.contains("invalid config file"), "{err}");
}

/// Runs node 1 of a two-node initial cluster with `extra` flags.
fn node_1_with(extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let mut args = vec![
        "--node-id",
        "1",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:19401",
        "--initial-cluster",
        "1=127.0.0.1:19401,2=127.0.0.1:19402",
    ];
    args.extend_from_slice(extra);
    broker(&args)
}

#[test]
fn a_raft_peer_route_to_a_node_outside_the_cluster_is_refused() {
    let (ok, err) = node_1_with(&["--raft-peer-routes", "3=127.0.0.1:19403"]);
    assert!(!ok);
    assert!(err.contains("names node 3, which is not in the initial cluster"), "{err}");
}

#[test]
fn zero_worker_threads_are_refused() {
    let (ok, err) = node_1_with(&["--worker-threads", "0"]);
    assert!(!ok);
    assert!(err.contains("--worker-threads must be at least 1"), "{err}");
}

#[test]
fn a_zero_or_malformed_background_write_rate_is_refused() {
    let (ok, err) = node_1_with(&["--background-write-rate", "0"]);
    assert!(!ok);
    assert!(err.contains("--background-write-rate must be positive"), "{err}");
    let (ok, err) = node_1_with(&["--background-write-rate", "fast"]);
    assert!(!ok);
    assert!(err.contains("--background-write-rate") && err.contains("is not a size"), "{err}");
}
