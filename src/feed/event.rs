//! Call events: what a yeti node posts about one call as it happens (SPEC 2.4).
//!
//! sems-yeti's `http_events_destination` posts one JSON object per event,
//! `{"data":{…},"local_tag":"…","type":"started"|"connected"|"disconnected"}`, with the
//! routing fields under `data.routing` and times as epoch seconds with a fraction. The
//! switch holds the call's next event until it has the answer, and sets no timeout, so
//! the listener answers as soon as the event is read, checked and queued: everything that
//! can be wrong with an event is found here, before the writer sees it, and the writer
//! only applies what is already a call.
//!
//! `data.routing` carries the same keys a snapshot row does, so it is read as one
//! ([`RawRow`]) and converted by the same rules: an event and a snapshot row of the same
//! call make the same values. The event's times are converted the way the switch writes
//! them into a snapshot: UTC text with the fraction cut.

use std::time::{Instant, SystemTime};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{BadValue, RawRow, convert, integer, text};
use crate::call::{Event, EventKind, PackedCall};
use crate::clock::{format_datetime, unix_millis};

/// The largest event body taken. A real one is 2–3 KB; its CDR headers could make it a
/// few times that.
pub const MAX_EVENT_BYTES: usize = 128 * 1024;

/// What a posted body turned out to be.
#[derive(Debug)]
pub enum Posted {
    /// An event to apply.
    Event(Box<Event>),
    /// A well-formed event of a `type` the agent does not know: answered 200, ignored,
    /// counted (a newer switch may post more kinds).
    Unknown,
}

/// Why a posted body is not an event: a one-line reason for the 400's body. `kind` is the
/// event's type when it could be read, for the metrics.
#[derive(Debug)]
pub struct Invalid {
    pub kind: Option<EventKind>,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    local_tag: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
}

/// The keys of `data` the agent reads besides `routing`.
#[derive(Deserialize, Default)]
struct RawData<'a> {
    #[serde(borrow)]
    node_id: Option<&'a RawValue>,
    #[serde(borrow)]
    start_time: Option<&'a RawValue>,
    #[serde(borrow)]
    connect_time: Option<&'a RawValue>,
    #[serde(borrow)]
    end_time: Option<&'a RawValue>,
    #[serde(borrow)]
    routing: Option<&'a RawValue>,
}

/// Reads and checks one posted body, received at `received_at`.
pub fn parse(body: &[u8], received_at: SystemTime, received: Instant) -> Result<Posted, Invalid> {
    let invalid = |kind, reason: String| Invalid { kind, reason };
    let text_body = std::str::from_utf8(body)
        .map_err(|_| invalid(None, "not a JSON object: not UTF-8".into()))?;
    let raw: RawEvent<'_> = serde_json::from_str(text_body)
        .map_err(|e| invalid(None, format!("not a JSON object: {e}")))?;
    let kind_text = raw.kind.map(text).transpose().ok().flatten();
    let kind = kind_text.as_deref().and_then(EventKind::of);
    let local_tag = raw
        .local_tag
        .map(text)
        .transpose()
        .ok()
        .flatten()
        .filter(|tag| !tag.is_empty())
        .ok_or_else(|| invalid(kind, "no local_tag".into()))?;
    let data: RawData<'_> = match raw.data {
        Some(data) => serde_json::from_str(data.get())
            .map_err(|e| invalid(kind, format!("data is not a JSON object: {e}")))?,
        None => RawData::default(),
    };
    let node_id = data
        .node_id
        .and_then(|v| integer(v).ok())
        .ok_or_else(|| invalid(kind, "no data.node_id".into()))?;
    // No `type`, or one the agent does not know: nothing it can apply (SPEC 2.4 refuses
    // only what is not an event of a call).
    let Some(kind) = kind else {
        return Ok(Posted::Unknown);
    };
    let bad = |key: &str| invalid(Some(kind), format!("bad or missing data.{key}"));
    let time = |value: Option<&RawValue>, key: &str| match value {
        None => Ok(None),
        Some(v) => epoch_ms(v).map_err(|()| bad(key)),
    };
    let start = time(data.start_time, "start_time")?;
    let connect = time(data.connect_time, "connect_time")?;
    let end = time(data.end_time, "end_time")?;
    let at_ms = match kind {
        EventKind::Started => start.ok_or_else(|| bad("start_time"))?,
        EventKind::Connected => connect.ok_or_else(|| bad("connect_time"))?,
        // The switch always says when; if not, now is the best the agent knows.
        EventKind::Disconnected => end.unwrap_or_else(|| unix_millis(received_at)),
    };
    let made = |start: Option<i64>| {
        let start = start.ok_or_else(|| bad("start_time"))?;
        let connect = (kind == EventKind::Connected).then_some(at_ms);
        call_of(&data, &local_tag, node_id, start, connect, received_at).map_err(|BadValue(key)| {
            match key {
                "start_time" | "connect_time" | "node_id" | "local_tag" => bad(key),
                routed => bad(&format!("routing.{routed}")),
            }
        })
    };
    let call = match kind {
        EventKind::Disconnected => None,
        EventKind::Started => Some(made(start)?),
        // An answer needs only its time for a call the agent knows; the call it would
        // make of an unknown one is a bonus, not a condition.
        EventKind::Connected => made(start).ok(),
    };
    Ok(Posted::Event(Box::new(Event {
        kind,
        node_id,
        local_tag: local_tag.into_owned(),
        at_ms,
        received_at,
        received,
        call,
    })))
}

/// The call an event describes: its routing converted as a snapshot row is, its times as a
/// snapshot writes them, and the receive time as its `snapshot_timestamp`.
fn call_of(
    data: &RawData<'_>,
    local_tag: &str,
    node_id: i64,
    start_ms: i64,
    connect_ms: Option<i64>,
    received_at: SystemTime,
) -> Result<PackedCall, BadValue> {
    let mut raw: RawRow<'_> = match data.routing {
        Some(routing) => {
            serde_json::from_str(routing.get()).map_err(|_| BadValue("customer_id"))?
        }
        None => RawRow::default(),
    };
    // The values the event has outside `routing`, in the form a snapshot row has them.
    let quoted = |text: String| RawValue::from_string(format!("\"{text}\""));
    let datetime = |ms: i64| quoted(format_datetime(ms.div_euclid(1000)));
    let bad = |key| move |_| BadValue(key);
    let tag = serde_json::to_string(local_tag)
        .and_then(RawValue::from_string)
        .map_err(bad("local_tag"))?;
    let node = RawValue::from_string(node_id.to_string()).map_err(bad("node_id"))?;
    let start = datetime(start_ms).map_err(bad("start_time"))?;
    let connect = connect_ms
        .map(datetime)
        .transpose()
        .map_err(bad("connect_time"))?;
    let stamp = datetime(unix_millis(received_at)).map_err(bad("start_time"))?;
    raw.local_tag = Some(&tag);
    raw.orig_call_id = None;
    raw.node_id = Some(&node);
    raw.start_time = Some(&start);
    raw.connect_time = connect.as_deref();
    raw.snapshot_timestamp = Some(&stamp);
    raw.buffered = None;
    convert(&raw).map(PackedCall::new)
}

/// An epoch time in seconds with a fraction (`1764081005.5`, as SEMS prints `%#.16g`), as
/// unix milliseconds, the fraction past them cut. `null`, and 0 or less (unset), are
/// `None`; a text that is not a number, or a time outside 1970–9999, is an error.
fn epoch_ms(value: &RawValue) -> Result<Option<i64>, ()> {
    if value.get() == "null" {
        return Ok(None);
    }
    let number = text(value)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((&number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let ms = if !whole.is_empty() && digits(whole) && digits(fraction) && whole.len() <= 12 {
        // The plain form, read exactly: no float rounds 1764081007.125 to …7.124.
        let millis: String = fraction.chars().chain("000".chars()).take(3).collect();
        whole.parse::<i64>().map_err(|_| ())? * 1000 + millis.parse::<i64>().map_err(|_| ())?
    } else {
        let seconds: f64 = number.parse().map_err(|_| ())?;
        if !seconds.is_finite() {
            return Err(());
        }
        (seconds * 1000.0).floor() as i64
    };
    match ms {
        ..=0 => Ok(None),
        // Up to the last second of 9999: a date the answer can write.
        1..=253_402_300_799_999 => Ok(Some(ms)),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> Result<Option<i64>, ()> {
        epoch_ms(&RawValue::from_string(text.to_owned()).unwrap())
    }

    #[test]
    fn epoch_times_are_read_exactly() {
        assert_eq!(ms("1764081005.5"), Ok(Some(1_764_081_005_500)));
        assert_eq!(ms("1764081004.0"), Ok(Some(1_764_081_004_000)));
        assert_eq!(ms("1764081007.125"), Ok(Some(1_764_081_007_125)));
        assert_eq!(ms("1764081007.1259"), Ok(Some(1_764_081_007_125)));
        assert_eq!(ms("1764081007"), Ok(Some(1_764_081_007_000)));
        assert_eq!(ms("\"1764081007.5\""), Ok(Some(1_764_081_007_500)));
        assert_eq!(ms("1.7640810075e9"), Ok(Some(1_764_081_007_500)));
        assert_eq!(ms("null"), Ok(None));
        assert_eq!(ms("0.0"), Ok(None));
        for bad in ["\"soon\"", "true", "1e300", "\"-\"", "\"\"", "{}"] {
            assert_eq!(ms(bad), Err(()), "{bad}");
        }
    }

    fn posted(body: &str) -> Result<Posted, Invalid> {
        parse(body.as_bytes(), SystemTime::UNIX_EPOCH, Instant::now())
    }

    fn reason(body: &str) -> String {
        match posted(body) {
            Err(invalid) => invalid.reason,
            Ok(other) => panic!("not refused: {other:?}"),
        }
    }

    const STARTED: &str = r#"{"data":{"node_id":7,"start_time":1764081006.25,"routing":{"customer_id":1001,"customer_acc_id":101,"destination_fee":"0.0","auth_orig_protocol_id":2,"auth_orig_port":8888,"src_name_in":"O'Brien"}},"local_tag":"LIVE","type":"started"}"#;

    #[test]
    fn a_started_event_makes_a_call_as_a_snapshot_row_would() {
        let Ok(Posted::Event(event)) = posted(STARTED) else {
            panic!("not an event")
        };
        assert_eq!(
            (
                event.kind,
                event.node_id,
                event.local_tag.as_str(),
                event.at_ms
            ),
            (EventKind::Started, 7, "LIVE", 1_764_081_006_250)
        );
        let call = event.call.expect("a call");
        let row = call.row();
        assert_eq!(row.start_time, "2025-11-25 14:30:06");
        assert_eq!(row.connect_time, None);
        assert_eq!(
            row.snapshot_timestamp.as_deref(),
            Some("1970-01-01 00:00:00")
        );
        assert_eq!((row.customer_id, row.customer_acc_id), (1001, 101));
        assert_eq!(
            (row.auth_orig_transport_protocol_id, row.auth_orig_port),
            (2, 8888)
        );
        assert_eq!(row.src_name_in, "O'Brien");
        assert_eq!(row.destination_fee, "0.0");
        assert_eq!((row.pai_in, row.to_domain.as_ref()), (None, ""));
    }

    #[test]
    fn bad_events_are_refused_with_one_line() {
        assert!(reason("[1]").starts_with("not a JSON object"));
        assert!(reason("{\"local_tag\":").starts_with("not a JSON object"));
        assert_eq!(
            reason(&STARTED.replace("\"local_tag\":\"LIVE\",", "")),
            "no local_tag"
        );
        assert_eq!(reason(&STARTED.replace("\"LIVE\"", "\"\"")), "no local_tag");
        assert_eq!(
            reason(&STARTED.replace("\"node_id\":7,", "")),
            "no data.node_id"
        );
        assert_eq!(
            reason(&STARTED.replace("\"node_id\":7", "\"node_id\":\"x\"")),
            "no data.node_id"
        );
        assert_eq!(
            reason(&STARTED.replace("\"customer_acc_id\":101,", "")),
            "bad or missing data.routing.customer_acc_id"
        );
        assert_eq!(
            reason(&STARTED.replace("1764081006.25", "\"yesterday\"")),
            "bad or missing data.start_time"
        );
        assert_eq!(
            reason(&STARTED.replace("\"started\"", "\"connected\"")),
            "bad or missing data.connect_time"
        );
        for reason in [
            reason("x"),
            reason(&STARTED.replace("\"customer_id\":1001", "\"customer_id\":\"a\\nb\"")),
        ] {
            assert!(!reason.contains('\n'), "one line: {reason}");
        }
    }

    #[test]
    fn an_unknown_type_is_no_error() {
        for body in [
            STARTED.replace("\"started\"", "\"transferred\""),
            STARTED.replace(",\"type\":\"started\"", ""),
            STARTED.replace("\"started\"", "null"),
        ] {
            assert!(matches!(posted(&body), Ok(Posted::Unknown)), "{body}");
        }
    }

    #[test]
    fn an_answer_needs_only_its_time() {
        let connected = STARTED.replace("\"started\"", "\"connected\"").replace(
            "\"start_time\"",
            "\"connect_time\":1764081008.5,\"start_time\"",
        );
        let Ok(Posted::Event(event)) = posted(&connected) else {
            panic!("not an event")
        };
        assert_eq!(event.at_ms, 1_764_081_008_500);
        assert!(event.call.is_some());
        let bare = connected.replace("\"customer_acc_id\":101,", "");
        let Ok(Posted::Event(event)) = posted(&bare) else {
            panic!("not an event")
        };
        assert!(
            event.call.is_none(),
            "no call to make of it, but its answer"
        );
    }

    #[test]
    fn a_disconnect_needs_only_its_key() {
        let Ok(Posted::Event(event)) = posted(
            r#"{"data":{"node_id":7,"end_time":1764081007.8},"local_tag":"X","type":"disconnected"}"#,
        ) else {
            panic!("not an event")
        };
        assert_eq!(
            (event.kind, event.at_ms),
            (EventKind::Disconnected, 1_764_081_007_800)
        );
        assert!(event.call.is_none());
    }
}
