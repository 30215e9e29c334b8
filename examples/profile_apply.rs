//! Where an apply and a query spend their time, without HTTP in the way: run it under
//! `perf record` (BENCHMARKS.md, "What bounds each figure").
//! `cargo run --release --example profile_apply [calls]` (default 100,000).
//!
//! On SEMS's bytes (`sems::Switch`): the line scan alone, then a full snapshot into an
//! empty store, the same calls resent, a 5-second period and a 10%-churn snapshot, each
//! with its wall and CPU time (the process's, both threads of an apply).

use std::io::Cursor;
use std::time::{Duration, Instant, SystemTime};

use active_calls_agent::feed::{InsertLine, apply_snapshot, line_key};
use active_calls_agent::lab::sems::Switch;
use active_calls_agent::store::{
    CallQuery, Filter, Origin, Readers, TextColumn, TextMatch, Writer,
};

/// CPU time of this process so far.
fn cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it is given, which points to
    // a zeroed rusage owned by this frame.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn apply(writer: &mut Writer, wal: &std::path::Path, snapshot: &[u8], label: &str) {
    let (started, cpu_before) = (Instant::now(), cpu());
    let report = apply_snapshot(
        writer,
        Cursor::new(snapshot),
        InsertLine::Optional,
        Origin::Socket,
        SystemTime::now(),
    )
    .expect("applied");
    let (applied, cpu_applied) = (started.elapsed(), cpu() - cpu_before);
    // A first snapshot's indexes, which the writer thread builds right after its answer.
    let indexed = Instant::now();
    if writer.build_pending_indexes().expect("indexes") {
        println!(
            "{label}: indexes built after the answer in {:.2?}",
            indexed.elapsed()
        );
    }
    let wal_mb = std::fs::metadata(wal).map_or(0.0, |m| m.len() as f64 / 1e6);
    writer.copy_back().expect("checkpoint");
    // The next commit writes the WAL from its start again.
    writer.checkpoint().expect("checkpoint");
    println!(
        "{label}: {applied:.2?} ({cpu_applied:.2?} CPU), {wal_mb:.1} MB of WAL, then {:.2?} \
         to copy it back (rows {}, written {}, removed {})",
        started.elapsed() - applied,
        report.rows,
        report.written,
        report.removed
    );
}

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let t0 = 1_764_081_000;
    let mut switch = Switch::new(2);
    switch.fill(calls, t0);
    let full = switch.render(t0);
    let resent = switch.render(t0 + 5);
    switch.period(t0 + 10, 5);
    let period = switch.render(t0 + 10);
    switch.churn(t0 + 15);
    let churn = switch.render(t0 + 15);
    println!(
        "{calls} calls, {:.1} MB a snapshot",
        full.len() as f64 / 1e6
    );

    let started = Instant::now();
    let keyed = full
        .split(|&b| b == b'\n')
        .filter(|line| line_key(line).is_some())
        .count();
    println!(
        "line keys alone: {:.2?} ({keyed} lines keyed)",
        started.elapsed()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("calls.db");
    let mut writer = Writer::open(&path).expect("store");
    let wal = dir.path().join("calls.db-wal");
    apply(&mut writer, &wal, &full, "full");
    apply(&mut writer, &wal, &resent, "the same calls resent");
    apply(&mut writer, &wal, &period, "a 5-second period");
    apply(&mut writer, &wal, &churn, "10% churn");
    // PROFILE_PERIODS=n: n more periods, back and forth (for `perf record`).
    let periods: usize = std::env::var("PROFILE_PERIODS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for i in 0..periods {
        let body = if i % 2 == 0 { &period } else { &churn };
        apply(&mut writer, &wal, body, "again");
    }

    println!(
        "database: {:.1} MB",
        std::fs::metadata(&path).map_or(0.0, |m| m.len() as f64 / 1e6)
    );
    let readers = Readers::new(&path);
    let starts = Filter::Text {
        column: TextColumn::DstPrefixIn,
        how: TextMatch::StartsWith,
        needle: b"44".to_vec(),
    };
    for (label, filters) in [
        ("no filter", vec![]),
        ("dst-prefix-in-starts-with=44", vec![starts]),
    ] {
        let started = Instant::now();
        let (mut rows, mut bytes) = (0, 0);
        for i in 0..2000 {
            let account = 2 + i % 999;
            let query = CallQuery {
                customer_id: 1 + (account - 1) % 50,
                account_id: account,
                filters: filters.clone(),
                now_ms: 0,
            };
            let mut body = Vec::new();
            rows += readers.outgoing_calls(&query, &mut body).expect("query");
            bytes += body.len();
        }
        println!(
            "query, small account, {label}: {:?} each ({} rows, {} bytes on average)",
            started.elapsed() / 2000,
            rows / 2000,
            bytes / 2000
        );
    }
}
