//! What one call is: a row as the feed reads it from a snapshot line and as the store
//! keeps it, and the key of its line.
//!
//! Both the feed and the store work with these types; they live below both, so that the
//! feed imports the store and the store never imports the feed.

use std::borrow::Cow;

/// One call, converted and checked, borrowing from the line it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRow<'a> {
    pub node_id: i64,
    pub local_tag: Cow<'a, str>,
    pub customer_id: i64,
    pub customer_acc_id: i64,
    /// `None`: the row has none, the snapshot's receive time stands in.
    pub snapshot_timestamp: Option<Cow<'a, str>>,
    pub start_time: Cow<'a, str>,
    pub connect_time: Option<Cow<'a, str>>,
    pub destination_prefix: Cow<'a, str>,
    pub destination_initial_interval: i64,
    pub destination_initial_rate: Cow<'a, str>,
    pub destination_next_interval: i64,
    pub destination_next_rate: Cow<'a, str>,
    pub destination_fee: Cow<'a, str>,
    pub src_name_in: Cow<'a, str>,
    pub src_prefix_in: Cow<'a, str>,
    pub dst_prefix_in: Cow<'a, str>,
    pub src_prefix_routing: Cow<'a, str>,
    pub dst_prefix_routing: Cow<'a, str>,
    pub from_domain: Cow<'a, str>,
    pub to_domain: Cow<'a, str>,
    pub ruri_domain: Cow<'a, str>,
    pub diversion_in: Option<Cow<'a, str>>,
    pub pai_in: Option<Cow<'a, str>>,
    pub ppi_in: Option<Cow<'a, str>>,
    pub privacy_in: Option<Cow<'a, str>>,
    pub rpid_in: Option<Cow<'a, str>>,
    pub rpid_privacy_in: Option<Cow<'a, str>>,
    pub auth_orig_transport_protocol_id: i64,
    pub auth_orig_ip: Cow<'a, str>,
    pub auth_orig_port: i64,
}

impl CallRow<'_> {
    /// The same row, owning its text (to cross from the reader thread to the writer).
    pub fn into_owned(self) -> CallRow<'static> {
        fn own(text: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(text.into_owned())
        }
        fn own_opt(text: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
            text.map(own)
        }
        CallRow {
            node_id: self.node_id,
            local_tag: own(self.local_tag),
            customer_id: self.customer_id,
            customer_acc_id: self.customer_acc_id,
            snapshot_timestamp: own_opt(self.snapshot_timestamp),
            start_time: own(self.start_time),
            connect_time: own_opt(self.connect_time),
            destination_prefix: own(self.destination_prefix),
            destination_initial_interval: self.destination_initial_interval,
            destination_initial_rate: own(self.destination_initial_rate),
            destination_next_interval: self.destination_next_interval,
            destination_next_rate: own(self.destination_next_rate),
            destination_fee: own(self.destination_fee),
            src_name_in: own(self.src_name_in),
            src_prefix_in: own(self.src_prefix_in),
            dst_prefix_in: own(self.dst_prefix_in),
            src_prefix_routing: own(self.src_prefix_routing),
            dst_prefix_routing: own(self.dst_prefix_routing),
            from_domain: own(self.from_domain),
            to_domain: own(self.to_domain),
            ruri_domain: own(self.ruri_domain),
            diversion_in: own_opt(self.diversion_in),
            pai_in: own_opt(self.pai_in),
            ppi_in: own_opt(self.ppi_in),
            privacy_in: own_opt(self.privacy_in),
            rpid_in: own_opt(self.rpid_in),
            rpid_privacy_in: own_opt(self.rpid_privacy_in),
            auth_orig_transport_protocol_id: self.auth_orig_transport_protocol_id,
            auth_orig_ip: own(self.auth_orig_ip),
            auth_orig_port: self.auth_orig_port,
        }
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
