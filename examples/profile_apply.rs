//! Where an apply and a query spend their time, without HTTP in the way: run it under
//! `perf record` (BENCHMARKS.md, "Profile"). `cargo run --release --example profile_apply`.

use std::io::Cursor;
use std::time::{Instant, SystemTime};

use active_calls_agent::feed::{InsertLine, apply_snapshot};
use active_calls_agent::sems::Switch;
use active_calls_agent::store::{
    CallQuery, Filter, Origin, Readers, TextColumn, TextMatch, Writer,
};

fn apply(writer: &mut Writer, snapshot: &[u8], label: &str) {
    let started = Instant::now();
    let report = apply_snapshot(
        writer,
        Cursor::new(snapshot),
        InsertLine::Optional,
        Origin::Socket,
        SystemTime::now(),
    )
    .expect("applied");
    let applied = started.elapsed();
    writer.copy_back().expect("checkpoint");
    println!(
        "{label}: {applied:?}, then {:?} to copy the WAL back (rows {}, written {}, removed {})",
        started.elapsed() - applied,
        report.rows,
        report.written,
        report.removed
    );
}

fn main() {
    let mut switch = Switch::new(2);
    switch.fill(100_000, 1_764_081_000);
    let full = switch.render(1_764_081_000);
    switch.churn(1_764_081_005);
    let churn = switch.render(1_764_081_005);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("calls.db");
    let mut writer = Writer::open(&path).expect("store");
    apply(&mut writer, &full, "full 100k");
    apply(&mut writer, &churn, "10% churn");
    apply(&mut writer, &churn, "same again");

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
                stale_cutoff_ms: 0,
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
