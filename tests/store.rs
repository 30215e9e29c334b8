//! The store on its own: a real SQLite file, the query plans of SPEC 5, and what a local
//! script sees when it opens the database read-only.

use std::io::Cursor;
use std::time::SystemTime;

use active_calls_agent::feed::{InsertLine, apply_snapshot};
use active_calls_agent::lab::sems::Switch;
use active_calls_agent::store::{
    CallQuery, Filter, Origin, Readers, TextColumn, TextMatch, Writer,
};

/// A new store in its own folder: the folder (kept alive), the database path, the writer
/// and the readers.
fn fresh_store() -> (tempfile::TempDir, std::path::PathBuf, Writer, Readers) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.db");
    let writer = Writer::open(&path).unwrap();
    let readers = Readers::new(&path);
    (dir, path, writer, readers)
}

/// A store holding `snapshot`, its indexes built (as the writer thread builds them right
/// after a first snapshot's answer).
fn store_with(snapshot: &str) -> (tempfile::TempDir, Readers) {
    let (dir, _path, mut writer, readers) = fresh_store();
    apply_text(&mut writer, snapshot);
    assert!(writer.build_pending_indexes().unwrap());
    (dir, readers)
}

/// The indexes on `calls` in the store at `path`, as a local script would list them.
fn calls_indexes(path: &std::path::Path) -> usize {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'calls' \
         AND sql IS NOT NULL",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// A first snapshot into an empty store commits its calls before their indexes (the
/// switch's answer and the customers' calls do not wait ~1 s of index building); they
/// answer meanwhile, and the indexes come next. A store left without them (the agent
/// killed in between) is rebuilt empty at the next start, its indexes whole.
#[test]
fn a_first_snapshot_is_answered_before_its_indexes_are_built() {
    let (_dir, path, mut writer, readers) = fresh_store();
    let whole = calls_indexes(&path);
    assert_eq!(whole, 11);
    apply_text(&mut writer, include_str!("fixtures/snapshot-1.jsonl"));
    assert_eq!(calls_indexes(&path), 0);
    let answered = stored_names(&readers);
    assert!(!answered.is_empty());
    assert!(writer.build_pending_indexes().unwrap());
    assert!(!writer.build_pending_indexes().unwrap(), "built once");
    assert_eq!(calls_indexes(&path), whole);
    assert_eq!(stored_names(&readers), answered);

    // Killed between the two: the next start finds the store without them.
    let (_dir2, path, mut writer, _readers) = fresh_store();
    apply_text(&mut writer, include_str!("fixtures/snapshot-1.jsonl"));
    drop(writer);
    assert_eq!(calls_indexes(&path), 0);
    let writer = Writer::open(&path).unwrap();
    assert_eq!(calls_indexes(&path), whole);
    let readers = Readers::new(&path);
    assert!(stored_names(&readers).is_empty(), "rebuilt empty");
    drop(writer);
}

fn query(filters: Vec<Filter>) -> CallQuery {
    CallQuery {
        customer_id: 1001,
        account_id: 101,
        filters,
        now_ms: 0,
    }
}

#[test]
fn every_string_filter_is_an_index_search_within_the_account() {
    let (_dir, readers) = store_with(include_str!("fixtures/snapshot-1.jsonl"));
    for column in TextColumn::ALL {
        for (how, index, range) in [
            (
                TextMatch::Equals,
                column.name().to_string(),
                format!("{}=?", column.name()),
            ),
            (
                TextMatch::StartsWith,
                column.name().to_string(),
                format!("{0}>? AND {0}<?", column.name()),
            ),
            (
                TextMatch::EndsWith,
                format!("{}_rev", column.name()),
                format!("{0}_rev>? AND {0}_rev<?", column.name()),
            ),
        ] {
            let filter = Filter::Text {
                column,
                how,
                needle: b"38".to_vec(),
            };
            let plan = readers.explain(&query(vec![filter])).unwrap().join("\n");
            let want =
                format!("SEARCH c USING INDEX calls_{index} (customer_acc_id=? AND {range})");
            assert!(
                plan.contains(&want),
                "{column:?} {how:?}:\n{plan}\nwanted: {want}"
            );
            assert!(!plan.contains("SCAN"), "{plan}");
        }
        let contains = Filter::Text {
            column,
            how: TextMatch::Contains,
            needle: b"38".to_vec(),
        };
        let plan = readers.explain(&query(vec![contains])).unwrap().join("\n");
        assert!(
            plan.contains("(customer_acc_id=?)") && !plan.contains("SCAN"),
            "{plan}"
        );
    }
    // The unfiltered account, and the typed filters, read the account's range only.
    for filters in [
        vec![],
        vec![Filter::AuthOrigPort(5060), Filter::ConnectTimeNull(true)],
    ] {
        let plan = readers.explain(&query(filters)).unwrap().join("\n");
        assert!(
            plan.contains("SEARCH c USING INDEX") && plan.contains("(customer_acc_id=?)"),
            "{plan}"
        );
        assert!(
            plan.contains("SEARCH n USING INTEGER PRIMARY KEY (rowid=?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN"), "{plan}");
    }
}

#[test]
fn a_local_script_can_read_the_database() {
    let (dir, _readers) = store_with(include_str!("fixtures/snapshot-1.jsonl"));
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join("calls.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let calls: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(calls, 20);
    let (node, stamp): (i64, String) = conn
        .query_row("SELECT node_id, snapshot_timestamp FROM nodes", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((node, stamp.as_str()), (7, "2025-11-25 14:30:00"));
    // The switch sends non-ASCII as \uXXXX escapes; a script reads the text itself.
    let name: String = conn
        .query_row(
            "SELECT src_name_in FROM calls WHERE local_tag = 'D096D679-6120-00000011'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(name, "Zo\u{eb}");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn the_simulated_switch_makes_rows_the_agent_takes_whole() {
    let mut switch = Switch::new(42);
    switch.fill(1000, 1_764_081_000);
    let (_dir, _path, mut writer, _readers) = fresh_store();
    let mut apply = |switch: &mut Switch, now: i64| {
        let snapshot = Cursor::new(switch.render(now));
        apply_snapshot(
            &mut writer,
            snapshot,
            InsertLine::Optional,
            Origin::File,
            SystemTime::now(),
        )
        .unwrap()
    };
    let report = apply(&mut switch, 1_764_081_000);
    assert_eq!(
        (report.rows, report.skipped, report.written),
        (1000, 0, 1000)
    );
    // 10% churn: the next snapshot writes exactly the new calls and removes the ended.
    switch.churn(1_764_081_005);
    let report = apply(&mut switch, 1_764_081_005);
    assert_eq!(
        (report.rows, report.written, report.removed),
        (1000, 100, 100)
    );
}

fn apply_text(writer: &mut Writer, text: &str) -> active_calls_agent::feed::ApplyReport {
    apply_snapshot(
        writer,
        Cursor::new(text.to_owned()),
        InsertLine::Optional,
        Origin::Socket,
        SystemTime::now(),
    )
    .unwrap()
}

fn stored_names(readers: &Readers) -> Vec<String> {
    let mut out = Vec::new();
    readers.outgoing_calls(&query(vec![]), &mut out).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out).unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["src_name_in"].as_str().unwrap(),
                r["snapshot_timestamp"].as_str().unwrap()
            )
        })
        .collect()
}

/// Lines that differ only in their timestamps take the fast path (nothing written), and
/// the fast path never hides a real change or breaks "the last row wins".
#[test]
fn unchanged_lines_are_recognised_without_being_rewritten() {
    let (_dir, _path, mut writer, readers) = fresh_store();
    let line = |tag: &str, name: &str, ts: &str| {
        format!(
            r#"{{"id":1,"snapshot_timestamp":"{ts}","snapshot_date":"{d}","node_id":1,"local_tag":"{tag}","customer_id":1001,"customer_acc_id":101,"start_time":"2025-11-25 10:00:00","end_time":"{ts}","src_name_in":"{name}"}}"#,
            d = &ts[..10]
        )
    };
    let t1 = "2025-11-25 14:30:00";
    let t2 = "2025-11-25 14:30:05";
    let report = apply_text(
        &mut writer,
        &format!("{}\n{}\n", line("a", "A", t1), line("b", "B", t1)),
    );
    assert_eq!(report.written, 2);
    let report = apply_text(
        &mut writer,
        &format!("{}\n{}\n", line("a", "A", t2), line("b", "B", t2)),
    );
    assert_eq!((report.rows, report.written, report.removed), (2, 0, 0));
    assert_eq!(
        stored_names(&readers),
        [format!("A {t2}"), format!("B {t2}")]
    );
    // A real change is written; a later repeat of the old line does not undo it... unless
    // it is the last row, which wins.
    let t3 = "2025-11-25 14:30:10";
    let report = apply_text(
        &mut writer,
        &format!(
            "{}\n{}\n{}\n",
            line("a", "A2", t3),
            line("b", "B", t3),
            line("a", "A", t3)
        ),
    );
    assert_eq!(report.rows, 3);
    assert_eq!(
        stored_names(&readers),
        [format!("A {t3}"), format!("B {t3}")]
    );
    let report = apply_text(
        &mut writer,
        &format!("{}\n{}\n", line("a", "A", t3), line("a", "A3", t3)),
    );
    assert_eq!((report.written, report.removed), (1, 1));
    assert_eq!(stored_names(&readers), [format!("A3 {t3}")]);
}

#[test]
fn a_snapshot_the_store_holds_already_is_a_repeat() {
    let (_dir, _path, mut writer, _readers) = fresh_store();
    let snapshot = std::fs::read_to_string("tests/fixtures/snapshot-1.jsonl").unwrap();
    let next = std::fs::read_to_string("tests/fixtures/snapshot-2.jsonl").unwrap();
    let first = apply_text(&mut writer, &snapshot);
    assert!(!first.repeat, "a node's first snapshot");
    // The same bytes again (the file at a start, a resend): a repeat, nothing written.
    let again = apply_text(&mut writer, &snapshot);
    assert!(again.repeat && again.written == 0, "{again:?}");
    // The next period: new timestamps (and calls), not a repeat; nor the old one after it.
    assert!(!apply_text(&mut writer, &next).repeat);
    assert!(!apply_text(&mut writer, &snapshot).repeat);
    // The same timestamp with a call changed is not a repeat either.
    apply_text(&mut writer, &snapshot);
    let edited = snapshot.replacen("\"dst_prefix_in\":\"", "\"dst_prefix_in\":\"9", 1);
    assert!(!apply_text(&mut writer, &edited).repeat);
}

/// A call that connects changes no indexed value: it is updated in place, and the answer
/// (and every filter) sees the new values.
#[test]
fn a_call_that_connects_is_updated_in_place() {
    let (_dir, _path, mut writer, readers) = fresh_store();
    let line = |connect: &str, port: u32| {
        format!(
            r#"{{"node_id":1,"local_tag":"a","customer_id":1001,"customer_acc_id":101,"start_time":"2025-11-25 10:00:00","connect_time":{connect},"auth_orig_port":{port},"src_name_in":"A"}}"#
        )
    };
    apply_text(&mut writer, &format!("{}\n", line("null", 5060)));
    let report = apply_text(
        &mut writer,
        &format!("{}\n", line("\"2025-11-25 10:00:07\"", 5061)),
    );
    assert_eq!((report.written, report.removed), (1, 0));
    let mut out = Vec::new();
    let connected = query(vec![
        Filter::ConnectTimeNull(false),
        Filter::AuthOrigPort(5061),
    ]);
    assert_eq!(readers.outgoing_calls(&connected, &mut out).unwrap(), 1);
    let body: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(body["data"][0]["connect_time"], "2025-11-25 10:00:07");
    assert_eq!(body["data"][0]["src_name_in"], "A");
    let ringing = query(vec![Filter::ConnectTimeNull(true)]);
    assert_eq!(
        readers.outgoing_calls(&ringing, &mut Vec::new()).unwrap(),
        0
    );
}

/// Repeated calls past the point where a large snapshot drops its indexes: the last row
/// of each still wins, and exactly one row per call is stored.
#[test]
fn repeated_calls_in_a_bulk_snapshot_keep_their_last_row() {
    let (_dir, path, mut writer, _readers) = fresh_store();
    let row = |tag: usize, name: &str| {
        format!(
            r#"{{"node_id":1,"local_tag":"t{tag}","customer_id":1001,"customer_acc_id":101,"start_time":"2025-11-25 10:00:00","src_name_in":"{name}"}}"#
        )
    };
    let calls = 6_000;
    let mut text = String::new();
    for tag in 0..calls {
        text.push_str(&row(tag, "first"));
        text.push('\n');
    }
    for tag in 0..calls {
        text.push_str(&row(tag, "last"));
        text.push('\n');
    }
    let report = apply_text(&mut writer, &text);
    assert_eq!(report.rows, 2 * calls as u64);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (count, last): (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(src_name_in = 'last') FROM calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((count, last), (calls as i64, calls as i64));
}

/// An account outside the call-id ranges takes ids from the overflow range: the next call
/// of an ordinary account never collides with it.
#[test]
fn accounts_outside_the_id_ranges_never_collide() {
    let (_dir, _path, mut writer, _readers) = fresh_store();
    let row = |tag: &str, account: i64| {
        format!(
            r#"{{"node_id":1,"local_tag":"{tag}","customer_id":1,"customer_acc_id":{account},"start_time":"2025-11-25 10:00:00"}}"#
        )
    };
    let text = [
        row("a", 7),
        row("b", -1),
        row("c", 7),
        row("d", i64::MAX),
        row("e", 7),
    ]
    .join("\n");
    let report = apply_text(&mut writer, &text);
    assert_eq!((report.rows, report.written), (5, 5));
}

/// A line of exactly the longest allowed length is a line like any other: the next line
/// is read, and a malformed next line still rejects the snapshot.
#[test]
fn a_line_of_exactly_the_limit_does_not_swallow_the_next() {
    use active_calls_agent::feed::MAX_LINE_BYTES;
    let (_dir, _path, mut writer, _readers) = fresh_store();
    let head = r#"{"node_id":1,"local_tag":"long","customer_id":1,"customer_acc_id":101,"start_time":"2025-11-25 10:00:00","pad":""#;
    let mut long = head.to_string();
    long.push_str(&"x".repeat(MAX_LINE_BYTES as usize - head.len() - 2));
    long.push_str("\"}");
    assert_eq!(long.len() as u64, MAX_LINE_BYTES);
    let row = r#"{"node_id":1,"local_tag":"a","customer_id":1,"customer_acc_id":101,"start_time":"2025-11-25 10:00:00"}"#;
    let report = apply_text(&mut writer, &format!("{long}\n{row}\n"));
    assert_eq!((report.rows, report.skipped), (2, 0));
    let rejected = apply_snapshot(
        &mut writer,
        Cursor::new(format!("{long}\nnot json at all\n")),
        InsertLine::Optional,
        Origin::Socket,
        SystemTime::now(),
    );
    assert!(rejected.is_err());
}
