//! What one call is: a row as the feed reads it from a snapshot line and as the store
//! keeps it, the key of its line, and a call event (what the switch says of one call
//! between snapshots).
//!
//! Both the feed and the store work with these types; they live below both, so that the
//! feed imports the store and the store never imports the feed.

use std::borrow::Cow;

/// One call, converted and checked, its text of type `T`: see [`CallRow`] and
/// [`PackedRow`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row<T> {
    pub node_id: i64,
    pub local_tag: T,
    pub customer_id: i64,
    pub customer_acc_id: i64,
    /// `None`: the row has none, the snapshot's receive time stands in.
    pub snapshot_timestamp: Option<T>,
    pub start_time: T,
    pub connect_time: Option<T>,
    pub destination_prefix: T,
    pub destination_initial_interval: i64,
    pub destination_initial_rate: T,
    pub destination_next_interval: i64,
    pub destination_next_rate: T,
    pub destination_fee: T,
    pub src_name_in: T,
    pub src_prefix_in: T,
    pub dst_prefix_in: T,
    pub src_prefix_routing: T,
    pub dst_prefix_routing: T,
    pub from_domain: T,
    pub to_domain: T,
    pub ruri_domain: T,
    pub diversion_in: Option<T>,
    pub pai_in: Option<T>,
    pub ppi_in: Option<T>,
    pub privacy_in: Option<T>,
    pub rpid_in: Option<T>,
    pub rpid_privacy_in: Option<T>,
    pub auth_orig_transport_protocol_id: i64,
    pub auth_orig_ip: T,
    pub auth_orig_port: i64,
    /// A row of a call that ended during the period (the switch's `buffering`): shown like
    /// the others, but never the one that brings back a call an event ended.
    pub buffered: bool,
}

/// A call borrowing its text from the line it was read from (or owning what had to be
/// unescaped).
pub type CallRow<'a> = Row<Cow<'a, str>>;

/// A call whose text lies in a buffer it shares with other rows, as byte ranges: how a
/// parsed row crosses from the reader thread to the writer. Thirty strings a row, each its
/// own allocation made on one thread and freed on the other, were a tenth of a full
/// apply's CPU; a block's rows share one buffer, reused from block to block.
pub type PackedRow = Row<std::ops::Range<u32>>;

impl<T> Row<T> {
    /// The same row with each text mapped by `f`.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Row<U> {
        Row {
            node_id: self.node_id,
            local_tag: f(self.local_tag),
            customer_id: self.customer_id,
            customer_acc_id: self.customer_acc_id,
            snapshot_timestamp: self.snapshot_timestamp.map(&mut f),
            start_time: f(self.start_time),
            connect_time: self.connect_time.map(&mut f),
            destination_prefix: f(self.destination_prefix),
            destination_initial_interval: self.destination_initial_interval,
            destination_initial_rate: f(self.destination_initial_rate),
            destination_next_interval: self.destination_next_interval,
            destination_next_rate: f(self.destination_next_rate),
            destination_fee: f(self.destination_fee),
            src_name_in: f(self.src_name_in),
            src_prefix_in: f(self.src_prefix_in),
            dst_prefix_in: f(self.dst_prefix_in),
            src_prefix_routing: f(self.src_prefix_routing),
            dst_prefix_routing: f(self.dst_prefix_routing),
            from_domain: f(self.from_domain),
            to_domain: f(self.to_domain),
            ruri_domain: f(self.ruri_domain),
            diversion_in: self.diversion_in.map(&mut f),
            pai_in: self.pai_in.map(&mut f),
            ppi_in: self.ppi_in.map(&mut f),
            privacy_in: self.privacy_in.map(&mut f),
            rpid_in: self.rpid_in.map(&mut f),
            rpid_privacy_in: self.rpid_privacy_in.map(&mut f),
            auth_orig_transport_protocol_id: self.auth_orig_transport_protocol_id,
            auth_orig_ip: f(self.auth_orig_ip),
            auth_orig_port: self.auth_orig_port,
            buffered: self.buffered,
        }
    }
}

impl CallRow<'_> {
    /// The same row, owning its text.
    pub fn into_owned(self) -> CallRow<'static> {
        self.map(|text| Cow::Owned(text.into_owned()))
    }

    /// The row with its text appended to `buffer` (a buffer of less than 4 GB).
    pub fn pack(self, buffer: &mut String) -> PackedRow {
        self.map(|text| {
            let start = buffer.len() as u32;
            buffer.push_str(&text);
            start..buffer.len() as u32
        })
    }
}

impl PackedRow {
    /// The row again, borrowing its text from the `buffer` it was packed into.
    pub fn unpack<'b>(&self, buffer: &'b str) -> CallRow<'b> {
        self.clone().map(|range| {
            Cow::Borrowed(
                buffer
                    .get(range.start as usize..range.end as usize)
                    .unwrap_or(""),
            )
        })
    }
}

/// What identifies a snapshot line apart from the values that change with every snapshot:
/// a switch resends an unchanged call as the same bytes but for these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineKey<'a> {
    /// xxh3 of the line with its per-snapshot values cut out (`feed::key`).
    pub hash: i64,
    /// The row's `snapshot_timestamp` as the scan read it (`None`: absent or null).
    pub snapshot_timestamp: Option<&'a str>,
}

impl LineKey<'_> {
    /// Whether the scan that made this key read the line's one per-snapshot value the
    /// agent uses as the full parse did: only then may the key stand for the row.
    pub fn agrees_with(&self, row: &CallRow<'_>) -> bool {
        self.snapshot_timestamp == row.snapshot_timestamp.as_deref()
    }
}

/// What a call event says happened (SPEC 2.4), in the order a call's events come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Routed: the call is current from now on.
    Started,
    /// Answered: the call's `connect_time` is set.
    Connected,
    /// Ended: the call is gone.
    Disconnected,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [
        EventKind::Started,
        EventKind::Connected,
        EventKind::Disconnected,
    ];

    /// The event's `type`, as the switch writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Connected => "connected",
            EventKind::Disconnected => "disconnected",
        }
    }

    pub fn of(text: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One call event, checked and converted: how it crosses from the feed's listener to the
/// writer. Its call is packed (one buffer, not thirty strings), since thousands may wait
/// in the writer's queue while a large snapshot applies.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub node_id: i64,
    pub local_tag: String,
    /// The switch's time of what happened (unix ms): the start, the answer or the end.
    pub at_ms: i64,
    /// When the agent received it: the node was heard then, and a call it makes shows this
    /// as its `snapshot_timestamp`.
    pub received_at: std::time::SystemTime,
    /// The same instant on the monotonic clock, for the event-to-visible latency.
    pub received: std::time::Instant,
    /// The call as the event describes it (`started` and `connected`; `None` for
    /// `disconnected`, which needs only the key).
    pub call: Option<PackedCall>,
}

/// A call row that owns its text in one buffer.
#[derive(Debug, Clone)]
pub struct PackedCall {
    text: String,
    row: PackedRow,
}

impl PackedCall {
    pub fn new(row: CallRow<'_>) -> PackedCall {
        let mut text = String::new();
        let row = row.pack(&mut text);
        PackedCall { text, row }
    }

    pub fn row(&self) -> CallRow<'_> {
        self.row.unpack(&self.text)
    }
}
