//! The Flotilla client library: metadata cache, routing to partition leaders, retries with backoff.
//! The CLI, the tests, the failover harness and the benchmark use it.
//!
//! # Layout
//! - [`client`]: the `Client` type.
//! - [`bench`]: the load generators behind `flotilla bench`.
//! - [`broker_binary`]: where the `flotilla-broker` binary is, for `flotilla dev` and the harness.
pub mod bench;
pub mod client;

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
