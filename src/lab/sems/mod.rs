//! A simulated switch: snapshots byte for byte as a yeti node writes them.
//!
//! A real node (SEMS with the yeti module, `shared/samples/README.md`) serialises each call
//! as `arg2json` of a `std::map`: keys in byte order, no spaces, every non-ASCII character
//! as a lowercase `\uXXXX` escape (surrogate pairs above U+FFFF), and four keys that change
//! in every snapshot even when the call does not: `id` (the node, the snapshot's second and
//! a running counter), `snapshot_timestamp`, `snapshot_date` and `end_time`. A figure or a
//! test on any other layout proves nothing about production, so this one generator feeds
//! the benchmark, the demo and the tests.
//!
//! [`Style::Legacy`] is the project's earlier, made-up layout (keys in no order, raw UTF-8,
//! numbers as strings, a stable `id`): kept for the tests that need its hostile values
//! (metacharacters, mixed case, nulls) and as the benchmark's point of comparison.
//!
//! A call is kept as its rendered key-value pairs, cut where a per-snapshot value goes,
//! so rendering 100k calls is a copy of their text with four values filled in.
//!
//! The same switch can post the call events a node with `http_events_destination` sends
//! between snapshots ([`events`]). Events carry sub-second instants and snapshots the same
//! instants cut to the second, so a call keeps its instants in milliseconds; the paths
//! without events ([`Switch::fill`], [`Switch::period`], [`Switch::churn`]) still draw
//! whole seconds, in the same order, and write the bytes they always did.

use std::fmt::Write as _;
use std::io::Write;

use crate::clock::format_datetime;

pub mod events;
mod row;

use row::{Drawn, leg_fields, legacy_fields, phone_number, pick, rating_fields};

pub use events::{CallEvent, EventKind, sems_double};

/// Accounts of the simulated population, with ids `1..=ACCOUNTS`.
pub const ACCOUNTS: i64 = 1000;
/// Customers; account `a` belongs to customer [`customer_of`]`(a)`.
pub const CUSTOMERS: i64 = 50;
/// The account that holds 30% of the calls.
pub const BIG_ACCOUNT: i64 = 1;

pub fn customer_of(account: i64) -> i64 {
    1 + (account - 1) % CUSTOMERS
}

pub fn uuid_of(account: i64) -> String {
    format!("00000000-0000-4000-8000-{account:012x}")
}

/// The directory of the simulated accounts: API access `n` sees customer `n`'s accounts.
pub fn directory_json() -> String {
    let accounts: Vec<String> = (1..=ACCOUNTS)
        .map(|a| {
            format!(
                r#"{{"id":{a},"uuid":"{}","contractor_id":{}}}"#,
                uuid_of(a),
                customer_of(a)
            )
        })
        .collect();
    let accesses: Vec<String> = (1..=CUSTOMERS)
        .map(|c| format!(r#"{{"id":{c},"customer_id":{c},"account_ids":[]}}"#))
        .collect();
    format!(
        r#"{{"accounts":[{}],"api_accesses":[{}]}}"#,
        accounts.join(","),
        accesses.join(",")
    )
}

/// How a snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// What a yeti node writes (the default).
    Sems,
    /// The project's earlier layout with hostile values, for the tests and comparisons
    /// that need them.
    Legacy,
}

/// A value that changes with every snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Volatile {
    Id,
    SnapshotTimestamp,
    SnapshotDate,
    /// The snapshot's time for a call in progress, its end for a buffered one.
    EndTime,
}

impl Volatile {
    fn of(key: &str) -> Option<Volatile> {
        Some(match key {
            "id" => Volatile::Id,
            "snapshot_timestamp" => Volatile::SnapshotTimestamp,
            "snapshot_date" => Volatile::SnapshotDate,
            "end_time" => Volatile::EndTime,
            _ => return None,
        })
    }
}

/// One generated call: its keys and their JSON values, and the same rendered.
///
/// Instants are unix milliseconds: an event writes them whole, a row cut to the second.
#[derive(Debug, Clone)]
struct Call {
    account: i64,
    dst_prefix_in: String,
    /// The A leg's local tag, the key of its events.
    local_tag: String,
    /// When it began.
    start_ms: i64,
    /// When it was answered, or `None` while it rings.
    connect_ms: Option<i64>,
    /// The stable `id` of the legacy layout.
    serial: u64,
    /// When it ended (a buffered row), or `None` while in progress.
    ended_ms: Option<i64>,
    /// `(key, JSON value)`, in the order the style writes them; the volatile keys' values
    /// are filled in at each render.
    fields: Vec<(&'static str, String)>,
    /// The fields rendered: text, each piece followed by a volatile value (but the last).
    pieces: Vec<(String, Option<Volatile>)>,
}

impl Call {
    fn set(&mut self, key: &'static str, value: String) {
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(field) => field.1 = value,
            None => self.fields.push((key, value)),
        }
    }

    /// Renders `fields` into `pieces`, in the style's key order.
    fn prepare(&mut self, style: Style) {
        // std::map<std::string, AmArg>: byte order. A call changed in place (answered)
        // is still in order: only a new call, or a new key, sorts.
        if style == Style::Sems
            && !self
                .fields
                .is_sorted_by(|a, b| a.0.as_bytes() <= b.0.as_bytes())
        {
            self.fields
                .sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }
        // Written into one buffer, then cut where the volatile values go: each piece is
        // allocated once, at its size (events re-render a call at every answer).
        let size: usize = self.fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut text = String::with_capacity(size + 2);
        let mut cuts = Vec::with_capacity(4);
        text.push('{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('"');
            text.push_str(key);
            text.push_str("\":");
            match Volatile::of(key) {
                Some(volatile) => cuts.push((text.len(), volatile)),
                None => text.push_str(value),
            }
        }
        text.push('}');
        self.pieces.clear();
        let mut from = 0;
        for (to, volatile) in cuts {
            self.pieces
                .push((text[from..to].to_owned(), Some(volatile)));
            from = to;
        }
        self.pieces.push((text[from..].to_owned(), None));
    }
}

/// Snapshots of one node, with calls that start, get answered and end.
pub struct Switch {
    rng: fastrand::Rng,
    style: Style,
    calls: Vec<Call>,
    /// Calls that ended since the last render: sent once more, buffered, when buffering.
    ended: Vec<Call>,
    buffering: bool,
    serial: u64,
    /// SEMS's running counter, the low bits of every `id`.
    counter: u64,
    /// How its calls' events are written, worked out once per set of row keys.
    layouts: Vec<events::Layout>,
}

impl Switch {
    /// A node (id 1) writing SEMS's bytes, its randomness from `seed`.
    pub fn new(seed: u64) -> Switch {
        Switch::with_style(seed, Style::Sems)
    }

    pub fn with_style(seed: u64, style: Style) -> Switch {
        Switch {
            rng: fastrand::Rng::with_seed(seed),
            style,
            calls: Vec::new(),
            ended: Vec::new(),
            buffering: false,
            serial: 0,
            counter: 0,
            layouts: Vec::new(),
        }
    }

    /// With buffering on (yeti's `buffering`), every row carries `buffered`, and calls
    /// that ended since the last snapshot come once more with `"buffered":true` and their
    /// real `end_time`.
    pub fn buffering(mut self, on: bool) -> Switch {
        self.buffering = on;
        for call in &mut self.calls {
            Self::mark_buffered(call, self.style, on, false);
        }
        self
    }

    fn mark_buffered(call: &mut Call, style: Style, on: bool, ended: bool) {
        if on {
            call.set("buffered", ended.to_string());
        } else {
            call.fields.retain(|(k, _)| *k != "buffered");
        }
        call.prepare(style);
    }

    /// Starts calls (or ends the newest) until there are `total`; new calls began up to two
    /// hours before `now`.
    pub fn fill(&mut self, total: usize, now: i64) {
        self.truncate(total, now);
        while self.calls.len() < total {
            let start = now - self.rng.i64(0..7200);
            let call = self.new_call(start * 1000, now * 1000, SECOND);
            self.calls.push(call);
        }
    }

    fn truncate(&mut self, total: usize, now: i64) {
        while self.calls.len() > total {
            if let Some(call) = self.calls.pop() {
                self.end(call, now * 1000);
            }
        }
    }

    /// A call that ended at `at_ms` leaves; buffering, it is sent once more.
    fn end(&mut self, mut call: Call, at_ms: i64) {
        if self.buffering {
            call.ended_ms = Some(at_ms);
            Self::mark_buffered(&mut call, self.style, true, true);
            self.ended.push(call);
        }
    }

    /// The call at `i` is answered at `at_ms`.
    fn answer(&mut self, i: usize, at_ms: i64) {
        let style = self.style;
        let call = &mut self.calls[i];
        call.connect_ms = Some(at_ms);
        call.set(
            "connect_time",
            json_string(style, &format_datetime(seconds(at_ms))),
        );
        call.prepare(style);
    }

    /// Ends `ended` (a share) of the calls at random, starts as many new ones in the period
    /// before `now`, and answers `answered` of the calls not yet answered.
    pub fn step(&mut self, ended: f64, answered: f64, now: i64, period: i64) {
        let total = self.calls.len();
        for _ in 0..(total as f64 * ended).round() as usize {
            if self.calls.is_empty() {
                break;
            }
            let i = self.rng.usize(..self.calls.len());
            let call = self.calls.swap_remove(i);
            let at = now - self.rng.i64(0..period.max(1));
            self.end(call, at * 1000);
        }
        let waiting: Vec<usize> = (0..self.calls.len())
            .filter(|&i| self.calls[i].connect_ms.is_none())
            .collect();
        let to_answer = (waiting.len() as f64 * answered).round() as usize;
        for &i in waiting.iter().take(to_answer) {
            let start = seconds(self.calls[i].start_ms);
            // Answered within the period, and never before it began.
            let at = (now - self.rng.i64(0..period.max(1)))
                .max(start + 1)
                .min(now);
            self.answer(i, at * 1000);
        }
        while self.calls.len() < total {
            let start = now - self.rng.i64(0..period.max(1));
            let call = self.new_call(start * 1000, now * 1000, SECOND);
            self.calls.push(call);
        }
    }

    /// 10% of the calls end, as many new ones start; the rest change only the values
    /// that change in every snapshot.
    pub fn churn(&mut self, now: i64) {
        self.step(0.10, 0.0, now, 5);
    }

    /// One switch period of `seconds` before `now`, as a busy node sees it: 3% of the calls
    /// end, 3% new ones start, 3% of those not yet answered are answered.
    pub fn period(&mut self, now: i64, seconds: i64) {
        self.step(0.03, 0.03, now, seconds);
    }

    /// The snapshot the switch sends at `now` (its period-aligned time): the `INSERT`
    /// line, then one row per call (and, buffering, per call ended since the last one).
    pub fn render(&mut self, now: i64) -> Vec<u8> {
        let stamp = format_datetime(now);
        let mut out = Vec::with_capacity((self.calls.len() + self.ended.len()) * 2300 + 64);
        out.extend_from_slice(b"INSERT INTO active_calls FORMAT JSONEachRow\n");
        let ended = std::mem::take(&mut self.ended);
        for call in self.calls.iter().chain(&ended) {
            self.counter = (self.counter + 1) & ID_COUNTER_MASK;
            let id = match self.style {
                // The node, the second, the counter: sems-yeti's snapshot row id.
                Style::Sems => {
                    (NODE_ID << 55) | ((now as u64 & ((1 << 32) - 1)) << 23) | self.counter
                }
                Style::Legacy => call.serial,
            };
            for (text, volatile) in &call.pieces {
                out.extend_from_slice(text.as_bytes());
                let _ = match volatile {
                    None => Ok(()),
                    Some(Volatile::Id) => write!(out, "{id}"),
                    Some(Volatile::SnapshotTimestamp) => write!(out, "\"{stamp}\""),
                    Some(Volatile::SnapshotDate) => write!(out, "\"{}\"", &stamp[..10]),
                    Some(Volatile::EndTime) => match call.ended_ms {
                        Some(at) => write!(out, "\"{}\"", format_datetime(seconds(at))),
                        None => write!(out, "\"{stamp}\""),
                    },
                };
            }
            out.push(b'\n');
        }
        out
    }

    /// `dst_prefix_in` values of the big account's calls, for selective queries.
    pub fn big_account_numbers(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c.account == BIG_ACCOUNT)
            .map(|c| c.dst_prefix_in.clone())
            .collect()
    }

    /// Calls in progress on `account`.
    pub fn count_in(&self, account: i64) -> usize {
        self.calls.iter().filter(|c| c.account == account).count()
    }

    /// A call that began at `start_ms`, seen at `now_ms`: answered (or not) by then, at a
    /// multiple of `tick_ms` after its start ([`SECOND`] on the paths without events, whose
    /// draws and bytes stay what they were; 1 for events).
    fn new_call(&mut self, start_ms: i64, now_ms: i64, tick_ms: i64) -> Call {
        self.serial += 1;
        let style = self.style;
        let serial = self.serial;
        let rng = &mut self.rng;
        let account = if rng.f64() < 0.3 {
            BIG_ACCOUNT
        } else {
            rng.i64(2..=ACCOUNTS)
        };
        let ticks = (now_ms - start_ms) / tick_ms;
        let answered = ticks > 0 && rng.bool();
        let connect_ms =
            answered.then(|| start_ms + tick_ms * rng.i64(1..=ticks.min(30_000 / tick_ms)));
        let dst_prefix_in = phone_number(rng);
        let s = |text: &str| json_string(style, text);
        let local_tag = format!("{:08X}-{:04X}-{:08X}", rng.u32(..), rng.u16(..), serial);
        let start_text = format_datetime(seconds(start_ms));
        let connect_text =
            connect_ms.map_or("null".to_owned(), |c| s(&format_datetime(seconds(c))));
        let (name, rate, other_rate, interval, port) = match style {
            Style::Sems => (
                s(pick(rng, &SEMS_NAMES)),
                s(pick(rng, &RATES)),
                s(pick(rng, &RATES)),
                pick(rng, &["60", "1"]).to_owned(),
                pick(rng, &["5060", "5061"]).to_owned(),
            ),
            Style::Legacy => (
                s(pick(rng, &LEGACY_NAMES)),
                pick(rng, &LEGACY_RATES).to_owned(),
                pick(rng, &LEGACY_RATES).to_owned(),
                pick(rng, &["60", "\"1\""]).to_owned(),
                pick(rng, &["5060", "\"5061\""]).to_owned(),
            ),
        };
        let drawn = Drawn {
            serial,
            account,
            local_tag,
            start_text,
            connect_text,
            dst_prefix_in,
            name,
            rate,
            other_rate,
            interval,
            port,
        };
        // In this order: the draws, hence the bytes, are the same whatever the layout.
        let mut fields = leg_fields(rng, style, &drawn);
        fields.extend(rating_fields(rng, style, &drawn));
        if style == Style::Legacy {
            fields.extend(legacy_fields(rng));
        }
        let mut call = Call {
            account,
            dst_prefix_in: drawn.dst_prefix_in,
            local_tag: drawn.local_tag,
            start_ms,
            connect_ms,
            serial,
            ended_ms: None,
            fields,
            pieces: Vec::new(),
        };
        if self.buffering {
            call.set("buffered", "false".into());
        }
        call.prepare(style);
        call
    }
}

/// The node every simulated row is of.
const NODE_ID: u64 = 1;
/// A second in the unit of a call's instants.
const SECOND: i64 = 1000;

/// Unix milliseconds cut to the second, as a snapshot writes an instant.
fn seconds(ms: i64) -> i64 {
    ms.div_euclid(SECOND)
}
/// The low bits of a SEMS row `id` that count rows.
const ID_COUNTER_MASK: u64 = (1 << 23) - 1;

/// Display names as customers' phones send them: Cyrillic, accents, emoji, quotes.
const SEMS_NAMES: [&str; 14] = [
    "Alice",
    "Bob",
    "Олександр",
    "Zoë",
    "ÄÖÜ",
    "O'Brien",
    "john doe",
    "MiXeD",
    "",
    "test",
    "[tag]",
    "say \"hi\"",
    "back\\slash",
    "🎉 party",
];
/// The legacy layout's hostile names: LIKE and glob metacharacters, case, raw UTF-8.
const LEGACY_NAMES: [&str; 10] = [
    "Alice",
    "Bob",
    "ÄÖÜ",
    "Zoë",
    "O'Brien",
    "100%",
    "x*y",
    "bob_smith",
    "MiXeD",
    "",
];
const RATES: [&str; 6] = ["0.0", "0.11", "0.5", "1", "2.3", "0.0123"];
/// Rates as strings and as bare numbers.
const LEGACY_RATES: [&str; 6] = [
    "\"0.0\"", "\"0.11\"", "\"0.5\"", "\"1\"", "\"2.3\"", "0.0123",
];

/// `text` as a JSON string the way `style` writes it.
fn json_string(style: Style, text: &str) -> String {
    match style {
        Style::Sems => sems_string(text),
        Style::Legacy => serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned()),
    }
}

/// SEMS's `str2json`: `"`, `\` and the named control characters escaped, every other
/// character below U+0020 or above U+007F as `\uXXXX` (lowercase, surrogate pairs above
/// U+FFFF).
pub fn sems_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    // Most values need no escape: copied whole.
    if text
        .bytes()
        .all(|b| (b' '..=0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(text);
        out.push('"');
        return out;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='\u{7f}' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

    /// Any JSON value, accepted only if every object in it, at every level, has its keys
    /// in strictly increasing byte order.
    pub(super) struct Ordered;

    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ordered, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("JSON")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                    let mut last: Option<String> = None;
                    while let Some(key) = map.next_key::<String>()? {
                        if last
                            .as_ref()
                            .is_some_and(|l| l.as_bytes() >= key.as_bytes())
                        {
                            return Err(A::Error::custom(format!("{key} after {last:?}")));
                        }
                        map.next_value::<Ordered>()?;
                        last = Some(key);
                    }
                    Ok(Ordered)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
                    while seq.next_element::<Ordered>()?.is_some() {}
                    Ok(Ordered)
                }
                fn visit_bool<E>(self, _: bool) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
                fn visit_str<E>(self, _: &str) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
                fn visit_unit<E>(self) -> Result<Ordered, E> {
                    Ok(Ordered)
                }
            }
            d.deserialize_any(V)
        }
    }

    pub(super) const NOW: i64 = 1_764_081_000; // 2025-11-25 14:30:00

    pub(super) fn rows(body: &[u8]) -> Vec<&str> {
        let text = std::str::from_utf8(body).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("INSERT INTO active_calls FORMAT JSONEachRow")
        );
        lines.collect()
    }

    pub(super) fn value(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap()
    }

    /// Whether `line` has a byte outside its strings that is whitespace.
    pub(super) fn spaced(line: &str) -> bool {
        let (mut in_string, mut escaped) = (false, false);
        for b in line.bytes() {
            match (in_string, escaped, b) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') | (false, _, b'"') => in_string = !in_string,
                (false, _, b) if b.is_ascii_whitespace() => return true,
                _ => {}
            }
        }
        false
    }

    #[test]
    fn rows_are_what_sems_writes() {
        let mut switch = Switch::new(7);
        switch.fill(300, NOW);
        let body = switch.render(NOW);
        let lines = rows(&body);
        assert_eq!(lines.len(), 300);
        let mut last_id = None;
        let mut escapes = 0;
        for line in &lines {
            // Strictly increasing: in byte order, and no key twice.
            serde_json::from_str::<Ordered>(line)
                .unwrap_or_else(|e| panic!("keys in byte order, none twice: {e}"));
            assert!(!spaced(line), "compact: {line}");
            assert!(line.is_ascii(), "non-ASCII escaped: {line}");
            for (at, _) in line.match_indices("\\u") {
                let hex = &line[at + 2..at + 6];
                assert!(
                    hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "{hex}"
                );
                escapes += 1;
            }
            let row = value(line);
            assert_eq!(row["snapshot_timestamp"], "2025-11-25 14:30:00");
            assert_eq!(row["snapshot_date"], "2025-11-25");
            assert_eq!(row["end_time"], "2025-11-25 14:30:00");
            assert!(row.get("buffered").is_none());
            let id = row["id"].as_u64().unwrap();
            assert_eq!(id >> 55, 1, "the node");
            assert_eq!((id >> 23) & ((1 << 32) - 1), NOW as u64, "the second");
            if let Some(last) = last_id {
                assert_eq!(id, last + 1, "a running counter");
            }
            last_id = Some(id);
        }
        assert!(escapes > 0, "some names need escapes");
        // The escapes decode to the names they stand for.
        let names: Vec<String> = lines
            .iter()
            .map(|l| value(l)["src_name_in"].as_str().unwrap().to_owned())
            .collect();
        for name in SEMS_NAMES {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
    }

    #[test]
    fn an_unchanged_call_differs_only_in_the_four_per_snapshot_keys() {
        let mut switch = Switch::new(3);
        switch.fill(50, NOW);
        let first = switch.render(NOW);
        let second = switch.render(NOW + 5);
        for (a, b) in rows(&first).iter().zip(rows(&second)) {
            let (a, b) = (value(a), value(b));
            let changed: Vec<&String> = a
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, v)| b[k.as_str()] != **v)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(changed, ["end_time", "id", "snapshot_timestamp"]);
            assert_eq!(b["snapshot_timestamp"], "2025-11-25 14:30:05");
        }
        // The date changes at midnight, and only then.
        let next_day = switch.render(NOW + 86_400);
        assert_eq!(value(rows(&next_day)[0])["snapshot_date"], "2025-11-26");
    }

    #[test]
    fn a_period_ends_starts_and_answers_calls() {
        let mut switch = Switch::new(5);
        switch.fill(1000, NOW);
        let before = switch.render(NOW);
        switch.period(NOW + 5, 5);
        let after = switch.render(NOW + 5);
        let by_tag = |body: &[u8]| -> std::collections::HashMap<String, serde_json::Value> {
            rows(body)
                .iter()
                .map(|l| {
                    let v = value(l);
                    (v["local_tag"].as_str().unwrap().to_owned(), v)
                })
                .collect()
        };
        let (old, new) = (by_tag(&before), by_tag(&after));
        assert_eq!(new.len(), 1000);
        let gone = old.keys().filter(|t| !new.contains_key(*t)).count();
        assert_eq!(gone, 30);
        let answered = new
            .iter()
            .filter(|(t, v)| {
                old.get(*t)
                    .is_some_and(|o| o["connect_time"].is_null() && !v["connect_time"].is_null())
            })
            .count();
        let waiting = old.values().filter(|v| v["connect_time"].is_null()).count();
        assert!(
            answered.abs_diff(waiting * 3 / 100) <= 1,
            "{answered} of {waiting}"
        );
        for row in new.values() {
            // A call is answered after it began, and by the snapshot that shows it.
            if let Some(connect) = row["connect_time"].as_str() {
                let start = row["start_time"].as_str().unwrap();
                assert!(
                    start < connect && connect <= "2025-11-25 14:30:05",
                    "{start} {connect}"
                );
            }
        }
        for (tag, row) in &new {
            if !old.contains_key(tag) {
                let start = row["start_time"].as_str().unwrap();
                assert!(start > "2025-11-25 14:30:00", "{start}");
            }
        }
    }

    #[test]
    fn buffered_rows_carry_their_end() {
        let mut switch = Switch::new(9).buffering(true);
        switch.fill(100, NOW);
        switch.render(NOW);
        switch.period(NOW + 5, 5);
        let body = switch.render(NOW + 5);
        let lines = rows(&body);
        assert_eq!(lines.len(), 103);
        let buffered: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| value(l))
            .filter(|v| v["buffered"] == true)
            .collect();
        assert_eq!(buffered.len(), 3);
        for row in &buffered {
            let end = row["end_time"].as_str().unwrap();
            assert!(
                end > "2025-11-25 14:30:00" && end <= "2025-11-25 14:30:05",
                "{end}"
            );
        }
        let active = lines
            .iter()
            .map(|l| value(l))
            .filter(|v| v["buffered"] == false);
        assert_eq!(active.count(), 100);
        // Sent once: the next snapshot has none of them.
        assert_eq!(rows(&switch.render(NOW + 10)).len(), 100);
    }

    #[test]
    fn sems_strings_escape_like_str2json() {
        assert_eq!(sems_string("Zoë"), r#""Zo\u00eb""#);
        assert_eq!(sems_string("a\"b\\c\n\t\u{1}"), r#""a\"b\\c\n\t\u0001""#);
        assert_eq!(sems_string("🎉"), r#""\ud83c\udf89""#);
        assert_eq!(sems_string("Ол"), r#""\u041e\u043b""#);
    }

    #[test]
    fn the_legacy_style_keeps_its_hostile_values() {
        let mut switch = Switch::with_style(1, Style::Legacy);
        switch.fill(300, NOW);
        let body = switch.render(NOW);
        let text = String::from_utf8(body).unwrap();
        assert!(!text.is_ascii(), "raw UTF-8");
        assert!(text.contains("\"100%\"") && text.contains("\"5061\""));
        let first = rows(text.as_bytes())[0];
        assert!(first.starts_with("{\"id\":"), "{first}");
        // A stable id: the same in the next snapshot.
        let again = switch.render(NOW + 5);
        assert_eq!(value(first)["id"], value(rows(&again)[0])["id"]);
    }
}
