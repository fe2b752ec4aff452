//! Logging set-up: `RUST_LOG`-style filters, text or JSON, and sampling of openraft's repeated warnings.
//!
//! openraft warns once per group per failed heartbeat or vote. With a thousand partition groups and one
//! peer unreachable that is thousands of lines a second, all saying the same thing. Each openraft call
//! site at INFO or above therefore logs at most [`BURST`] events per [`WINDOW`]; the rest are counted and
//! a summary line says how many were dropped. DEBUG and TRACE, which a person turns on deliberately, are
//! never sampled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
            if dropped > 0 {
                tracing::warn!(dropped, "dropped {dropped} repeated openraft log lines in the last {WINDOW:?}");
            }
        }
    })?;
    Ok(())
}

/// Per-call-site rate limiting.
#[derive(Default)]
pub struct Sampler {
    windows: Mutex<HashMap<Identifier, (Instant, u32)>>,
    dropped: AtomicU64,
}

impl Sampler {
    /// Whether an event of call site `site` at `now` is logged; counts it as dropped if not.
    pub fn admit(&self, site: Identifier, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = windows.entry(site).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        let admitted = *count <= BURST;
        if !admitted {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Events dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

fn sampled(meta: &Metadata<'_>) -> bool {
    meta.is_event() && meta.target().starts_with("openraft") && *meta.level() <= Level::INFO
}

struct SampleFilter(Arc<Sampler>);

impl<S> Filter<S> for SampleFilter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        !sampled(meta) || self.0.admit(meta.callsite(), Instant::now())
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
        let admitted = (0..100).filter(|_| sampler.admit(META_A.callsite(), t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert_eq!(sampler.take_dropped(), 100 - u64::from(BURST));
        assert_eq!(sampler.take_dropped(), 0, "the count restarts after a summary");

        // Another call site has its own budget; a new window restores the first one's.
        assert!(sampler.admit(META_B.callsite(), t0));
        assert!(!sampler.admit(META_A.callsite(), t0 + WINDOW / 2));
        assert!(sampler.admit(META_A.callsite(), t0 + WINDOW));
    }

    #[test]
    fn only_openraft_events_at_info_and_above_are_sampled() {
        assert!(sampled(&META_A));
        assert!(!sampled(&META_C));
        assert!(!sampled(&META_D));
    }
}
