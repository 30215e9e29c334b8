//! How an event's body is written: `arg2json` of `{"data":{…},"local_tag":"…","type":"…"}`
//! (sems-yeti `Cdr::serialize_for_http_{common,connected,disconnected}`), compact, keys in
//! byte order at every level, strings as `sems_string` writes them.
//!
//! An event is written from its call's row, so the two cannot disagree: each row key has a
//! `Role` that says where it goes in an event and in which form; what a row does not hold
//! (the B leg's instants, the disconnect fields, the routing keys a row never shows) comes
//! from the call's instants and the tables below. Where each value goes is worked out once
//! per set of row keys (a [`Layout`]), so a body is a few microseconds of copying: a
//! benchmark can make them as it posts them.

use super::super::{Call, SECOND, sems_string};
use super::{CallEvent, EventKind};

/// How a call ended: sems-yeti's disconnect fields. The internal code and reason repeat
/// the SIP ones and nothing is rewritten, as in the samples.
#[derive(Debug)]
pub(super) struct Outcome {
    /// `DisconnectInitiator` (sems-yeti `cdr/Cdr.h`): 0 routing, 1 the switch, 2 the
    /// destination, 3 the originator.
    initiator: u8,
    code: u16,
    reason: &'static str,
}

pub(super) const fn outcome(initiator: u8, code: u16, reason: &'static str) -> Outcome {
    Outcome {
        initiator,
        code,
        reason,
    }
}

/// Where a row key goes in an event. Row keys with no role (the per-snapshot keys, the
/// instants, the header keys, the tag) are not copied: an event writes those its own way
/// or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `data`, from "started" on, as the row writes it.
    Started,
    /// `data`, from "connected" on, as the row writes it.
    Connected,
    /// `data.routing`, as the row writes it: numbers, rates as strings, nulls.
    Routing,
    /// `data`, a row's 0/1 as `false`/`true` (a `bool` in the CDR).
    StartedFlag,
    /// `data.routing`, a row's 0/1 as `false`/`true`.
    RoutingFlag,
    /// The row's `auth_orig_transport_protocol_id`, routing's `auth_orig_protocol_id`.
    Protocol,
}

#[rustfmt::skip]
pub(super) const STARTED_KEYS: [&str; 11] = [
    "dump_level_id", "global_tag", "legA_local_ip", "legA_local_port", "legA_remote_ip",
    "legA_remote_port", "node_id", "orig_call_id", "pop_id", "resources", "time_limit",
];
#[rustfmt::skip]
pub(super) const CONNECTED_KEYS: [&str; 6] = [
    "attempt_num", "legB_local_ip", "legB_local_port", "legB_remote_ip", "legB_remote_port",
    "term_call_id",
];
/// The routing fields a row shows, under the same name and in the same form.
#[rustfmt::skip]
pub(super) const ROUTING_KEYS: [&str; 50] = [
    "auth_orig_ip", "auth_orig_port", "customer_acc_id", "customer_acc_vat", "customer_auth_id",
    "customer_auth_name", "customer_id", "destination_fee", "destination_id",
    "destination_initial_interval", "destination_initial_rate", "destination_next_interval",
    "destination_next_rate", "destination_prefix", "destination_rate_policy_id", "dialpeer_fee",
    "dialpeer_id", "dialpeer_initial_interval", "dialpeer_initial_rate", "dialpeer_next_interval",
    "dialpeer_next_rate", "dialpeer_prefix", "dst_area_id", "dst_country_id", "dst_network_id",
    "dst_prefix_in", "dst_prefix_out", "dst_prefix_routing", "from_domain", "lnp_database_id",
    "lrn", "metadata", "orig_gw_id", "rateplan_id", "routing_group_id", "routing_plan_id",
    "routing_tag_ids", "ruri_domain", "src_area_id", "src_country_id", "src_name_in",
    "src_name_out", "src_network_id", "src_prefix_in", "src_prefix_out", "src_prefix_routing",
    "term_gw_id", "to_domain", "vendor_acc_id", "vendor_id",
];
#[rustfmt::skip]
pub(super) const ROUTING_FLAGS: [&str; 3] = [
    "customer_acc_check_balance", "destination_reverse_billing", "dialpeer_reverse_billing",
];
/// Routing fields no row shows; the simulated routing leaves them unset, as the samples do.
#[rustfmt::skip]
pub(super) const ROUTING_NULLS: [&str; 20] = [
    "customer_acc_external_id", "customer_auth_external_id", "customer_auth_external_type",
    "customer_currency_id", "customer_currency_rate", "customer_external_id",
    "destination_attempt_fee", "destination_cdo", "dialpeer_attempt_fee", "dst_network_type_id",
    "lega_ss_status_id", "legb_ss_status_id", "orig_gw_external_id", "package_counter_id",
    "src_network_type_id", "term_gw_external_id", "vendor_acc_external_id", "vendor_currency_id",
    "vendor_currency_rate", "vendor_external_id",
];

/// The role of a row key, if it has one.
fn role(key: &str) -> Option<Role> {
    let tables: [(&[&str], Role); 6] = [
        (&STARTED_KEYS, Role::Started),
        (&CONNECTED_KEYS, Role::Connected),
        (&ROUTING_KEYS, Role::Routing),
        (&["audio_record_enabled"], Role::StartedFlag),
        (&ROUTING_FLAGS, Role::RoutingFlag),
        (&["auth_orig_transport_protocol_id"], Role::Protocol),
    ];
    tables
        .iter()
        .find(|(keys, _)| keys.contains(&key))
        .map(|(_, role)| *role)
}

/// A value an event has that its call's row does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Own {
    /// The `routing` object.
    Routing,
    /// `start_time`, and `cdr_born_time`: the simulated CDR is born as the call starts.
    Start,
    Connect,
    /// The B leg's INVITE, 100 Trying and 180 Ringing ([`leg_b`]).
    Invite,
    Trying,
    Ringing,
    BlegTag,
    End,
    Initiator,
    Code,
    Reason,
}

/// Where an event takes a value from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The row's value at this index of its fields, as the row writes it.
    Row(usize),
    /// The row's 0/1 at this index, as `false`/`true`.
    Flag(usize),
    /// This JSON text, always.
    Text(&'static str),
    Own(Own),
}

/// The `data` keys an event has beyond its row's: from "started" on, from the answer on,
/// at the end. The headers are the CDR's, keyed by header name; the samples' calls carry
/// none.
const STARTED_OWN: [(&str, Source); 5] = [
    ("aleg_headers", Source::Text("{}")),
    ("bleg_headers", Source::Text("{}")),
    ("cdr_born_time", Source::Own(Own::Start)),
    ("routing", Source::Own(Own::Routing)),
    ("start_time", Source::Own(Own::Start)),
];
const CONNECTED_OWN: [(&str, Source); 8] = [
    ("active_resources", Source::Text("{}")),
    ("bleg_connect_time", Source::Own(Own::Connect)),
    ("bleg_invite_time", Source::Own(Own::Invite)),
    ("bleg_local_tag", Source::Own(Own::BlegTag)),
    ("connect_time", Source::Own(Own::Connect)),
    ("sip_10x_time", Source::Own(Own::Trying)),
    ("sip_18x_time", Source::Own(Own::Ringing)),
    ("sip_early_media_present", Source::Text("false")),
];
const DISCONNECTED_OWN: [(&str, Source); 9] = [
    ("disconnect_code", Source::Own(Own::Code)),
    ("disconnect_initiator", Source::Own(Own::Initiator)),
    ("disconnect_internal_code", Source::Own(Own::Code)),
    ("disconnect_internal_reason", Source::Own(Own::Reason)),
    ("disconnect_reason", Source::Own(Own::Reason)),
    ("disconnect_rewrited_code", Source::Text("0")),
    ("disconnect_rewrited_reason", Source::Text("\"\"")),
    ("end_time", Source::Own(Own::End)),
    ("is_redirected", Source::Text("false")),
];

/// An object to write: for each key in byte order (`std::map`), the text before its value
/// (`{"key":` or `,"key":`) and where the value comes from.
type Template = Vec<(String, Source)>;

fn template(mut entries: Vec<(&str, Source)>) -> Template {
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let open = |i: usize| if i == 0 { '{' } else { ',' };
    entries
        .iter()
        .enumerate()
        .map(|(i, (key, source))| (format!("{}\"{key}\":", open(i)), *source))
        .collect()
}

/// How to write the events of calls whose rows have one set of keys. Every call a switch
/// makes has the same keys (with `buffered` or without), so the byte order of an event's
/// keys and where each value comes from are worked out once; an event is then text and
/// values copied in a fixed order, with no key looked up or compared.
pub(in crate::lab::sems) struct Layout {
    /// The row's keys, in its order.
    keys: Vec<&'static str>,
    routing: Template,
    /// `data`, by [`Stage`].
    data: [Template; 4],
}

/// Which keys an event's `data` has: they accumulate as the call goes.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Started,
    Connected,
    EndedRinging,
    EndedAnswered,
}

impl Layout {
    fn of(call: &Call) -> Layout {
        let keys: Vec<&'static str> = call.fields.iter().map(|(k, _)| *k).collect();
        let mut routing: Vec<(&str, Source)> = ROUTING_NULLS
            .iter()
            .map(|k| (*k, Source::Text("null")))
            .collect();
        let (mut started, mut connected) = (STARTED_OWN.to_vec(), CONNECTED_OWN.to_vec());
        for (i, key) in keys.iter().enumerate() {
            match role(key) {
                Some(Role::Started) => started.push((key, Source::Row(i))),
                Some(Role::StartedFlag) => started.push((key, Source::Flag(i))),
                Some(Role::Connected) => connected.push((key, Source::Row(i))),
                Some(Role::Routing) => routing.push((key, Source::Row(i))),
                Some(Role::RoutingFlag) => routing.push((key, Source::Flag(i))),
                Some(Role::Protocol) => routing.push(("auth_orig_protocol_id", Source::Row(i))),
                None => {}
            }
        }
        let stage = |parts: &[&[(&str, Source)]]| template(parts.concat());
        Layout {
            routing: template(routing),
            data: [
                stage(&[&started]),
                stage(&[&started, &connected]),
                stage(&[&started, &DISCONNECTED_OWN]),
                stage(&[&started, &connected, &DISCONNECTED_OWN]),
            ],
            keys,
        }
    }

    /// Whether `call`'s row has this layout's keys: the same literals, so mostly the
    /// same pointers, compared before the text.
    fn fits(&self, call: &Call) -> bool {
        self.keys.len() == call.fields.len()
            && self
                .keys
                .iter()
                .zip(&call.fields)
                .all(|(a, (b, _))| std::ptr::eq(*a, *b) || a == b)
    }
}

/// What changed, which is what an event reports.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change {
    Started,
    Connected,
    Disconnected(&'static Outcome),
}

/// An event as it is being written: the call, what changed and when.
struct Writing<'a> {
    call: &'a Call,
    layout: &'a Layout,
    change: Change,
    at_ms: i64,
}

impl Writing<'_> {
    fn object(&self, out: &mut String, template: &Template) {
        if template.is_empty() {
            out.push('{');
        }
        for (before, source) in template {
            out.push_str(before);
            let row = |i: usize| self.call.fields.get(i).map_or("null", |(_, v)| v.as_str());
            match *source {
                Source::Row(i) => out.push_str(row(i)),
                Source::Flag(i) => out.push_str(if row(i) == "0" { "false" } else { "true" }),
                Source::Text(text) => out.push_str(text),
                Source::Own(own) => self.own(out, own),
            }
        }
        out.push('}');
    }

    fn own(&self, out: &mut String, own: Own) {
        let call = self.call;
        // Only the stages after an answer write its instants, only "disconnected" its end
        // and outcome.
        let connect = call.connect_ms.unwrap_or(call.start_ms);
        let [invite, trying, ringing] = leg_b(call.start_ms, connect);
        let outcome = match self.change {
            Change::Disconnected(outcome) => Some(outcome),
            Change::Started | Change::Connected => None,
        };
        match own {
            Own::Routing => self.object(out, &self.layout.routing),
            Own::Start => write_epoch(out, Some(call.start_ms)),
            Own::Connect => write_epoch(out, Some(connect)),
            Own::Invite => write_epoch(out, Some(invite)),
            Own::Trying => write_epoch(out, Some(trying)),
            Own::Ringing => write_epoch(out, Some(ringing)),
            // The B leg's tag: the A leg's with a `B` first, as in the samples.
            Own::BlegTag => {
                let tag = format!("B{}", call.local_tag.get(1..).unwrap_or_default());
                out.push_str(&sems_string(&tag));
            }
            Own::End => write_epoch(out, Some(self.at_ms)),
            Own::Initiator => out.push_str(&outcome.map_or(0, |o| o.initiator).to_string()),
            Own::Code => out.push_str(&outcome.map_or(0, |o| o.code).to_string()),
            Own::Reason => out.push_str(&sems_string(outcome.map_or("", |o| o.reason))),
        }
    }
}

/// SEMS's `double2str` as the samples show it: `%#.16g`, then the fraction's trailing
/// zeros cut but one digit kept (`1764081005.5`, `1764081004.0`, `1764081007.125`); the
/// exponent form as printed; NaN and infinities `null`, as `arg2json` writes them.
///
/// SEMS's own `double2str` (yeti-switch/sems `core/AmUtils.cpp`, from jsoncpp) keeps one
/// zero after the last nonzero digit (`…5.50`, `…7.1250`); the samples, which this project
/// treats as what a node sends, do not, so this follows the samples. Both parse to the
/// same number.
pub fn sems_double(value: f64) -> String {
    if !value.is_finite() {
        return "null".to_owned();
    }
    // %g: the exponent of the value rounded to 16 digits picks the form.
    let scientific = format!("{value:.15e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs());
    }
    let mut text = format!("{value:.*}", (15 - exponent) as usize);
    if !text.contains('.') {
        // `#` keeps the point even with no digit after it.
        text.push('.');
    }
    while text.ends_with('0') && !text.ends_with(".0") {
        text.pop();
    }
    text
}

/// Appends an instant (unix milliseconds) as an event writes it: epoch seconds, `null`
/// when unset.
///
/// What [`sems_double`] prints for `ms / 1000`, written from the integers: with ten digits
/// of seconds `%#.16g` leaves six decimals, enough for every millisecond exactly, and an
/// event writes up to nine instants, where formatting floats would cost a tenth of it.
pub(super) fn write_epoch(out: &mut String, ms: Option<i64>) {
    let Some(ms) = ms else {
        out.push_str("null");
        return;
    };
    let (seconds, millis) = (ms.div_euclid(SECOND), ms.rem_euclid(SECOND));
    if !(1_000_000_000..10_000_000_000).contains(&seconds) {
        out.push_str(&sems_double(ms as f64 / SECOND as f64));
        return;
    }
    // Ten digits, the point, three decimals with their trailing zeros cut but one kept.
    let mut text = [b'0'; 14];
    text[10] = b'.';
    let mut n = seconds;
    for digit in text[..10].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    for (digit, unit) in text[11..].iter_mut().zip([100, 10, 1]) {
        *digit = b'0' + (millis / unit % 10) as u8;
    }
    let mut len = 14;
    while len > 12 && text[len - 1] == b'0' {
        len -= 1;
    }
    text[..len].iter().for_each(|&b| out.push(char::from(b)));
}

/// The B leg's instants a snapshot never shows (INVITE sent, 100 Trying, 180 Ringing),
/// between the call's start and its answer, from those two alone: a call's "connected" and
/// "disconnected" carry the same values without the call storing them.
fn leg_b(start_ms: i64, connect_ms: i64) -> [i64; 3] {
    let invite = start_ms + ((connect_ms - start_ms) / 10).min(120);
    let trying = invite + ((connect_ms - invite) / 10).min(40);
    let ringing = connect_ms - ((connect_ms - trying) / 2).min(1_500);
    [invite, trying, ringing]
}

/// The event of `change` to `call` as it stands, at `at_ms`, written with the layout of
/// its row (found among `layouts`, or worked out and added).
pub(super) fn event(
    layouts: &mut Vec<Layout>,
    call: &Call,
    change: Change,
    at_ms: i64,
) -> CallEvent {
    let index = match layouts.iter().position(|l| l.fits(call)) {
        Some(index) => index,
        None => {
            layouts.push(Layout::of(call));
            layouts.len() - 1
        }
    };
    let layout = &layouts[index];
    let (kind, stage) = match (change, call.connect_ms) {
        (Change::Started, _) => (EventKind::Started, Stage::Started),
        (Change::Connected, _) => (EventKind::Connected, Stage::Connected),
        (Change::Disconnected(_), None) => (EventKind::Disconnected, Stage::EndedRinging),
        (Change::Disconnected(_), Some(_)) => (EventKind::Disconnected, Stage::EndedAnswered),
    };
    let writing = Writing {
        call,
        layout,
        change,
        at_ms,
    };
    let mut body = String::with_capacity(4_096);
    body.push_str("{\"data\":");
    writing.object(&mut body, &layout.data[stage as usize]);
    body.push_str(",\"local_tag\":");
    body.push_str(&sems_string(&call.local_tag));
    body.push_str(",\"type\":\"");
    body.push_str(kind.as_str());
    body.push_str("\"}");
    CallEvent {
        at_ms,
        kind,
        local_tag: call.local_tag.clone(),
        body: body.into_bytes(),
    }
}
