//! Logging set-up: `RUST_LOG`-style filters, text or JSON, and sampling of openraft's repeated warnings.
//!
//! openraft warns once per group per failed heartbeat or vote. With a thousand partition groups and one
//! peer unreachable that is thousands of lines a second, all saying the same thing. Each openraft call
//! site at INFO or above therefore logs at most [`BURST`] events per [`WINDOW`]; the rest are counted and
//! a summary line says how many were dropped. DEBUG and TRACE, which a person turns on deliberately, are
//! never sampled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{FilterExt, LevelFilter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Events a sampled call site may log per window.
pub const BURST: u32 = 5;
/// The sampling window, and how often a summary of dropped events is logged.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Default filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,openraft=warn";

/// Installs the global subscriber. `format` is `text` or `json`.
pub fn init(format: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let sampler = Arc::new(Sampler::default());
    let fmt = match format {
        "json" => tracing_subscriber::fmt::layer().json().boxed(),
        "text" => tracing_subscriber::fmt::layer().boxed(),
        other => anyhow::bail!("log format {other:?} is neither text nor json"),
    };
    // `and` asks the env filter first, so only events that would be logged count against a burst.
    tracing_subscriber::registry().with(fmt.with_filter(filter.and(SampleFilter(sampler.clone())))).init();
    std::thread::Builder::new().name("log-sampler".into()).spawn(move || {
        loop {
            std::thread::sleep(WINDOW);
            let dropped = sampler.take_dropped();
            if dropped.total > 0 {
                let total = dropped.total;
                tracing::warn!(
                    dropped = total,
                    "dropped {total} repeated openraft log lines in the last {WINDOW:?}; most from {}",
                    dropped.top_sites()
                );
            }
        }
    })?;
    Ok(())
}

/// Call sites named in a summary of dropped events.
const SUMMARY_SITES: usize = 3;

/// Per-call-site rate limiting.
#[derive(Default)]
pub struct Sampler {
    sites: Mutex<HashMap<Identifier, Site>>,
}

/// One sampled call site: its current window and what it dropped since the last summary.
struct Site {
    /// Where the events come from: target, file and line.
    name: String,
    window_start: Instant,
    in_window: u32,
    dropped: u64,
}

/// What a sampler dropped since its last summary: the total, and per call site, most first.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    pub total: u64,
    pub by_site: Vec<(String, u64)>,
}

impl Dropped {
    /// The busiest call sites, as "N at SITE", for the summary line: a storm of one warning (a peer
    /// retried in a loop) is then named, not only counted.
    pub fn top_sites(&self) -> String {
        let named: Vec<String> =
            self.by_site.iter().take(SUMMARY_SITES).map(|(site, n)| format!("{n} at {site}")).collect();
        named.join(", ")
    }
}

impl Sampler {
    /// Whether an event of call site `meta` at `now` is logged; counts it as dropped if not.
    pub fn admit(&self, meta: &Metadata<'_>, now: Instant) -> bool {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let site = sites.entry(meta.callsite()).or_insert_with(|| Site {
            name: format!(
                "{} ({}:{})",
                meta.target(),
                meta.file().map_or("?", crate_relative),
                meta.line().map_or_else(|| "?".to_owned(), |l| l.to_string())
            ),
            window_start: now,
            in_window: 0,
            dropped: 0,
        });
        if now.duration_since(site.window_start) >= WINDOW {
            site.window_start = now;
            site.in_window = 0;
        }
        site.in_window = site.in_window.saturating_add(1);
        let admitted = site.in_window <= BURST;
        if !admitted {
            site.dropped += 1;
        }
        admitted
    }

    /// Events dropped since the last call, per call site.
    pub fn take_dropped(&self) -> Dropped {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_site: Vec<(String, u64)> = sites
            .values_mut()
            .filter(|s| s.dropped > 0)
            .map(|s| (s.name.clone(), std::mem::take(&mut s.dropped)))
            .collect();
        by_site.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Dropped { total: by_site.iter().map(|(_, n)| n).sum(), by_site }
    }
}

/// A source path from its crate's `src/` on: a dependency's file is named by its absolute path in the
/// Cargo registry of the machine that built the broker.
fn crate_relative(file: &str) -> &str {
    file.rfind("/src/").map_or(file, |at| &file[at + 1..])
}

fn sampled(meta: &Metadata<'_>) -> bool {
    meta.is_event() && meta.target().starts_with("openraft") && *meta.level() <= Level::INFO
}

struct SampleFilter(Arc<Sampler>);

impl<S> Filter<S> for SampleFilter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        !sampled(meta) || self.0.admit(meta, Instant::now())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // Sampled call sites must be asked about every event; everything else is always let through here.
        if sampled(meta) { Interest::sometimes() } else { Interest::always() }
    }

    /// No limit of its own: without a hint, `and` would report none and the env filter's level would be
    /// lost (every `log` record of every dependency would reach the filters).
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A static event call site: its metadata, as the `tracing` macros make them.
    macro_rules! event_site {
        ($site:ident, $meta:ident, $target:literal, $level:expr) => {
            static $site: tracing::callsite::DefaultCallsite = tracing::callsite::DefaultCallsite::new(&$meta);
            static $meta: Metadata<'static> = tracing::metadata!(
                name: stringify!($meta),
                target: $target,
                level: $level,
                fields: &[],
                callsite: &$site,
                kind: tracing::metadata::Kind::EVENT,
            );
        };
    }

    event_site!(SITE_A, META_A, "openraft::core", Level::WARN);
    event_site!(SITE_B, META_B, "openraft::replication", Level::WARN);
    event_site!(SITE_C, META_C, "flotilla_broker::service", Level::WARN);
    event_site!(SITE_D, META_D, "openraft::core", Level::DEBUG);

    #[test]
    fn a_call_site_logs_a_burst_per_window_and_counts_the_rest() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| sampler.admit(&META_A, t0)).count();
        assert_eq!(admitted, BURST as usize);
        let dropped = sampler.take_dropped();
        assert_eq!(dropped.total, 100 - u64::from(BURST));
        assert_eq!(dropped.by_site.len(), 1);
        assert_eq!(sampler.take_dropped().total, 0, "the count restarts after a summary");

        // Another call site has its own budget; a new window restores the first one's.
        assert!(sampler.admit(&META_B, t0));
        assert!(!sampler.admit(&META_A, t0 + WINDOW / 2));
        assert!(sampler.admit(&META_A, t0 + WINDOW));
    }

    #[test]
    fn a_summary_names_the_call_sites_that_dropped_most() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        for _ in 0..BURST + 3 {
            sampler.admit(&META_A, t0);
        }
        for _ in 0..BURST + 40 {
            sampler.admit(&META_B, t0);
        }
        let dropped = sampler.take_dropped();
        assert_eq!(dropped.total, 43);
        let (line_a, line_b) = (META_A.line().unwrap_or(0), META_B.line().unwrap_or(0));
        assert_eq!(
            dropped.top_sites(),
            format!(
                "40 at openraft::replication (src/logging.rs:{line_b}), 3 at openraft::core (src/logging.rs:{line_a})"
            )
        );
        assert_eq!(
            crate_relative("/root/.cargo/registry/src/index/openraft-0.10/src/replication/mod.rs"),
            "src/replication/mod.rs"
        );
        assert_eq!(crate_relative("build.rs"), "build.rs");
    }

    #[test]
    fn only_openraft_events_at_info_and_above_are_sampled() {
        assert!(sampled(&META_A));
        assert!(!sampled(&META_C));
        assert!(!sampled(&META_D));
    }
}
