//! Regressions the fuzz targets (fuzz/, scripts/fuzz) found, and the inputs of the same
//! family an issue named: each test is the smallest input that shows the fault, through
//! the public API.

use std::io::Cursor;
use std::time::{Duration, UNIX_EPOCH};

use active_calls_agent::clock::format_datetime;
use active_calls_agent::feed::{InsertLine, apply_snapshot};
use active_calls_agent::store::{CallQuery, Origin, Readers, Writer};

/// The answer of account 101 of customer 1001.
fn answer(readers: &Readers) -> serde_json::Value {
    let query = CallQuery {
        customer_id: 1001,
        account_id: 101,
        filters: Vec::new(),
        now_ms: 0,
    };
    let mut out = Vec::new();
    readers.outgoing_calls(&query, &mut out).unwrap();
    serde_json::from_slice(&out).unwrap()
}

/// fuzz target `snapshot_apply`: the same snapshot applied twice gave different answers.
///
/// A row without a top-level `snapshot_timestamp` takes the time the snapshot was
/// received (SPEC 2.1). `feed::line_key` looks for the `"snapshot_timestamp":` key
/// anywhere in the line, so a key of that name inside a nested object (here in
/// `metadata`, a key the agent ignores) became the line's timestamp. The first snapshot
/// parses the line in full and is right; from the second snapshot on, the unchanged line
/// takes the fast path (`SnapshotTx::put_unchanged`) with the nested value, which then
/// becomes the node's snapshot timestamp and is served for the node's calls.
#[test]
fn a_nested_snapshot_timestamp_is_not_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calls.db");
    let mut writer = Writer::open(&path).unwrap();
    let readers = Readers::new(&path);
    let snapshot = concat!(
        r#"{"node_id":1,"local_tag":"a","customer_id":1001,"customer_acc_id":101,"#,
        r#""start_time":"2025-11-25 12:47:28","metadata":{"snapshot_timestamp":"2020-01-01 00:00:00"}}"#,
        "\n"
    );
    let first = UNIX_EPOCH + Duration::from_secs(1_764_081_000);
    for received_at in [first, first + Duration::from_secs(10)] {
        apply_snapshot(
            &mut writer,
            Cursor::new(snapshot),
            InsertLine::Optional,
            Origin::Socket,
            received_at,
        )
        .unwrap();
        let seconds = received_at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(
            answer(&readers)["data"][0]["snapshot_timestamp"],
            format_datetime(seconds as i64),
            "received at {seconds}"
        );
    }
}

/// The key set of a real switch (issue 11): `id` is one of the per-snapshot values, and a
/// line may carry it nested, escaped or twice. Each line below is applied, then resent with
/// new per-snapshot values and a new receive time; the answer must be what a full parse of
/// the resent line gives: its `snapshot_timestamp` where the row has one at the top level,
/// else the receive time.
#[test]
fn the_per_snapshot_keys_written_every_way_a_line_can() {
    let base = r#""customer_acc_id":101,"customer_id":1001,"local_tag":"a","node_id":1,"start_time":"2025-11-25 12:47:28""#;
    let first = UNIX_EPOCH + Duration::from_secs(1_764_081_000);
    for (extra, shows_own) in [
        (
            r#""id":1,"snapshot_timestamp":"2025-11-25 14:30:00","#,
            true,
        ),
        (
            r#""id":1,"metadata":{"id":7},"snapshot_timestamp":"2025-11-25 14:30:00","#,
            true,
        ),
        (
            r#""\u0069d":1,"snapshot_timestamp":"2025-11-25 14:30:00","#,
            true,
        ),
        (
            r#""id":1,"id":2,"snapshot_timestamp":"2025-11-25 14:30:00","#,
            true,
        ),
        (
            r#""id":1,"snapshot\u005ftimestamp":"2025-11-25 14:30:00","#,
            true,
        ),
        (
            r#""id":1,"metadata":{"snapshot_timestamp":"2025-11-25 14:30:00"},"#,
            false,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.db");
        let mut writer = Writer::open(&path).unwrap();
        let readers = Readers::new(&path);
        let line = format!("{{{extra}{base}}}\n");
        let resent = line
            .replace("\"id\":1", "\"id\":99")
            .replace("\\u0069d\":1", "\\u0069d\":99")
            .replace("14:30:00", "14:30:05");
        for (snapshot, at, shown) in [
            (&line, first, "2025-11-25 14:30:00"),
            (
                &resent,
                first + Duration::from_secs(10),
                "2025-11-25 14:30:05",
            ),
        ] {
            apply_snapshot(
                &mut writer,
                Cursor::new(snapshot.clone()),
                InsertLine::Optional,
                Origin::Socket,
                at,
            )
            .unwrap();
            let seconds = at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
            let want = if shows_own {
                shown.to_owned()
            } else {
                format_datetime(seconds)
            };
            assert_eq!(
                answer(&readers)["data"][0]["snapshot_timestamp"],
                want,
                "{snapshot}"
            );
        }
    }
}
