//! A whole snapshot through the store: the input is a snapshot body (an optional
//! `INSERT INTO … FORMAT JSONEachRow` line, then JSONEachRow lines), applied with
//! `feed::apply_snapshot` to a real SQLite store, twice.
//!
//! The store is one temporary database per process (emptied before every input), so an
//! input is reproducible on its own.
//!
//! Checked beyond "never panics":
//! - the snapshot is refused exactly when one of its lines is not a JSON object (or the
//!   first line is neither the query nor a line), and its row and skip counts are those of
//!   `feed::parse_line` on each line; a refused snapshot leaves the store as it was;
//! - applying the same snapshot again (the fast path that recognises unchanged lines by
//!   `feed::line_key`) gives the same counts and exactly the same answers to every
//!   customer's query as the first apply, which parsed every line in full;
//! - the snapshot resent as a switch resends it (every value after `"id":`,
//!   `"snapshot_timestamp":`, `"snapshot_date":` or `"end_time":` rewritten, wherever that
//!   text is) gives the same report, refusal and answers with the fast path as a second
//!   store that parses every line (`Writer::set_fast_path(false)`) after the same history.

#![no_main]

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use active_calls_agent::feed::{self, InsertLine, Line, SnapshotError};
use active_calls_agent::store::{CallQuery, Origin, Readers, Writer};
use libfuzzer_sys::fuzz_target;

struct Store {
    writer: Writer,
    readers: Readers,
    /// The same history without the fast path: the reference for the resent snapshot.
    parsed: Writer,
    parsed_readers: Readers,
}

/// The folder of this process's database, removed at exit.
fn store_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        const PREFIX: &str = "active-calls-agent-fuzz-";
        // Folders left by runs that ended abruptly (a crash, a kill): their process is gone.
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
            if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the store folder");
        extern "C" fn remove_store_dir() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove_store_dir) };
        dir
    })
}

fn store() -> &'static Mutex<Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        let path = store_dir().join("calls.db");
        let writer = Writer::open(&path).expect("opening the store");
        let readers = Readers::new(&path);
        let parsed_path = store_dir().join("parsed.db");
        let mut parsed = Writer::open(&parsed_path).expect("opening the reference store");
        parsed.set_fast_path(false);
        let parsed_readers = Readers::new(&parsed_path);
        Mutex::new(Store {
            writer,
            readers,
            parsed,
            parsed_readers,
        })
    })
}

/// What the snapshot must do, line by line as the reader splits it: `Err` when it must be
/// refused, else the rows and skipped rows it has, and every (customer, account) of a row.
fn expected(input: &[u8]) -> Result<(u64, u64, BTreeSet<(i64, i64)>), ()> {
    let (mut rows, mut skipped, mut accounts) = (0, 0, BTreeSet::new());
    for (i, line) in input.split_inclusive(|&b| b == b'\n').enumerate() {
        let line = match (i, feed::strip_insert(line)) {
            (0, Some((_table, data))) => data,
            _ => line,
        };
        match feed::parse_line(line).map_err(|_| ())? {
            Line::Nothing => {}
            Line::Row(row) => {
                rows += 1;
                accounts.insert((row.customer_id, row.customer_acc_id));
            }
            Line::Skipped { .. } => skipped += 1,
        }
    }
    Ok((rows, skipped, accounts))
}

/// Every customer's answer for each account, concatenated.
fn answers(readers: &Readers, accounts: &BTreeSet<(i64, i64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for &(customer_id, account_id) in accounts {
        let query = CallQuery {
            customer_id,
            account_id,
            filters: Vec::new(),
            now_ms: 0,
        };
        readers
            .outgoing_calls(&query, &mut out)
            .expect("querying the store");
        out.push(b'\n');
    }
    out
}

fuzz_target!(|input: &[u8]| {
    // The reader's limit on a line is far above what libFuzzer generates.
    if input.len() as u64 > feed::MAX_LINE_BYTES {
        return;
    }
    let expected = expected(input);
    let mut store = store().lock().unwrap_or_else(|e| e.into_inner());
    let Store {
        writer,
        readers,
        parsed,
        parsed_readers,
    } = &mut *store;
    let received_at = UNIX_EPOCH + Duration::from_secs(1_764_081_000);
    // Empty the store: every node was received at or before the cutoff.
    for writer in [&mut *writer, &mut *parsed] {
        writer
            .expire(SystemTime::now() + Duration::from_secs(86_400))
            .expect("emptying the store");
    }
    // The agent copies the WAL back between snapshots; here it would otherwise grow
    // without bound (every 256 inputs: a checkpoint costs more than an input).
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    if INPUTS.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
        writer.checkpoint().expect("checkpointing the store");
        parsed.checkpoint().expect("checkpointing the reference store");
    }
    assert!(readers.node_stats().expect("node stats").is_empty());

    let apply_at = |writer: &mut Writer, input: &[u8], received_at: SystemTime| {
        feed::apply_snapshot(
            writer,
            Cursor::new(input.to_vec()),
            InsertLine::Optional,
            Origin::File,
            received_at,
        )
    };
    let apply = |writer: &mut Writer| apply_at(writer, input, received_at);
    let first = apply(writer);
    let _ = apply(parsed);
    let (rows, skipped, accounts) = match (expected, first) {
        (Err(()), Err(SnapshotError::Malformed { .. })) => {
            // Refused: nothing applied.
            assert!(readers.node_stats().expect("node stats").is_empty());
            return;
        }
        (Ok((rows, skipped, accounts)), Ok(report)) => {
            assert_eq!(
                (report.rows, report.skipped),
                (rows, skipped),
                "first apply"
            );
            (rows, skipped, accounts)
        }
        (expected, got) => panic!("expected {expected:?}, the first apply gave {got:?}"),
    };
    let first_answers = answers(readers, &accounts);

    let second = apply(writer).unwrap_or_else(|e| panic!("the same snapshot again: {e}"));
    assert_eq!(
        (second.rows, second.skipped),
        (rows, skipped),
        "second apply"
    );
    let second_answers = answers(readers, &accounts);
    if first_answers != second_answers {
        panic!(
            "the unchanged snapshot changed the answers:\nfirst:  {}\nsecond: {}",
            String::from_utf8_lossy(&first_answers),
            String::from_utf8_lossy(&second_answers)
        );
    }

    // The next snapshot of the same calls, against the store that parses every line.
    let _ = apply(parsed);
    let next = resend(input);
    let later = received_at + Duration::from_secs(5);
    let outcome = |result: Result<feed::ApplyReport, SnapshotError>| match result {
        Ok(r) => Ok((r.rows, r.skipped, r.nodes, r.written, r.removed)),
        Err(SnapshotError::Malformed { line, .. }) => Err(line),
        Err(e) => panic!("applying the resent snapshot: {e}"),
    };
    let fast = outcome(apply_at(writer, &next, later));
    let reference = outcome(apply_at(parsed, &next, later));
    assert_eq!(fast, reference, "the resent snapshot, fast path against full parse");
    let (fast, reference) = (answers(readers, &accounts), answers(parsed_readers, &accounts));
    if fast != reference {
        panic!(
            "the resent snapshot answered differently:\nfast path:  {}\nfull parse: {}",
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&reference)
        );
    }
});

/// `input` as the switch's next snapshot carries it: after each `"id":`, an integer is
/// replaced by another; after the three time keys, a quoted date-time or date by another
/// and `null` by a date-time. Wherever the text is: in a nested object, in a string.
fn resend(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 64);
    let mut at = 0;
    while at < input.len() {
        let rest = &input[at..];
        let key = [
            &b"\"id\":"[..],
            b"\"snapshot_timestamp\":",
            b"\"snapshot_date\":",
            b"\"end_time\":",
        ]
        .into_iter()
        .find(|k| rest.starts_with(k));
        let Some(key) = key else {
            out.push(input[at]);
            at += 1;
            continue;
        };
        out.extend_from_slice(key);
        at += key.len();
        let value = &input[at..];
        let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
        if key == b"\"id\":" && digits > 0 {
            out.extend_from_slice(b"266999763163938837");
            at += digits;
        } else if value.starts_with(b"null") {
            out.extend_from_slice(b"\"2025-11-25 14:30:05\"");
            at += 4;
        } else if value.len() >= 21 && value[0] == b'"' && value[20] == b'"' {
            out.extend_from_slice(b"\"2025-11-25 14:30:05\"");
            at += 21;
        } else if value.len() >= 12 && value[0] == b'"' && value[11] == b'"' {
            out.extend_from_slice(b"\"2025-11-26\"");
            at += 12;
        }
    }
    out
}
