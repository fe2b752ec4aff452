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

/// A Markdown table of runs, one row per JSON report (`run --report`), for a sweep's summary.
/// Reports are read as plain JSON, so a report written by an older harness still makes a row.
pub fn table(reports: &[serde_json::Value]) -> String {
    let mut out = String::from(
        "| scenario | target | nodes | seed | s | sends ok / fail / info | faults fired | anomalies | recovery s | gates | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let text = |k: &str| r[k].as_str().unwrap_or("?").to_string();
        let number = |v: &serde_json::Value| v.as_u64().map_or_else(|| "?".to_string(), |n| n.to_string());
        let checked = &r["checked"];
        let anomalies = checked["anomalies"].as_array().map(Vec::as_slice).unwrap_or_default();
        let found: Vec<String> = anomalies
            .iter()
            .filter(|a| a["count"].as_u64() != Some(0))
            .map(|a| format!("{} {}", a["id"].as_str().unwrap_or("?"), number(&a["count"])))
            .collect();
        let anomalies = if anomalies.is_empty() {
            "?".to_string()
        } else if found.is_empty() {
            format!("0 (of {} checked)", anomalies.len())
        } else {
            found.join(", ")
        };
        let gates = r["gates"].as_array().map(Vec::as_slice).unwrap_or_default();
        let failed: Vec<&str> =
            gates.iter().filter(|g| g["passed"].as_bool() != Some(true)).filter_map(|g| g["name"].as_str()).collect();
        let gates =
            if failed.is_empty() { format!("{} held", gates.len()) } else { format!("failed: {}", failed.join(", ")) };
        let recovery = r["recovery_s"].as_f64().map_or_else(|| "-".to_string(), |s| format!("{s:.1}"));
        let verdict = if r["passed"].as_bool() == Some(true) { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {} / {} / {} | {} | {anomalies} | {recovery} | {gates} | {verdict} |",
            text("scenario"),
            text("target"),
            number(&r["nodes"]),
            number(&r["seed"]),
            r["duration_s"].as_f64().unwrap_or(0.0),
            number(&checked["sends_ok"]),
            number(&checked["sends_fail"]),
            number(&checked["sends_info"]),
            r["faults"].as_array().map_or(0, Vec::len),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::table;

    fn report(passed: bool, i1: u64, gate_ok: bool) -> serde_json::Value {
        json!({
            "scenario": "S6", "target": "compose", "nodes": 3, "seed": 7, "duration_s": 300.2,
            "faults": [{"kind": "Partition"}, {"kind": "Partition"}],
            "recovery_s": 2.25,
            "checked": {
                "sends_ok": 900, "sends_fail": 40, "sends_info": 2,
                "anomalies": [{"id": "I1", "count": i1}, {"id": "I2", "count": 0}],
            },
            "gates": [{"name": "faults fired", "passed": true}, {"name": "recovery", "passed": gate_ok}],
            "passed": passed,
        })
    }

    #[test]
    fn a_row_per_report_names_what_was_found_and_which_gates_failed() {
        let t = table(&[report(true, 0, true), report(false, 3, false)]);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 4, "{t}");
        assert_eq!(
            rows[2],
            "| S6 | compose | 3 | 7 | 300 | 900 / 40 / 2 | 2 | 0 (of 2 checked) | 2.2 | 2 held | PASS |"
        );
        assert!(
            rows[3].contains("| I1 3 |") && rows[3].contains("failed: recovery") && rows[3].ends_with("FAIL |"),
            "{t}"
        );
    }

    #[test]
    fn a_report_missing_fields_still_makes_a_row() {
        let t = table(&[json!({"scenario": "S1"})]);
        assert!(t.lines().nth(2).is_some_and(|r| r.starts_with("| S1 | ? |") && r.ends_with("| FAIL |")), "{t}");
    }
}
