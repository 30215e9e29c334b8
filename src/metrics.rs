//! Prometheus metrics, in the text format of the official client crate.
//!
//! Counters and histograms are updated where their event happens: the writer thread per
//! snapshot, the accept loop per request, the watcher per directory read. The per-node
//! gauges (calls, snapshot age) are not kept up to date at all: they are read from the
//! store when Prometheus scrapes, so they are the database's truth, and a node that expired
//! a second ago does not linger as a series. The relay's spool age is likewise computed at
//! the scrape, from the time its oldest snapshot was spooled, so it grows while a URL is
//! down even though nothing else happens.
//!
//! Each series is declared once, one line in a `series!` table (field, type, exposed name,
//! unit, help), from which its field, construction and registration are made: the ~300
//! lines of near-identical registrations this replaced let a field be added without being
//! registered, or registered under another's help. The table's order is the exposition's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

mod process;
mod streams;

pub(crate) use process::ProcStat;
use process::ProcessSample;
pub use streams::{OpenStream, StreamMetrics};

use crate::call::EventKind;
use crate::logs::Throttled;
use crate::store::{NodeStats, Origin, StoreSize};

/// What came of a posted call event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Checked and queued for the writer (200).
    Queued,
    /// A type the agent does not know (200).
    Ignored,
    /// Not an event (400).
    Invalid,
    /// The queue was full (503).
    Overloaded,
}

impl EventOutcome {
    fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Queued => "queued",
            EventOutcome::Ignored => "ignored",
            EventOutcome::Invalid => "invalid",
            EventOutcome::Overloaded => "overloaded",
        }
    }
}

/// The event series that exist from the start, at 0: every known type with each outcome
/// it can have, and the unknown ones (`other`).
const EVENT_SERIES: [(&str, &[&str]); 4] = [
    ("started", &["queued", "invalid", "overloaded"]),
    ("connected", &["queued", "invalid", "overloaded"]),
    ("disconnected", &["queued", "invalid", "overloaded"]),
    ("other", &["ignored", "invalid"]),
];

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node_id: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SnapshotLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    source: &'static str,
    reason: &'static str,
}

/// Why a snapshot was rejected: `snapshots_rejected_total`'s reasons, every one present
/// from the start.
pub const REJECTED_REASONS: [&str; 6] = ["malformed", "input", "spill", "disk", "store", "damaged"];

/// Why an answer was cut short: `answers_cut_total`'s reasons, every one from the start.
pub const CUT_REASONS: [&str; 3] = ["slow", "budget", "time"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    r#type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

/// One relay URL's series, for its sender and the spooler.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Snapshots ClickHouse took.
    pub sent: Counter,
    /// Snapshots ClickHouse refused for good.
    pub failed: Counter,
    /// Attempts that failed and will be retried.
    pub retried: Counter,
    /// Snapshots dropped without reaching ClickHouse: the spool's bound, or a spool error.
    pub dropped: Counter,
    pub spool_bytes: Gauge,
    /// ClickHouse's exception code while the URL refuses every snapshot for a cause of its
    /// own (an unknown table, authentication, read-only, …; -1: an HTTP refusal without a
    /// code); 0 while it takes them.
    pub blocked: Gauge,
    /// 1 while the relay sends `insert_deduplication_token` to the URL, 0 where the server
    /// does not know that setting.
    pub dedup_token: Gauge,
    /// When the oldest spooled snapshot was spooled (unix ms; 0: the spool is empty).
    oldest_ms: Arc<AtomicI64>,
}

impl RelayMetrics {
    /// The spool's oldest snapshot was spooled `at` (`None`: the spool is empty).
    pub fn set_oldest(&self, at: Option<SystemTime>) {
        let ms = at.map_or(0, |t| crate::clock::unix_millis(t).max(1));
        self.oldest_ms.store(ms, Ordering::Relaxed);
    }
}

/// An open connection, counted until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Declares a struct of series once: each line gives a field, its type (and how it is
/// built, where `Default` will not do), the name and unit it is exposed under, and its
/// help. The struct, its constructor and its registration all come from that one line, so
/// a new metric is one line, and registration follows the lines' order: the order of the
/// exposition, which a diff of two scrapes sees.
macro_rules! series {
    (@init) => {
        Default::default()
    };
    (@init $init:expr) => {
        $init
    };
    (@register $registry:ident, $name:literal, $help:expr, $series:expr) => {
        $registry.register($name, $help, $series)
    };
    (@register $registry:ident, $name:literal, $help:expr, $series:expr, $unit:ident) => {
        $registry.register_with_unit($name, $help, Unit::$unit, $series)
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $struct:ident {
            $(
                $field:ident: $ty:ty $(= $init:expr)?
                    => $name:literal $(in $unit:ident)?, $help:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $struct {
            $($field: $ty,)*
        }

        impl $struct {
            pub(super) fn new() -> Self {
                $struct {
                    $($field: series!(@init $($init)?),)*
                }
            }

            pub(super) fn register(&self, registry: &mut Registry) {
                $(series!(@register registry, $name, $help, self.$field.clone() $(, $unit)?);)*
            }
        }
    };
}

// For the series declared beside their users (`streams`).
use series;

series! {
    /// The agent's own series, under its prefix.
    struct Series {
        // Set from the store at each scrape (render), not as things happen.
        node_calls: Family<NodeLabels, Gauge> => "calls", "Current calls stored per node";
        snapshot_age: Family<NodeLabels, Gauge<f64, AtomicU64>> => "snapshot_age" in Seconds,
            "Time since each node's last snapshot was received";
        node_period: Family<NodeLabels, Gauge<f64, AtomicU64>> => "node_period" in Seconds,
            "Each node's snapshot period, learned from its consecutive snapshot_timestamps \
             (feed.stale_after = \"auto\" empties a node silent for two of them plus 5 s)";
        snapshots: Family<SnapshotLabels, Counter> => "snapshots",
            "Snapshots applied or rejected, per source";
        events: Family<EventLabels, Counter> => "events",
            "Call events posted to /events, per type and outcome (queued, ignored: a type the \
             agent does not know, invalid: answered 400, overloaded: answered 503)";
        // 100 µs to ~13 s: a batch committed at once, to events queued behind the apply of
        // a large snapshot on a loaded host.
        event_visible: Histogram = Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
            => "event_visible" in Seconds,
            "Time from a call event's arrival to its commit, after which every answer shows it";
        rows_skipped: Family<SourceLabels, Counter> => "rows_skipped",
            "Snapshot rows skipped as malformed, per source";
        // 1 ms to ~65 s: a small node's apply to a huge snapshot on a loaded host.
        apply_duration: Family<SourceLabels, Histogram> = Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            })
            => "apply_duration" in Seconds, "Time to apply a snapshot, per source";
        requests: Family<RequestLabels, Counter> => "http_requests",
            "HTTP requests answered, per listener, route and status";
        // 25 µs to ~26 s: the endpoint answers in well under a millisecond, a posted
        // snapshot in up to seconds.
        request_duration: Family<RouteLabels, Histogram> = Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_025, 2.0, 21))
            })
            => "http_request_duration" in Seconds,
            "Time to answer an HTTP request, per listener and route";
        connections: Family<ListenerLabels, Gauge> => "http_connections",
            "HTTP connections open now, per listener";
        connections_refused: Family<ListenerLabels, Counter> => "http_connections_refused",
            "Connections answered 503: the listener was at max_connections, all busy";
        connections_evicted: Family<ListenerLabels, Counter> => "http_connections_evicted",
            "Idle connections closed to make room for a new one at max_connections";
        auth_refusals: Family<ReasonLabels, Counter> => "auth_refusals",
            "Requests answered 401, by reason";
        directory_loads: Family<ResultLabels, Counter> => "directory_loads",
            "Reads of the directory file, per result (ok, failed)";
        relay_sent: Family<UrlLabels, Counter> => "relay_sent",
            "Snapshots relayed to a ClickHouse URL (answered 2xx)";
        relay_failed: Family<UrlLabels, Counter> => "relay_failed",
            "Snapshots a ClickHouse URL refused for good (a 4xx that no retry fixes); dropped";
        relay_retried: Family<UrlLabels, Counter> => "relay_retried",
            "Failed attempts to relay a snapshot that will be retried, per URL";
        relay_dropped: Family<UrlLabels, Counter> => "relay_dropped",
            "Snapshots dropped before a URL took them: past upstream.spool_max_bytes, or a spool error";
        relay_spool_bytes: Family<UrlLabels, Gauge> => "relay_spool" in Bytes,
            "Size of the snapshots spooled for a URL";
        relay_blocked: Family<UrlLabels, Gauge> => "relay_blocked",
            "ClickHouse's exception code while a URL refuses every snapshot for a cause of \
             its own (unknown table or database, authentication, read-only, too many parts, \
             memory; -1: an HTTP refusal without a code): they stay spooled and are retried; \
             0 while it takes them";
        relay_dedup_token: Family<UrlLabels, Gauge> => "relay_dedup_token",
            "1 while snapshots go to a URL with insert_deduplication_token, 0 where the server \
             does not know that setting (older ClickHouse: a snapshot resent after a crash may \
             be stored twice)";
        // Set at each scrape, from `Metrics::relay_oldest`.
        relay_spool_oldest_age: Family<UrlLabels, Gauge<f64, AtomicU64>>
            => "relay_spool_oldest_age" in Seconds,
            "Time since the oldest snapshot spooled for a URL was spooled (0: none)";
        relay_pending_bytes: Gauge => "relay_pending" in Bytes,
            "Raw bytes of applied snapshots waiting for the relay's spooler (all URLs); past \
             upstream.spool_max_bytes new snapshots are not relayed (relay_dropped_total)";
        relay_running: Gauge => "relay_running",
            "1 while the relay runs; 0 when it is off, or configured but could not start (the log says why)";
        store_bytes: Gauge => "store" in Bytes, "Size of the store's database file and its WAL";
        store_wal_bytes: Gauge => "store_wal" in Bytes,
            "Size of the store's WAL: a read held open keeps it from being copied back and \
             started again; it is truncated to 64 MiB once readers leave";
        store_readable: Gauge => "store_readable",
            "1 while the store answers reads; 0 when this scrape could not read it (its \
             per-node series are left out)";
        store_replaced: Counter => "store_replaced",
            "Stores SQLite could not read, set aside as <name>.corrupt-<time> and created anew";
        snapshots_rejected: Family<RejectedLabels, Counter> => "snapshots_rejected",
            "Snapshots rejected, per source and reason (malformed: a bad line; input: the \
             body or file could not be read; spill: the body could not be received into its \
             file; disk: the store could not be written, a full disk; store: another store \
             error; damaged: the store could not be read, and was replaced)";
        answers_cut: Family<ReasonLabels, Counter> => "answers_cut",
            "Answers cut short, per reason (slow: the client read nothing for the write \
             timeout; budget: what it had not read yet outgrew api.max_answer_bytes; time: a \
             streamed answer took longer than its time limit)";
    }
}

series! {
    /// The process metrics every Prometheus exporter has, under their standard names (no
    /// prefix), read from `/proc/self` at each scrape.
    struct ProcessSeries {
        rss: Gauge => "process_resident_memory" in Bytes, "Resident memory size in bytes";
        cpu: Counter<f64, AtomicU64> => "process_cpu" in Seconds,
            "Total user and system CPU time spent in seconds";
        fds: Gauge => "process_open_fds", "Number of open file descriptors";
        start: Gauge<f64, AtomicU64> => "process_start_time" in Seconds,
            "Start time of the process since unix epoch in seconds";
    }
}

impl Series {
    /// Creates, at 0, the series that must exist before their first event: a rate or an
    /// `increase()` over a counter that appears at 1 misses that first one, and the alert
    /// on it stays silent.
    fn start_at_zero(&self) {
        for (kind, outcomes) in EVENT_SERIES {
            for outcome in outcomes {
                let _ = self.events.get_or_create(&EventLabels {
                    r#type: kind,
                    outcome,
                });
            }
        }
        for reason in crate::auth::Unauthorized::ALL {
            let _ = self.auth_refusals.get_or_create(&ReasonLabels {
                reason: reason.reason(),
            });
        }
        for origin in Origin::ALL {
            let source = origin.as_str();
            for result in ["applied", "rejected"] {
                let _ = self
                    .snapshots
                    .get_or_create(&SnapshotLabels { source, result });
            }
            let _ = self.rows_skipped.get_or_create(&SourceLabels { source });
            for reason in REJECTED_REASONS {
                let _ = self
                    .snapshots_rejected
                    .get_or_create(&RejectedLabels { source, reason });
            }
        }
        for reason in CUT_REASONS {
            let _ = self.answers_cut.get_or_create(&ReasonLabels { reason });
        }
    }
}

/// Every metric of one agent.
pub struct Metrics {
    /// `series` and the streams', under the agent's prefix.
    registry: Registry,
    series: Series,
    /// `process`'s, without the prefix.
    process_registry: Registry,
    process: ProcessSeries,
    /// Scrapes refill the per-node gauges; two at once must not interleave.
    scrape: Mutex<()>,
    /// Refusals are logged at most once a second, with how many went unlogged.
    refusals_logged: Mutex<Throttled>,
    /// Cut answers too, every ten seconds.
    cuts_logged: Mutex<Throttled>,
    /// Per URL, when its oldest spooled snapshot was spooled: the age gauge's source.
    relay_oldest: Mutex<Vec<(UrlLabels, Arc<AtomicI64>)>>,
    /// The live streams' series.
    pub streams: StreamMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let series = Series::new();
        series.start_at_zero();
        let streams = StreamMetrics::default();
        let mut registry = Registry::with_prefix("active_calls_agent");
        streams.register(&mut registry);
        series.register(&mut registry);
        let process = ProcessSeries::new();
        let mut process_registry = Registry::default();
        process.register(&mut process_registry);
        Metrics {
            registry,
            series,
            process_registry,
            process,
            scrape: Mutex::new(()),
            refusals_logged: Mutex::new(Throttled::every(Duration::from_secs(1))),
            cuts_logged: Mutex::new(Throttled::every(Duration::from_secs(10))),
            relay_oldest: Mutex::new(Vec::new()),
            streams,
        }
    }

    /// Reads this process's figures from `/proc/self` (Linux), and the store's size.
    fn sample_process(&self, store_bytes: u64) {
        self.series
            .store_bytes
            .set(i64::try_from(store_bytes).unwrap_or(i64::MAX));
        let Some(sample) = ProcessSample::read() else {
            return;
        };
        self.process.rss.set(sample.rss_bytes);
        // A counter only goes up: it is moved to the kernel's figure.
        let delta = sample.cpu_seconds - self.process.cpu.get();
        if delta > 0.0 {
            self.process.cpu.inc_by(delta);
        }
        self.process.fds.set(sample.open_fds);
        self.process.start.set(sample.start_time_seconds);
    }

    /// A snapshot applied (`Ok`: its skipped rows and duration) or rejected.
    pub fn snapshot(&self, source: &'static str, applied: Result<(u64, Duration), &'static str>) {
        let result = if applied.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        self.series
            .snapshots
            .get_or_create(&SnapshotLabels { source, result })
            .inc();
        if let Err(reason) = applied {
            self.series
                .snapshots_rejected
                .get_or_create(&RejectedLabels { source, reason })
                .inc();
        }
        if let Ok((skipped, duration)) = applied {
            let labels = SourceLabels { source };
            self.series
                .rows_skipped
                .get_or_create(&labels)
                .inc_by(skipped);
            self.series
                .apply_duration
                .get_or_create(&labels)
                .observe(duration.as_secs_f64());
        }
    }

    /// A posted call event of type `kind` (`None`: unreadable or unknown), and what came
    /// of it.
    pub fn event(&self, kind: Option<EventKind>, outcome: EventOutcome) {
        self.series
            .events
            .get_or_create(&EventLabels {
                r#type: kind.map_or("other", EventKind::as_str),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A call event committed `after` its arrival.
    pub fn event_visible(&self, after: Duration) {
        self.series.event_visible.observe(after.as_secs_f64());
    }

    /// One answered request; `route` is its path when the listener counts that path under
    /// its own name (its `routes`), else `other`.
    pub fn request(
        &self,
        listener: &'static str,
        route: &'static str,
        status: u16,
        took: Duration,
    ) {
        self.series
            .requests
            .get_or_create(&RequestLabels {
                listener,
                route,
                status,
            })
            .inc();
        self.series
            .request_duration
            .get_or_create(&RouteLabels { listener, route })
            .observe(took.as_secs_f64());
    }

    /// Counts a connection of `listener` as open until the returned guard drops.
    pub fn connection(&self, listener: &'static str) -> OpenConnection {
        let gauge = self
            .series
            .connections
            .get_or_create(&ListenerLabels { listener })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// A connection refused at the cap of `listener`.
    pub fn connection_refused(&self, listener: &'static str) {
        self.series
            .connections_refused
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// An idle connection of `listener` closed to make room at the cap.
    pub fn connection_evicted(&self, listener: &'static str) {
        self.series
            .connections_evicted
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// One read of the directory file.
    pub fn directory_load(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.series
            .directory_loads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The series of relay URL `url` (its label: no credentials, no query), all at 0.
    pub fn relay(&self, url: &str) -> RelayMetrics {
        let labels = UrlLabels {
            url: url.to_owned(),
        };
        let oldest_ms = Arc::new(AtomicI64::new(0));
        self.relay_oldest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((labels.clone(), oldest_ms.clone()));
        self.series
            .relay_spool_oldest_age
            .get_or_create(&labels)
            .set(0.0);
        RelayMetrics {
            sent: self.series.relay_sent.get_or_create(&labels).clone(),
            failed: self.series.relay_failed.get_or_create(&labels).clone(),
            retried: self.series.relay_retried.get_or_create(&labels).clone(),
            dropped: self.series.relay_dropped.get_or_create(&labels).clone(),
            spool_bytes: self.series.relay_spool_bytes.get_or_create(&labels).clone(),
            blocked: self.series.relay_blocked.get_or_create(&labels).clone(),
            dedup_token: {
                let gauge = self.series.relay_dedup_token.get_or_create(&labels).clone();
                gauge.set(1);
                gauge
            },
            oldest_ms,
        }
    }

    /// A request answered 401: counted by reason, and logged at most once a second (the
    /// reason and the request id, never the token), so that an operator can tell a
    /// customer why, and a flood of bad tokens cannot flood the log.
    pub fn auth_refused(&self, why: crate::auth::Unauthorized, request_id: &str) {
        self.series
            .auth_refusals
            .get_or_create(&ReasonLabels {
                reason: why.reason(),
            })
            .inc();
        let admitted = lock(&self.refusals_logged).admit();
        let Some(unlogged) = admitted else {
            return;
        };
        tracing::info!(
            reason = why.reason(),
            request_id,
            unlogged_since_last = unlogged,
            "request refused: 401"
        );
    }

    /// The gauge of the raw bytes waiting for the relay's spooler.
    pub fn relay_pending_bytes(&self) -> Gauge {
        self.series.relay_pending_bytes.clone()
    }

    /// A damaged store was set aside and created anew.
    pub fn store_replaced(&self) {
        self.series.store_replaced.inc();
    }

    /// An answer on `listener` was cut short, for `reason` ([`CUT_REASONS`]): counted,
    /// and logged at most every ten seconds, with how many went unlogged.
    pub fn answer_cut(&self, listener: &'static str, reason: &'static str, what: &str) {
        self.series
            .answers_cut
            .get_or_create(&ReasonLabels { reason })
            .inc();
        let admitted = lock(&self.cuts_logged).admit();
        let Some(unlogged) = admitted else {
            return;
        };
        tracing::warn!(
            listener,
            reason,
            unlogged_since_last = unlogged,
            "an answer was cut short: {what}"
        );
    }

    /// Whether the relay runs.
    pub fn relay_running(&self, running: bool) {
        self.series.relay_running.set(i64::from(running));
    }

    /// The text exposition, with the per-node gauges set from `nodes` as of `now_ms`
    /// (`None`: the store could not be read, and they are left out). `store` is the
    /// store's size on disk.
    pub fn render(&self, nodes: Option<&[NodeStats]>, now_ms: i64, store: StoreSize) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.sample_process(store.total);
        self.series
            .store_wal_bytes
            .set(i64::try_from(store.wal).unwrap_or(i64::MAX));
        self.series.store_readable.set(i64::from(nodes.is_some()));
        let nodes = nodes.unwrap_or_default();
        self.series.node_calls.clear();
        self.series.snapshot_age.clear();
        self.series.node_period.clear();
        let seconds = |ms: i64| ms.max(0) as f64 / 1000.0;
        for node in nodes {
            let labels = NodeLabels {
                node_id: node.node_id,
            };
            self.series
                .node_calls
                .get_or_create(&labels)
                .set(node.calls);
            // A node heard from only by its call events has no snapshot to be old.
            if let Some(received) = node.received_at_ms {
                self.series
                    .snapshot_age
                    .get_or_create(&labels)
                    .set(seconds(now_ms - received));
            }
            if let Some(period) = node.period_ms {
                self.series
                    .node_period
                    .get_or_create(&labels)
                    .set(seconds(period));
            }
        }
        for (labels, oldest_ms) in self
            .relay_oldest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let oldest = oldest_ms.load(Ordering::Relaxed);
            let age = if oldest == 0 {
                0.0
            } else {
                (now_ms - oldest).max(0) as f64 / 1000.0
            };
            self.series
                .relay_spool_oldest_age
                .get_or_create(labels)
                .set(age);
        }
        let mut text = String::with_capacity(8192);
        // Writing into a String cannot fail.
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let _ = encode_registry(&mut text, &self.registry);
        let _ = encode_registry(&mut text, &self.process_registry);
        let _ = encode_eof(&mut text);
        text
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_series() {
        let metrics = Metrics::new();
        for (route, status) in [("other", 404), ("other", 404), ("/healthz", 200)] {
            metrics.request("api", route, status, Duration::from_micros(5));
        }
        let text = metrics.render(Some(&[]), 0, StoreSize::default());
        assert!(
            text.contains(
                r#"active_calls_agent_http_requests_total{listener="api",route="other",status="404"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"route="/healthz",status="200"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_relay_spool_age_grows_between_scrapes() {
        let metrics = Metrics::new();
        let url = metrics.relay("http://ch:8123/");
        let series = r#"active_calls_agent_relay_spool_oldest_age_seconds{url="http://ch:8123/"}"#;
        assert!(
            metrics
                .render(Some(&[]), 5_000, StoreSize::default())
                .contains(&format!("{series} 0.0"))
        );
        url.set_oldest(Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_000)));
        url.spool_bytes.set(42);
        let text = metrics.render(Some(&[]), 3_500, StoreSize::default());
        assert!(text.contains(&format!("{series} 2.5")), "{text}");
        assert!(
            text.contains(r#"active_calls_agent_relay_spool_bytes{url="http://ch:8123/"} 42"#),
            "{text}"
        );
        assert!(
            text.contains(r#"active_calls_agent_relay_sent_total{url="http://ch:8123/"} 0"#),
            "{text}"
        );
        url.set_oldest(None);
        assert!(
            metrics
                .render(Some(&[]), 9_000, StoreSize::default())
                .contains(&format!("{series} 0.0"))
        );
    }

    #[test]
    fn node_gauges_follow_the_store() {
        let metrics = Metrics::new();
        let node = |node_id, calls| NodeStats {
            node_id,
            received_at_ms: Some(1_000),
            heard_at_ms: 1_000,
            expires_at_ms: 10_000,
            period_ms: Some(2_000),
            calls,
        };
        let text = metrics.render(
            Some(&[node(1, 20), node(2, 3)]),
            3_500,
            StoreSize::default(),
        );
        assert!(
            text.contains(r#"active_calls_agent_calls{node_id="2"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"active_calls_agent_snapshot_age_seconds{node_id="1"} 2.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"active_calls_agent_node_period_seconds{node_id="1"} 2.0"#),
            "{text}"
        );
        // Node 2 expired: its series go.
        let text = metrics.render(Some(&[node(1, 20)]), 3_500, StoreSize::default());
        assert!(!text.contains(r#"node_id="2""#), "{text}");
        assert!(
            text.contains("active_calls_agent_store_readable 1"),
            "{text}"
        );

        // A store that cannot be read: no per-node series, a gauge that says so, and every
        // other series still there.
        let size = StoreSize {
            total: 3 << 20,
            wal: 1 << 20,
        };
        let text = metrics.render(None, 3_500, size);
        assert!(!text.contains("node_id="), "{text}");
        assert!(
            text.contains("active_calls_agent_store_readable 0"),
            "{text}"
        );
        assert!(
            text.contains("active_calls_agent_store_wal_bytes 1048576"),
            "{text}"
        );
        assert!(
            text.contains("active_calls_agent_store_bytes 3145728"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
