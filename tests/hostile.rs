//! A hostile world against the real binary (issue 20): a directory of the wrong shape,
//! stores SQLite cannot read, a full disk, slow readers and a WAL that would grow, and a
//! watched file with an old modification time. Each case gives a clear line and loses
//! nothing the next snapshot would not restore.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// Metrics of the real agent, on its API listener.
fn metrics_text(agent: &Process) -> String {
    let reply = request(agent.api, "GET", "/metrics", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.text()
}

#[test]
fn a_directory_of_the_wrong_shape_is_refused_and_the_last_good_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let agent = Process::start(&config);
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("A", 3)).status,
        200
    );
    assert_eq!(agent.answer().1, 3);
    let directory = dir.path().join("directory.json");
    let wrapped = format!("{{\"directory\": {SAMPLE_DIRECTORY}}}");
    let camel = SAMPLE_DIRECTORY.replace("api_accesses", "apiAccesses");
    for (failed, (content, names)) in [
        (wrapped.as_str(), r#"(the file has "directory")"#),
        (camel.as_str(), r#"no "api_accesses" list"#),
        ("{}", "no other key"),
    ]
    .into_iter()
    .enumerate()
    {
        write_file(&directory, content.as_bytes());
        let line = agent.wait_log("directory not loaded").replace("\\\"", "\"");
        assert!(line.contains(names), "{line}");
        // Customers are still answered from the previous directory.
        assert_eq!(agent.answer().1, 3, "after {content}");
        let text = metrics_text(&agent);
        assert_eq!(
            metric(
                &text,
                r#"active_calls_agent_directory_loads_total{result="failed"}"#
            ),
            Some(failed as f64 + 1.0)
        );
        let (ok, said) = check(&config);
        assert!(!ok && said.contains(names), "{said}");
    }
    assert_eq!(request(agent.api, "GET", "/readyz", &[]).status, 200);

    // A file that parses but drops every account is applied, with a warning, and `check`
    // warns too.
    write_file(&directory, br#"{"accounts": [], "api_accesses": []}"#);
    let line = agent.wait_log("none of the accounts the previous one had");
    assert!(line.contains("WARN"), "{line}");
    let (ok, said) = check(&config);
    assert!(ok && said.contains("no account"), "{said}");
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let reply = request(
        agent.api,
        "GET",
        &target,
        &[("Authorization", &token_for(5001))],
    );
    assert_eq!(reply.status, 401);
}

/// Polls `done` every 20 ms for at most 10 s.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Puts `content` at `path` as rsync does: a temporary file given `modified` as its time,
/// then renamed over the old one.
fn place_with_time(path: &Path, content: &[u8], modified: SystemTime) {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, content).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&temporary)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[test]
fn a_watched_file_with_an_old_time_is_shown_when_it_changes_and_said_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("stale_after = 0", "stale_after = 60")).unwrap();
    let snapshot = dir.path().join("snapshot.jsonl");
    let agent = Process::start(&config);
    // The file comes after the agent's first look (one there at start is read as such).
    let first_look = "no snapshot file (yet)";
    if !agent.start_log.iter().any(|line| line.contains(first_look)) {
        agent.wait_log(first_look);
    }
    // Copied with its time kept, ten minutes old: it just changed, so it is current.
    let old = SystemTime::now() - Duration::from_secs(600);
    place_with_time(&snapshot, &named_snapshot("A", 3), old);
    let line = agent.wait_log("modification time is older than its nodes may stay silent");
    assert!(line.contains("age_s=6"), "{line}");
    eventually("the old file's calls are shown", || agent.answer().1 == 3);

    // A file put in place while the agent was down (a new store here, so that nothing
    // heard the node since) counts as written when its time says: too old to show, and the
    // log says why.
    agent.kill();
    for file in ["calls.db", "calls.db-wal", "calls.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    place_with_time(&snapshot, &named_snapshot("A", 4), old);
    let agent = Process::start(&config);
    let line = agent.wait_log("read at start was last written longer ago");
    assert!(
        line.contains("WARN") && line.contains("nodes=[1]"),
        "{line}"
    );
    assert_eq!(agent.answer().1, 0);

    // A time in the future counts as now, and is said.
    let ahead = SystemTime::now() + Duration::from_secs(3600);
    place_with_time(&snapshot, &named_snapshot("B", 2), ahead);
    let line = agent.wait_log("modification time is in the future");
    assert!(line.contains("WARN"), "{line}");
    eventually("the future file's calls are shown", || {
        agent.answer() == (vec!["B".to_string()], 2)
    });
}

/// A store with `calls` calls in it, left by an agent stopped cleanly (no WAL).
fn filled_store(config: &Path, calls: usize) {
    let mut agent = Process::start(config);
    let reply = post(agent.feed, "/", &[], &named_snapshot("A", calls));
    assert_eq!(reply.status, 200, "{}", reply.text());
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
}

/// The stores set aside beside the store (`calls.db.corrupt-*`, without their WALs).
fn set_aside(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            n.starts_with("calls.db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")
        })
        .collect();
    names.sort();
    names
}

/// After the store was replaced: not ready, saying why; metrics answer; the next snapshot
/// is applied and answered, and the agent is ready again.
fn serves_again_after_replacing(agent: &Process, replaced: f64) {
    let readyz = request(agent.api, "GET", "/readyz", &[]);
    assert_eq!(readyz.status, 503, "{}", readyz.text());
    assert!(
        readyz.text().contains("could not be read"),
        "{}",
        readyz.text()
    );
    let text = metrics_text(agent);
    assert_eq!(
        metric(&text, "active_calls_agent_store_replaced_total"),
        Some(replaced),
        "{text}"
    );
    let reply = post(agent.feed, "/", &[], &named_snapshot("B", 5));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(agent.answer(), (vec!["B".to_string()], 5));
    let readyz = request(agent.api, "GET", "/readyz", &[]);
    assert_eq!(readyz.status, 200, "{}", readyz.text());
}

#[test]
fn a_store_sqlite_cannot_read_at_start_is_set_aside_and_the_next_snapshot_answers() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 3] = [
        ("garbage over it", |db| {
            let len = std::fs::metadata(db).unwrap().len() as usize;
            std::fs::write(db, vec![0x5a; len]).unwrap();
        }),
        ("truncated to half", |db| {
            let file = std::fs::File::options().write(true).open(db).unwrap();
            file.set_len(file.metadata().unwrap().len() / 2).unwrap();
        }),
        ("pages overwritten in the middle", |db| {
            use std::io::{Seek, SeekFrom, Write};
            let mut file = std::fs::File::options().write(true).open(db).unwrap();
            let len = file.metadata().unwrap().len();
            file.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
            file.write_all(&vec![0xa5; 3 * 4096]).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = write_process_config(dir.path(), "");
        filled_store(&config, 2000);
        damage(&dir.path().join("calls.db"));
        let (ok, said) = check(&config);
        assert!(
            !ok && said.contains("SQLite cannot read it") && said.contains("calls.db"),
            "{what}: {said}"
        );
        let agent = Process::start(&config);
        let line = agent
            .start_log
            .iter()
            .find(|l| l.contains("set aside"))
            .unwrap_or_else(|| panic!("{what}: no line says so in {:?}", agent.start_log));
        assert!(line.contains("calls.db.corrupt-"), "{what}: {line}");
        assert_eq!(set_aside(dir.path()).len(), 1, "{what}");
        serves_again_after_replacing(&agent, 1.0);
    }
}

#[test]
fn a_store_damaged_while_serving_is_set_aside_when_met_and_metrics_answer_throughout() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let agent = Process::start(&config);
    let reply = post(agent.feed, "/", &[], &named_snapshot("A", 2000));
    assert_eq!(reply.status, 200);
    // The writer copies the WAL back after each snapshot, and the next write starts it
    // again (another node's call): the first calls are then read from the database file,
    // which is overwritten in the middle.
    let db = dir.path().join("calls.db");
    eventually("the WAL is copied back", || {
        std::fs::metadata(&db).unwrap().len() > 256 * 1024
    });
    let other = br#"INSERT INTO active_calls FORMAT JSONEachRow
{"node_id":2,"local_tag":"x","customer_id":1,"customer_acc_id":1,"start_time":"2025-11-25 10:00:00"}
"#;
    assert_eq!(post(agent.feed, "/", &[], other).status, 200);
    {
        use std::io::Write;
        // The middle half: pages of the calls table and of its indexes alike.
        let len = std::fs::metadata(&db).unwrap().len();
        let mut file = std::fs::File::options().write(true).open(&db).unwrap();
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len / 4 / 4096 * 4096)).unwrap();
        file.write_all(&vec![0xa5; (len / 2) as usize]).unwrap();
    }
    // Whatever reads the damage first (this scrape, or the customer query) reports it; the
    // metrics answer 200 all along.
    for _ in 0..3 {
        metrics_text(&agent);
        let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
        request(
            agent.api,
            "GET",
            &target,
            &[("Authorization", &token_for(5001))],
        );
    }
    let line = agent.wait_log("set aside");
    assert!(
        line.contains("ERROR") && line.contains("calls.db.corrupt-"),
        "{line}"
    );
    assert_eq!(set_aside(dir.path()).len(), 1);
    serves_again_after_replacing(&agent, 1.0);
}

#[test]
fn a_store_whose_wal_belongs_to_another_is_set_aside_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    filled_store(&config, 2000);
    // Another store's WAL, left by a kill -9 after a snapshot that changed part of it.
    let other = tempfile::tempdir().unwrap();
    let other_config = write_process_config(other.path(), "");
    filled_store(&other_config, 3000);
    let agent = Process::start(&other_config);
    let reply = post(agent.feed, "/", &[], &named_snapshot("C", 500));
    assert_eq!(reply.status, 200);
    agent.kill();
    std::fs::copy(
        other.path().join("calls.db-wal"),
        dir.path().join("calls.db-wal"),
    )
    .unwrap();

    let agent = Process::start(&config);
    assert!(
        agent.start_log.iter().any(|l| l.contains("set aside")),
        "{:?}",
        agent.start_log
    );
    assert_eq!(set_aside(dir.path()).len(), 1);
    serves_again_after_replacing(&agent, 1.0);
}

/// A tmpfs of `bytes` mounted at `dir` while it lives (needs root: `None` elsewhere).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Option<SmallDisk> {
        // SAFETY: geteuid only reads the process's effective user id.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallDisk(dir.to_path_buf()))
    }

    /// Fills what is left of it; the returned file frees it when removed.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        filler
    }
}

/// Asserts a snapshot was refused for the disk: 507, and a body that starts with `text`.
fn refused_507(reply: &Reply, text: &str) {
    assert_eq!(reply.status, 507, "{}", reply.text());
    assert!(reply.text().starts_with(text), "{}", reply.text());
}

/// POSTs `body` to the feed's `/` as one chunk of a chunked body.
fn post_chunked(addr: std::net::SocketAddr, body: &[u8]) -> Reply {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .write_all(format!("{:x}\r\n", body.len()).as_bytes())
        .unwrap();
    stream.write_all(body).unwrap();
    stream.write_all(b"\r\n0\r\n\r\n").unwrap();
    read_reply(&mut stream)
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_is_said_by_readyz_refused_with_507_and_a_failed_file_applied_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(disk) = SmallDisk::mount(&state, 4 << 20) else {
        eprintln!("skipped: filling a disk needs root (a tmpfs mount)");
        return;
    };
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let store = state.join("calls.db");
    std::fs::write(
        &config,
        text.replace(
            &format!("{:?}", dir.path().join("calls.db")),
            &format!("{store:?}"),
        ),
    )
    .unwrap();
    let agent = Process::start(&config);
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("A", 3)).status,
        200
    );
    assert_eq!(request(agent.api, "GET", "/readyz", &[]).status, 200);
    let filler = disk.fill();

    // Too large for memory, and chunked (no length: received whole before it applies, not
    // as it arrives): it cannot be received into its file.
    let reply = post_chunked(agent.feed, &named_snapshot("B", 3000));
    refused_507(&reply, "Cannot receive the snapshot into a file");
    let readyz = request(agent.api, "GET", "/readyz", &[]);
    assert_eq!(readyz.status, 503, "{}", readyz.text());
    assert!(
        readyz.text().contains("cannot be received"),
        "{}",
        readyz.text()
    );
    // Received in memory, but the store cannot take it. Its rows are made wide (a long
    // name: a wide tag and wide src_name_in entries) so that its write is larger than the
    // WAL file holds already: a write that fits there needs no new space, and a full disk
    // may take it (the body stays under the 256 KB kept in memory).
    let wide = format!("C{}", "c".repeat(29));
    let reply = post(agent.feed, "/", &[], &named_snapshot(&wide, 500));
    refused_507(&reply, "Cannot store the snapshot");
    let readyz = request(agent.api, "GET", "/readyz", &[]).text();
    assert!(readyz.contains("the store cannot be written"), "{readyz}");
    // As the switch sends it (sized, at once, past 256 KB): applied as it arrives, so
    // never in a file, and refused by the store the same way.
    let reply = post(agent.feed, "/", &[], &named_snapshot("D", 3000));
    refused_507(&reply, "Cannot store the snapshot");
    // The watched file fails the same way.
    write_file(
        &dir.path().join("snapshot.jsonl"),
        &named_snapshot("D", 500),
    );
    agent.wait_log("snapshot rejected");
    // The calls answered before are still answered.
    assert_eq!(agent.answer(), (vec!["A".to_string()], 3));
    let text = metrics_text(&agent);
    for (reason, count) in [("spill", 1.0), ("disk", 2.0)] {
        let series = format!(
            "active_calls_agent_snapshots_rejected_total{{source=\"socket\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(&text, &series), Some(count), "{series}");
    }

    // Space is back: the file is applied again without changing, and the agent is ready.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.answer() != (vec!["D".to_string()], 500) {
        assert!(Instant::now() < deadline, "the file was not applied again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let readyz = request(agent.api, "GET", "/readyz", &[]);
    assert_eq!(readyz.status, 200, "{}", readyz.text());
}

/// The size of the store's WAL file.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("calls.db-wal")).map_or(0, |m| m.len())
}

#[test]
fn a_scrape_client_that_stops_reading_holds_no_read_open_and_still_gets_its_answer() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let tokens = dir.path().join("scrape-tokens");
    std::fs::write(&tokens, "scrape-token-0123456789abcdef\n").unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("[upstream]\nscrape_tokens_file = {tokens:?}\n"));
    std::fs::write(&config, text).unwrap();
    let agent = Process::start(&config);
    let calls = 16000;
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("A", calls)).status,
        200
    );
    // What one apply rewriting every call leaves in the WAL.
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("B", calls)).status,
        200
    );
    let one_apply = wal_bytes(dir.path());

    // Two clients ask for every call (both turns of a scrape), and read nothing. Their
    // reads wait for them a second at most, then read on into memory and give their turns
    // back: a third scrape is answered. Then the switch rewrites every call six times, and
    // the WAL is copied back and started again each time rather than grown by each.
    let stalled_scrape = || {
        let mut slow = active_calls_agent::lab::bench::small_buffer_connection(agent.api).unwrap();
        slow.write_all(
            b"GET /api/rest/node/v1/active-calls HTTP/1.1\r\nHost: x\r\n\
              Authorization: Bearer scrape-token-0123456789abcdef\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut head = [0u8; 12];
        slow.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        slow
    };
    let (mut slow, _other) = (stalled_scrape(), stalled_scrape());
    // (A 503 after its 5 s wait for a turn is asked again: a loaded machine may take
    // that long to read the rows; with the read waiting on its clients, never 200.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let third = request(
            agent.api,
            "GET",
            "/api/rest/node/v1/active-calls",
            &[("Authorization", "Bearer scrape-token-0123456789abcdef")],
        );
        if third.status == 200 {
            break;
        }
        assert_eq!(third.status, 503);
        assert!(
            Instant::now() < deadline,
            "the stalled scrapes kept their turns"
        );
    }
    // One of them then trickles 4 KB a second, so that the write timeout does not cut it
    // however long the rewrites take on a loaded machine.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut got = Vec::new();
            let mut piece = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = slow.read(&mut piece).unwrap();
                got.extend_from_slice(&piece[..n]);
                std::thread::sleep(Duration::from_secs(1));
            }
            slow.read_to_end(&mut got).unwrap();
            got
        }
    });
    for name in ["C", "D", "C", "D", "C", "D"] {
        assert_eq!(
            post(agent.feed, "/", &[], &named_snapshot(name, calls)).status,
            200
        );
    }
    let wal = wal_bytes(dir.path());
    assert!(
        wal < 4 * one_apply,
        "the WAL grew to {wal} B, one apply writes {one_apply} B"
    );
    // The answer is the one state the scrape read, whole.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rest = reader.join().unwrap();
    let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let body = String::from_utf8(dechunked(&rest[head_end + 4..])).unwrap();
    let rows = body.matches("\"local_tag\":\"B-").count();
    assert_eq!(rows, calls, "{} bytes", rest.len());
}
