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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
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
