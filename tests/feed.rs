//! The file feed checked from outside: snapshots written to the watched file, answers read
//! over HTTP.

mod common;

use active_calls_agent::config::StaleAfter;
use std::io::Write;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value, json};

/// One call row as a switch sends it (only the keys the agent reads, plus one it ignores).
fn call(node: i64, tag: &str, account: i64, start: &str) -> Value {
    json!({"node_id": node, "local_tag": tag, "customer_id": if account <= 102 { 1001 } else { 1002 },
           "customer_acc_id": account, "start_time": start, "snapshot_timestamp": "2025-11-25 14:30:00",
           "src_name_in": tag, "legA_remote_ip": "192.168.0.1"})
}

fn snapshot(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

fn tags(reply: &Reply) -> Vec<String> {
    reply
        .rows()
        .iter()
        .map(|r| r["src_name_in"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_snapshot_replaces_the_nodes_it_names_and_those_the_file_fed() {
    let agent = TestAgent::start();
    agent.feed(&snapshot(&[
        call(1, "a", 101, "2025-11-25 10:00:03"),
        call(1, "b", 101, "2025-11-25 10:00:02"),
        call(2, "c", 101, "2025-11-25 10:00:01"),
    ]));
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_101}"))),
        ["a", "b", "c"]
    );

    // Node 2 is gone from the file: its calls are gone; b ended, d started, a changed.
    let mut changed = call(1, "a", 101, "2025-11-25 09:00:00");
    changed["src_name_in"] = json!("a2");
    let status = agent.feed(&snapshot(&[
        changed,
        call(1, "d", 101, "2025-11-25 10:00:04"),
    ]));
    let report = status.last_report.unwrap();
    assert_eq!(
        (report.rows, report.written, report.removed, report.nodes),
        (2, 2, 2, vec![1])
    );
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_101}"))),
        ["d", "a2"]
    );

    // The same content again writes nothing.
    let status = agent.feed(&snapshot(&[
        {
            let mut a = call(1, "a", 101, "2025-11-25 09:00:00");
            a["src_name_in"] = json!("a2");
            a
        },
        call(1, "d", 101, "2025-11-25 10:00:04"),
    ]));
    let report = status.last_report.unwrap();
    assert_eq!((report.written, report.removed), (0, 0));

    // An empty file: the nodes it fed have no calls.
    agent.feed("");
    assert!(
        agent
            .get(&format!("account-id={ACCOUNT_101}"))
            .rows()
            .is_empty()
    );
}

#[test]
fn the_snapshot_timestamp_follows_each_snapshot() {
    let agent = TestAgent::start();
    let mut row = call(1, "a", 101, "2025-11-25 10:00:00");
    agent.feed(&snapshot(std::slice::from_ref(&row)));
    row["snapshot_timestamp"] = json!("2025-11-25 14:30:05");
    agent.feed(&snapshot(std::slice::from_ref(&row)));
    let rows = agent.get(&format!("account-id={ACCOUNT_101}")).rows();
    assert_eq!(rows[0]["snapshot_timestamp"], "2025-11-25 14:30:05");

    // Rows of one node with different timestamps keep their own.
    let mut other = call(1, "b", 101, "2025-11-25 09:00:00");
    other["snapshot_timestamp"] = json!("2025-11-25 14:29:59");
    agent.feed(&snapshot(&[row, other]));
    let rows = agent.get(&format!("account-id={ACCOUNT_101}")).rows();
    let stamps: Vec<&str> = rows
        .iter()
        .map(|r| r["snapshot_timestamp"].as_str().unwrap())
        .collect();
    assert_eq!(stamps, ["2025-11-25 14:30:05", "2025-11-25 14:29:59"]);

    // A row without one gets the time the snapshot was received: the file just changed,
    // so when it was read (SPEC 2.2), between the write and the answer.
    let mut bare = call(1, "a", 101, "2025-11-25 10:00:00");
    bare.as_object_mut().unwrap().remove("snapshot_timestamp");
    let written = active_calls_agent::clock::unix_now();
    agent.feed(&snapshot(&[bare]));
    let rows = agent.get(&format!("account-id={ACCOUNT_101}")).rows();
    let answered = active_calls_agent::clock::unix_now();
    let stamp = rows[0]["snapshot_timestamp"].as_str().unwrap();
    let stamped = active_calls_agent::clock::parse_datetime(stamp).unwrap();
    assert!(
        (written..=answered).contains(&stamped),
        "{stamp}, written at {written}, answered at {answered}"
    );
}

#[test]
fn a_line_that_is_not_json_rejects_the_whole_snapshot() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let before = agent.get(&format!("account-id={ACCOUNT_102}")).text();
    // The switch's first row, cut in the middle (as a crashed writer leaves it).
    let first_row = SAMPLE_SNAPSHOT.lines().nth(1).unwrap();
    let cut = &first_row[..first_row.len() / 2];
    for bad in [
        format!("{SAMPLE_SNAPSHOT}not json\n"),
        format!(
            "{}\n[1,2,3]\n",
            snapshot(&[call(1, "x", 102, "2025-11-25 10:00:00")])
        ),
        format!("{cut}\n{SAMPLE_SNAPSHOT}"),
        format!(
            "SELECT 1\n{}",
            SAMPLE_SNAPSHOT
                .lines()
                .skip(1)
                .collect::<Vec<_>>()
                .join("\n")
        ),
        format!("{}\n", "x".repeat(2 << 20)),
    ] {
        let status = agent.feed(&bad);
        assert!(status.last_error.is_some());
        assert_eq!(
            agent.get(&format!("account-id={ACCOUNT_102}")).text(),
            before
        );
    }
    let status = agent.feed(SAMPLE_SNAPSHOT);
    assert_eq!((status.applied, status.rejected), (2, 5));
}

#[test]
fn bad_rows_are_skipped_and_counted_and_their_node_still_counts() {
    let agent = TestAgent::start();
    agent.feed(&snapshot(&[
        call(1, "a", 101, "2025-11-25 10:00:00"),
        call(2, "b", 101, "2025-11-25 10:00:00"),
    ]));
    let mut no_account = call(1, "x", 101, "2025-11-25 10:00:00");
    no_account
        .as_object_mut()
        .unwrap()
        .remove("customer_acc_id");
    let mut bad_time = call(2, "b", 101, "2025-11-25 10:00:00");
    bad_time["start_time"] = json!("yesterday");
    let mut bad_port = call(1, "y", 101, "2025-11-25 10:00:00");
    bad_port["auth_orig_port"] = json!("50x");
    let mut huge = call(1, "z", 101, "2025-11-25 10:00:00");
    huge["pai_in"] = json!("x".repeat(2 << 20));
    let mut content = snapshot(&[
        call(1, "a", 101, "2025-11-25 10:00:00"),
        no_account,
        bad_time,
        bad_port,
        huge,
    ])
    .into_bytes();
    // A Latin-1 byte and a raw tab: not strict JSON, still one bad row each.
    content.extend_from_slice(
        b"{\"node_id\": 1, \"local_tag\": \"l\", \"src_name_in\": \"Ren\xE9\"}\n",
    );
    content
        .extend_from_slice(b"{\"node_id\": 1, \"local_tag\": \"t\", \"src_name_in\": \"a\tb\"}\n");
    let status = agent.feed_bytes(&content);
    let report = status.last_report.unwrap();
    assert_eq!(
        (report.rows, report.skipped, report.nodes),
        (1, 6, vec![1, 2])
    );
    // Node 2 sent only a bad row: it is in the snapshot, so its call b is gone.
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_101}"))),
        ["a"]
    );
}

#[test]
fn a_repeated_call_keeps_its_last_row() {
    let agent = TestAgent::start();
    let mut second = call(1, "a", 101, "2025-11-25 10:00:00");
    second["src_name_in"] = json!("last");
    agent.feed(&snapshot(&[
        call(1, "a", 101, "2025-11-25 10:00:00"),
        second,
    ]));
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_101}"))),
        ["last"]
    );
    // A call that moves account moves with it.
    let status = agent.feed(&snapshot(&[call(1, "a", 102, "2025-11-25 10:00:00")]));
    assert_eq!(status.last_report.unwrap().rows, 1);
    assert!(
        agent
            .get(&format!("account-id={ACCOUNT_101}"))
            .rows()
            .is_empty()
    );
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_102}"))),
        ["a"]
    );
}

#[test]
fn a_file_written_in_place_is_applied_once_complete() {
    let agent = TestAgent::start();
    let mut status = agent.agent().feed_status();
    let mut file = std::fs::File::create(agent.snapshot_path()).unwrap();
    let (first, rest) = SAMPLE_SNAPSHOT.split_at(SAMPLE_SNAPSHOT.len() / 2);
    file.write_all(first.as_bytes()).unwrap();
    file.flush().unwrap();
    // The window in which a wrong implementation would apply the half-written file.
    std::thread::sleep(Duration::from_millis(300));
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    let after = agent.wait_for(&mut status, |s| s.applied + s.rejected > 0);
    assert_eq!(applied_report(after, 1).rows, 20);
}

#[test]
fn a_deleted_file_changes_nothing_and_the_store_survives_a_restart() {
    let mut agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let before = agent.get(&format!("account-id={ACCOUNT_102}")).text();
    std::fs::remove_file(agent.snapshot_path()).unwrap();
    // Events are handled in order: once the directory rewrite is seen, so was the delete.
    let mut reloads = agent.agent().directory_reloads();
    write_file(&agent.config.directory.path, SAMPLE_DIRECTORY.as_bytes());
    agent.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|n| *n > 0))
            .await
            .unwrap()
            .unwrap();
    });
    assert_eq!(
        agent.get(&format!("account-id={ACCOUNT_102}")).text(),
        before
    );
    assert_eq!(agent.agent().feed_status().borrow().applied, 1);

    agent.restart();
    assert_eq!(
        agent.get(&format!("account-id={ACCOUNT_102}")).text(),
        before
    );
}

/// Writes the snapshot file with a modification time `age` ago (negative: ahead), as a
/// writer left it (temporary file, then rename).
fn write_aged(agent: &TestAgent, content: &str, age: i64) {
    let tmp = agent.snapshot_path().with_extension("writing");
    std::fs::write(&tmp, content).unwrap();
    let file = std::fs::File::options().write(true).open(&tmp).unwrap();
    let now = SystemTime::now();
    let at = if age >= 0 {
        now - Duration::from_secs(age as u64)
    } else {
        now + Duration::from_secs(age.unsigned_abs())
    };
    file.set_modified(at).unwrap();
    drop(file);
    std::fs::rename(&tmp, agent.snapshot_path()).unwrap();
}

/// When the node of the snapshot file was last heard, by the store (unix ms).
fn heard_at(agent: &TestAgent) -> i64 {
    rusqlite::Connection::open(&agent.config.store.path)
        .unwrap()
        .query_row("SELECT heard_at_ms FROM nodes WHERE node_id = 7", [], |r| {
            r.get(0)
        })
        .unwrap()
}

#[test]
fn silent_nodes_expire_also_across_a_restart() {
    // SPEC 2.2: a file read at start counts as received when it was written (a time in the
    // future as now); one read because it changed, when it was read.
    let agent = TestAgent::start_with(|c| c.feed.stale_after = StaleAfter::Seconds(60));
    let calls_of_102 = SAMPLE_SNAPSHOT.matches("\"customer_acc_id\":102,").count();
    assert!(calls_of_102 > 0);
    let answered = |agent: &TestAgent| agent.get(&format!("account-id={ACCOUNT_102}")).rows().len();
    let restart = |agent: &mut TestAgent| {
        agent.restart();
        agent.wait_for(&mut agent.agent().feed_status(), |s| s.applied > 0);
    };

    // Written 61 s ago, and only just renamed into place: it counts as received now.
    let mut status = agent.agent().feed_status();
    write_aged(&agent, SAMPLE_SNAPSHOT, 61);
    agent.wait_for(&mut status, |s| s.applied > 0);
    assert_eq!(answered(&agent), calls_of_102);

    // A switch that stopped writing 61 s ago, and an agent started since (over a store
    // that has not heard from the node since): its calls are not current, nor after
    // another restart.
    let mut agent = TestAgent::start_with(|c| c.feed.stale_after = StaleAfter::Seconds(60));
    let stopped = |agent: &mut TestAgent, age: i64| {
        if let Some(running) = agent.agent.take() {
            running.stop();
        }
        write_aged(agent, SAMPLE_SNAPSHOT, age);
    };
    stopped(&mut agent, 61);
    restart(&mut agent);
    assert_eq!(answered(&agent), 0);
    restart(&mut agent);
    assert_eq!(answered(&agent), 0);

    // Written 30 s ago: within the minute, current.
    stopped(&mut agent, 30);
    restart(&mut agent);
    assert_eq!(answered(&agent), calls_of_102);

    // A clock ahead (a copied file, a switch's wrong clock) counts as now, not tomorrow.
    stopped(&mut agent, -86_400);
    restart(&mut agent);
    assert_eq!(answered(&agent), calls_of_102);
    let now_ms = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        heard_at(&agent) <= now_ms,
        "heard {} > now {now_ms}",
        heard_at(&agent)
    );
}

#[test]
fn the_directory_is_reloaded_and_a_bad_one_is_rejected() {
    let agent = TestAgent::start();
    agent.feed(&snapshot(&[call(1, "a", 105, "2025-11-25 10:00:00")]));
    let uuid = "0a0a0a0a-0000-4000-8000-000000000105";
    assert_eq!(agent.get(&format!("account-id={uuid}")).status, 400);

    let mut directory: Value = serde_json::from_str(SAMPLE_DIRECTORY).unwrap();
    directory["accounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": 105, "uuid": uuid, "contractor_id": 1001}));
    let mut reloads = agent.agent().directory_reloads();
    let mut reload = |content: &[u8]| {
        let before = *reloads.borrow_and_update();
        write_file(&agent.config.directory.path, content);
        agent.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|n| *n > before))
                .await
                .unwrap()
                .unwrap();
        });
    };
    reload(directory.to_string().as_bytes());
    let mut row = call(1, "a", 105, "2025-11-25 10:00:00");
    row["customer_id"] = json!(1001);
    agent.feed(&snapshot(&[row]));
    assert_eq!(tags(&agent.get(&format!("account-id={uuid}"))), ["a"]);

    reload(b"{\"accounts\": 5}");
    assert_eq!(
        tags(&agent.get(&format!("account-id={uuid}"))),
        ["a"],
        "previous directory kept"
    );
}

#[test]
fn calls_of_another_customer_on_the_same_account_id_are_never_shown() {
    // A row whose customer does not own the account (a bad switch row) stays invisible.
    let agent = TestAgent::start();
    let mut foreign = call(1, "f", 101, "2025-11-25 10:00:00");
    foreign["customer_id"] = json!(1002);
    agent.feed(&snapshot(&[
        foreign,
        call(1, "a", 101, "2025-11-25 10:00:00"),
    ]));
    assert_eq!(
        tags(&agent.get(&format!("account-id={ACCOUNT_101}"))),
        ["a"]
    );
}

#[test]
fn busy_neighbours_in_the_folder_do_not_delay_a_snapshot() {
    let agent = TestAgent::start();
    let neighbour = agent.snapshot_path().with_file_name("switch.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut log = std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&neighbour)
                    .unwrap();
                log.write_all(b"another line\n").unwrap();
                drop(log);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    // A file closed every 2 ms beside it: the snapshot is still applied at once.
    let status = agent.feed(SAMPLE_SNAPSHOT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(status.applied, 1);
}

#[test]
fn a_burst_of_writes_costs_far_fewer_applies_and_ends_on_the_last_content() {
    let agent = TestAgent::start();
    let mut status = agent.agent().feed_status();
    let writes = 30;
    for i in 0..writes {
        let row = call(1, "a", 101, "2025-11-25 10:00:00");
        let mut row = row;
        row["src_name_in"] = json!(format!("v{i}"));
        write_file(&agent.snapshot_path(), snapshot(&[row]).as_bytes());
    }
    let last = format!("v{}", writes - 1);
    let after = agent.wait_for(&mut status, |s| {
        s.last_report.is_some() && s.applied + s.rejected > 0 && {
            // Settled on the last content.
            let reply = agent.get(&format!("account-id={ACCOUNT_101}"));
            reply.status == 200 && tags(&reply) == [last.clone()]
        }
    });
    assert_eq!(after.rejected, 0);
    assert!(
        after.applied < writes / 3,
        "{} applies for {writes} writes",
        after.applied
    );
}
