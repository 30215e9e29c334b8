//! The live streams' series (SPEC 7): how many are open, what they send, why they end,
//! and how long a commit takes to reach them.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::series;

/// What a stream shows: a customer's calls, or the node's.
pub const KINDS: [&str; 2] = ["customer", "node"];
/// The events a stream sends.
pub const EVENTS: [&str; 3] = ["snapshot", "changes", "end"];
/// Why a stream ended: its client left, or the `end` event's reasons.
pub const ENDED: [&str; 6] = ["client", "expired", "revoked", "stopping", "slow", "error"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

series! {
    /// The streams' series, under the agent's prefix.
    pub struct StreamMetrics {
        open: Family<KindLabels, Gauge> => "streams_open",
            "Live streams open, per kind (customer: the endpoint's; node: the scrape's)";
        events: Family<EventLabels, Counter> => "stream_events",
            "Events sent on live streams, per event";
        ended: Family<ReasonLabels, Counter> => "streams_ended",
            "Live streams ended, per reason (client: it left; expired: its token; revoked: \
             its access, account or scrape token left; stopping: the agent; slow: its client \
             fell too far behind; error: the store could not be read)";
        refused: Counter => "streams_refused",
            "Live streams refused with 503 at api.max_streams";
        // 50 µs to ~3 s: an event read at once, to a 100k-call period read by every stream
        // of a loaded host.
        publish_to_send: Histogram = Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
            => "stream_publish_to_send" in Seconds,
            "Time from a commit's publication to a stream's event that shows it, queued to \
             its connection";
    }
}

impl Default for StreamMetrics {
    fn default() -> Self {
        let metrics = StreamMetrics::new();
        // Every series from the start: an alert on a rate needs the zero before the rise.
        for kind in KINDS {
            let _ = metrics.open.get_or_create(&KindLabels { kind });
        }
        for event in EVENTS {
            let _ = metrics.events.get_or_create(&EventLabels { event });
        }
        for reason in ENDED {
            let _ = metrics.ended.get_or_create(&ReasonLabels { reason });
        }
        metrics
    }
}

/// An open stream, counted until dropped.
pub struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl StreamMetrics {
    /// A stream of `kind` opens; it counts as open until the guard is dropped.
    pub fn opened(&self, kind: &'static str) -> OpenStream {
        let gauge = self.open.get_or_create(&KindLabels { kind }).clone();
        gauge.inc();
        OpenStream(gauge)
    }

    pub fn sent(&self, event: &'static str) {
        self.events.get_or_create(&EventLabels { event }).inc();
    }

    pub fn ended(&self, reason: &'static str) {
        self.ended.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn publish_to_send(&self, after: Duration) {
        self.publish_to_send.observe(after.as_secs_f64());
    }
}
