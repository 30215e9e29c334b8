//! Crash safety: the real binary, killed with SIGKILL in the middle of applying a large
//! snapshot, restarts with one whole snapshot and an intact database.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn kill_9_mid_apply_leaves_one_whole_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let db = dir.path().join("calls.db");

    let agent = Process::start(&config);
    let small = named_snapshot("A", 100);
    let reply = post(agent.feed, "/", &[], &small);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(agent.answer(), (vec!["A".to_string()], 100));

    // Half of a 40k-call body: the writer is deep inside its transaction when it dies.
    let large = named_snapshot("B", 40_000);
    let mut stream = TcpStream::connect(agent.feed).unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        large.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&large[..large.len() / 2]).unwrap();
    agent.kill();
    drop(stream);

    let agent = Process::start(&config);
    assert_eq!(
        agent.answer(),
        (vec!["A".to_string()], 100),
        "the old snapshot, whole"
    );

    // The same through the file source, killed at a few points of a large apply: each
    // restart shows the old snapshot or the new one, whole.
    let snapshot_file = dir.path().join("snapshot.jsonl");
    let mut agent = agent;
    for (round, delay_ms) in [20u64, 150, 400].into_iter().enumerate() {
        let name = format!("F{round}");
        write_file(&snapshot_file, &named_snapshot(&name, 40_000));
        std::thread::sleep(Duration::from_millis(delay_ms)); // when to pull the plug
        agent.kill();
        agent = Process::start(&config);
        // At start the agent applies the file again; read until the store settles on it.
        let (kinds, count) = agent.answer();
        assert!(
            kinds.len() == 1 && (count == 100 || count == 40_000),
            "round {round}: a torn store: {kinds:?} in {count} rows"
        );
    }
    agent.kill();

    let conn = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}
