//! The `flotilla-harness` binary: its self-test passes, and runs it cannot carry out are refused clearly.
//! (Being an integration test also makes `cargo test` build the binary that `.ci/run` then runs.)

use std::process::Command;

fn harness(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-harness")).args(args).output().expect("run flotilla-harness");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_self_test_passes_and_names_every_case() {
    let (code, out, err) = harness(&["selftest"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("failed") && out.contains(", 0 failed"), "{out}");
    assert!(!out.contains("FAIL "), "{out}");
}

#[test]
fn scenarios_that_need_missing_fault_primitives_are_refused_with_the_reason() {
    let (code, _, err) = harness(&["run", "--scenario", "S15", "--duration", "10s"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("membership"), "{err}");
    let (code, _, err) = harness(&["run", "--scenario", "S9", "--target", "cloud", "--duration", "10s"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown target \"cloud\""), "{err}");
    let (code, _, err) = harness(&["run", "--scenario", "S6", "--faults", "flood"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown fault \"flood\""), "{err}");
    let (code, _, err) = harness(&["run", "--scenario", "S1", "--nodes", "3", "--replication-factor", "4"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--replication-factor must be between 1 and --nodes (3)"), "{err}");
}

/// Processes whose command line names `dir`.
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn a_run_stopped_by_sigterm_stops_its_brokers_and_says_so() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("run");
    let work_arg = work.to_str().expect("utf8");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-harness"))
        .args(["run", "--scenario", "S1", "--nodes", "3", "--duration", "600s", "--work-dir", work_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the harness");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    // The workload starts once the brokers are up and took the first topics.
    let mut seen = String::new();
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("the harness ended before its workload began:\n{seen}"));
        let line = line.expect("a line");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("workload:") {
            break;
        }
    }
    assert!(!processes_under(&work).is_empty(), "no broker runs under {}", work.display());
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("the harness ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    let left = processes_under(&work);
    assert!(left.is_empty(), "still running after the harness stopped: {left:?}");
}
