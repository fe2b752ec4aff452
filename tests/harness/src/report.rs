//! The human summary of a run; the JSON report is [`RunReport`] serialised.

use std::fmt::Write;

use crate::run::RunReport;

pub fn summary(r: &RunReport) -> String {
    let mut out = String::new();
    let c = &r.checked;
    let _ = writeln!(out, "== Flotilla failover run: {} ({}) ==", r.scenario, r.title);
    let _ = writeln!(
        out,
        "seed {} (replay with --seed {}), target {}, {} nodes, {} keys, {:.0} s",
        r.seed, r.seed, r.target, r.nodes, r.keys, r.duration_s
    );
    let _ = writeln!(out, "faults:");
    if r.faults.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for f in &r.faults {
        let releader = f.releader_note();
        let _ = writeln!(out, "  {:7.1}s - {:7.1}s  {:<10} {}{releader}", f.start, f.end, f.kind.name(), f.description);
    }
    let _ = writeln!(
        out,
        "operations: sends ok {} / fail {} / info {}; polls {}; offset reads {}; values read {}",
        c.sends_ok, c.sends_fail, c.sends_info, r.polls, r.offsets_reads, c.values_read
    );
    let _ = writeln!(out, "anomalies:");
    for a in &c.anomalies {
        let _ = writeln!(out, "  {:<4} {:<32} {}", a.id, a.name, a.count);
        for e in &a.examples {
            let _ = writeln!(out, "         e.g. {e}");
        }
    }
    let _ = writeln!(out, "  I10  committed offsets                n/a (no consumer groups yet)");
    let _ = writeln!(
        out,
        "  duplicates of unknown (info) sends: {} (allowed without idempotent produce)",
        c.info_duplicates
    );
    if c.keys_cut > 0 {
        let _ = writeln!(
            out,
            "retention: final reads of {} keys began past offset 0 (log start up to {}); acknowledged values it \
             removed before any read saw them: {}",
            c.keys_cut, c.highest_log_start, c.expired
        );
    }
    let _ = writeln!(out, "gates:");
    for g in &r.gates {
        let _ = writeln!(out, "  {:<22} {}  {}", g.name, if g.passed { "PASS" } else { "FAIL" }, g.detail);
    }
    let _ = writeln!(out, "verdict: {}", if r.passed { "PASS" } else { "FAIL" });
    out
}
