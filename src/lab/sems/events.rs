//! Call events as a node with `http_events_destination` posts them between snapshots.
//!
//! sems-yeti (`SBCCallLeg::httpCall{Started,Connected,Disconnected}Hook`,
//! `shared/samples/README.md`) posts one request per change of a call: "started" once routing
//! chose a route, "connected" at the answer, "disconnected" when the A leg ends. `data`
//! grows with the call (one map per call): "connected" repeats what "started" carried and
//! "disconnected" everything before it. How a body is written is `body`'s; here, which
//! events a switch's calls make and when.

use std::collections::VecDeque;

use super::{Call, SECOND, Switch};

mod body;

pub use crate::call::EventKind;
pub(super) use body::Layout;
pub use body::sems_double;
use body::{Change, Outcome, event, outcome};

/// One event, as the node posts it.
#[derive(Debug, Clone)]
pub struct CallEvent {
    /// When the change it reports happened (unix milliseconds): its `start_time`,
    /// `connect_time` or `end_time`.
    pub at_ms: i64,
    pub kind: EventKind,
    /// The A leg's local tag (the body's `local_tag`).
    pub local_tag: String,
    /// The request body, byte for byte.
    pub body: Vec<u8>,
}

/// Shares of a period's calls, as [`Switch::period`] has them.
const ENDED: f64 = 0.03;
const ANSWERED: f64 = 0.03;
/// Attempts refused within a period, as a share of the calls (at least one).
const ATTEMPTS: f64 = 0.01;
/// The longest a refused attempt lasts.
const ATTEMPT_MS: i64 = 3_000;
/// In [`Switch::events`], the slots between an attempt's start and its refusal.
const ATTEMPT_SLOTS: usize = 4;
/// How many random calls [`Switch::events`] looks at for one it can answer or end.
const PROBES: usize = 8;

/// An answered call ends with a BYE from either side.
const HANG_UPS: [Outcome; 2] = [outcome(3, 200, "Bye"), outcome(2, 200, "Bye")];
/// A ringing call is cancelled by its caller.
const CANCEL: Outcome = outcome(3, 487, "Request Terminated");
/// An attempt the destination refuses.
const REFUSALS: [Outcome; 4] = [
    outcome(2, 503, "Service Unavailable"),
    outcome(2, 486, "Busy Here"),
    outcome(2, 480, "Temporarily Unavailable"),
    outcome(2, 404, "Not Found"),
];

/// The last instant a call has reported: its answer, or its start.
fn last_instant(call: &Call) -> i64 {
    call.connect_ms.unwrap_or(call.start_ms)
}

impl Switch {
    /// One period of `seconds` ending at `now` (as [`Switch::period`] has it: 3% of the
    /// calls end, as many start, 3% of those ringing are answered), returning the events a
    /// node posts during it in posting (time) order, plus a few attempts that start and are
    /// refused within the period ("started" then "disconnected", never in a snapshot).
    ///
    /// Instants fall in the period with millisecond fractions; afterwards [`Switch::render`]
    /// at `now` shows exactly the state the events leave (ended calls buffered when
    /// buffering). Meant for [`super::Style::Sems`]: a legacy switch's events carry its
    /// legacy values.
    pub fn period_with_events(&mut self, now: i64, seconds: i64) -> Vec<CallEvent> {
        let end = now * SECOND;
        let span = seconds.max(1) * SECOND;
        let mut events = Vec::new();
        let total = self.calls.len();
        for _ in 0..(total as f64 * ENDED).round() as usize {
            if self.calls.is_empty() {
                break;
            }
            let i = self.rng.usize(..self.calls.len());
            let call = self.calls.swap_remove(i);
            // After what it has already reported, even when that was at the period's end.
            let at = (end - self.rng.i64(0..span))
                .max(last_instant(&call) + 1)
                .min(end);
            let end_of = self.end_of(&call);
            events.push(event(&mut self.layouts, &call, end_of, at));
            self.end(call, at);
        }
        // Calls that began at the period's very end cannot be answered within it.
        let waiting: Vec<usize> = (0..self.calls.len())
            .filter(|&i| self.calls[i].connect_ms.is_none() && self.calls[i].start_ms < end)
            .collect();
        for &i in waiting
            .iter()
            .take((waiting.len() as f64 * ANSWERED).round() as usize)
        {
            let at = (end - self.rng.i64(0..span))
                .max(self.calls[i].start_ms + 1)
                .min(end);
            self.answer(i, at);
            events.push(event(
                &mut self.layouts,
                &self.calls[i],
                Change::Connected,
                at,
            ));
        }
        while self.calls.len() < total {
            let start = end - self.rng.i64(0..span);
            let call = self.new_call(start, end, 1);
            events.push(event(&mut self.layouts, &call, Change::Started, start));
            // Some are answered within the period too.
            if let Some(connect) = call.connect_ms {
                events.push(event(&mut self.layouts, &call, Change::Connected, connect));
            }
            self.calls.push(call);
        }
        for _ in 0..((total as f64 * ATTEMPTS).round() as usize).max(1) {
            let start = end - self.rng.i64(1..span);
            let refused = start + self.rng.i64(1..=(end - start).min(ATTEMPT_MS));
            events.extend(self.attempt(start, refused));
        }
        // Stable: a call's events, pushed in order, keep it when their instants tie.
        events.sort_by_key(|e| e.at_ms);
        events
    }

    /// `n` events at instants spread evenly over (`from_ms`, `to_ms`], in time order, with
    /// no snapshot in between: a sustained stream for a benchmark. Calls start (and some
    /// are refused a few events later), ringing calls are answered and calls end in the
    /// shares that keep the number of calls steady; [`Switch::render`] afterwards shows
    /// the state they leave. `from_ms` is not before the switch's latest instant (the
    /// last `fill`, `period` or event). With buffering on, ended calls are held until the
    /// next render.
    ///
    /// Cost: a body is a few microseconds of copying; a start also makes the call's row
    /// (as [`Switch::fill`] does, about 10 µs), so an event averages under 10 µs on a
    /// common machine, generated in the posting loop.
    pub fn events(&mut self, n: usize, from_ms: i64, to_ms: i64) -> Vec<CallEvent> {
        let span = (to_ms - from_ms).max(0);
        let mut events = Vec::with_capacity(n);
        // Attempts in flight, by the slot of their refusal: a fixed lag keeps that order
        // the order they started in, so the front is always the next one due.
        let mut refusals: VecDeque<(usize, Call)> = VecDeque::new();
        for slot in 0..n {
            let at = from_ms + (slot as i64 + 1) * span / n as i64;
            if refusals.front().is_some_and(|(due, _)| *due == slot) {
                if let Some((_, call)) = refusals.pop_front() {
                    let refusal = self.refusal();
                    events.push(event(&mut self.layouts, &call, refusal, at));
                }
                continue;
            }
            // Of every 20 slots drawn: 2 attempts, 7 starts, 4 answers, 7 ends. Starts
            // match ends, so the number of calls holds, and about half of them are answered.
            let done = match self.rng.u8(..20) {
                0 | 1 if slot + ATTEMPT_SLOTS < n => {
                    let call = self.new_call(at, at, 1);
                    events.push(event(&mut self.layouts, &call, Change::Started, at));
                    refusals.push_back((slot + ATTEMPT_SLOTS, call));
                    true
                }
                9..=12 => match self.probe(|c| c.connect_ms.is_none() && c.start_ms < at) {
                    Some(i) => {
                        self.answer(i, at);
                        let call = &self.calls[i];
                        events.push(event(&mut self.layouts, call, Change::Connected, at));
                        true
                    }
                    None => false,
                },
                13.. => match self.probe(|c| last_instant(c) < at) {
                    Some(i) => {
                        let call = self.calls.swap_remove(i);
                        let end_of = self.end_of(&call);
                        events.push(event(&mut self.layouts, &call, end_of, at));
                        self.end(call, at);
                        true
                    }
                    None => false,
                },
                _ => false,
            };
            if !done {
                // A start, also where no call fits an answer or an end.
                let call = self.new_call(at, at, 1);
                events.push(event(&mut self.layouts, &call, Change::Started, at));
                self.calls.push(call);
            }
        }
        events
    }

    /// How a call in progress ends: a hang-up once answered, a cancel while ringing.
    fn end_of(&mut self, call: &Call) -> Change {
        Change::Disconnected(match call.connect_ms {
            Some(_) => &HANG_UPS[self.rng.usize(..HANG_UPS.len())],
            None => &CANCEL,
        })
    }

    /// How an attempt ends: refused.
    fn refusal(&mut self) -> Change {
        Change::Disconnected(&REFUSALS[self.rng.usize(..REFUSALS.len())])
    }

    /// A random call that `fits`, if one of a few looked at does.
    fn probe(&mut self, fits: impl Fn(&Call) -> bool) -> Option<usize> {
        if self.calls.is_empty() {
            return None;
        }
        (0..PROBES)
            .map(|_| self.rng.usize(..self.calls.len()))
            .find(|&i| fits(&self.calls[i]))
    }

    /// An attempt that starts at `start_ms` and is refused at `refused_ms`: it never joins
    /// the calls, so no snapshot shows it.
    fn attempt(&mut self, start_ms: i64, refused_ms: i64) -> [CallEvent; 2] {
        let call = self.new_call(start_ms, start_ms, 1);
        let refusal = self.refusal();
        [
            event(&mut self.layouts, &call, Change::Started, start_ms),
            event(&mut self.layouts, &call, refusal, refused_ms),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use serde_json::Value;

    use super::body::write_epoch;
    use super::body::{CONNECTED_KEYS, ROUTING_FLAGS, ROUTING_KEYS, ROUTING_NULLS, STARTED_KEYS};
    use super::*;
    use crate::clock::format_datetime;
    use crate::lab::sems::tests::{NOW, Ordered, rows, spaced, value};

    const STARTED: &str = include_str!("../../../tests/fixtures/events/01-started-EPH.json");
    const REFUSED: &str = include_str!("../../../tests/fixtures/events/02-disconnected-EPH.json");
    const HUNG_UP: &str =
        include_str!("../../../tests/fixtures/events/04-disconnected-922631C6.json");
    const CANCELLED: &str =
        include_str!("../../../tests/fixtures/events/05-disconnected-81CC8265.json");
    const CONNECTED: &str = include_str!("../../../tests/fixtures/events/06-connected-LIVE.json");

    /// The data keys that hold instants.
    const TIMES: [&str; 8] = [
        "bleg_connect_time",
        "bleg_invite_time",
        "cdr_born_time",
        "connect_time",
        "end_time",
        "sip_10x_time",
        "sip_18x_time",
        "start_time",
    ];

    /// The literal text of `"key":` 's value in a compact body.
    fn literal<'a>(body: &'a str, key: &str) -> Option<&'a str> {
        let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
        let len = body[at..].find([',', '}'])?;
        Some(&body[at..at + len])
    }

    /// Checks what every body must be and returns it parsed.
    fn checked(event: &CallEvent) -> Value {
        let text = std::str::from_utf8(&event.body).unwrap();
        assert!(text.is_ascii(), "non-ASCII escaped: {text}");
        assert!(!spaced(text), "compact: {text}");
        serde_json::from_str::<Ordered>(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let body: Value = serde_json::from_str(text).unwrap();
        assert_eq!(body["type"], event.kind.as_str());
        assert_eq!(body["local_tag"], event.local_tag.as_str());
        for key in TIMES {
            if let Some(text) = literal(text, key).filter(|t| *t != "null") {
                let seconds: f64 = text.parse().unwrap();
                assert_eq!(sems_double(seconds), text, "{key}");
                let (whole, fraction) = text.split_once('.').unwrap();
                assert!(
                    whole.len() == 10 && (1..=3).contains(&fraction.len()),
                    "{text}"
                );
            }
        }
        let instant = match event.kind {
            EventKind::Started => "start_time",
            EventKind::Connected => "connect_time",
            EventKind::Disconnected => "end_time",
        };
        assert_eq!(ms(&body["data"][instant]), event.at_ms, "{instant}");
        body
    }

    fn ms(seconds: &Value) -> i64 {
        (seconds.as_f64().unwrap() * 1000.0).round() as i64
    }

    /// An event's instant as a row writes it: UTC text, the fraction cut.
    fn cut(seconds: &Value) -> Value {
        Value::from(format_datetime(seconds.as_f64().unwrap().floor() as i64))
    }

    /// A batch of events between two snapshots of one switch, rows keyed by local tag.
    struct Batch {
        before: HashMap<String, Value>,
        events: Vec<(CallEvent, Value)>,
        after: HashMap<String, Value>,
        buffered: HashMap<String, Value>,
        /// The instants the events may have: (exclusive, inclusive).
        window: (i64, i64),
    }

    fn by_tag(body: &[u8], buffered: bool) -> HashMap<String, Value> {
        rows(body)
            .iter()
            .map(|l| value(l))
            .filter(|row| (row["buffered"] == true) == buffered)
            .map(|row| (row["local_tag"].as_str().unwrap().to_owned(), row))
            .collect()
    }

    /// A period of `seconds` after [`NOW`] with events, between its two snapshots.
    fn period(seed: u64, calls: usize, buffering: bool) -> Batch {
        let mut switch = Switch::new(seed).buffering(buffering);
        switch.fill(calls, NOW);
        let before = switch.render(NOW);
        let events = switch.period_with_events(NOW + 5, 5);
        let after = switch.render(NOW + 5);
        batch(&before, events, &after, (NOW * 1000, (NOW + 5) * 1000))
    }

    /// A stream of `n` events over the second after [`NOW`], between two snapshots.
    fn stream(seed: u64, calls: usize, n: usize) -> Batch {
        let mut switch = Switch::new(seed);
        switch.fill(calls, NOW);
        let before = switch.render(NOW);
        let events = switch.events(n, NOW * 1000, (NOW + 1) * 1000);
        assert_eq!(events.len(), n);
        let after = switch.render(NOW + 1);
        batch(&before, events, &after, (NOW * 1000, (NOW + 1) * 1000))
    }

    fn batch(before: &[u8], events: Vec<CallEvent>, after: &[u8], window: (i64, i64)) -> Batch {
        Batch {
            before: by_tag(before, false),
            events: events
                .into_iter()
                .map(|e| {
                    let body = checked(&e);
                    (e, body)
                })
                .collect(),
            after: by_tag(after, false),
            buffered: by_tag(after, true),
            window,
        }
    }

    impl Batch {
        fn tags(&self, kind: EventKind) -> HashSet<String> {
            self.events
                .iter()
                .filter(|(e, _)| e.kind == kind)
                .map(|(e, _)| e.local_tag.clone())
                .collect()
        }

        /// (b): an event agrees with its call's row: the routing, the data a row also
        /// has, the instants cut to the second.
        fn agrees_with_rows(&self) {
            let mut compared = 0;
            let answered = self.tags(EventKind::Connected);
            for (event, body) in &self.events {
                let tag = &event.local_tag;
                // A call still present shows in the snapshot after (buffered, when it ended
                // and buffering is on); an ended one in the snapshot before, which predates
                // an answer within the batch; an attempt in none.
                let (row, current) = match self.after.get(tag).or_else(|| self.buffered.get(tag)) {
                    Some(row) => (row, true),
                    None => match self.before.get(tag) {
                        Some(row) => (row, !answered.contains(tag)),
                        None => continue,
                    },
                };
                compared += 1;
                let data = body["data"].as_object().unwrap();
                for (key, value) in data["routing"].as_object().unwrap() {
                    let row_key = match key.as_str() {
                        "auth_orig_protocol_id" => "auth_orig_transport_protocol_id",
                        key => key,
                    };
                    let expected = match &row[row_key] {
                        Value::Number(n) if value.is_boolean() => {
                            Value::from(n.as_u64() == Some(1))
                        }
                        v => v.clone(),
                    };
                    if ROUTING_NULLS.contains(&key.as_str()) {
                        assert!(value.is_null() && row.get(key).is_none(), "{key}");
                    } else {
                        assert_eq!(*value, expected, "{tag} routing {key}");
                    }
                }
                for key in STARTED_KEYS.iter().chain(&CONNECTED_KEYS) {
                    if let Some(value) = data.get(*key) {
                        assert_eq!(*value, row[*key], "{tag} {key}");
                    }
                }
                assert_eq!(cut(&data["start_time"]), row["start_time"], "{tag}");
                assert_eq!(cut(&data["cdr_born_time"]), row["cdr_born_time"], "{tag}");
                match data.get("connect_time") {
                    Some(connect) if current => {
                        assert_eq!(cut(connect), row["connect_time"], "{tag}")
                    }
                    Some(_) => {}
                    // Ringing when it ended, or when it started.
                    None => assert!(
                        event.kind == EventKind::Started || row["connect_time"].is_null(),
                        "{tag}"
                    ),
                }
                if let Some(row) = self.buffered.get(tag) {
                    assert_eq!(cut(&data["end_time"]), row["end_time"], "{tag}");
                }
            }
            assert!(compared > self.events.len() / 2, "{compared}");
        }

        /// (c): the calls after are the calls before, plus those started, minus those
        /// ended; with buffering, those ended (attempts aside) come once more, buffered.
        fn accounts_for_the_calls(&self, buffering: bool) {
            let (started, ended) = (
                self.tags(EventKind::Started),
                self.tags(EventKind::Disconnected),
            );
            let before: HashSet<String> = self.before.keys().cloned().collect();
            let expected: HashSet<String> = before.union(&started).cloned().collect();
            let expected: HashSet<String> = expected.difference(&ended).cloned().collect();
            let after: HashSet<String> = self.after.keys().cloned().collect();
            assert_eq!(after, expected);
            let buffered: HashSet<String> = self.buffered.keys().cloned().collect();
            match buffering {
                true => assert_eq!(buffered, ended.intersection(&before).cloned().collect()),
                false => assert!(buffered.is_empty()),
            }
            // Attempts: started and refused within the batch, never in a snapshot.
            let attempts: Vec<&String> = started.intersection(&ended).collect();
            assert!(!attempts.is_empty());
            for tag in attempts {
                assert!(!self.before.contains_key(tag) && !self.buffered.contains_key(tag));
            }
            // Answered calls were ringing before, or started in the batch.
            for tag in self.tags(EventKind::Connected) {
                match self.before.get(&tag) {
                    Some(row) => assert!(row["connect_time"].is_null(), "{tag}"),
                    None => assert!(started.contains(&tag), "{tag}"),
                }
            }
        }

        /// (d): a call's events in the order started, connected, disconnected; all in
        /// time order and within the batch's window.
        fn in_order(&self) {
            let mut last: HashMap<&str, EventKind> = HashMap::new();
            let mut at = self.window.0;
            for (event, _) in &self.events {
                assert!(
                    event.at_ms >= at && event.at_ms <= self.window.1,
                    "{}",
                    event.at_ms
                );
                at = event.at_ms;
                let rank = |k: EventKind| k as u8;
                if let Some(previous) = last.insert(&event.local_tag, event.kind) {
                    assert!(rank(previous) < rank(event.kind), "{}", event.local_tag);
                }
                if event.kind == EventKind::Started {
                    assert!(!self.before.contains_key(&event.local_tag));
                }
            }
        }
    }

    /// The keys at every level, and the type of each value both have non-null.
    fn same_shape(ours: &Value, sample: &Value, path: &str) {
        match (ours, sample) {
            (Value::Object(a), Value::Object(b)) => {
                let keys = |o: &serde_json::Map<String, Value>| {
                    o.keys().cloned().collect::<std::collections::BTreeSet<_>>()
                };
                assert_eq!(keys(a), keys(b), "keys of {path}");
                for (key, value) in a {
                    same_shape(value, &b[key], &format!("{path}.{key}"));
                }
            }
            (Value::Null, _) | (_, Value::Null) => {}
            (Value::Number(_), Value::Number(_))
            | (Value::String(_), Value::String(_))
            | (Value::Bool(_), Value::Bool(_))
            | (Value::Array(_), Value::Array(_)) => {}
            (a, b) => panic!("{path}: {a} where the sample has {b}"),
        }
    }

    #[test]
    fn sems_doubles_print_like_the_samples() {
        for (value, text) in [
            (1_764_081_005.5, "1764081005.5"),
            (1_764_081_004.0, "1764081004.0"),
            (1_764_081_007.125, "1764081007.125"),
            (1_764_081_005.9, "1764081005.9"),
            (1_764_081_006.25, "1764081006.25"),
            (0.0, "0.0"),
            (1e20, "1.000000000000000e+20"),
            (f64::NAN, "null"),
        ] {
            assert_eq!(sems_double(value), text);
        }
        let epoch = |ms| {
            let mut text = String::new();
            write_epoch(&mut text, ms);
            text
        };
        assert_eq!(epoch(Some(1_764_081_007_125)), "1764081007.125");
        assert_eq!(epoch(Some(1_764_081_005_900)), "1764081005.9");
        assert_eq!(epoch(Some(1_764_081_004_000)), "1764081004.0");
        assert_eq!(epoch(Some(1_764_081_006_250)), "1764081006.25");
        assert_eq!(epoch(None), "null");
        // The integer path prints what the float path does.
        for ms in (0..3_000).map(|i| 1_764_081_000_000 + i * 7) {
            assert_eq!(epoch(Some(ms)), sems_double(ms as f64 / 1000.0), "{ms}");
        }
        // Every instant of the samples prints back as written.
        for sample in [STARTED, REFUSED, HUNG_UP, CANCELLED, CONNECTED] {
            for key in TIMES {
                if let Some(text) = literal(sample, key) {
                    assert_eq!(sems_double(text.parse().unwrap()), text, "{key}");
                }
            }
        }
    }

    #[test]
    fn event_bodies_are_compact_ascii_and_in_byte_order() {
        // `checked` holds the rules; here, a population where every kind occurs.
        let batch = period(11, 2000, false);
        for kind in [
            EventKind::Started,
            EventKind::Connected,
            EventKind::Disconnected,
        ] {
            assert!(!batch.tags(kind).is_empty(), "{kind:?}");
        }
        let escaped = batch
            .events
            .iter()
            .filter(|(e, _)| e.body.windows(2).any(|w| w == b"\\u"))
            .count();
        assert!(escaped > 0, "some names need escapes");
        let (started, _) = batch
            .events
            .iter()
            .find(|(e, _)| e.kind == EventKind::Started)
            .unwrap();
        let body = std::str::from_utf8(&started.body).unwrap();
        let end = format!(
            ",\"local_tag\":\"{}\",\"type\":\"started\"}}",
            started.local_tag
        );
        assert!(
            body.starts_with("{\"data\":{\"aleg_headers\":{},\"audio_record_enabled\":false,")
                && body.ends_with(&end),
            "{body}"
        );
    }

    #[test]
    fn event_bodies_have_the_samples_shape() {
        let batch = period(12, 2000, false);
        let find = |kind: EventKind, answered: bool| {
            batch
                .events
                .iter()
                .map(|(e, body)| (e.kind, body))
                .find(|(k, body)| {
                    *k == kind && body["data"].get("connect_time").is_some() == answered
                })
                .map(|(_, body)| body)
                .unwrap_or_else(|| panic!("no {kind:?}, answered {answered}"))
        };
        let sample = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        same_shape(find(EventKind::Started, false), &sample(STARTED), "started");
        same_shape(
            find(EventKind::Connected, true),
            &sample(CONNECTED),
            "connected",
        );
        same_shape(
            find(EventKind::Disconnected, true),
            &sample(HUNG_UP),
            "hung up",
        );
        same_shape(
            find(EventKind::Disconnected, false),
            &sample(CANCELLED),
            "cancelled",
        );
        same_shape(
            find(EventKind::Disconnected, false),
            &sample(REFUSED),
            "refused",
        );
        // The routing tables are the samples' routing keys, none twice.
        let routing: Vec<&str> = ROUTING_KEYS
            .iter()
            .chain(&ROUTING_FLAGS)
            .chain(&ROUTING_NULLS)
            .chain(&["auth_orig_protocol_id"])
            .copied()
            .collect();
        let unique: HashSet<&str> = routing.iter().copied().collect();
        assert_eq!(unique.len(), routing.len());
        let sample_routing = sample(STARTED)["data"]["routing"].clone();
        assert_eq!(
            unique,
            sample_routing
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect()
        );
    }

    #[test]
    fn events_agree_with_the_rows_of_their_calls() {
        period(13, 1000, false).agrees_with_rows();
        period(14, 1000, true).agrees_with_rows();
    }

    #[test]
    fn a_period_s_events_account_for_the_next_snapshot() {
        let batch = period(15, 1000, false);
        batch.accounts_for_the_calls(false);
        assert_eq!(
            batch.tags(EventKind::Disconnected).len(),
            30 + 10,
            "3% and the attempts"
        );
        period(16, 1000, true).accounts_for_the_calls(true);
    }

    #[test]
    fn each_call_s_events_come_in_order() {
        period(17, 1000, false).in_order();
    }

    #[test]
    fn a_stream_of_events_keeps_the_snapshot_in_step() {
        let batch = stream(18, 1000, 3000);
        batch.in_order();
        batch.accounts_for_the_calls(false);
        batch.agrees_with_rows();
        let count = |kind| batch.events.iter().filter(|(e, _)| e.kind == kind).count();
        let (started, connected, ended) = (
            count(EventKind::Started),
            count(EventKind::Connected),
            count(EventKind::Disconnected),
        );
        assert!(
            connected > 400 && started.abs_diff(ended) < 150,
            "{started} {connected} {ended}"
        );
        assert!(
            batch.after.len().abs_diff(1000) < 150,
            "{}",
            batch.after.len()
        );
    }
}
