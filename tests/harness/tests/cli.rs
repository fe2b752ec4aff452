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
