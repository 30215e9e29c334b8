//! Logging: tracing to stderr, which under systemd is the journal.
//!
//! The level comes from `RUST_LOG` when it is set (an operator debugging by hand wins),
//! else from `log.level`, and a SIGHUP can change the latter without a restart: the filter
//! sits behind a reload handle. Under the journal (`JOURNAL_STREAM` set) lines carry no
//! timestamp of their own, the journal has one, and no colours.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// The words a directive without `=` may be: anything else would silently be read as a
/// module name (`inof` would turn every line off).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses a `log.level` value as a tracing filter: levels, or `target=level` directives.
pub fn parse_filter(level: &str) -> anyhow::Result<EnvFilter> {
    for directive in level.split(',').map(str::trim) {
        if !directive.contains(['=', '['])
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            anyhow::bail!(
                "{directive:?} is not a level (one of {}) nor a target=level directive",
                LEVELS.join(", ")
            );
        }
    }
    Ok(EnvFilter::builder().parse(level)?)
}

/// Changes the level of the installed logger.
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    /// The level comes from `RUST_LOG`, which the configuration does not override.
    from_env: bool,
}

impl LogControl {
    /// Applies `log.level` (already validated), unless `RUST_LOG` decides.
    pub fn set_level(&self, level: &str) {
        if self.from_env {
            return;
        }
        match parse_filter(level).map(|f| self.filter.reload(f)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not change the log level"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "log.level not applied"),
        }
    }
}

/// Installs the logger with `level` (or `RUST_LOG`'s), once per process.
pub fn init(level: &str) -> LogControl {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let from_env = env.is_some();
    let filter = env
        .as_deref()
        .and_then(|v| EnvFilter::builder().parse(v).ok())
        .or_else(|| parse_filter(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journal && std::io::stderr().is_terminal();
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if journal {
        registry.with(layer.without_time()).init();
    } else {
        registry.with(layer).init();
    }
    LogControl {
        filter: handle,
        from_env,
    }
}

/// Says "now" at most once per its interval, and counts in `pending` what happened in
/// between (for the line that then says it): a repeated failure is logged, not flooded.
pub struct Throttled {
    every: Duration,
    last: Option<Instant>,
    pub pending: u64,
}

impl Throttled {
    pub fn every(every: Duration) -> Throttled {
        Throttled {
            every,
            last: None,
            pending: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line is due now (the interval
    /// starts again); else `None`, and this one is counted as left out.
    pub fn admit(&mut self) -> Option<u64> {
        if self.due() {
            Some(std::mem::take(&mut self.pending))
        } else {
            self.pending += 1;
            None
        }
    }

    /// Whether a line is due now; if so, the interval starts again.
    pub fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|t| t.elapsed() >= self.every);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }
}
