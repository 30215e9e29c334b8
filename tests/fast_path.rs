//! The fast path that recognises an unchanged call by its line key (`feed::key`) against
//! the full parse it stands in for: two real stores follow the same snapshots, one with
//! the fast path and one parsing every line (`Writer::set_fast_path(false)`), and every
//! answer, count and refusal must be the same.
//!
//! The snapshots are what a switch resends: random lines (keys in SEMS's byte order or
//! not, spaced or compact, `\u` escapes in values and in key names, `id`, the timestamps
//! and `end_time` nested in other keys, given twice, as other types), then the same lines
//! with their per-snapshot values rewritten, as the next snapshot carries them, or with a
//! key-value pair cut out. Cases: 256 by default (`PROPTEST_CASES` for more).

use std::io::Cursor;
use std::time::{Duration, UNIX_EPOCH};

use active_calls_agent::feed::{ApplyReport, InsertLine, SnapshotError, apply_snapshot};
use active_calls_agent::store::{CallQuery, Origin, Readers, Writer};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

struct Store {
    _dir: tempfile::TempDir,
    writer: Writer,
    readers: Readers,
}

fn store(fast_path: bool) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.db");
    let mut writer = Writer::open(&path).unwrap();
    writer.set_fast_path(fast_path);
    let readers = Readers::new(&path);
    Store {
        _dir: dir,
        writer,
        readers,
    }
}

/// What applying a snapshot showed: the report's counts (or the refusal), and every
/// account's answer.
fn apply(store: &mut Store, snapshot: &[u8], at: u64) -> String {
    let received = UNIX_EPOCH + Duration::from_secs(at);
    let result = apply_snapshot(
        &mut store.writer,
        Cursor::new(snapshot.to_vec()),
        InsertLine::Optional,
        Origin::Socket,
        received,
    );
    let report = match result {
        Ok(ApplyReport {
            rows,
            skipped,
            nodes,
            written,
            removed,
            repeat,
            ..
        }) => format!(
            "rows {rows} skipped {skipped} nodes {nodes:?} written {written} removed {removed} \
             repeat {repeat}"
        ),
        Err(SnapshotError::Malformed { line, .. }) => format!("refused at line {line}"),
        Err(e) => panic!("{e}"),
    };
    let mut out = report;
    for (customer_id, account_id) in ACCOUNTS {
        let query = CallQuery {
            customer_id,
            account_id,
            filters: Vec::new(),
            now_ms: 0,
        };
        let mut body = Vec::new();
        store.readers.outgoing_calls(&query, &mut body).unwrap();
        out.push('\n');
        out.push_str(&String::from_utf8_lossy(&body));
    }
    out
}

const ACCOUNTS: [(i64, i64); 3] = [(1001, 101), (1001, 102), (1002, 103)];
const KEYS: [&str; 4] = ["id", "snapshot_timestamp", "snapshot_date", "end_time"];

/// A key-value pair of a generated line.
#[derive(Clone, Debug)]
struct Pair {
    key: String,
    value: String,
}

fn pair(key: &str, value: impl Into<String>) -> Pair {
    Pair {
        key: format!("\"{key}\""),
        value: value.into(),
    }
}

/// How a per-snapshot key appears in a line, the hostile ways included.
fn per_snapshot_pairs() -> impl Strategy<Value = Vec<Pair>> {
    let time = prop::sample::select(vec![
        "\"2025-11-25 14:30:00\"",
        "\"2025-11-25 14:30:05\"",
        "null",
        "\"2025-13-25 14:30:00\"",
        "5",
        "\"\\u0032025-11-25 14:30:00\"",
    ]);
    let id = prop::sample::select(vec![
        "266999763121995777",
        "0",
        "-3",
        "1.5",
        "012",
        "\"7\"",
        "null",
    ]);
    let one = prop_oneof![
        (0usize..4, time.clone(), id.clone()).prop_map(|(k, t, i)| {
            let key = KEYS[k];
            match key {
                "id" => pair(key, i),
                "snapshot_date" => pair(
                    key,
                    if t == "null" {
                        "null"
                    } else {
                        "\"2025-11-25\""
                    },
                ),
                _ => pair(key, t),
            }
        }),
        // Nested in a key the agent ignores.
        (0usize..4, time.clone()).prop_map(|(k, t)| {
            let value = if KEYS[k] == "id" {
                "9".to_owned()
            } else {
                t.to_owned()
            };
            pair("metadata", format!("{{\"{}\":{value}}}", KEYS[k]))
        }),
        // Its name written with an escape.
        (0usize..4, time).prop_map(|(k, t)| Pair {
            key: format!(
                "\"{}\"",
                KEYS[k]
                    .replacen('_', "\\u005f", 1)
                    .replacen('i', "\\u0069", 1)
            ),
            value: if KEYS[k] == "id" {
                "4".into()
            } else {
                t.into()
            },
        }),
        // A quote escaped in a key that ends like one.
        Just(Pair {
            key: "\"a\\\"end_time\"".into(),
            value: "null".into()
        }),
    ];
    prop::collection::vec(one, 0..5)
}

/// One line: a call (some of them bad), with the per-snapshot pairs mixed in.
fn line_strategy() -> impl Strategy<Value = (Vec<Pair>, bool, bool)> {
    (
        0usize..4,
        0usize..3,
        prop::sample::select(vec!["Alice", "\\u041e\\u043b", "Zo\\u00eb", "", "a\\\"b"]),
        prop::option::of(prop::sample::select(vec![
            "\"2025-11-25 14:00:00\"",
            "null",
        ])),
        per_snapshot_pairs(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(tag, account, name, connect, extra, sorted, spaced, bad)| {
                let (customer, account) = ACCOUNTS[account];
                let mut pairs = vec![
                    pair("node_id", "7"),
                    pair("local_tag", format!("\"t{tag}\"")),
                    pair("customer_id", customer.to_string()),
                    pair("customer_acc_id", account.to_string()),
                    pair(
                        "start_time",
                        if bad {
                            "\"yesterday\""
                        } else {
                            "\"2025-11-25 13:00:00\""
                        },
                    ),
                    pair("src_name_in", format!("\"{name}\"")),
                ];
                if let Some(connect) = connect {
                    pairs.push(pair("connect_time", connect));
                }
                pairs.extend(extra);
                (pairs, sorted, spaced)
            },
        )
}

fn render(pairs: &[Pair], sorted: bool, spaced: bool) -> String {
    let mut pairs = pairs.to_vec();
    if sorted {
        pairs.sort_by(|a, b| a.key.cmp(&b.key));
    }
    let (colon, comma) = if spaced { (": ", ", ") } else { (":", ",") };
    let body: Vec<String> = pairs
        .iter()
        .map(|p| format!("{}{colon}{}", p.key, p.value))
        .collect();
    format!("{{{}}}", body.join(comma))
}

/// The next snapshot's line for the same call: every per-snapshot value rewritten the way a
/// switch rewrites it (found by a plain search for the key, wherever it is), or, with
/// `cut`, one such pair cut out and its comma left, which is not JSON any more.
fn resend(line: &str, cut: bool) -> String {
    let mut out = line.to_owned();
    for key in KEYS {
        let pattern = format!("\"{key}\":");
        let Some(at) = out.find(&pattern) else {
            continue;
        };
        let value_at = at + pattern.len();
        let rest = &out[value_at..];
        let (len, new) = if key == "id" {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_digit() || *b == b'-')
                .count();
            (len, "266999763163938837".to_owned())
        } else if rest.starts_with("null") {
            (4, "null".to_owned())
        } else if rest.starts_with("\"2025-11-25 14:30:0") {
            (21, "\"2025-11-25 14:30:10\"".to_owned())
        } else if rest.starts_with("\"2025-11-25\"") {
            (12, "\"2025-11-26\"".to_owned())
        } else {
            continue;
        };
        if cut {
            out.replace_range(at..value_at + len, "");
            return out;
        }
        out.replace_range(value_at..value_at + len, &new);
    }
    out
}

fn snapshot(lines: &[String]) -> Vec<u8> {
    let mut body = b"INSERT INTO active_calls FORMAT JSONEachRow\n".to_vec();
    for line in lines {
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    body
}

/// Applies `snapshots` to both stores in turn; the first difference, if any.
fn differ(snapshots: &[Vec<u8>]) -> Result<(), String> {
    let (mut fast, mut parsed) = (store(true), store(false));
    for (i, body) in snapshots.iter().enumerate() {
        let at = 1_764_081_000 + 5 * i as u64;
        let (a, b) = (apply(&mut fast, body, at), apply(&mut parsed, body, at));
        if a != b {
            return Err(format!(
                "snapshot {i}:\n{}\nwith the fast path:\n{a}\nparsed:\n{b}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    Ok(())
}

#[test]
fn the_fast_path_answers_as_the_full_parse_does() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = (
        prop::collection::vec(line_strategy(), 1..6),
        prop::collection::vec(any::<bool>(), 6),
    );
    let (resent_lines, keyed) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    runner
        .run(&strategy, |(lines, cut_at)| {
            let first: Vec<String> = lines
                .iter()
                .map(|(pairs, sorted, spaced)| render(pairs, *sorted, *spaced))
                .collect();
            let second: Vec<String> = first.iter().map(|l| resend(l, false)).collect();
            let third: Vec<String> = second
                .iter()
                .zip(&cut_at)
                .map(|(l, &cut)| resend(l, cut))
                .collect();
            resent_lines.set(resent_lines.get() + second.len());
            keyed.set(
                keyed.get()
                    + second
                        .iter()
                        .filter(|l| active_calls_agent::feed::line_key(l.as_bytes()).is_some())
                        .count(),
            );
            let bodies = [
                snapshot(&first),
                snapshot(&second),
                snapshot(&second),
                snapshot(&third),
            ];
            differ(&bodies).map_err(TestCaseError::fail)
        })
        .unwrap();
    // The generator must exercise the fast path, not only its refusals.
    let (keyed, resent_lines) = (keyed.get(), resent_lines.get());
    assert!(
        keyed * 4 > resent_lines,
        "{keyed} of {resent_lines} resent lines had a key"
    );
}

/// The cases the issue and the module's doc name, one by one.
#[test]
fn named_cases_answer_as_the_full_parse_does() {
    let call = |extra: &str| {
        format!(
            r#"{{"customer_acc_id":101,"customer_id":1001,"end_time":"2025-11-25 14:30:00","id":1,"local_tag":"a","node_id":7,{extra}"snapshot_timestamp":"2025-11-25 14:30:00","start_time":"2025-11-25 13:00:00"}}"#
        )
    };
    for extra in [
        "",
        r#""metadata":{"id":2},"#,
        r#""metadata":{"snapshot_timestamp":"2020-01-01 00:00:00"},"#,
        r#""\u0069d":3,"#,
        r#""snapshot\u005ftimestamp":"2025-11-25 14:30:00","#,
        r#""id":4,"#,
        r#""src_name_in":"\u041e\u043b","#,
        r#""a\"end_time":null,"#,
    ]
    .map(call)
    .into_iter()
    .chain([
        // The row's timestamp written with an escape, a nested one beside it: the nested
        // one is not the row's, even while they agree.
        r#"{"customer_acc_id":101,"customer_id":1001,"local_tag":"a","metadata":{"snapshot_timestamp":"2025-11-25 14:30:00"},"node_id":7,"snapshot\u005ftimestamp":"2025-11-25 14:30:00","start_time":"2025-11-25 13:00:00"}"#.to_owned(),
        // Only a nested one: the row has none (the receive time stands in).
        r#"{"customer_acc_id":101,"customer_id":1001,"local_tag":"a","metadata":{"snapshot_timestamp":"2025-11-25 14:30:00"},"node_id":7,"start_time":"2025-11-25 13:00:00"}"#.to_owned(),
    ]) {
        let first = extra.clone();
        let second = resend(&first, false);
        let cut = resend(&second, true);
        let bodies: Vec<Vec<u8>> = [&first, &second, &second, &cut]
            .iter()
            .map(|l| snapshot(&[(*l).clone()]))
            .collect();
        if let Err(e) = differ(&bodies) {
            panic!("{extra}: {e}");
        }
    }
    // The issue's own: a pair cut out of the line of a stored call is refused.
    let mut fast = store(true);
    let line = r#"{"end_time":null,"node_id":9,"local_tag":"a","customer_id":1001,"customer_acc_id":101,"start_time":"2025-11-25 13:00:00"}"#;
    apply(&mut fast, &snapshot(&[line.to_owned()]), 1_764_081_000);
    let cut = line.replacen(r#""end_time":null"#, "", 1);
    let answer = apply(&mut fast, &snapshot(&[cut]), 1_764_081_005);
    assert!(answer.starts_with("refused at line 2"), "{answer}");
}
