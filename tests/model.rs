//! Model-based checks of the endpoint (issue 6, parts 3 and 4): the real agent, fed real
//! snapshot files and directories and asked over real HTTP, against a plain in-memory
//! reference of SPEC 1.2 and 1.3 written here from the SPEC alone.
//!
//! - `filters_agree_with_the_reference`: random rows (nodes, tags, accounts, customers,
//!   every column a filter reads, with empty strings, nulls, case, `%`, `_`, `*`, `\`,
//!   UTF-8 and prefixes of each other) and random queries (0–4 filters, repeated names,
//!   brackets, unknown names, bad values, random percent-encoding) give exactly the
//!   reference's answer: status, 400 body, and every row's 26 keys in order with their
//!   values, in SPEC 1.3's order (rows that tie on `start_time` and `local_tag` — the same
//!   tag on two nodes — may come in any order among themselves).
//! - `tenants_are_isolated`: random directories and tokens (static and dynamic, limited to
//!   accounts or not, other customers', expired, forged) over calls of every customer: no
//!   answer holds a call the token may not see, and an account it may not see is the
//!   SPEC's 400.
//!
//! Rows are written compact with their keys in byte order and a fresh `id` in every
//! snapshot, as SEMS writes them, or spaced in no order; `\u` escapes or raw UTF-8.
//!
//! One agent per test; each proptest case writes a whole new snapshot (and directory).
//! Cases: 128 and 96 by default; `PROPTEST_CASES=5000 cargo test --test model` for a long
//! run. A failure is shrunk and its seed saved in `tests/model.proptest-regressions`, which
//! is replayed first on every later run.

mod common;

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, FileFailurePersistence, TestRunner};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------------
// The runner
// ------------------------------------------------------------------------------------

/// A runner with `default_cases` cases (or `PROPTEST_CASES`), whose failures are saved in
/// and replayed from `tests/model.proptest-regressions`.
fn runner(default_cases: u32) -> TestRunner {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let config = RunnerConfig {
        cases: env("PROPTEST_CASES").unwrap_or(default_cases),
        // Every case costs HTTP round trips: bound the shrinking, unless told otherwise.
        max_shrink_time: env("PROPTEST_MAX_SHRINK_TIME").unwrap_or(180_000),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..RunnerConfig::default()
    };
    TestRunner::new(config)
}

/// What a run checked, for its closing line.
#[derive(Default)]
struct Stats {
    cases: Cell<u64>,
    queries: Cell<u64>,
    /// 200 answers; with rows; whose filters kept some but not all of the account's calls.
    ok: Cell<u64>,
    with_rows: Cell<u64>,
    narrowed: Cell<u64>,
    bad_request: Cell<u64>,
    unauthorized: Cell<u64>,
    rows: Cell<u64>,
}

fn bump(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get() + n);
}

impl Stats {
    /// Counts one checked answer: `want` is the reference's, `account_calls` how many calls
    /// the asked account has before the filters.
    fn answer(&self, want: Option<&Result<Vec<&Call>, String>>, account_calls: usize) {
        bump(&self.queries, 1);
        match want {
            None => bump(&self.unauthorized, 1),
            Some(Err(_)) => bump(&self.bad_request, 1),
            Some(Ok(rows)) => {
                bump(&self.ok, 1);
                bump(&self.rows, rows.len() as u64);
                bump(&self.with_rows, u64::from(!rows.is_empty()));
                bump(
                    &self.narrowed,
                    u64::from(!rows.is_empty() && rows.len() < account_calls),
                );
            }
        }
    }

    fn finish(&self, name: &str, started: Instant, result: Result<(), String>) {
        eprintln!(
            "{name}: {} cases, {} queries (200: {}, with rows: {}, narrowed by filters: {}; \
             400: {}; 401: {}), {} rows compared, {:.1} s",
            self.cases.get(),
            self.queries.get(),
            self.ok.get(),
            self.with_rows.get(),
            self.narrowed.get(),
            self.bad_request.get(),
            self.unauthorized.get(),
            self.rows.get(),
            started.elapsed().as_secs_f64()
        );
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}

// ------------------------------------------------------------------------------------
// Input rows: what a switch sends
// ------------------------------------------------------------------------------------

/// The string columns a filter reads: `<col>-eq/-starts-with/-ends-with/-contains`.
const TEXT_COLUMNS: [&str; 5] = [
    "src_name_in",
    "src_prefix_in",
    "dst_prefix_in",
    "src_prefix_routing",
    "dst_prefix_routing",
];
const OPS: [&str; 4] = ["eq", "starts-with", "ends-with", "contains"];

/// Pieces that strings are made of: metacharacters, case, UTF-8, digits that make prefixes.
const ATOMS: &[&str] = &[
    "1", "2", "3", "38", "380", "44", "a", "A", "b", "B", "ab", "Ab", "aB", "%", "_", "*", "?",
    "[", "]", "\\", "'", "\"", " ", "ä", "Ä", "ß", "€", "😀", "zoë", "ZOË", "x", "X", "-", "+",
    "\u{0}", "\t",
];
/// Whole values, many the prefix or suffix of another.
const COMMON: &[&str] = &[
    "",
    "380",
    "3805",
    "38050",
    "44",
    "4420",
    "a",
    "ab",
    "abc",
    "Abc",
    "ABC",
    "100%",
    "100_",
    "100",
    "x*y",
    "back\\slash",
    "back\\",
    "ÄÖÜ",
    "äöü",
    "zoë",
    "ZOË",
    "Zo",
    "%_",
    "_%",
];
/// Digit strings that may arrive as JSON numbers.
const NUMERIC: &[&str] = &["380", "44", "12", "7", "0"];
const IPS: &[&str] = &[
    "127.0.0.1",
    "10.0.0.1",
    "10.0.0.10",
    "2001:db8::1",
    "::1",
    "",
    "ABC",
    "abc",
    "1.2.3.4 ",
];
/// Local tags: case, UTF-8 and metacharacters make their byte order non-trivial.
const TAGS: &[&str] = &[
    "a", "A", "b", "B", "ab", "a b", "a_b", "a%b", "ä", "Ä", "z", "Z", "10", "9", "~", "abc",
    "ab\\c",
];
const NODES: &[i64] = &[1, 2, 3, 4_294_967_297];
/// Few distinct times, so that rows tie on `start_time`.
const TIMES: &[&str] = &[
    "2025-11-25 10:00:00",
    "2025-11-25 10:00:01",
    "2025-11-25 09:59:59",
    "2024-02-29 23:59:59",
    "2025-11-26 00:00:00",
    "1999-12-31 23:59:59",
];
const PORTS: &[i64] = &[0, 5060, 5061, 1, -1, 65535, 2_147_483_647, -2_147_483_648];
const PROTOS: &[i64] = &[0, 1, 2, 3, -1, 127, -128];
const INTERVALS: &[i64] = &[0, 1, 30, 60, -1];
const DECIMALS: &[&str] = &[
    "0", "0.11", "0.10", "1.5000", "-0.01", "12", "0.0123", "100",
];

/// A string value of an input row.
#[derive(Clone, Debug, PartialEq)]
enum Text {
    Absent,
    Null,
    Str(String),
    /// Digits sent as a JSON number.
    Num(&'static str),
}

impl Text {
    /// The value as SPEC 1.3 outputs a never-null string.
    fn out(&self) -> String {
        match self {
            Text::Absent | Text::Null => String::new(),
            Text::Str(s) => s.clone(),
            Text::Num(s) => (*s).to_owned(),
        }
    }

    /// As a string-or-null column outputs it.
    fn out_nullable(&self) -> Value {
        match self {
            Text::Absent | Text::Null => Value::Null,
            other => Value::String(other.out()),
        }
    }

    fn json(&self, escape: bool) -> Option<String> {
        match self {
            Text::Absent => None,
            Text::Null => Some("null".into()),
            Text::Str(s) => Some(json_string(s, escape)),
            Text::Num(s) => Some((*s).to_owned()),
        }
    }
}

/// An integer of an input row.
#[derive(Clone, Debug, PartialEq)]
enum IntField {
    Absent,
    Null,
    Num(i64),
    /// Sent as a string of digits.
    Str(i64),
}

impl IntField {
    fn out(&self) -> i64 {
        match self {
            IntField::Absent | IntField::Null => 0,
            IntField::Num(n) | IntField::Str(n) => *n,
        }
    }

    fn json(&self) -> Option<String> {
        match self {
            IntField::Absent => None,
            IntField::Null => Some("null".into()),
            IntField::Num(n) => Some(n.to_string()),
            IntField::Str(n) => Some(format!("\"{n}\"")),
        }
    }
}

/// A decimal: its text, sent as a JSON string or as a JSON number written that way.
#[derive(Clone, Debug, PartialEq)]
struct Decimal(&'static str, bool);

impl Decimal {
    fn json(&self) -> String {
        if self.1 {
            self.0.to_owned()
        } else {
            format!("\"{}\"", self.0)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TagKey {
    LocalTag,
    OrigCallId,
    /// Both given: `local_tag` is the key.
    Both,
}

/// A value that does not convert, or a required key missing: the row is skipped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    NoNode,
    NoTag,
    NoCustomer,
    NoAccount,
    NoStart,
    InvalidStart,
    InvalidConnect,
    InvalidPort,
    InvalidInterval,
    InvalidRate,
}

/// One call row as the switch sends it.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    node: i64,
    tag: String,
    tag_key: TagKey,
    customer: i64,
    account: i64,
    /// `None`: absent (the time the snapshot was received).
    snapshot_ts: Option<&'static str>,
    start: &'static str,
    connect: Option<&'static str>,
    destination_prefix: Text,
    initial_interval: IntField,
    initial_rate: Decimal,
    next_interval: IntField,
    next_rate: Decimal,
    fee: Decimal,
    strings: [Text; 5],
    domains: [Text; 3],
    nullables: [Text; 6],
    proto: IntField,
    /// `auth_orig_protocol_id`, the older switches' name.
    proto_old_name: bool,
    ip: Text,
    port: IntField,
    bad: Option<Bad>,
    /// `{"k":v,...}` (as `line_key` recognises) or `{"k": v, ...}`.
    compact: bool,
    /// Non-ASCII characters written as `\uXXXX`.
    escape: bool,
    end_time: Option<&'static str>,
    /// The row's `id`: SEMS writes a fresh one in every snapshot, for every call.
    id: u64,
}

impl Row {
    /// A row with plain values everywhere but these.
    fn plain(node: i64, tag: String, customer: i64, account: i64, start: &'static str) -> Row {
        Row {
            node,
            tag,
            tag_key: TagKey::LocalTag,
            customer,
            account,
            snapshot_ts: Some("2025-11-25 14:30:00"),
            start,
            connect: None,
            destination_prefix: Text::Str("44".into()),
            initial_interval: IntField::Num(60),
            initial_rate: Decimal("0.11", false),
            next_interval: IntField::Str(1),
            next_rate: Decimal("0.5", true),
            fee: Decimal("0", false),
            strings: std::array::from_fn(|_| Text::Str(String::new())),
            domains: std::array::from_fn(|_| Text::Absent),
            nullables: std::array::from_fn(|_| Text::Null),
            proto: IntField::Num(1),
            proto_old_name: false,
            ip: Text::Str("127.0.0.1".into()),
            port: IntField::Num(5060),
            bad: None,
            compact: true,
            escape: false,
            end_time: None,
            id: 266_999_763_121_995_777,
        }
    }

    /// The snapshot line. A bad row is given `bad_tag` as its key, so that it never
    /// competes with a good row for one.
    fn line(&self, bad_tag: &str) -> String {
        let e = self.escape;
        let mut kv: Vec<(&str, String)> = Vec::new();
        let tag = if self.bad.is_some() {
            bad_tag
        } else {
            &self.tag
        };
        kv.push(("node_id", self.node.to_string()));
        match self.tag_key {
            TagKey::LocalTag => kv.push(("local_tag", json_string(tag, e))),
            TagKey::OrigCallId => kv.push(("orig_call_id", json_string(tag, e))),
            TagKey::Both => {
                kv.push(("orig_call_id", json_string(&format!("{tag}-orig"), e)));
                kv.push(("local_tag", json_string(tag, e)));
            }
        }
        if let Some(ts) = self.snapshot_ts {
            kv.push(("snapshot_timestamp", format!("\"{ts}\"")));
            kv.push(("snapshot_date", format!("\"{}\"", &ts[..10])));
        }
        kv.push(("customer_id", self.customer.to_string()));
        kv.push(("customer_acc_id", self.account.to_string()));
        kv.push(("start_time", format!("\"{}\"", self.start)));
        kv.push((
            "connect_time",
            self.connect.map_or("null".into(), |t| format!("\"{t}\"")),
        ));
        if let Some(t) = self.end_time {
            kv.push(("end_time", format!("\"{t}\"")));
        }
        kv.push(("id", self.id.to_string()));
        kv.push(("legA_remote_ip", "\"192.168.0.1\"".into()));
        let texts: [(&str, &Text); 9] = [
            ("destination_prefix", &self.destination_prefix),
            ("src_name_in", &self.strings[0]),
            ("src_prefix_in", &self.strings[1]),
            ("dst_prefix_in", &self.strings[2]),
            ("src_prefix_routing", &self.strings[3]),
            ("dst_prefix_routing", &self.strings[4]),
            ("from_domain", &self.domains[0]),
            ("to_domain", &self.domains[1]),
            ("ruri_domain", &self.domains[2]),
        ];
        for (key, text) in texts {
            if let Some(v) = text.json(e) {
                kv.push((key, v));
            }
        }
        for (key, text) in NULLABLE_KEYS.iter().zip(&self.nullables) {
            if let Some(v) = text.json(e) {
                kv.push((key, v));
            }
        }
        for (key, value) in [
            ("destination_initial_interval", self.initial_interval.json()),
            ("destination_next_interval", self.next_interval.json()),
            ("destination_initial_rate", Some(self.initial_rate.json())),
            ("destination_next_rate", Some(self.next_rate.json())),
            ("destination_fee", Some(self.fee.json())),
            ("auth_orig_port", self.port.json()),
        ] {
            if let Some(v) = value {
                kv.push((key, v));
            }
        }
        let proto_key = if self.proto_old_name {
            "auth_orig_protocol_id"
        } else {
            "auth_orig_transport_protocol_id"
        };
        if let Some(v) = self.proto.json() {
            kv.push((proto_key, v));
        }
        if let Some(v) = self.ip.json(e) {
            kv.push(("auth_orig_ip", v));
        }
        kv.push(("buffered", "false".into()));
        let set = |kv: &mut Vec<(&str, String)>, key: &str, value: &str| {
            for (k, v) in kv.iter_mut() {
                if *k == key {
                    *v = value.to_owned();
                }
            }
        };
        match self.bad {
            None => {}
            Some(Bad::NoNode) => kv.retain(|(k, _)| *k != "node_id"),
            Some(Bad::NoTag) => kv.retain(|(k, _)| *k != "local_tag" && *k != "orig_call_id"),
            Some(Bad::NoCustomer) => kv.retain(|(k, _)| *k != "customer_id"),
            Some(Bad::NoAccount) => kv.retain(|(k, _)| *k != "customer_acc_id"),
            Some(Bad::NoStart) => kv.retain(|(k, _)| *k != "start_time"),
            Some(Bad::InvalidStart) => set(&mut kv, "start_time", "\"2025-02-30 10:00:00\""),
            Some(Bad::InvalidConnect) => set(&mut kv, "connect_time", "\"yesterday\""),
            Some(Bad::InvalidPort) => kv.push(("auth_orig_port", "\"50x60\"".into())),
            Some(Bad::InvalidInterval) => set(&mut kv, "destination_initial_interval", "\"1.5\""),
            Some(Bad::InvalidRate) => set(&mut kv, "destination_fee", "\"1,5\""),
        }
        if self.bad == Some(Bad::InvalidPort) {
            // Keep one auth_orig_port: the bad one.
            let last = kv
                .iter()
                .rposition(|(k, _)| *k == "auth_orig_port")
                .unwrap();
            let mut i = 0;
            kv.retain(|(k, _)| {
                i += 1;
                *k != "auth_orig_port" || i - 1 == last
            });
        }
        let (colon, comma) = if self.compact {
            (":", ",")
        } else {
            (": ", ", ")
        };
        if self.compact {
            // As SEMS writes it: keys in byte order (a std::map).
            kv.sort_by(|a, b| a.0.cmp(b.0));
        }
        let body: Vec<String> = kv
            .iter()
            .map(|(k, v)| format!("\"{k}\"{colon}{v}"))
            .collect();
        format!("{{{}}}", body.join(comma))
    }

    /// The 26 keys of SPEC 1.3, in order, for this row.
    fn output(&self, received: &str) -> Vec<(&'static str, Value)> {
        let mut out: Vec<(&'static str, Value)> = vec![
            (
                "snapshot_timestamp",
                json!(self.snapshot_ts.unwrap_or(received)),
            ),
            ("start_time", json!(self.start)),
            ("connect_time", json!(self.connect)),
            ("destination_prefix", json!(self.destination_prefix.out())),
            (
                "destination_initial_interval",
                json!(self.initial_interval.out()),
            ),
            ("destination_initial_rate", json!(self.initial_rate.0)),
            ("destination_next_interval", json!(self.next_interval.out())),
            ("destination_next_rate", json!(self.next_rate.0)),
            ("destination_fee", json!(self.fee.0)),
        ];
        for (key, text) in TEXT_COLUMNS.iter().zip(&self.strings) {
            out.push((key, json!(text.out())));
        }
        for (key, text) in ["from_domain", "to_domain", "ruri_domain"]
            .iter()
            .zip(&self.domains)
        {
            out.push((key, json!(text.out())));
        }
        for (key, text) in NULLABLE_KEYS.iter().zip(&self.nullables) {
            out.push((key, text.out_nullable()));
        }
        out.push(("auth_orig_transport_protocol_id", json!(self.proto.out())));
        out.push(("auth_orig_ip", json!(self.ip.out())));
        out.push(("auth_orig_port", json!(self.port.out())));
        out
    }
}

const NULLABLE_KEYS: [&str; 6] = [
    "diversion_in",
    "pai_in",
    "ppi_in",
    "privacy_in",
    "rpid_in",
    "rpid_privacy_in",
];

/// A JSON string; with `escape`, every non-ASCII character as `\uXXXX` (surrogate pairs
/// beyond the BMP).
fn json_string(s: &str, escape: bool) -> String {
    let plain = serde_json::to_string(s).unwrap();
    if !escape {
        return plain;
    }
    let mut out = String::new();
    for c in plain.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out += &format!("\\u{unit:04x}");
            }
        }
    }
    out
}

/// A snapshot file of these rows.
fn snapshot_text(rows: &[Row], insert_line: bool) -> String {
    let mut text = String::new();
    if insert_line {
        text.push_str("INSERT INTO active_calls FORMAT JSONEachRow\n");
    }
    for (i, row) in rows.iter().enumerate() {
        text.push_str(&row.line(&format!("bad-{i}")));
        text.push('\n');
    }
    text
}

// ------------------------------------------------------------------------------------
// The reference: what the store must hold after a snapshot (SPEC 2.1, 2.2)
// ------------------------------------------------------------------------------------

/// A current call as the reference keeps it.
#[derive(Clone, Debug)]
struct Call {
    tag: String,
    customer: i64,
    account: i64,
    start: String,
    connected: bool,
    /// The five filter strings, then `auth_orig_ip`: the bytes a filter compares.
    columns: [Vec<u8>; 6],
    port: i64,
    proto: i64,
    output: Vec<(&'static str, Value)>,
}

/// The calls a snapshot of `rows` leaves: bad rows skipped, the last row of a
/// (node, key) kept. `received`: when the agent read the file, for absent timestamps.
fn current_calls(rows: &[Row], received: &str) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    let mut at: HashMap<(i64, String), usize> = HashMap::new();
    for row in rows.iter().filter(|r| r.bad.is_none()) {
        let output = row.output(received);
        let text = |i: usize| output[i].1.as_str().unwrap().as_bytes().to_vec();
        let call = Call {
            tag: row.tag.clone(),
            customer: row.customer,
            account: row.account,
            start: row.start.to_owned(),
            connected: row.connect.is_some(),
            columns: [text(9), text(10), text(11), text(12), text(13), text(24)],
            port: row.port.out(),
            proto: row.proto.out(),
            output,
        };
        match at.get(&(row.node, row.tag.clone())) {
            Some(&i) => calls[i] = call,
            None => {
                at.insert((row.node, row.tag.clone()), calls.len());
                calls.push(call);
            }
        }
    }
    calls
}

// ------------------------------------------------------------------------------------
// The reference: the directory and authentication (SPEC 1.1, 3)
// ------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Account {
    id: i64,
    uuid: String,
    contractor: i64,
}

#[derive(Clone, Debug)]
struct Access {
    id: i64,
    customer: i64,
    account_ids: Vec<i64>,
}

#[derive(Clone, Debug)]
struct Directory {
    accounts: Vec<Account>,
    accesses: Vec<Access>,
    /// `None`: the key is absent.
    customers: Option<Vec<i64>>,
    profiles: Option<Vec<i64>>,
}

impl Directory {
    fn json(&self) -> Value {
        let mut dir = json!({
            "accounts": self.accounts.iter()
                .map(|a| json!({"id": a.id, "uuid": a.uuid, "contractor_id": a.contractor}))
                .collect::<Vec<_>>(),
            "api_accesses": self.accesses.iter()
                .map(|a| json!({"id": a.id, "customer_id": a.customer, "account_ids": a.account_ids}))
                .collect::<Vec<_>>(),
            "unknown_key": {"ignored": true},
        });
        if let Some(customers) = &self.customers {
            dir["customers"] = customers.iter().map(|c| json!({"id": c})).collect();
        }
        if let Some(profiles) = &self.profiles {
            dir["customer_portal_access_profiles"] =
                profiles.iter().map(|p| json!({"id": p})).collect();
        }
        dir
    }

    /// The customers a dynamic token may name.
    fn has_customer(&self, id: i64) -> bool {
        match &self.customers {
            Some(list) => list.contains(&id),
            None => {
                self.accounts.iter().any(|a| a.contractor == id)
                    || self.accesses.iter().any(|a| a.customer == id)
            }
        }
    }

    fn has_profile(&self, id: i64) -> bool {
        self.profiles.as_ref().is_none_or(|p| p.contains(&id))
    }
}

/// An auth context (SPEC 1.1).
#[derive(Clone, Debug, PartialEq)]
struct Context {
    customer: i64,
    account_ids: Vec<i64>,
}

impl Context {
    /// The account (by the query's value) this context may ask for.
    fn allowed<'d>(&self, directory: &'d Directory, value: &[u8]) -> Option<&'d Account> {
        if !is_uuid(value) {
            return None;
        }
        directory
            .accounts
            .iter()
            .find(|a| a.uuid.as_bytes().eq_ignore_ascii_case(value))
            .filter(|a| a.contractor == self.customer)
            .filter(|a| self.account_ids.is_empty() || self.account_ids.contains(&a.id))
    }
}

fn is_uuid(value: &[u8]) -> bool {
    value.len() == 36
        && value.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

// ------------------------------------------------------------------------------------
// The reference: the endpoint (SPEC 1.2, 1.3)
// ------------------------------------------------------------------------------------

const FIXED_PARAMS: [&str; 5] = [
    "account-id",
    "auth-orig-ip",
    "auth-orig-port",
    "auth-orig-transport-protocol-id",
    "connect-time-null",
];

fn is_known(name: &str) -> bool {
    FIXED_PARAMS.contains(&name)
        || TEXT_COLUMNS.iter().any(|c| {
            OPS.iter()
                .any(|op| name == format!("{}-{op}", c.replace('_', "-")))
        })
}

/// An integer as SPEC 1.2 reads one: optional sign, digits (leading zeros allowed),
/// nothing else, within `min..=max`.
fn parse_int(value: &[u8], min: i64, max: i64) -> Option<i64> {
    let (negative, digits) = match value.first() {
        Some(b'+') => (false, &value[1..]),
        Some(b'-') => (true, &value[1..]),
        _ => (false, value),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = &digits[digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len())..];
    if significant.len() > 12 {
        return None;
    }
    let magnitude: i64 = std::str::from_utf8(significant)
        .unwrap()
        .parse::<i64>()
        .unwrap_or(0);
    let n = if negative { -magnitude } else { magnitude };
    (min..=max).contains(&n).then_some(n)
}

fn ascii_contains(haystack: &[u8], needle: &[u8]) -> bool {
    let (h, n) = (haystack.to_ascii_lowercase(), needle.to_ascii_lowercase());
    n.is_empty() || h.windows(n.len()).any(|w| w == n.as_slice())
}

/// A filter of the reference.
type Keep = Box<dyn Fn(&Call) -> bool>;

/// A query's decoded `(name, value)` pairs, in order.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The answer to a query (its decoded pairs, in order) by an authenticated context:
/// the calls in SPEC order, or the 400's error text.
fn reference<'c>(
    directory: &Directory,
    context: &Context,
    pairs: &[(Vec<u8>, Vec<u8>)],
    calls: &'c [Call],
) -> Result<Vec<&'c Call>, String> {
    // Known names in the order of their first appearance, each with its last value
    // (None: an array or a hash).
    let mut given: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for (name, value) in pairs {
        let (base, array) = match name.iter().skip(1).position(|&b| b == b'[') {
            Some(i) => (&name[..i + 1], true),
            None => (&name[..], false),
        };
        let Ok(base) = std::str::from_utf8(base) else {
            continue;
        };
        if !is_known(base) {
            continue;
        }
        let value = (!array).then(|| value.clone());
        match given.iter_mut().find(|(n, _)| n == base) {
            Some(slot) => slot.1 = value,
            None => given.push((base.to_owned(), value)),
        }
    }
    if !given.iter().any(|(n, _)| n == "account-id") {
        return Err("missing required param(s) account-id".into());
    }
    let mut account = None;
    let mut keep: Vec<Keep> = Vec::new();
    for (name, value) in &given {
        let Some(value) = value.clone() else {
            return Err(format!("param {name} can't be an array"));
        };
        let invalid = || Err(format!("invalid value {name}"));
        match name.as_str() {
            "account-id" => match context.allowed(directory, &value) {
                Some(a) => account = Some(a.id),
                None => return invalid(),
            },
            "auth-orig-ip" => keep.push(Box::new(move |c| c.columns[5] == value)),
            "auth-orig-port" => match parse_int(&value, i32::MIN.into(), i32::MAX.into()) {
                Some(port) => keep.push(Box::new(move |c| c.port == port)),
                None => return invalid(),
            },
            "auth-orig-transport-protocol-id" => match parse_int(&value, -128, 127) {
                Some(id) => keep.push(Box::new(move |c| c.proto == id)),
                None => return invalid(),
            },
            "connect-time-null" => {
                let not_null = [
                    &b""[..],
                    b"0",
                    b"f",
                    b"F",
                    b"false",
                    b"FALSE",
                    b"off",
                    b"OFF",
                ]
                .contains(&value.as_slice());
                keep.push(Box::new(move |c| c.connected == not_null));
            }
            text => {
                let column = TEXT_COLUMNS
                    .iter()
                    .position(|c| text.starts_with(&format!("{}-", c.replace('_', "-"))))
                    .unwrap();
                let op = &text[TEXT_COLUMNS[column].len() + 1..];
                keep.push(match op {
                    "eq" => Box::new(move |c| c.columns[column] == value),
                    "starts-with" => Box::new(move |c| c.columns[column].starts_with(&value)),
                    "ends-with" => Box::new(move |c| c.columns[column].ends_with(&value)),
                    "contains" => Box::new(move |c| ascii_contains(&c.columns[column], &value)),
                    _ => unreachable!("{text}"),
                });
            }
        }
    }
    let account = account.unwrap();
    let mut rows: Vec<&Call> = calls
        .iter()
        .filter(|c| c.customer == context.customer && c.account == account)
        .filter(|c| keep.iter().all(|k| k(c)))
        .collect();
    rows.sort_by(|a, b| b.start.cmp(&a.start).then(a.tag.cmp(&b.tag)));
    Ok(rows)
}

/// A JSON object with its keys in the order they came.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

#[derive(serde::Deserialize)]
struct Body {
    data: Vec<Ordered>,
    rows: Value,
}

/// Checks an answer against the reference's; `Err` describes the difference.
fn compare(reply: &Reply, want: &Result<Vec<&Call>, String>) -> Result<usize, String> {
    let want = match want {
        Err(error) => {
            let body = json!({ "error": error }).to_string();
            if reply.status != 400 || reply.body != body.as_bytes() {
                return Err(format!(
                    "want 400 {body}, got {} {}",
                    reply.status,
                    reply.text()
                ));
            }
            return Ok(0);
        }
        Ok(want) => want,
    };
    if reply.status != 200 {
        return Err(format!("want 200, got {} {}", reply.status, reply.text()));
    }
    if reply.header("content-type") != Some("application/json; charset=utf-8") {
        return Err(format!("content-type {:?}", reply.header("content-type")));
    }
    let top: Ordered = serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
    let top_keys: Vec<&str> = top.0.iter().map(|(k, _)| k.as_str()).collect();
    if top_keys != ["data", "rows"] {
        return Err(format!("body keys {top_keys:?}"));
    }
    let body: Body = serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
    if body.rows != json!(body.data.len()) {
        return Err(format!(
            "rows {} for {} rows of data",
            body.rows,
            body.data.len()
        ));
    }
    let got: Vec<Value> = body
        .data
        .iter()
        .map(|row| {
            let keys: Vec<&str> = row.0.iter().map(|(k, _)| k.as_str()).collect();
            let want_keys: Vec<&str> = OUTPUT_KEYS.to_vec();
            if keys != want_keys {
                return Err(format!("row keys {keys:?}"));
            }
            Ok(Value::Object(row.0.iter().cloned().collect()))
        })
        .collect::<Result<_, _>>()?;
    let expected: Vec<Value> = want
        .iter()
        .map(|c| {
            Value::Object(
                c.output
                    .iter()
                    .map(|(k, v)| ((*k).into(), v.clone()))
                    .collect(),
            )
        })
        .collect();
    let fail = || {
        Err(format!(
            "rows differ:\n got  {}\n want {}",
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(&expected).unwrap()
        ))
    };
    if got.len() != want.len() {
        return fail();
    }
    // In SPEC order; calls that tie on (start_time, local_tag) — one tag on two nodes —
    // in any order among themselves.
    let mut i = 0;
    while i < want.len() {
        let tie = want[i..]
            .iter()
            .take_while(|c| c.start == want[i].start && c.tag == want[i].tag)
            .count();
        let mut left: Vec<&Value> = expected[i..i + tie].iter().collect();
        for row in &got[i..i + tie] {
            match left.iter().position(|v| *v == row) {
                Some(p) => {
                    left.remove(p);
                }
                None => return fail(),
            }
        }
        i += tie;
    }
    Ok(got.len())
}

// ------------------------------------------------------------------------------------
// Queries: pairs, percent-encoding
// ------------------------------------------------------------------------------------

/// A small deterministic generator for encoding choices (from a proptest-drawn seed).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Form-urlencodes bytes, choosing per byte between the forms that decode to it.
fn encode(bytes: &[u8], mix: &mut Mix) -> String {
    let mut out = String::new();
    for &b in bytes {
        let r = mix.next();
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*'
                if !r.is_multiple_of(4) =>
            {
                out.push(b as char)
            }
            b' ' if r.is_multiple_of(2) => out.push('+'),
            _ if r.is_multiple_of(8) => out += &format!("%{b:02x}"),
            _ => out += &format!("%{b:02X}"),
        }
    }
    out
}

/// The query string of decoded pairs.
fn query_string(pairs: &[(Vec<u8>, Vec<u8>)], seed: u64) -> String {
    let mut mix = Mix(seed);
    pairs
        .iter()
        .map(|(n, v)| format!("{}={}", encode(n, &mut mix), encode(v, &mut mix)))
        .collect::<Vec<_>>()
        .join("&")
}

// ------------------------------------------------------------------------------------
// Part 3: filters against the reference
// ------------------------------------------------------------------------------------

/// The fixed directory of the filter test: three customers, an account with the largest
/// int4 id and two outside the store's id ranges, a uuid written in upper case, and
/// accesses limited to some accounts.
fn filter_directory() -> Directory {
    let account = |id, uuid: &str, contractor| Account {
        id,
        uuid: uuid.into(),
        contractor,
    };
    let access = |id, customer, account_ids: &[i64]| Access {
        id,
        customer,
        account_ids: account_ids.to_vec(),
    };
    Directory {
        accounts: vec![
            account(11, "0b2c7a4e-1d11-4c3a-9e11-00000000000b", 1),
            account(12, "0B2C7A4E-1D12-4C3A-9E12-A0000000000C", 1),
            account(21, "9f000000-0000-4000-8000-000000000021", 2),
            account(2_147_483_647, "7fffffff-ffff-4fff-bfff-ffffffffffff", 2),
            account(31, "31313131-3131-4131-8131-313131313131", 3),
            // Ids outside the store's per-account ranges of call ids.
            account(1 << 43, "43434343-4343-4343-8343-434343434343", 3),
            account(-7, "fffffff7-0000-4000-8000-00000000fff7", 1),
        ],
        accesses: vec![
            access(901, 1, &[]),
            access(902, 2, &[]),
            access(903, 3, &[]),
            access(911, 1, &[11]),
            access(912, 2, &[2_147_483_647, 11]),
        ],
        customers: Some(vec![1, 2, 3]),
        profiles: None,
    }
}

/// Accounts the rows are on (with their owner): the directory's and one it lacks.
const ROW_ACCOUNTS: &[(i64, i64)] = &[
    (11, 1),
    (12, 1),
    (21, 2),
    (2_147_483_647, 2),
    (31, 3),
    (41, 3),
    (1 << 43, 3),
    (-7, 1),
    (i64::MAX, 1),
];

fn string_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(COMMON).prop_map(String::from),
        3 => prop::collection::vec(prop::sample::select(ATOMS), 0..4).prop_map(|v| v.concat()),
    ]
}

fn text_strategy() -> impl Strategy<Value = Text> {
    prop_oneof![
        1 => Just(Text::Absent),
        1 => Just(Text::Null),
        12 => string_strategy().prop_map(Text::Str),
        1 => prop::sample::select(NUMERIC).prop_map(Text::Num),
    ]
}

fn nullable_strategy() -> impl Strategy<Value = Text> {
    prop_oneof![
        1 => Just(Text::Absent),
        2 => Just(Text::Null),
        4 => string_strategy().prop_map(Text::Str),
    ]
}

fn int_strategy(pool: &'static [i64]) -> impl Strategy<Value = IntField> {
    prop_oneof![
        1 => Just(IntField::Absent),
        1 => Just(IntField::Null),
        6 => prop::sample::select(pool).prop_map(IntField::Num),
        3 => prop::sample::select(pool).prop_map(IntField::Str),
    ]
}

fn present_int_strategy(pool: &'static [i64]) -> impl Strategy<Value = IntField> {
    prop_oneof![
        prop::sample::select(pool).prop_map(IntField::Num),
        prop::sample::select(pool).prop_map(IntField::Str),
    ]
}

fn decimal_strategy() -> impl Strategy<Value = Decimal> {
    (prop::sample::select(DECIMALS), any::<bool>()).prop_map(|(d, n)| Decimal(d, n))
}

fn bad_strategy() -> impl Strategy<Value = Bad> {
    prop::sample::select(vec![
        Bad::NoNode,
        Bad::NoTag,
        Bad::NoCustomer,
        Bad::NoAccount,
        Bad::NoStart,
        Bad::InvalidStart,
        Bad::InvalidConnect,
        Bad::InvalidPort,
        Bad::InvalidInterval,
        Bad::InvalidRate,
    ])
}

fn row_strategy() -> impl Strategy<Value = Row> {
    let identity = (
        prop::sample::select(NODES),
        prop::sample::select(TAGS),
        prop_oneof![
            8 => Just(TagKey::LocalTag),
            1 => Just(TagKey::OrigCallId),
            1 => Just(TagKey::Both),
        ],
        prop::sample::select(ROW_ACCOUNTS),
        prop::option::weighted(0.1, 1i64..=3),
        prop::option::weighted(0.8, prop::sample::select(TIMES)),
        prop::sample::select(TIMES),
        prop::option::of(prop::sample::select(TIMES)),
    );
    let money = (
        text_strategy(),
        present_int_strategy(INTERVALS),
        decimal_strategy(),
        present_int_strategy(INTERVALS),
        decimal_strategy(),
        decimal_strategy(),
    );
    let strings = (
        prop::array::uniform5(text_strategy()),
        prop::array::uniform3(text_strategy()),
        prop::array::uniform6(nullable_strategy()),
    );
    let auth = (
        int_strategy(PROTOS),
        prop::bool::weighted(0.2),
        prop_oneof![
            1 => Just(Text::Absent),
            1 => Just(Text::Null),
            8 => prop::sample::select(IPS).prop_map(|s| Text::Str(s.into())),
        ],
        int_strategy(PORTS),
    );
    let form = (
        prop::option::weighted(0.08, bad_strategy()),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.2),
        prop::option::of(prop::sample::select(TIMES)),
    );
    (identity, money, strings, auth, form).prop_map(
        |(
            (node, tag, tag_key, (account, owner), customer, snapshot_ts, start, connect),
            (destination_prefix, initial_interval, initial_rate, next_interval, next_rate, fee),
            (strings, domains, nullables),
            (proto, proto_old_name, ip, port),
            (bad, compact, escape, end_time),
        )| Row {
            node,
            tag: tag.into(),
            tag_key,
            customer: customer.unwrap_or(owner),
            account,
            snapshot_ts,
            start,
            connect,
            destination_prefix,
            initial_interval,
            initial_rate,
            next_interval,
            next_rate,
            fee,
            strings,
            domains,
            nullables,
            proto,
            proto_old_name,
            ip,
            port,
            bad,
            compact,
            escape,
            end_time,
            id: 266_999_763_121_995_777,
        },
    )
}

/// How a row of the first snapshot changes in the second.
#[derive(Clone, Debug)]
enum Change {
    /// The same line (the agent may recognise it unparsed).
    Same,
    Drop,
    /// Only the snapshot timestamp (and end time) differ.
    Timestamp(Option<&'static str>, Option<&'static str>),
    Text(usize, Text),
    Start(&'static str),
    Connect(Option<&'static str>),
    Port(IntField),
    Account((i64, i64)),
    /// The same values written differently.
    Reformat,
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => Just(Change::Same),
        2 => Just(Change::Drop),
        3 => (
            prop::option::weighted(0.8, prop::sample::select(TIMES)),
            prop::option::of(prop::sample::select(TIMES))
        )
            .prop_map(|(t, e)| Change::Timestamp(t, e)),
        2 => (0usize..5, text_strategy()).prop_map(|(i, t)| Change::Text(i, t)),
        1 => prop::sample::select(TIMES).prop_map(Change::Start),
        1 => prop::option::of(prop::sample::select(TIMES)).prop_map(Change::Connect),
        1 => int_strategy(PORTS).prop_map(Change::Port),
        1 => prop::sample::select(ROW_ACCOUNTS).prop_map(Change::Account),
        1 => Just(Change::Reformat),
    ]
}

fn apply_changes(rows: &[Row], changes: &[Change], added: &[Row]) -> Vec<Row> {
    let mut next = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let mut row = row.clone();
        // Every call of the next snapshot has a new id, changed or not.
        row.id += 41_943_060;
        match changes.get(i).cloned().unwrap_or(Change::Same) {
            Change::Same => {}
            Change::Drop => continue,
            Change::Timestamp(t, e) => {
                row.snapshot_ts = t;
                row.end_time = e;
            }
            Change::Text(c, t) => row.strings[c] = t,
            Change::Start(t) => row.start = t,
            Change::Connect(t) => row.connect = t,
            Change::Port(p) => row.port = p,
            Change::Account((account, owner)) => {
                row.account = account;
                row.customer = owner;
            }
            Change::Reformat => {
                row.compact = !row.compact;
                row.escape = !row.escape;
            }
        }
        next.push(row);
    }
    next.extend(added.iter().cloned());
    next
}

/// How a needle is cut from a value.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// The cut that makes the filter's operator match: the whole value for `-eq`, a
    /// prefix for `-starts-with`, a suffix for `-ends-with`, a piece for `-contains`.
    Natural,
    Whole,
    Prefix,
    Suffix,
    Middle,
    SwapCase,
    Upper,
    Lower,
}

/// A string filter's value.
#[derive(Clone, Debug)]
enum Needle {
    /// A piece of a current call's value (a call of the queried account when there is one):
    /// of the filter's own column, or of another (`0..5` strings, `5` the ip).
    FromCall {
        /// `None`: the query's target call.
        call: Option<Index>,
        column: Option<usize>,
        cut: Cut,
        a: Index,
        b: Index,
    },
    Literal(String),
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
enum IntNeedle {
    /// A current call's value, written plainly, with `+`, or with leading zeros.
    FromCall(Option<Index>, u8),
    Literal(&'static str),
}

const INT_LITERALS: &[&str] = &[
    "",
    "abc",
    " 5060",
    "5060 ",
    "1e3",
    "2147483647",
    "2147483648",
    "-2147483648",
    "-2147483649",
    "0x10",
    "+",
    "-",
    "--1",
    "+-1",
    "٣",
    "5060.0",
    "00000000000000000000005060",
    "99999999999999999999999",
    "127",
    "128",
    "-128",
    "-129",
    "0",
    "-0",
    "+0",
    "5 060",
];
const CONNECT_VALUES: &[&str] = &[
    "", "0", "f", "F", "false", "FALSE", "off", "OFF", "1", "true", "False", "yes", "abc", "no",
    "t", "0 ", " 0", "On", "ä", "nil", "null",
];

#[derive(Clone, Debug)]
enum FilterKind {
    Text {
        column: usize,
        op: usize,
        needle: Needle,
    },
    Ip(Needle),
    Port(IntNeedle),
    Proto(IntNeedle),
    ConnectNull(&'static str),
}

#[derive(Clone, Debug)]
struct FilterSpec {
    kind: FilterKind,
    position: u8,
    /// The same name given once more (the last value wins, the first position counts).
    again: Option<(&'static str, u8)>,
    /// `name[]=` or `name[k]=`: an array or a hash.
    brackets: Option<&'static str>,
}

#[derive(Clone, Debug)]
enum AccountPick {
    /// An account of the directory, in lower, upper or the directory's case.
    Account(Index, u8),
    Missing,
    Brackets(Index, &'static str),
    Literal(&'static str),
}

#[derive(Clone, Debug)]
struct QuerySpec {
    /// `None`: the account owner's unlimited access; else any access of the directory.
    token: Option<Index>,
    account: AccountPick,
    position: u8,
    /// `account-id` given once more.
    again: Option<(&'static str, u8)>,
    filters: Vec<FilterSpec>,
    /// The call most needles are cut from (one of the asked account's, when it has some),
    /// so that the filters together match something.
    target: Index,
    noise: Vec<(&'static str, String, u8)>,
    seed: u64,
}

fn needle_strategy() -> impl Strategy<Value = Needle> {
    let cut = prop_oneof![
        14 => Just(Cut::Natural),
        2 => Just(Cut::Whole),
        2 => Just(Cut::Prefix),
        2 => Just(Cut::Suffix),
        2 => Just(Cut::Middle),
        1 => Just(Cut::SwapCase),
        1 => Just(Cut::Upper),
        1 => Just(Cut::Lower),
    ];
    prop_oneof![
        8 => (prop::option::weighted(0.15, any::<Index>()), prop::option::weighted(0.1, 0usize..6), cut, any::<Index>(), any::<Index>())
            .prop_map(|(call, column, cut, a, b)| Needle::FromCall { call, column, cut, a, b }),
        2 => string_strategy().prop_map(Needle::Literal),
        1 => prop::sample::select(vec![
            vec![0xFF], vec![0xC3], vec![0xC3, 0x84], vec![0xE2, 0x82], vec![0x00],
            b"%".to_vec(), b"_".to_vec(), b"\\".to_vec(), b"a\xFF".to_vec(),
        ]).prop_map(Needle::Bytes),
    ]
}

fn int_needle_strategy() -> impl Strategy<Value = IntNeedle> {
    prop_oneof![
        3 => (prop::option::weighted(0.25, any::<Index>()), 0u8..3)
            .prop_map(|(i, f)| IntNeedle::FromCall(i, f)),
        1 => prop::sample::select(INT_LITERALS).prop_map(IntNeedle::Literal),
    ]
}

fn filter_strategy() -> impl Strategy<Value = FilterSpec> {
    let kind = prop_oneof![
        10 => (0usize..5, 0usize..4, needle_strategy())
            .prop_map(|(column, op, needle)| FilterKind::Text { column, op, needle }),
        1 => needle_strategy().prop_map(FilterKind::Ip),
        1 => int_needle_strategy().prop_map(FilterKind::Port),
        1 => int_needle_strategy().prop_map(FilterKind::Proto),
        1 => prop::sample::select(CONNECT_VALUES).prop_map(FilterKind::ConnectNull),
    ];
    (
        kind,
        any::<u8>(),
        prop::option::weighted(
            0.1,
            (
                prop::sample::select(&["", "abc", "5060", "x", "-1", "1"][..]),
                any::<u8>(),
            ),
        ),
        prop::option::weighted(0.03, prop::sample::select(&["[]", "[k]", "[0]"][..])),
    )
        .prop_map(|(kind, position, again, brackets)| FilterSpec {
            kind,
            position,
            again,
            brackets,
        })
}

const BAD_ACCOUNT_VALUES: &[&str] = &[
    "",
    "x",
    "0b2c7a4e1d114c3a9e1100000000000b",
    "{0b2c7a4e-1d11-4c3a-9e11-00000000000b}",
    "0b2c7a4e-1d11-4c3a-9e11-00000000000b ",
    " 0b2c7a4e-1d11-4c3a-9e11-00000000000b",
    "0b2c7a4e-1d11-4c3a-9e11-00000000000",
    "0b2c7a4e-1d11-4c3a-9e11-00000000000bb",
    "0b2c7a4e-1d11-4c3a-9e11_00000000000b",
    "0b2c7a4g-1d11-4c3a-9e11-00000000000b",
    "00000000-0000-0000-0000-000000000000",
    "11",
    "urn:uuid:0b2c7a4e-1d11-4c3a-9e11-00000000000b",
];

fn query_strategy() -> impl Strategy<Value = QuerySpec> {
    let account = prop_oneof![
        30 => (any::<Index>(), 0u8..3).prop_map(|(i, c)| AccountPick::Account(i, c)),
        1 => Just(AccountPick::Missing),
        1 => (any::<Index>(), prop::sample::select(&["[]", "[k]"][..]))
            .prop_map(|(i, b)| AccountPick::Brackets(i, b)),
        2 => prop::sample::select(BAD_ACCOUNT_VALUES).prop_map(AccountPick::Literal),
    ];
    let noise = prop::collection::vec(
        (
            prop::sample::select(
                &[
                    "page",
                    "sort[]",
                    "src-name-in",
                    "src_name_in-eq",
                    "Account-Id",
                    "x[y]",
                    "account-id-eq",
                    "filter[src-name-in-eq]",
                    "connect_time_null",
                    "",
                    "SRC-NAME-IN-EQ",
                    "auth-orig-port2",
                ][..],
            ),
            string_strategy(),
            any::<u8>(),
        ),
        0..2,
    );
    (
        prop::option::weighted(0.08, any::<Index>()),
        account,
        any::<u8>(),
        prop::option::weighted(
            0.05,
            (
                prop::sample::select(&["", "x", "0b2c7a4e-1d11-4c3a-9e11-00000000000b"][..]),
                any::<u8>(),
            ),
        ),
        prop::collection::vec(filter_strategy(), 0..=4),
        any::<Index>(),
        noise,
        any::<u64>(),
    )
        .prop_map(
            |(token, account, position, again, filters, target, noise, seed)| QuerySpec {
                token,
                account,
                position,
                again,
                filters,
                target,
                noise,
                seed,
            },
        )
}

fn cut(value: &[u8], op: usize, how: Cut, a: &Index, b: &Index) -> Vec<u8> {
    let n = value.len();
    match how {
        Cut::Natural => {
            let how = match op {
                0 => Cut::Whole,
                1 => Cut::Prefix,
                2 => Cut::Suffix,
                _ if a.index(3) == 0 => Cut::SwapCase,
                _ => Cut::Middle,
            };
            cut(value, op, how, a, b)
        }
        Cut::Whole => value.to_vec(),
        Cut::Prefix => value[..a.index(n + 1)].to_vec(),
        Cut::Suffix => value[a.index(n + 1)..].to_vec(),
        Cut::Middle => {
            let (i, j) = (a.index(n + 1), b.index(n + 1));
            value[i.min(j)..i.max(j)].to_vec()
        }
        Cut::SwapCase => value
            .iter()
            .map(|b| {
                if b.is_ascii_uppercase() {
                    b.to_ascii_lowercase()
                } else {
                    b.to_ascii_uppercase()
                }
            })
            .collect(),
        Cut::Upper => value.to_ascii_uppercase(),
        Cut::Lower => value.to_ascii_lowercase(),
    }
}

impl QuerySpec {
    /// The token's access id and the decoded pairs, in order, resolved against the calls.
    fn resolve(&self, directory: &Directory, calls: &[Call]) -> (i64, Pairs) {
        let accounts = &directory.accounts;
        let mut pairs: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
        let chosen = match &self.account {
            AccountPick::Account(i, _) | AccountPick::Brackets(i, _) => {
                Some(&accounts[i.index(accounts.len())])
            }
            _ => None,
        };
        match &self.account {
            AccountPick::Account(_, case) => {
                let uuid = &chosen.unwrap().uuid;
                let uuid = match case {
                    0 => uuid.to_ascii_lowercase(),
                    1 => uuid.to_ascii_uppercase(),
                    _ => uuid.clone(),
                };
                pairs.push((self.position, b"account-id".to_vec(), uuid.into_bytes()));
            }
            AccountPick::Missing => {}
            AccountPick::Brackets(_, brackets) => pairs.push((
                self.position,
                format!("account-id{brackets}").into_bytes(),
                chosen.unwrap().uuid.clone().into_bytes(),
            )),
            AccountPick::Literal(v) => {
                pairs.push((self.position, b"account-id".to_vec(), v.as_bytes().to_vec()))
            }
        }
        if let (Some((value, position)), false) = (
            self.again,
            matches!(self.account, AccountPick::Brackets(..)),
        ) {
            pairs.push((position, b"account-id".to_vec(), value.as_bytes().to_vec()));
        }
        // Needles come from the asked account's visible calls when it has some.
        let own: Vec<&Call> = calls
            .iter()
            .filter(|c| chosen.is_some_and(|a| a.id == c.account && a.contractor == c.customer))
            .collect();
        let pool: Vec<&Call> = if own.is_empty() {
            calls.iter().collect()
        } else {
            own
        };
        let pick = |call: &Option<Index>| -> Option<&Call> {
            if pool.is_empty() {
                return None;
            }
            Some(pool[call.as_ref().unwrap_or(&self.target).index(pool.len())])
        };
        let needle = |needle: &Needle, column: usize, op: usize| -> Vec<u8> {
            match needle {
                Needle::FromCall {
                    call,
                    column: other,
                    cut: how,
                    a,
                    b,
                } => match pick(call) {
                    Some(call) => cut(&call.columns[other.unwrap_or(column)], op, *how, a, b),
                    None => Vec::new(),
                },
                Needle::Literal(s) => s.as_bytes().to_vec(),
                Needle::Bytes(b) => b.clone(),
            }
        };
        let int_needle = |needle: &IntNeedle, of: fn(&Call) -> i64| -> Vec<u8> {
            match needle {
                IntNeedle::FromCall(call, form) => {
                    let n = pick(call).map_or(5060, of);
                    let digits = n.unsigned_abs().to_string();
                    let sign = if n < 0 { "-" } else { "" };
                    match form {
                        0 => format!("{sign}{digits}"),
                        1 if n >= 0 => format!("+{digits}"),
                        _ => format!("{sign}000{digits}"),
                    }
                    .into_bytes()
                }
                IntNeedle::Literal(s) => s.as_bytes().to_vec(),
            }
        };
        for filter in &self.filters {
            let (name, value) = match &filter.kind {
                FilterKind::Text {
                    column,
                    op,
                    needle: n,
                } => (
                    format!("{}-{}", TEXT_COLUMNS[*column].replace('_', "-"), OPS[*op]),
                    needle(n, *column, *op),
                ),
                FilterKind::Ip(n) => ("auth-orig-ip".to_owned(), needle(n, 5, 0)),
                FilterKind::Port(n) => ("auth-orig-port".to_owned(), int_needle(n, |c| c.port)),
                FilterKind::Proto(n) => (
                    "auth-orig-transport-protocol-id".to_owned(),
                    int_needle(n, |c| c.proto),
                ),
                FilterKind::ConnectNull(v) => {
                    ("connect-time-null".to_owned(), v.as_bytes().to_vec())
                }
            };
            match filter.brackets {
                // Brackets on a name given only that way (SPEC leaves mixed forms open).
                Some(b) if !pairs.iter().any(|(_, n, _)| n.starts_with(name.as_bytes())) => {
                    pairs.push((filter.position, format!("{name}{b}").into_bytes(), value));
                    continue;
                }
                _ => {}
            }
            if pairs
                .iter()
                .any(|(_, n, _)| n.starts_with(name.as_bytes()) && n.len() > name.len())
            {
                continue; // already given with brackets
            }
            pairs.push((filter.position, name.clone().into_bytes(), value));
            if let Some((value, position)) = filter.again {
                pairs.push((position, name.into_bytes(), value.as_bytes().to_vec()));
            }
        }
        for (name, value, position) in &self.noise {
            pairs.push((
                *position,
                name.as_bytes().to_vec(),
                value.as_bytes().to_vec(),
            ));
        }
        pairs.sort_by_key(|(position, _, _)| *position);
        let access = match (&self.token, chosen) {
            (Some(i), _) => directory.accesses[i.index(directory.accesses.len())].id,
            (None, Some(account)) => {
                directory
                    .accesses
                    .iter()
                    .find(|a| a.customer == account.contractor && a.account_ids.is_empty())
                    .unwrap()
                    .id
            }
            (None, None) => directory.accesses[0].id,
        };
        (access, pairs.into_iter().map(|(_, n, v)| (n, v)).collect())
    }
}

#[derive(Clone, Debug)]
struct FilterCase {
    first: Vec<Row>,
    insert_line: bool,
    changes: Vec<Change>,
    added: Vec<Row>,
    queries: Vec<QuerySpec>,
}

fn filter_case_strategy() -> impl Strategy<Value = FilterCase> {
    (
        prop::collection::vec(row_strategy(), 0..40),
        any::<bool>(),
        prop::collection::vec(change_strategy(), 0..24),
        prop::collection::vec(row_strategy(), 0..5),
        prop::collection::vec(query_strategy(), 1..12),
    )
        .prop_map(|(first, insert_line, changes, added, queries)| FilterCase {
            first,
            insert_line,
            changes,
            added,
            queries,
        })
}

/// Feeds `rows` as the whole snapshot, then asks every query and compares with the
/// reference. Returns (queries, rows compared).
fn check_snapshot(
    agent: &TestAgent,
    directory: &Directory,
    rows: &[Row],
    insert_line: bool,
    queries: &[QuerySpec],
    stats: &Stats,
) -> Result<(), String> {
    let text = snapshot_text(rows, insert_line);
    let before = agent.agent().feed_status().borrow().clone();
    let status = agent.feed(&text);
    if status.applied != before.applied + 1 {
        return Err(format!("snapshot not applied: {:?}", status.last_error));
    }
    let bad = rows.iter().filter(|r| r.bad.is_some()).count() as u64;
    let report = status.last_report.clone().unwrap();
    if report.skipped != bad {
        return Err(format!("{} rows skipped, {bad} bad rows", report.skipped));
    }
    // Read because it changed: received when read (SPEC 2.2).
    let received =
        active_calls_agent::clock::format_datetime(report.received_at_ms.div_euclid(1000));
    let calls = current_calls(rows, &received);
    for query in queries {
        let (access, pairs) = query.resolve(directory, &calls);
        let access_row = directory.accesses.iter().find(|a| a.id == access).unwrap();
        let context = Context {
            customer: access_row.customer,
            account_ids: access_row.account_ids.clone(),
        };
        let target = format!("{ENDPOINT}?{}", query_string(&pairs, query.seed));
        let reply = request(
            agent.addr(),
            "GET",
            &target,
            &[("Authorization", &token_for(access))],
        );
        let want = reference(directory, &context, &pairs, &calls);
        compare(&reply, &want).map_err(|e| {
            format!(
                "GET {target}\n  token of access {access} ({context:?})\n  decoded: {}\n  {e}\n  snapshot:\n{text}",
                pairs
                    .iter()
                    .map(|(n, v)| format!("{:?}={:?}", String::from_utf8_lossy(n), String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>()
                    .join(" & ")
            )
        })?;
        let account = pairs
            .iter()
            .rev()
            .find(|(n, _)| n == b"account-id")
            .and_then(|(_, v)| context.allowed(directory, v))
            .map(|a| a.id);
        let account_calls = calls
            .iter()
            .filter(|c| c.customer == context.customer && Some(c.account) == account)
            .count();
        stats.answer(Some(&want), account_calls);
    }
    Ok(())
}

/// SPEC 1.2 through SQLite equals SPEC 1.2 in memory, for random rows and filters, over
/// a snapshot and the next one that changes it.
#[test]
fn filters_agree_with_the_reference() {
    let directory = filter_directory();
    let dir_json = directory.json().to_string();
    let agent = TestAgent::start_with(|c| std::fs::write(&c.directory.path, &dir_json).unwrap());
    let stats = Stats::default();
    let started = Instant::now();
    let result = runner(128).run(&filter_case_strategy(), |case| {
        for rows in [
            case.first.clone(),
            apply_changes(&case.first, &case.changes, &case.added),
        ] {
            check_snapshot(
                &agent,
                &directory,
                &rows,
                case.insert_line,
                &case.queries,
                &stats,
            )
            .map_err(TestCaseError::fail)?;
        }
        bump(&stats.cases, 1);
        Ok(())
    });
    stats.finish(
        "filters_agree_with_the_reference",
        started,
        result.map_err(|e| e.to_string()),
    );
}

// ------------------------------------------------------------------------------------
// Part 4: tenant isolation
// ------------------------------------------------------------------------------------

/// A directory drawn at random, before ids and uuids are made unique.
#[derive(Clone, Debug)]
struct DirectorySpec {
    customers: Vec<i64>,
    list_customers: bool,
    /// (id, contractor index, uuid bits, upper case)
    accounts: Vec<(i64, Index, u128, bool)>,
    /// (customer index, account_ids: indexes into the accounts, or foreign ids)
    accesses: Vec<(Index, Vec<Result<Index, i64>>)>,
    profiles: Option<Vec<i64>>,
}

/// The marker account that tells which directory the agent has loaded.
const MARKER_CUSTOMER: i64 = 99;
const MARKER_ACCESS: i64 = 99_999;

fn marker_uuid(generation: u64) -> String {
    format!("99999999-0000-4000-8000-{generation:012x}")
}

impl DirectorySpec {
    fn build(&self, generation: u64) -> Directory {
        let mut accounts: Vec<Account> = Vec::new();
        for (id, contractor, bits, upper) in &self.accounts {
            if accounts.iter().any(|a| a.id == *id) {
                continue;
            }
            let hex = format!("{bits:032x}");
            let uuid = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            let uuid = if *upper {
                uuid.to_ascii_uppercase()
            } else {
                uuid
            };
            if accounts.iter().any(|a| a.uuid.eq_ignore_ascii_case(&uuid)) {
                continue;
            }
            accounts.push(Account {
                id: *id,
                uuid,
                contractor: self.customers[contractor.index(self.customers.len())],
            });
        }
        let mut accesses: Vec<Access> = self
            .accesses
            .iter()
            .enumerate()
            .map(|(i, (customer, ids))| Access {
                id: 100 + i as i64,
                customer: self.customers[customer.index(self.customers.len())],
                account_ids: ids
                    .iter()
                    .filter_map(|id| match id {
                        Ok(i) if accounts.is_empty() => None,
                        Ok(i) => Some(accounts[i.index(accounts.len())].id),
                        Err(foreign) => Some(*foreign),
                    })
                    .collect(),
            })
            .collect();
        accounts.push(Account {
            id: 999_999,
            uuid: marker_uuid(generation),
            contractor: MARKER_CUSTOMER,
        });
        accesses.push(Access {
            id: MARKER_ACCESS,
            customer: MARKER_CUSTOMER,
            account_ids: vec![],
        });
        let mut customers = self.customers.clone();
        customers.push(MARKER_CUSTOMER);
        Directory {
            accounts,
            accesses,
            customers: self.list_customers.then_some(customers),
            profiles: self.profiles.clone(),
        }
    }
}

fn directory_strategy() -> impl Strategy<Value = DirectorySpec> {
    (
        prop::sample::subsequence(vec![1i64, 2, 3, 4], 1..=4),
        prop::bool::weighted(0.7),
        prop::collection::vec(
            (
                prop::sample::select(&[1i64, 2, 3, 4, 5, 6, 7, 8, 2_147_483_647][..]),
                any::<Index>(),
                any::<u128>(),
                prop::bool::weighted(0.2),
            ),
            0..8,
        ),
        prop::collection::vec(
            (
                any::<Index>(),
                prop_oneof![
                    2 => Just(vec![]),
                    3 => prop::collection::vec(
                        prop_oneof![
                            4 => any::<Index>().prop_map(Ok),
                            1 => prop::sample::select(&[777i64, 0, 9][..]).prop_map(Err),
                        ],
                        1..4,
                    ),
                ],
            ),
            1..5,
        ),
        prop::option::weighted(0.3, Just(vec![1i64, 2])),
    )
        .prop_map(
            |(customers, list_customers, accounts, accesses, profiles)| DirectorySpec {
                customers,
                list_customers,
                accounts,
                accesses,
                profiles,
            },
        )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expiry {
    None,
    Future,
    Past,
}

#[derive(Clone, Debug)]
enum TokenSpec {
    /// An access of the directory (`sub` as a number or a string).
    Static(Index, bool, Expiry),
    /// An access id the directory does not have.
    Unknown(i64),
    Dynamic {
        /// One of the directory's customers, or any id (maybe unknown).
        customer: Result<Index, i64>,
        /// Indexes into the directory's accounts, or foreign ids; `None`: key absent.
        account_ids: Option<Vec<Result<Index, i64>>>,
        profile: Option<i64>,
        extras: bool,
        /// An unknown key in `cfg`, or no `customer_id`.
        broken: Option<bool>,
        expiry: Expiry,
    },
    /// A valid-looking token signed with another secret.
    Forged(Index),
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Raw,
    Bearer,
    Cookie,
}

fn token_strategy() -> impl Strategy<Value = (TokenSpec, Transport)> {
    let expiry = prop_oneof![
        4 => Just(Expiry::None),
        3 => Just(Expiry::Future),
        1 => Just(Expiry::Past),
    ];
    let token = prop_oneof![
        5 => (any::<Index>(), any::<bool>(), expiry.clone())
            .prop_map(|(i, s, e)| TokenSpec::Static(i, s, e)),
        1 => prop::sample::select(&[1i64, 5, 777][..]).prop_map(TokenSpec::Unknown),
        5 => (
            prop_oneof![
                4 => any::<Index>().prop_map(Ok),
                1 => prop::sample::select(&[1i64, 2, 3, 4, 5][..]).prop_map(Err),
            ],
            prop::option::weighted(0.7, prop::collection::vec(
                prop_oneof![
                    4 => any::<Index>().prop_map(Ok),
                    1 => prop::sample::select(&[777i64, 0][..]).prop_map(Err),
                ],
                0..3,
            )),
            prop::option::weighted(0.4, prop::sample::select(&[1i64, 1, 2, 9][..])),
            any::<bool>(),
            prop::option::weighted(0.05, any::<bool>()),
            expiry,
        )
            .prop_map(|(customer, account_ids, profile, extras, broken, expiry)| TokenSpec::Dynamic {
                customer, account_ids, profile, extras, broken, expiry,
            }),
        1 => any::<Index>().prop_map(TokenSpec::Forged),
    ];
    let transport = prop_oneof![
        2 => Just(Transport::Raw),
        2 => Just(Transport::Bearer),
        1 => Just(Transport::Cookie),
    ];
    (token, transport)
}

/// The token's JWT and the context the SPEC gives it (`None`: 401).
fn mint(spec: &TokenSpec, directory: &Directory, customers: &[i64]) -> (String, Option<Context>) {
    let now = unix_now();
    let exp = |claims: &mut Value, expiry: Expiry| match expiry {
        Expiry::None => {}
        Expiry::Future => claims["exp"] = json!(now + 3600),
        Expiry::Past => claims["exp"] = json!(now - 3600),
    };
    // Accesses of the test (not the marker's).
    let accesses = &directory.accesses[..directory.accesses.len() - 1];
    let accounts = &directory.accounts[..directory.accounts.len() - 1];
    match spec {
        TokenSpec::Static(i, as_string, expiry) => {
            if accesses.is_empty() {
                return (token_for(4242), None);
            }
            let access = &accesses[i.index(accesses.len())];
            let sub = if *as_string {
                json!(access.id.to_string())
            } else {
                json!(access.id)
            };
            let mut claims = json!({"aud": ["customer-v1"], "sub": sub});
            exp(&mut claims, *expiry);
            let context = (*expiry != Expiry::Past).then(|| Context {
                customer: access.customer,
                account_ids: access.account_ids.clone(),
            });
            (sign(&claims), context)
        }
        TokenSpec::Unknown(id) => (token_for(*id), None),
        TokenSpec::Dynamic {
            customer,
            account_ids,
            profile,
            extras,
            broken,
            expiry,
        } => {
            let customer = &match customer {
                Ok(i) => customers[i.index(customers.len())],
                Err(id) => *id,
            };
            let ids: Option<Vec<i64>> = account_ids.as_ref().map(|ids| {
                ids.iter()
                    .filter_map(|id| match id {
                        Ok(_) if accounts.is_empty() => None,
                        Ok(i) => Some(accounts[i.index(accounts.len())].id),
                        Err(foreign) => Some(*foreign),
                    })
                    .collect()
            });
            let mut cfg = json!({"customer_id": customer});
            if let Some(ids) = &ids {
                cfg["account_ids"] = json!(ids);
            }
            if let Some(p) = profile {
                cfg["customer_portal_access_profile_id"] = json!(p);
            }
            if *extras {
                cfg["allowed_ips"] = json!(["0.0.0.0/0", "::/0"]);
                cfg["allow_outgoing_numberlists_ids"] = json!([]);
                cfg["provision_gateway_id"] = json!(null);
            }
            match broken {
                Some(true) => cfg["x"] = json!(1),
                Some(false) => {
                    cfg.as_object_mut().unwrap().remove("customer_id");
                }
                None => {}
            }
            let mut claims = json!({"aud": "customer-v1", "sub": "D", "cfg": cfg});
            exp(&mut claims, *expiry);
            let ok = broken.is_none()
                && *expiry != Expiry::Past
                && directory.has_customer(*customer)
                && directory.has_profile(profile.unwrap_or(1));
            let context = ok.then(|| Context {
                customer: *customer,
                account_ids: ids.unwrap_or_default(),
            });
            (sign(&claims), context)
        }
        TokenSpec::Forged(i) => {
            let id = if accesses.is_empty() {
                1
            } else {
                accesses[i.index(accesses.len())].id
            };
            (
                sign_with(
                    &json!({"aud": ["customer-v1"], "sub": id}),
                    b"not-the-secret",
                ),
                None,
            )
        }
    }
}

/// A call of the isolation test: (account: an index into the directory's accounts or a
/// foreign id, another customer than the owner, node, start time, shared value).
type CallSpec = (
    Result<Index, i64>,
    Option<i64>,
    i64,
    &'static str,
    &'static str,
);

const SHARED: &[&str] = &["380", "3805", "44", "a", "A", "", "c1/", "%"];

#[derive(Clone, Debug)]
struct IsolationCase {
    directory: DirectorySpec,
    tokens: Vec<(TokenSpec, Transport)>,
    calls: Vec<CallSpec>,
    /// Filters tried along the queries: (column, op, needle).
    filters: Vec<Option<(usize, usize, &'static str)>>,
    seed: u64,
}

fn isolation_strategy() -> impl Strategy<Value = IsolationCase> {
    (
        directory_strategy(),
        prop::collection::vec(token_strategy(), 1..7),
        prop::collection::vec(
            (
                prop_oneof![
                    6 => any::<Index>().prop_map(Ok),
                    1 => prop::sample::select(&[777i64, 0][..]).prop_map(Err),
                ],
                prop::option::weighted(0.15, 1i64..=5),
                1i64..=3,
                prop::sample::select(TIMES),
                prop::sample::select(SHARED),
            ),
            0..60,
        ),
        prop::collection::vec(
            prop::option::weighted(
                0.6,
                (
                    0usize..3,
                    0usize..4,
                    prop::sample::select(
                        &[
                            "", "c1/", "c2/", "c3/", "c4/", "/a", "380", "38", "a", "/n1/", "c",
                        ][..],
                    ),
                ),
            ),
            1..4,
        ),
        any::<u64>(),
    )
        .prop_map(|(directory, tokens, calls, filters, seed)| IsolationCase {
            directory,
            tokens,
            calls,
            filters,
            seed,
        })
}

/// The rows of the isolation snapshot; `src_name_in` names each call's tenancy.
fn isolation_rows(case: &IsolationCase, directory: &Directory) -> Vec<Row> {
    let accounts = &directory.accounts[..directory.accounts.len() - 1];
    case.calls
        .iter()
        .enumerate()
        .filter_map(|(i, (account, other, node, start, shared))| {
            let (account, owner) = match account {
                Ok(_) if accounts.is_empty() => return None,
                Ok(a) => {
                    let a = &accounts[a.index(accounts.len())];
                    (a.id, a.contractor)
                }
                Err(foreign) => (*foreign, 1),
            };
            let customer = other.unwrap_or(owner);
            let mut row = Row::plain(*node, format!("t{i}"), customer, account, start);
            row.strings[0] = Text::Str(format!("c{customer}/a{account}/n{node}/r{i}"));
            row.strings[1] = Text::Str((*shared).into());
            row.strings[2] = Text::Str(format!("{shared}{i}"));
            row.connect = (i % 3 == 0).then_some("2025-11-25 10:00:05");
            Some(row)
        })
        .collect()
}

/// Writes the directory and waits until the agent answers from it (its marker account).
fn load_directory(agent: &TestAgent, directory: &Directory, generation: u64) {
    write_file(
        &agent.config.directory.path,
        directory.json().to_string().as_bytes(),
    );
    let target = format!("{ENDPOINT}?account-id={}", marker_uuid(generation));
    let token = token_for(MARKER_ACCESS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(agent.addr(), "GET", &target, &[("Authorization", &token)]).status != 200 {
        assert!(
            Instant::now() < deadline,
            "directory {generation} not loaded within 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// For random directories and tokens, no answer shows a call the token may not see, and
/// every account it may not see is the SPEC's 400.
#[test]
fn tenants_are_isolated() {
    let agent = TestAgent::start();
    let generation = Cell::new(0u64);
    let stats = Stats::default();
    let started = Instant::now();
    let result = runner(96).run(&isolation_strategy(), |case| {
        generation.set(generation.get() + 1);
        let directory = case.directory.build(generation.get());
        load_directory(&agent, &directory, generation.get());
        let rows = isolation_rows(&case, &directory);
        let status = agent.feed(&snapshot_text(&rows, true));
        prop_assert!(status.last_error.is_none(), "{:?}", status.last_error);
        let calls = current_calls(&rows, "unused");

        let mut mix = Mix(case.seed);
        let mut uuids: Vec<String> = directory.accounts.iter().map(|a| a.uuid.clone()).collect();
        uuids.push("0b2c7a4e-1d11-4c3a-9e11-00000000000b".into()); // not in the directory
        for (t, (spec, transport)) in case.tokens.iter().enumerate() {
            let (mut token, context) = mint(spec, &directory, &case.directory.customers);
            for (a, uuid) in uuids.iter().enumerate() {
                let headers: Vec<(&str, String)> = match transport {
                    Transport::Raw => vec![("Authorization", token.clone())],
                    Transport::Bearer => vec![("Authorization", format!("Bearer {token}"))],
                    Transport::Cookie => {
                        vec![("Cookie", format!("_yeti_customer_v1_session={token}"))]
                    }
                };
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let uuid = match mix.next() % 3 {
                    0 => uuid.to_ascii_uppercase(),
                    1 => uuid.to_ascii_lowercase(),
                    _ => uuid.clone(),
                };
                let mut pairs = vec![(b"account-id".to_vec(), uuid.clone().into_bytes())];
                let filter = &case.filters[(t * 7 + a) % case.filters.len()];
                if let Some((column, op, needle)) = filter {
                    let name = format!("{}-{}", TEXT_COLUMNS[*column].replace('_', "-"), OPS[*op]);
                    pairs.push((name.into_bytes(), needle.as_bytes().to_vec()));
                }
                let target = format!("{ENDPOINT}?{}", query_string(&pairs, mix.next()));
                let reply = request(agent.addr(), "GET", &target, &headers);
                // A cookie token comes back refreshed for the same context: the next query
                // of this token uses the refreshed one, so it is checked like the first.
                let refreshed = reply
                    .header("set-cookie")
                    .and_then(|c| c.strip_prefix("_yeti_customer_v1_session="))
                    .and_then(|c| c.split(';').next())
                    .map(str::to_owned);
                match (transport, &context, reply.status, refreshed) {
                    (Transport::Cookie, Some(_), 200, Some(fresh)) => token = fresh,
                    (Transport::Cookie, Some(_), 200, None) => {
                        prop_assert!(false, "a cookie token's 200 refreshes the cookie")
                    }
                    (Transport::Cookie, Some(_), _, Some(fresh)) => token = fresh,
                    (_, _, _, None) => {}
                    (_, _, status, Some(_)) => prop_assert!(
                        false,
                        "set-cookie on a {status} to a token that was not a cookie's, or failed"
                    ),
                }
                let what = || format!("GET {target} with {spec:?} over {transport:?} ({context:?})\n  directory {}\n  calls {calls:?}", directory.json());
                let Some(context) = &context else {
                    prop_assert!(
                        reply.status == 401 && reply.body.is_empty(),
                        "want 401, got {} {}\n  {}",
                        reply.status,
                        reply.text(),
                        what()
                    );
                    stats.answer(None, 0);
                    continue;
                };
                // The isolation property itself, from the rows alone: every call shown is
                // of the token's customer, on the asked account, which the token may see.
                if reply.status == 200 {
                    let asked_account = directory
                        .accounts
                        .iter()
                        .find(|a| a.uuid.eq_ignore_ascii_case(&uuid));
                    for row in reply.rows() {
                        let name = row["src_name_in"].as_str().unwrap_or("?");
                        let tenancy: Vec<Option<i64>> = name
                            .split('/')
                            .take(2)
                            .map(|p| p.get(1..).and_then(|n| n.parse().ok()))
                            .collect();
                        let visible = match tenancy[..] {
                            [Some(customer), Some(account)] => {
                                customer == context.customer
                                    && asked_account.is_some_and(|a| {
                                        a.id == account
                                            && a.contractor == context.customer
                                            && (context.account_ids.is_empty()
                                                || context.account_ids.contains(&account))
                                    })
                            }
                            _ => false,
                        };
                        prop_assert!(visible, "leaked call {name}\n  {}", what());
                    }
                }
                // And the whole answer, against the reference.
                let want = reference(&directory, context, &pairs, &calls);
                let account_calls = directory
                    .accounts
                    .iter()
                    .find(|a| a.uuid.eq_ignore_ascii_case(&uuid))
                    .map_or(0, |a| {
                        calls
                            .iter()
                            .filter(|c| c.customer == context.customer && c.account == a.id)
                            .count()
                    });
                stats.answer(Some(&want), account_calls);
                if let Err(e) = compare(&reply, &want) {
                    prop_assert!(false, "{e}\n  {}", what());
                }
            }
        }
        bump(&stats.cases, 1);
        Ok(())
    });
    stats.finish(
        "tenants_are_isolated",
        started,
        result.map_err(|e| e.to_string()),
    );
}
