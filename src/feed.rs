//! The call-state feed: a snapshot of a node's active calls in, one store transaction out.
//!
//! A snapshot is newline-delimited JSON ("JSONEachRow", SPEC 2.1), up to hundreds of
//! megabytes, of which the agent needs ~30 keys out of ~100 per row. So it is read line by
//! line into one reused buffer, each line deserialized into borrowed raw values (unknown keys
//! skipped, strings without escapes never copied), converted, and handed straight to the
//! store's open transaction. Memory does not grow with the snapshot, and a bad line found
//! late aborts the transaction, so the previous state stays whole.
//!
//! Two kinds of bad input are told apart on purpose: a row whose values do not convert is
//! skipped and counted (its node still counts as sent), while a line that is not a JSON
//! object means the input is not a snapshot at all, and rejects it whole.

use std::borrow::Cow;
use std::io::{BufRead, Read};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::call::{CallRow, Event, LineKey, PackedRow};
use crate::clock::{format_datetime, is_datetime};
use crate::store::{EventChanges, Origin, SnapshotTx, Writer};

pub mod event;
mod file;
pub mod key;
pub mod socket;
pub mod writer;

pub use file::{FileRead, apply_file};
pub use key::line_key;

/// A line longer than this is not a row of a switch (those are ~2.3 KB): it is skipped as
/// a bad row rather than buffered without bound.
pub const MAX_LINE_BYTES: u64 = 1 << 20;

/// What one line of a snapshot turned out to be.
#[derive(Debug, PartialEq)]
pub enum Line<'a> {
    /// Blank, or the leading `INSERT INTO … FORMAT JSONEachRow`.
    Nothing,
    Row(Box<CallRow<'a>>),
    /// A JSON object that is not a usable row; `node_id` when it had a readable one.
    Skipped {
        node_id: Option<i64>,
        reason: String,
    },
}

/// Why a whole snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("line {line}: {reason}")]
    Malformed { line: u64, reason: String },
    #[error("reading the snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("storing the snapshot: {0}")]
    Store(#[from] rusqlite::Error),
}

impl SnapshotError {
    /// Its reason in `snapshots_rejected_total` (`metrics::REJECTED_REASONS`).
    pub fn reason(&self) -> &'static str {
        match self {
            SnapshotError::Malformed { .. } => "malformed",
            SnapshotError::Io(_) => "input",
            SnapshotError::Store(e) if crate::store::is_damage(e) => "damaged",
            SnapshotError::Store(e) if is_disk_full(e) => "disk",
            SnapshotError::Store(_) => "store",
        }
    }
}

/// Whether SQLite could not write for want of space (or of quota, which it reports so).
pub fn is_disk_full(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull)
    )
}

/// What an applied snapshot did, for the log line and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// When it counts as received (unix ms): what stands in for an absent
    /// `snapshot_timestamp`, and when its nodes were heard.
    pub received_at_ms: i64,
    pub rows: u64,
    pub skipped: u64,
    pub nodes: Vec<i64>,
    /// Nodes a snapshot file fed before and no longer names (their calls are gone).
    pub dropped: Vec<i64>,
    pub written: u64,
    pub removed: u64,
    /// The store held this snapshot already (`store::Changes::repeat`): not relayed.
    pub repeat: bool,
    /// Rows of calls an event ended, not applied (SPEC 2.4).
    pub suppressed: u64,
    /// The call events applied with it ([`Arrivals`]).
    pub events: EventChanges,
    pub duration: Duration,
}

/// The raw values of the keys the agent reads; every other key is skipped unparsed.
/// A JSON `null` and an absent key are both `None`. A call event's `data.routing` has the
/// same keys, so [`event`] reads it as one too.
#[derive(Deserialize, Default)]
struct RawRow<'a> {
    #[serde(borrow)]
    node_id: Option<&'a RawValue>,
    #[serde(borrow)]
    local_tag: Option<&'a RawValue>,
    #[serde(borrow)]
    orig_call_id: Option<&'a RawValue>,
    #[serde(borrow)]
    snapshot_timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer_acc_id: Option<&'a RawValue>,
    #[serde(borrow)]
    start_time: Option<&'a RawValue>,
    #[serde(borrow)]
    connect_time: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_prefix: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_initial_interval: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_initial_rate: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_next_interval: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_next_rate: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_fee: Option<&'a RawValue>,
    #[serde(borrow)]
    src_name_in: Option<&'a RawValue>,
    #[serde(borrow)]
    src_prefix_in: Option<&'a RawValue>,
    #[serde(borrow)]
    dst_prefix_in: Option<&'a RawValue>,
    #[serde(borrow)]
    src_prefix_routing: Option<&'a RawValue>,
    #[serde(borrow)]
    dst_prefix_routing: Option<&'a RawValue>,
    #[serde(borrow)]
    from_domain: Option<&'a RawValue>,
    #[serde(borrow)]
    to_domain: Option<&'a RawValue>,
    #[serde(borrow)]
    ruri_domain: Option<&'a RawValue>,
    #[serde(borrow)]
    diversion_in: Option<&'a RawValue>,
    #[serde(borrow)]
    pai_in: Option<&'a RawValue>,
    #[serde(borrow)]
    ppi_in: Option<&'a RawValue>,
    #[serde(borrow)]
    privacy_in: Option<&'a RawValue>,
    #[serde(borrow)]
    rpid_in: Option<&'a RawValue>,
    #[serde(borrow)]
    rpid_privacy_in: Option<&'a RawValue>,
    #[serde(borrow)]
    auth_orig_transport_protocol_id: Option<&'a RawValue>,
    /// The older switches' name for `auth_orig_transport_protocol_id`.
    #[serde(borrow)]
    auth_orig_protocol_id: Option<&'a RawValue>,
    #[serde(borrow)]
    auth_orig_ip: Option<&'a RawValue>,
    #[serde(borrow)]
    auth_orig_port: Option<&'a RawValue>,
    #[serde(borrow)]
    buffered: Option<&'a RawValue>,
}

/// A value that did not convert: the key, for the skip reason.
#[derive(Debug)]
struct BadValue(&'static str);

/// Reads one line of a snapshot. `Err` means the line is not a JSON object, which makes
/// the whole snapshot invalid.
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, String> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(Line::Nothing);
    }
    if !line.starts_with(b"{") {
        return Err("not a JSON object".into());
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return skipped_if_object(line, "not UTF-8".into());
    };
    let raw: RawRow<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return skipped_if_object(line, e.to_string()),
    };
    let node_id = raw.node_id.map(integer).transpose().ok().flatten();
    Ok(match convert(&raw) {
        Ok(row) => Line::Row(Box::new(row)),
        Err(BadValue(key)) => Line::Skipped {
            node_id,
            reason: format!("bad or missing {key}"),
        },
    })
}

/// A line that is not strict JSON but still an object once its bytes are read leniently
/// (a Latin-1 byte in a display name, a raw tab in a string, a key given twice) is one bad
/// row, not a bad snapshot: ClickHouse itself would have taken it. Anything else is not a
/// JSON object at all.
fn skipped_if_object(line: &[u8], reason: String) -> Result<Line<'_>, String> {
    let lenient: String = String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_ascii_control() { ' ' } else { c })
        .collect();
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&lenient) {
        Ok(object) => Ok(Line::Skipped {
            node_id: object.get("node_id").and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            }),
            reason,
        }),
        Err(e) => Err(format!("not a JSON object: {e}")),
    }
}

/// Whether a snapshot must start with its `INSERT INTO <table> FORMAT JSONEachRow` query
/// (an HTTP body without a `query` parameter) or may (a file, a body after one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertLine {
    Optional,
    Required,
}

/// If `text` starts with `INSERT INTO <table> FORMAT JSONEachRow`, the table and what
/// follows the query (ClickHouse lets the data start on the same line).
pub fn strip_insert(text: &[u8]) -> Option<(&[u8], &[u8])> {
    fn word(s: &[u8]) -> Option<(&[u8], &[u8])> {
        let s = s.trim_ascii_start();
        let end = s
            .iter()
            .position(u8::is_ascii_whitespace)
            .unwrap_or(s.len());
        (end > 0).then(|| s.split_at(end))
    }
    let (insert, rest) = word(text)?;
    let (into, rest) = word(rest)?;
    let (table, rest) = word(rest)?;
    let (format, rest) = word(rest)?;
    let (each_row, rest) = word(rest)?;
    (insert.eq_ignore_ascii_case(b"INSERT")
        && into.eq_ignore_ascii_case(b"INTO")
        && format.eq_ignore_ascii_case(b"FORMAT")
        && each_row == b"JSONEachRow")
        .then_some((table, rest))
}

fn convert<'a>(raw: &RawRow<'a>) -> Result<CallRow<'a>, BadValue> {
    let required = |value: Option<&'a RawValue>, key| value.ok_or(BadValue(key));
    let local_tag = [raw.local_tag, raw.orig_call_id]
        .into_iter()
        .flatten()
        .map(|v| text(v).map_err(|_| BadValue("local_tag")))
        .find(|tag| !matches!(tag, Ok(t) if t.is_empty()))
        .ok_or(BadValue("local_tag"))??;
    let int = |value: Option<&'a RawValue>, key| match value {
        Some(v) => integer(v).map_err(|_| BadValue(key)),
        None => Ok(0),
    };
    let string = |value: Option<&'a RawValue>, key| match value {
        Some(v) => text(v).map_err(|_| BadValue(key)),
        None => Ok(Cow::Borrowed("")),
    };
    let nullable = |value: Option<&'a RawValue>, key| {
        value
            .map(|v| text(v).map_err(|_| BadValue(key)))
            .transpose()
    };
    let rate = |value: Option<&'a RawValue>, key| match value {
        Some(v) => decimal(v).map_err(|_| BadValue(key)),
        None => Ok(Cow::Borrowed("0")),
    };
    let time_of = |value: &'a RawValue, key| time(value).map_err(|_| BadValue(key));
    Ok(CallRow {
        node_id: integer(required(raw.node_id, "node_id")?).map_err(|_| BadValue("node_id"))?,
        local_tag,
        customer_id: integer(required(raw.customer_id, "customer_id")?)
            .map_err(|_| BadValue("customer_id"))?,
        customer_acc_id: integer(required(raw.customer_acc_id, "customer_acc_id")?)
            .map_err(|_| BadValue("customer_acc_id"))?,
        snapshot_timestamp: raw
            .snapshot_timestamp
            .map(|v| time_of(v, "snapshot_timestamp"))
            .transpose()?,
        start_time: time_of(required(raw.start_time, "start_time")?, "start_time")?,
        connect_time: raw
            .connect_time
            .map(|v| time_of(v, "connect_time"))
            .transpose()?,
        destination_prefix: string(raw.destination_prefix, "destination_prefix")?,
        destination_initial_interval: int(
            raw.destination_initial_interval,
            "destination_initial_interval",
        )?,
        destination_initial_rate: rate(raw.destination_initial_rate, "destination_initial_rate")?,
        destination_next_interval: int(raw.destination_next_interval, "destination_next_interval")?,
        destination_next_rate: rate(raw.destination_next_rate, "destination_next_rate")?,
        destination_fee: rate(raw.destination_fee, "destination_fee")?,
        src_name_in: string(raw.src_name_in, "src_name_in")?,
        src_prefix_in: string(raw.src_prefix_in, "src_prefix_in")?,
        dst_prefix_in: string(raw.dst_prefix_in, "dst_prefix_in")?,
        src_prefix_routing: string(raw.src_prefix_routing, "src_prefix_routing")?,
        dst_prefix_routing: string(raw.dst_prefix_routing, "dst_prefix_routing")?,
        from_domain: string(raw.from_domain, "from_domain")?,
        to_domain: string(raw.to_domain, "to_domain")?,
        ruri_domain: string(raw.ruri_domain, "ruri_domain")?,
        diversion_in: nullable(raw.diversion_in, "diversion_in")?,
        pai_in: nullable(raw.pai_in, "pai_in")?,
        ppi_in: nullable(raw.ppi_in, "ppi_in")?,
        privacy_in: nullable(raw.privacy_in, "privacy_in")?,
        rpid_in: nullable(raw.rpid_in, "rpid_in")?,
        rpid_privacy_in: nullable(raw.rpid_privacy_in, "rpid_privacy_in")?,
        auth_orig_transport_protocol_id: int(
            raw.auth_orig_transport_protocol_id
                .or(raw.auth_orig_protocol_id),
            "auth_orig_transport_protocol_id",
        )?,
        auth_orig_ip: string(raw.auth_orig_ip, "auth_orig_ip")?,
        auth_orig_port: int(raw.auth_orig_port, "auth_orig_port")?,
        // Lenient: a flag the agent only uses to keep an ended call ended.
        buffered: raw
            .buffered
            .is_some_and(|v| matches!(v.get(), "true" | "1" | "\"true\"" | "\"1\"")),
    })
}

/// A JSON string (unescaped, borrowed when it has no escapes) or a number's text.
fn text(value: &RawValue) -> Result<Cow<'_, str>, ()> {
    let raw = value.get();
    match raw.as_bytes().first() {
        Some(b'"') if !raw.contains('\\') => Ok(Cow::Borrowed(&raw[1..raw.len() - 1])),
        Some(b'"') => serde_json::from_str::<String>(raw)
            .map(Cow::Owned)
            .map_err(|_| ()),
        Some(b'-' | b'0'..=b'9') => Ok(Cow::Borrowed(raw)),
        _ => Err(()),
    }
}

/// An integer given as a JSON number or as a string of base-10 digits.
fn integer(value: &RawValue) -> Result<i64, ()> {
    let digits = text(value)?;
    let digits = digits.strip_prefix('+').unwrap_or(&digits);
    digits.parse().map_err(|_| ())
}

/// A decimal number, kept as the text the switch sent (a rate is money: no float trip).
fn decimal(value: &RawValue) -> Result<Cow<'_, str>, ()> {
    let number = text(value)?;
    is_decimal(&number).then_some(number).ok_or(())
}

fn is_decimal(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && digits(fraction) && exponent.is_none_or(digits)
}

/// A `YYYY-MM-DD hh:mm:ss` UTC time, or a unix time in seconds (as ClickHouse accepts).
fn time(value: &RawValue) -> Result<Cow<'_, str>, ()> {
    let raw = value.get();
    if raw.starts_with('"') {
        let text = text(value)?;
        return is_datetime(&text).then_some(text).ok_or(());
    }
    let seconds: i64 = raw.parse().map_err(|_| ())?;
    Ok(Cow::Owned(format_datetime(seconds)))
}

/// A block of whole lines read from a snapshot, and what the reader made of each.
struct Block {
    text: Vec<u8>,
    items: Vec<Item>,
    /// The text of the block's parsed rows ([`PackedRow`]).
    rows: String,
}

/// One line, as the reader thread hands it to the writer. A parsed row is held inline:
/// a block's items live in one vector, reused from block to block, where a box would be an
/// allocation per row made on one thread and freed on the other.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// A line whose key is a stored call's: the writer confirms it is unchanged, or parses
    /// it (`line` and `timestamp` are ranges of the block's text).
    Keyed {
        line: std::ops::Range<usize>,
        line_no: u64,
        hash: i64,
        timestamp: Option<std::ops::Range<usize>>,
    },
    /// A parsed row (its text in the block's `rows`), and the key of its line.
    Row(PackedRow, Option<i64>),
    Skipped {
        node_id: Option<i64>,
    },
}

/// Lines a block gathers before it goes to the writer.
const BLOCK_BYTES: usize = 1 << 20;
/// Blocks in flight between the reader and the writer: two keep the writer fed; four held
/// ~4 MB more at an apply's peak for no time gained (that memory went to the page cache).
const BLOCKS_IN_FLIGHT: usize = 2;

/// Reads a whole snapshot from `input` and applies it in one transaction of `writer`.
/// On any error nothing is applied.
///
/// Two threads share the work, since the second core is otherwise idle during an apply: a
/// reader splits the input into lines, keys them, and parses every line that is not a
/// stored call's; the calling thread (the writer) matches, writes and commits.
pub fn apply_snapshot(
    writer: &mut Writer,
    input: impl BufRead + Send,
    insert_line: InsertLine,
    origin: Origin,
    received_at: SystemTime,
) -> Result<ApplyReport, SnapshotError> {
    apply_snapshot_teed(writer, input, insert_line, origin, received_at, None, None)
}

/// Where the reader copies a snapshot's rows as it reads them: the relay's spool.
///
/// It gets the bytes of every line after the `INSERT` line, as they came (so every key,
/// and rows the agent skips), before they are parsed; whether they count is decided at the
/// commit. It cannot fail the snapshot: applying never waits for, or on, the relay. A copy
/// dropped without [`Tee::commit`] (the snapshot was rejected) is discarded.
pub trait Tee: Send {
    fn copy(&mut self, bytes: &[u8]);
    /// Hands the copy of a committed snapshot of `nodes` on, without waiting for anything.
    /// `repeat`: the store held this snapshot already (`store::Changes::repeat`): the
    /// copy may be dropped if this very copy was handed on before.
    fn commit(self: Box<Self>, nodes: &[i64], repeat: bool);
}

/// Where each applied snapshot's rows go on: the relay, when it is on.
///
/// The feed defines it and the relay implements it, so that the writer hands snapshots on
/// without naming the relay: the relay builds on the feed, never the other way round.
pub trait Forward: Send {
    /// A new copy for the snapshot about to apply; `None` when this one is not forwarded.
    fn begin(&self) -> Option<Box<dyn Tee>>;
}

/// Call events that come while a snapshot applies: applied in its transaction, between its
/// blocks and once more before it commits, so that they show when it does instead of
/// waiting behind it (a 100k-call apply takes seconds; a busy switch posts hundreds of
/// events a second, which would then take hundreds of milliseconds more to catch up).
pub struct Arrivals<'a> {
    /// The events applied so far, for the caller: counted once the snapshot committed, or
    /// applied on their own if it did not.
    pub applied: Vec<Event>,
    /// Moves the events that have come since into the vector.
    pub fetch: &'a mut dyn FnMut(&mut Vec<Event>),
}

impl Arrivals<'_> {
    fn apply_new(&mut self, tx: &mut SnapshotTx<'_>) -> rusqlite::Result<()> {
        let from = self.applied.len();
        (self.fetch)(&mut self.applied);
        tx.apply_events(&self.applied[from..])
    }
}

/// [`apply_snapshot`], copying the rows into `tee` on the way, and applying the call
/// events that come meanwhile from `arrivals` in the same transaction.
pub fn apply_snapshot_teed(
    writer: &mut Writer,
    input: impl BufRead + Send,
    insert_line: InsertLine,
    origin: Origin,
    received_at: SystemTime,
    tee: Option<&mut dyn Tee>,
    mut arrivals: Option<&mut Arrivals<'_>>,
) -> Result<ApplyReport, SnapshotError> {
    let started = Instant::now();
    let mut tx = writer.begin(origin, received_at)?;
    let stored_keys = tx.line_keys();
    let mut report = ApplyReport::default();
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        let (blocks_tx, blocks) = std::sync::mpsc::sync_channel(BLOCKS_IN_FLIGHT);
        // Applied blocks go back to the reader to be filled again: a snapshot of hundreds
        // of megabytes passes through the same few buffers, never through fresh pages.
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let reader = scope
            .spawn(move || read_blocks(input, insert_line, &stored_keys, blocks_tx, &spare, tee));
        let applied = apply_blocks(&mut tx, blocks, &spare_tx, &mut report, &mut arrivals);
        let read = reader.join().unwrap_or_else(|_| {
            Err(SnapshotError::Io(std::io::Error::other(
                "the snapshot reader failed",
            )))
        });
        // The writer's error comes first: when it stops, the reader stops with it.
        applied.and(read)
    })?;
    if let Some(arrivals) = arrivals {
        arrivals.apply_new(&mut tx)?;
    }
    let changes = tx.commit()?;
    report.nodes = changes.nodes;
    report.dropped = changes.dropped;
    report.written = changes.written;
    report.removed = changes.removed;
    report.repeat = changes.repeat;
    report.received_at_ms = crate::clock::unix_millis(received_at);
    report.suppressed = changes.suppressed;
    report.events = changes.events;
    report.duration = started.elapsed();
    Ok(report)
}

/// The writer's side: applies the blocks as they come, until the reader is done, and after
/// each block the events that came meanwhile.
fn apply_blocks(
    tx: &mut SnapshotTx<'_>,
    blocks: std::sync::mpsc::Receiver<Block>,
    spare: &std::sync::mpsc::Sender<Block>,
    report: &mut ApplyReport,
    arrivals: &mut Option<&mut Arrivals<'_>>,
) -> Result<(), SnapshotError> {
    for mut block in blocks {
        for item in block.items.drain(..) {
            match item {
                Item::Keyed {
                    line,
                    line_no,
                    hash,
                    timestamp,
                } => {
                    let key = LineKey {
                        hash,
                        snapshot_timestamp: timestamp
                            .and_then(|range| std::str::from_utf8(&block.text[range]).ok()),
                    };
                    if tx.put_unchanged(&key)? {
                        report.rows += 1;
                        continue;
                    }
                    // Rare: the call keeps a timestamp of its own; parse it after all.
                    let malformed = |reason| SnapshotError::Malformed {
                        line: line_no,
                        reason,
                    };
                    match parse_line(&block.text[line]).map_err(malformed)? {
                        Line::Nothing => {}
                        Line::Row(row) => {
                            tx.put(&row, key.agrees_with(&row).then_some(hash))?;
                            report.rows += 1;
                        }
                        Line::Skipped { node_id, .. } => {
                            report.skipped += 1;
                            if let Some(node) = node_id {
                                tx.touch_node(node)?;
                            }
                        }
                    }
                }
                Item::Row(row, key) => {
                    tx.put(&row.unpack(&block.rows), key)?;
                    report.rows += 1;
                }
                Item::Skipped { node_id } => {
                    report.skipped += 1;
                    if let Some(node) = node_id {
                        tx.touch_node(node)?;
                    }
                }
            }
        }
        block.text.clear();
        block.rows.clear();
        let _ = spare.send(block);
        if let Some(arrivals) = arrivals.as_deref_mut() {
            arrivals.apply_new(tx)?;
        }
    }
    Ok(())
}

/// The reader's side: lines in, blocks out. Stops at the first malformed line, or when the
/// writer stops taking blocks.
fn read_blocks(
    mut input: impl BufRead,
    insert_line: InsertLine,
    stored_keys: &crate::store::LineKeys,
    blocks: std::sync::mpsc::SyncSender<Block>,
    spare: &std::sync::mpsc::Receiver<Block>,
    mut tee: Option<&mut dyn Tee>,
) -> Result<(), SnapshotError> {
    let new_block = || {
        spare.try_recv().unwrap_or_else(|_| Block {
            text: Vec::with_capacity(BLOCK_BYTES + 64 * 1024),
            items: Vec::new(),
            rows: String::new(),
        })
    };
    let mut block = new_block();
    let mut line_no = 0u64;
    loop {
        let start = block.text.len();
        let read = (&mut input)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut block.text)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        // Longer than the limit: more than it read, with no newline yet.
        if read as u64 > MAX_LINE_BYTES && block.text.last() != Some(&b'\n') {
            let first_required = line_no == 1 && insert_line == InsertLine::Required;
            if first_required || block.text[start..].trim_ascii_start().first() != Some(&b'{') {
                return Err(SnapshotError::Malformed {
                    line: line_no,
                    reason: "not a JSON object".into(),
                });
            }
            // An object too long to be a row of a switch: skipped without ever holding
            // more of it in memory (the relay still gets it whole: ClickHouse decides).
            if let Some(tee) = tee.as_deref_mut() {
                tee.copy(&block.text[start..]);
            }
            block.text.truncate(start);
            skip_rest_of_line(&mut input, tee.as_deref_mut())?;
            tracing::debug!(
                line = line_no,
                "snapshot row skipped: longer than {MAX_LINE_BYTES} bytes"
            );
            block.items.push(Item::Skipped { node_id: None });
            continue;
        }
        let mut line = start..block.text.len();
        if line_no == 1 {
            match (strip_insert(&block.text[line.clone()]), insert_line) {
                (Some((_table, data)), _) => line.start = block.text.len() - data.len(),
                (None, InsertLine::Required) => {
                    return Err(SnapshotError::Malformed {
                        line: 1,
                        reason: "expected INSERT INTO <table> FORMAT JSONEachRow".into(),
                    });
                }
                (None, InsertLine::Optional) => {}
            }
        }
        let text = &block.text[line.clone()];
        // The INSERT line's own line end is not a row: the relay's body starts at the rows.
        let insert_line_end = line.start > start && text.trim_ascii().is_empty();
        if let Some(tee) = tee.as_deref_mut()
            && !insert_line_end
        {
            tee.copy(text);
        }
        let key = line_key(text);
        let item = match key {
            Some(key) if stored_keys.contains(key.hash) => {
                let base = text.as_ptr() as usize - line.start;
                let timestamp = key.snapshot_timestamp.map(|t| {
                    let at = t.as_ptr() as usize - base;
                    at..at + t.len()
                });
                Some(Item::Keyed {
                    line: line.clone(),
                    line_no,
                    hash: key.hash,
                    timestamp,
                })
            }
            _ => {
                let malformed = |reason| SnapshotError::Malformed {
                    line: line_no,
                    reason,
                };
                match parse_line(text).map_err(malformed)? {
                    Line::Nothing => None,
                    Line::Row(row) => {
                        let key = key.filter(|k| k.agrees_with(&row)).map(|k| k.hash);
                        Some(Item::Row(row.pack(&mut block.rows), key))
                    }
                    Line::Skipped { node_id, reason } => {
                        tracing::debug!(line = line_no, %reason, "snapshot row skipped");
                        Some(Item::Skipped { node_id })
                    }
                }
            }
        };
        block.items.extend(item);
        if block.text.len() >= BLOCK_BYTES {
            let full = std::mem::replace(&mut block, new_block());
            if blocks.send(full).is_err() {
                return Ok(()); // the writer stopped; its error is the one to report
            }
        }
    }
    let _ = blocks.send(block);
    Ok(())
}

/// Consumes input up to and including the next newline, copying it into `tee`.
fn skip_rest_of_line(
    input: &mut impl BufRead,
    mut tee: Option<&mut (dyn Tee + '_)>,
) -> std::io::Result<()> {
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        let (used, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (chunk.len(), false),
        };
        if let Some(tee) = tee.as_deref_mut() {
            tee.copy(&chunk[..used]);
        }
        input.consume(used);
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: &str) -> CallRow<'_> {
        match parse_line(line.as_bytes()) {
            Ok(Line::Row(row)) => *row,
            other => panic!("not a row: {other:?}"),
        }
    }

    fn skipped(line: &str) -> (Option<i64>, String) {
        match parse_line(line.as_bytes()) {
            Ok(Line::Skipped { node_id, reason }) => (node_id, reason),
            other => panic!("not skipped: {other:?}"),
        }
    }

    const MINIMAL: &str = r#"{"node_id":1,"local_tag":"a","customer_id":2,"customer_acc_id":3,"start_time":"2025-11-25 12:47:28"}"#;

    #[test]
    fn a_minimal_row_gets_the_documented_defaults() {
        let r = row(MINIMAL);
        assert_eq!(
            (r.node_id, &*r.local_tag, r.customer_id, r.customer_acc_id),
            (1, "a", 2, 3)
        );
        assert_eq!(r.snapshot_timestamp, None);
        assert_eq!(r.connect_time, None);
        assert_eq!(r.src_name_in, "");
        assert_eq!(r.diversion_in, None);
        assert_eq!(
            (r.auth_orig_port, r.auth_orig_transport_protocol_id),
            (0, 0)
        );
    }

    #[test]
    fn numbers_arrive_as_numbers_or_strings_and_rates_keep_their_text() {
        let r = row(
            r#"{"node_id":"1","local_tag":"a","customer_id":2,"customer_acc_id":"3","start_time":"2025-11-25 12:47:28",
            "auth_orig_port":"5060","destination_initial_rate":0.10,"destination_next_rate":"0.0123",
            "destination_initial_interval":"60","auth_orig_protocol_id":3,"src_prefix_in":380}"#,
        );
        assert_eq!(
            (r.node_id, r.customer_acc_id, r.auth_orig_port),
            (1, 3, 5060)
        );
        assert_eq!(r.destination_initial_rate, "0.10");
        assert_eq!(r.destination_next_rate, "0.0123");
        assert_eq!(r.destination_initial_interval, 60);
        assert_eq!(r.auth_orig_transport_protocol_id, 3);
        assert_eq!(r.src_prefix_in, "380");
    }

    #[test]
    fn escapes_and_utf8_decode() {
        let r = row(
            r#"{"node_id":1,"local_tag":"a","customer_id":2,"customer_acc_id":3,"start_time":"2025-11-25 12:47:28","src_name_in":"back\\slash \u00c4\"","pai_in":"Zoë"}"#,
        );
        assert_eq!(r.src_name_in, "back\\slash Ä\"");
        assert_eq!(r.pai_in.as_deref(), Some("Zoë"));
    }

    #[test]
    fn local_tag_falls_back_to_orig_call_id() {
        let line = MINIMAL.replace(r#""local_tag":"a""#, r#""orig_call_id":"c-1""#);
        assert_eq!(row(&line).local_tag, "c-1");
        let line = MINIMAL.replace(r#""local_tag":"a""#, r#""local_tag":null"#);
        assert_eq!(skipped(&line).0, Some(1));
    }

    #[test]
    fn rows_with_bad_values_are_skipped_with_their_node() {
        for (from, to) in [
            (r#""customer_id":2"#, r#""customer_id":"two""#),
            (r#""customer_acc_id":3"#, r#""customer_acc_id":3.5"#),
            (
                r#""start_time":"2025-11-25 12:47:28""#,
                r#""start_time":"2025-02-30 12:47:28""#,
            ),
            (
                r#""start_time":"2025-11-25 12:47:28""#,
                r#""start_time":null"#,
            ),
            (r#""local_tag":"a""#, r#""local_tag":{"x":1}"#),
            (r#""customer_id":2"#, r#""customer_id":2,"customer_id":2"#),
            (
                r#""customer_id":2"#,
                r#""customer_id":2,"destination_fee":"1,5""#,
            ),
            (
                r#""customer_id":2"#,
                r#""customer_id":2,"auth_orig_port":true"#,
            ),
            (
                r#""customer_id":2"#,
                r#""customer_id":2,"src_name_in":"\ud800""#,
            ),
        ] {
            let line = MINIMAL.replace(from, to);
            assert_eq!(skipped(&line).0, Some(1), "{line}");
        }
        assert_eq!(skipped(&MINIMAL.replace(r#""node_id":1,"#, "")).0, None);
        let latin1 = MINIMAL.replace(r#""local_tag":"a""#, r#""local_tag":"Ren\xE9""#);
        let mut bytes = latin1.into_bytes();
        let at = bytes.windows(4).position(|w| w == b"\\xE9").unwrap();
        bytes.splice(at..at + 4, [0xE9]);
        match parse_line(&bytes) {
            Ok(Line::Skipped { node_id, .. }) => assert_eq!(node_id, Some(1)),
            other => panic!("not skipped: {other:?}"),
        }
    }

    #[test]
    fn unix_seconds_are_a_time_too() {
        let line = MINIMAL.replace(r#""2025-11-25 12:47:28""#, "1764074848");
        assert_eq!(row(&line).start_time, "2025-11-25 12:47:28");
    }

    #[test]
    fn a_line_that_is_not_an_object_is_an_error() {
        for bad in ["[1,2]", "{\"node_id\":1", "hello", "\"x\"", "{} trailing"] {
            assert!(parse_line(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_line(b"{\"a\xff").is_err());
        assert_eq!(parse_line(b"  \r").unwrap(), Line::Nothing);
    }

    #[test]
    fn insert_line_is_recognised() {
        let data = |text: &[u8]| strip_insert(text).map(|(_, rest)| rest.trim_ascii().to_vec());
        assert_eq!(
            data(b"INSERT INTO active_calls FORMAT JSONEachRow\n"),
            Some(vec![])
        );
        assert_eq!(
            data(b"insert into db.t format JSONEachRow\r\n"),
            Some(vec![])
        );
        assert_eq!(
            data(b"INSERT INTO t FORMAT JSONEachRow {\"a\":1}\n"),
            Some(b"{\"a\":1}".to_vec())
        );
        assert_eq!(
            strip_insert(b"INSERT INTO t FORMAT JSONEachRow").map(|(t, _)| t),
            Some(&b"t"[..])
        );
        assert_eq!(data(b"SELECT 1"), None);
        assert_eq!(data(b"INSERT INTO t FORMAT CSV"), None);
        assert_eq!(data(b"INSERT INTO t"), None);
    }

    #[test]
    fn decimals() {
        for good in ["0", "0.0", "-1.25", "1e-3", "12.5E+2"] {
            assert!(is_decimal(good), "{good}");
        }
        for bad in ["", ".5", "1.", "1,5", "abc", "1e", "+-1", "NaN", "inf"] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }
}
