//! Call events (SPEC 2.4, issue 19), from outside: the sample snapshots and the seven
//! sample events a node posts between snapshot-2 and snapshot-3, byte for byte, over the
//! feed socket; after each step the endpoint and the scrape show exactly the calls the
//! samples' README says are current then. Then each reconciliation rule, bad events, the
//! queue's bound, and a SIGKILL between events.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use active_calls_agent::config::Config;
use common::*;
use serde_json::Value;

const SCRAPE: &str = "/api/rest/node/v1/active-calls";
const SCRAPE_TOKEN: &str = "scrape-token-events-0123456789";
const BEARER: &str = "Bearer scrape-token-events-0123456789";

const EVENTS: [&str; 7] = SAMPLE_EVENTS;
const EPH: &str = "EPH-A6233255-0D46-00000000";
const LIVE: &str = "LIVE-C27DB4EC-BC1E-00000000";
const TALKING: &str = "922631C6-DCD0-00000005";
const RINGING_CANCELLED: &str = "81CC8265-4573-00000002";
const RINGING_ANSWERED: &str = "9F66AD57-FCA6-00000004";

/// What the tests compare of a current call: its account, start and answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    account: i64,
    start_time: String,
    connect_time: Option<String>,
}

/// The current calls by local tag.
type State = BTreeMap<String, Call>;

fn state_of(snapshot: &str) -> State {
    snapshot
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            (row["local_tag"].as_str().unwrap().to_owned(), call_of(&row))
        })
        .collect()
}

fn call_of(row: &Value) -> Call {
    Call {
        account: row["customer_acc_id"].as_i64().unwrap(),
        start_time: row["start_time"].as_str().unwrap().to_owned(),
        connect_time: row["connect_time"].as_str().map(str::to_owned),
    }
}

/// An agent with the socket source, a scrape token, and `adjust` applied.
fn start_with(adjust: impl FnOnce(&mut Config)) -> TestAgent {
    TestAgent::start_with(|c| {
        let tokens = c.directory.path.with_file_name("scrape-tokens");
        std::fs::write(&tokens, format!("{SCRAPE_TOKEN}\n")).unwrap();
        c.upstream.scrape_tokens_file = tokens;
        c.feed.listen = "127.0.0.1:0".into();
        adjust(c);
    })
}

fn start() -> TestAgent {
    start_with(|_| {})
}

trait Switch {
    fn post_snapshot(&self, body: &str);
    fn post_event(&self, body: &str) -> Reply;
    /// Posts an event the agent takes (200), and waits until it is applied.
    fn event(&self, body: &str);
}

impl Switch for TestAgent {
    fn post_snapshot(&self, body: &str) {
        let feed = self.agent().feed_addr().expect("socket source");
        let reply = post(feed, "/", &[], body.as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    fn post_event(&self, body: &str) -> Reply {
        let feed = self.agent().feed_addr().expect("socket source");
        post(
            feed,
            "/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    fn event(&self, body: &str) {
        let mut status = self.agent().feed_status();
        let before = status.borrow_and_update().events;
        let reply = self.post_event(body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.body.is_empty());
        self.wait_for(&mut status, |s| s.events > before);
    }
}

/// The current calls as the scrape shows them.
fn scraped(agent: &TestAgent) -> State {
    let reply = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .text()
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            (row["local_tag"].as_str().unwrap().to_owned(), call_of(&row))
        })
        .collect()
}

/// Each account's answer from the endpoint (which has no local tags): its calls, sorted.
fn answered(agent: &TestAgent) -> BTreeMap<i64, Vec<Call>> {
    [
        (101, ACCOUNT_101, 5001),
        (102, ACCOUNT_102, 5001),
        (103, ACCOUNT_103, 5002),
        (104, ACCOUNT_104, 5002),
    ]
    .into_iter()
    .map(|(id, uuid, access)| {
        let reply = request(
            agent.addr(),
            "GET",
            &format!("{ENDPOINT}?account-id={uuid}"),
            &[("Authorization", &token_for(access))],
        );
        let mut calls: Vec<Call> = reply
            .rows()
            .iter()
            .map(|row| Call {
                account: id,
                ..call_of(&serde_json::json!({
                    "customer_acc_id": id,
                    "start_time": row["start_time"],
                    "connect_time": row["connect_time"],
                }))
            })
            .collect();
        calls.sort();
        (id, calls)
    })
    .filter(|(_, calls)| !calls.is_empty())
    .collect()
}

fn by_account(state: &State) -> BTreeMap<i64, Vec<Call>> {
    let mut accounts: BTreeMap<i64, Vec<Call>> = BTreeMap::new();
    for call in state.values() {
        accounts.entry(call.account).or_default().push(call.clone());
    }
    for calls in accounts.values_mut() {
        calls.sort();
    }
    accounts
}

/// Both the scrape and the endpoint show exactly `expected`.
fn shows(agent: &TestAgent, expected: &State, step: &str) {
    assert_eq!(&scraped(agent), expected, "the scrape after {step}");
    assert_eq!(
        answered(agent),
        by_account(expected),
        "the endpoint after {step}"
    );
}

fn sample_3() -> &'static str {
    include_str!("fixtures/snapshot-3.jsonl")
}

#[test]
fn the_sample_events_make_the_answer_current_between_snapshots() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT);
    shows(&agent, &state_of(SAMPLE_SNAPSHOT), "snapshot-1");
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    let mut expected = state_of(SAMPLE_SNAPSHOT_2);
    shows(&agent, &expected, "snapshot-2");

    // What the samples' README says each event does, in posting order, and whether it
    // changes account 101's answer (whose ETag then changes, and otherwise stays).
    let at = |time: &str| format!("2025-11-25 {time}");
    type Change = Box<dyn Fn(&mut State)>;
    let steps: [(&str, bool, Change); 7] = [
        (
            "01: an attempt starts",
            false,
            Box::new(move |s| {
                let start_time = at("14:30:05");
                s.insert(
                    EPH.into(),
                    Call {
                        account: 103,
                        start_time,
                        connect_time: None,
                    },
                );
            }),
        ),
        (
            "02: the attempt is refused",
            false,
            Box::new(|s| drop(s.remove(EPH))),
        ),
        (
            "03: a new call starts",
            true,
            Box::new(move |s| {
                let start_time = at("14:30:06");
                s.insert(
                    LIVE.into(),
                    Call {
                        account: 101,
                        start_time,
                        connect_time: None,
                    },
                );
            }),
        ),
        (
            "04: a talking call hangs up",
            true,
            Box::new(|s| drop(s.remove(TALKING))),
        ),
        (
            "05: a ringing call is cancelled",
            false,
            Box::new(|s| drop(s.remove(RINGING_CANCELLED))),
        ),
        (
            "06: the new call is answered",
            true,
            Box::new(move |s| s.get_mut(LIVE).unwrap().connect_time = Some(at("14:30:08"))),
        ),
        (
            "07: a ringing call is answered",
            false,
            Box::new(move |s| {
                s.get_mut(RINGING_ANSWERED).unwrap().connect_time = Some(at("14:30:09"))
            }),
        ),
    ];
    let etag = |agent: &TestAgent| {
        let reply = request(
            agent.addr(),
            "GET",
            &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
            &[("Authorization", &token_for(5001))],
        );
        reply.header("etag").unwrap().to_owned()
    };
    for (event, (step, changes_101, change)) in EVENTS.iter().zip(&steps) {
        let before = etag(&agent);
        agent.event(event);
        change(&mut expected);
        shows(&agent, &expected, step);
        assert_eq!(
            etag(&agent) != before,
            *changes_101,
            "account 101's ETag at {step}"
        );
    }

    // A call an event made shows what the event carried, as its first snapshot will: all
    // but the header keys, which an event does not carry, and the time it was received.
    let live = |body: &str| -> Value {
        body.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["local_tag"] == LIVE)
            .unwrap()
    };
    let reply = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    let made = live(&reply.text());

    // The same calls from a shell.
    let cli = agent.dir.path().join("cli.toml");
    std::fs::write(
        &cli,
        format!(
            "[store]\npath = {:?}\n[directory]\npath = {:?}\n",
            agent.config.store.path, agent.config.directory.path
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
        .args(["calls", "--json", "--config"])
        .arg(&cli)
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let tags: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["local_tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags.len(), expected.len());
    assert!(tags.contains(&LIVE) && !tags.contains(&TALKING), "{tags:?}");

    // snapshot-2 again, after the events: it is older than all of them, and changes nothing.
    let scrape_before = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    let before = etag(&agent);
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    shows(&agent, &expected, "snapshot-2 again");
    assert_eq!(etag(&agent), before);
    let scrape_after = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    assert_eq!(scrape_after.header("etag"), scrape_before.header("etag"));
    assert_eq!(scrape_after.body, scrape_before.body);

    // snapshot-3: the state the events left, the call a snapshot again.
    agent.post_snapshot(sample_3());
    assert_eq!(expected, state_of(sample_3()));
    shows(&agent, &expected, "snapshot-3");
    let reply = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    let snapshot = live(&reply.text());
    for (key, value) in snapshot.as_object().unwrap() {
        match key.as_str() {
            "snapshot_timestamp" => {
                assert_eq!(value, "2025-11-25 14:30:10");
                let received = made[key].as_str().unwrap();
                assert!(received > "2026-01-01", "the receive time: {received}");
            }
            "diversion_in" | "pai_in" | "ppi_in" | "privacy_in" | "rpid_in" | "rpid_privacy_in" => {
                assert_eq!(made[key], Value::Null, "{key}")
            }
            _ => assert_eq!(&made[key], value, "{key}"),
        }
    }

    let metrics = agent.request("GET", "/metrics", &[]).text();
    for (kind, count) in [("started", 2), ("connected", 2), ("disconnected", 3)] {
        let series = format!(
            "active_calls_agent_events_total{{type=\"{kind}\",outcome=\"queued\"}} {count}"
        );
        assert!(metrics.contains(&series), "{series}\n{metrics}");
    }
    assert!(
        metrics.contains("active_calls_agent_event_visible_seconds_count 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("active_calls_agent_node_period_seconds{node_id=\"7\"} 5.0"),
        "{metrics}"
    );
    assert_eq!(reply.header("x-node-periods"), Some("7=5"));
}

#[test]
fn lost_events_heal_at_the_next_snapshot() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    // Only the attempt's two events arrive; the other five are lost (on_failure = remove).
    agent.event(EVENTS[0]);
    agent.event(EVENTS[1]);
    shows(&agent, &state_of(SAMPLE_SNAPSHOT_2), "the attempt");
    agent.post_snapshot(sample_3());
    shows(&agent, &state_of(sample_3()), "snapshot-3");
}

#[test]
fn an_ended_call_stays_ended_but_for_a_later_snapshot_that_still_has_it() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    agent.event(EVENTS[3]); // the talking call hangs up at 14:30:07.125
    let mut expected = state_of(SAMPLE_SNAPSHOT_2);
    expected.remove(TALKING);

    // snapshot-3, with the call once more as a buffered row (its real end): still ended.
    let row_of = |snapshot: &str| {
        snapshot
            .lines()
            .find(|l| l.contains(&format!("\"local_tag\":\"{TALKING}\"")))
            .unwrap()
            .to_owned()
    };
    let talking = row_of(SAMPLE_SNAPSHOT_2)
        .replace(
            "\"snapshot_timestamp\":\"2025-11-25 14:30:05\"",
            "\"snapshot_timestamp\":\"2025-11-25 14:30:10\"",
        )
        .replace("{\"", "{\"buffered\":true,\"");
    let buffered = format!("{}{talking}\n", sample_3());
    agent.post_snapshot(&buffered);
    let mut after_3 = state_of(sample_3());
    after_3.remove(TALKING);
    shows(&agent, &after_3, "snapshot-3 with a buffered row");

    // A snapshot dated 14:30:07, before the end, that still has it: still ended.
    let early = SAMPLE_SNAPSHOT_2.replace("14:30:05", "14:30:07");
    agent.post_snapshot(&early);
    expected = state_of(&early);
    expected.remove(TALKING);
    shows(&agent, &expected, "a snapshot dated before the end");

    // One dated 14:30:08, after the end, still has it in progress: the snapshot is the
    // newer word (the event was wrong, or the tag came back), and the call is current.
    let late = SAMPLE_SNAPSHOT_2.replace("14:30:05", "14:30:08");
    agent.post_snapshot(&late);
    shows(&agent, &state_of(&late), "a snapshot dated after the end");
}

#[test]
fn a_call_started_after_a_snapshot_stays_until_a_later_one_leaves_it_out() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    agent.event(EVENTS[2]); // LIVE starts at 14:30:06.25
    agent.event(EVENTS[6]); // 9F66AD57 answered at 14:30:09.2
    let mut expected = state_of(SAMPLE_SNAPSHOT_2);
    expected.insert(
        LIVE.into(),
        Call {
            account: 101,
            start_time: "2025-11-25 14:30:06".into(),
            connect_time: None,
        },
    );
    expected.get_mut(RINGING_ANSWERED).unwrap().connect_time = Some("2025-11-25 14:30:09".into());
    shows(&agent, &expected, "the events");
    // Dated 14:30:06: LIVE started after it; 9F66AD57 was answered after it.
    let at_six = SAMPLE_SNAPSHOT_2.replace("14:30:05", "14:30:06");
    agent.post_snapshot(&at_six);
    shows(&agent, &expected, "a snapshot dated 14:30:06");
    // Dated 14:30:10, and without LIVE, with 9F66AD57 still ringing: the snapshot is newer
    // than both events, and says so.
    let at_ten = SAMPLE_SNAPSHOT_2.replace("14:30:05", "14:30:10");
    agent.post_snapshot(&at_ten);
    shows(&agent, &state_of(&at_ten), "a snapshot dated 14:30:10");
}

#[test]
fn bad_events_get_a_400_and_change_nothing() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    let before = scraped(&agent);
    let started = EVENTS[2];
    for (body, reason) in [
        ("not json".to_owned(), "not a JSON object"),
        ("[1,2]".to_owned(), "not a JSON object"),
        (
            started.replace(",\"local_tag\":\"LIVE-C27DB4EC-BC1E-00000000\"", ""),
            "no local_tag",
        ),
        (started.replace("\"node_id\":7,", ""), "no data.node_id"),
        (
            started.replace("\"customer_acc_id\":101,", "\"customer_acc_id\":\"x\","),
            "bad or missing data.routing.customer_acc_id",
        ),
        (
            started.replace("1764081006.25", "\"soon\""),
            "bad or missing data.start_time",
        ),
    ] {
        let reply = agent.post_event(&body);
        assert_eq!(reply.status, 400, "{body}");
        let text = reply.text();
        assert!(text.contains(reason), "{reason}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    }
    // A type the agent does not know: taken, ignored, counted.
    let reply = agent.post_event(&started.replace("\"started\"", "\"transferred\""));
    assert_eq!(reply.status, 200);
    // Nothing changed: the next event that applies finds the calls as they were.
    agent.event(EVENTS[1]);
    assert_eq!(scraped(&agent), before);
    let metrics = agent.request("GET", "/metrics", &[]).text();
    for series in [
        "active_calls_agent_events_total{type=\"other\",outcome=\"ignored\"} 1",
        "active_calls_agent_events_total{type=\"other\",outcome=\"invalid\"} 2",
        "active_calls_agent_events_total{type=\"started\",outcome=\"invalid\"} 4",
    ] {
        assert!(metrics.contains(series), "{series}\n{metrics}");
    }
    // The events' own credentials are the feed's.
    let agent = start_with(|c| {
        c.feed.user = "switch".into();
        c.feed.password = "secret".into();
    });
    assert_eq!(agent.post_event(EVENTS[2]).status, 401);
    let feed = agent.agent().feed_addr().unwrap();
    let basic = "Basic c3dpdGNoOnNlY3JldA=="; // switch:secret
    let reply = post(
        feed,
        "/events",
        &[("Authorization", basic)],
        EVENTS[2].as_bytes(),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(request(feed, "GET", "/events", &[]).status, 405);
}

#[test]
fn a_flood_of_events_past_the_bound_gets_503_and_the_rest_apply() {
    let agent = start_with(|c| c.feed.max_queued_events = 1);
    let feed = agent.agent().feed_addr().unwrap();
    // A large snapshot keeps the writer busy for a while: events queue behind it.
    let mut switch = active_calls_agent::lab::sems::Switch::new(3);
    switch.fill(10_000, 1_764_081_000);
    let big = switch.render(1_764_081_000);
    let posting = std::thread::spawn(move || post(feed, "/", &[], &big).status);
    let (mut taken, mut refused) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    while !posting.is_finished() && Instant::now() < deadline {
        n += 1;
        let tag = format!("FLOOD-{n}");
        let body = EVENTS[2].replace(LIVE, &tag);
        let reply = agent.post_event(&body);
        match reply.status {
            200 => taken.push(tag),
            503 => {
                assert_eq!(reply.header("retry-after"), Some("1"));
                refused.push(tag);
            }
            other => panic!("{other}: {}", reply.text()),
        }
    }
    assert_eq!(posting.join().unwrap(), 200);
    assert!(!refused.is_empty(), "none refused of {n}");
    agent.wait_for(&mut agent.agent().feed_status(), |s| {
        s.events >= taken.len() as u64
    });
    let current = scraped(&agent);
    for tag in &taken {
        assert!(current.contains_key(tag), "{tag} applied");
    }
    for tag in &refused {
        assert!(!current.contains_key(tag), "{tag} refused, not applied");
    }
    let metrics = agent.request("GET", "/metrics", &[]).text();
    let series = format!(
        "active_calls_agent_events_total{{type=\"started\",outcome=\"overloaded\"}} {}",
        refused.len()
    );
    assert!(metrics.contains(&series), "{series}");
}

#[test]
fn a_node_posting_every_two_seconds_is_empty_within_nine_once_silent() {
    // The default, feed.stale_after = "auto".
    let agent = start_with(|c| c.feed.stale_after = Default::default());
    let mut switch = active_calls_agent::lab::sems::Switch::new(11);
    let first = unix_now() as i64;
    switch.fill(50, first);
    // When the last snapshot was sent (it is received after that) and answered.
    let (mut sent, mut last) = (Instant::now(), Instant::now());
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(2).saturating_sub(last.elapsed()));
        }
        let at = first + 2 * i;
        switch.period(at, 2);
        let body = switch.render(at);
        let feed = agent.agent().feed_addr().unwrap();
        sent = Instant::now();
        assert_eq!(post(feed, "/", &[], &body).status, 200);
        last = Instant::now();
    }
    let reply = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    assert_eq!(reply.text().lines().count(), 50);
    assert_eq!(reply.header("x-node-periods"), Some("1=2"));
    // Silent from now on: two periods and 5 s later, the node has no calls.
    let empty_at = loop {
        let reply = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
        if reply.text().is_empty() {
            break sent.elapsed();
        }
        assert!(
            last.elapsed() < Duration::from_secs(10),
            "still answered after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Not before 9 s after it was received (the limit, to the millisecond), nor later
    // than 10 s after it was answered (an apply slowed by a loaded machine counts from
    // the receipt, which falls between the two).
    assert!(
        empty_at >= Duration::from_millis(8_990) && last.elapsed() < Duration::from_secs(10),
        "empty {empty_at:?} after the last snapshot was sent"
    );
}

#[test]
fn what_was_committed_survives_a_sigkill_between_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let agent = Process::start(&config);
    let token = token_for(5001);
    let tags_of_101 = |api| -> Vec<String> {
        let reply = request(
            api,
            "GET",
            &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
            &[("Authorization", &token)],
        );
        let mut starts: Vec<String> = reply
            .rows()
            .iter()
            .map(|r| format!("{} {}", r["start_time"], r["connect_time"]))
            .collect();
        starts.sort();
        starts
    };
    let post_ok = |feed, target: &str, body: &str| {
        let reply = post(feed, target, &[], body.as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
    };
    post_ok(agent.feed, "/", SAMPLE_SNAPSHOT_2);
    for event in &EVENTS[..4] {
        post_ok(agent.feed, "/events", event);
    }
    // Answered means queued; visible a moment later.
    let mut expected = state_of(SAMPLE_SNAPSHOT_2);
    expected.remove(TALKING);
    expected.insert(
        LIVE.into(),
        Call {
            account: 101,
            start_time: "2025-11-25 14:30:06".into(),
            connect_time: None,
        },
    );
    let want: Vec<String> = {
        let mut v: Vec<String> = expected
            .values()
            .filter(|c| c.account == 101)
            .map(|c| {
                format!(
                    "{} {}",
                    Value::from(c.start_time.clone()),
                    c.connect_time.clone().map_or(Value::Null, Value::from)
                )
            })
            .collect();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tags_of_101(agent.api) != want {
        assert!(
            Instant::now() < deadline,
            "{:?} != {want:?}",
            tags_of_101(agent.api)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill();
    let agent = Process::start(&config);
    assert_eq!(tags_of_101(agent.api), want, "after the SIGKILL");
    // What events knew survived too: snapshot-2 again keeps LIVE, and the call that hung
    // up stays gone.
    post_ok(agent.feed, "/", SAMPLE_SNAPSHOT_2);
    assert_eq!(tags_of_101(agent.api), want, "snapshot-2 after the restart");
}

#[test]
fn check_explains_how_silence_expires() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    for (value, says) in [
        (
            "\"auto\"",
            "ok: feed.stale_after = \"auto\": a node silent for more than two of its snapshot periods plus 5 s has no calls",
        ),
        (
            "60",
            "ok: feed.stale_after = 60: a node silent for 60 s has no calls",
        ),
        (
            "0",
            "warning: feed.stale_after = 0: calls of a silent node never expire",
        ),
    ] {
        std::fs::write(
            &config,
            text.replace("stale_after = 0", &format!("stale_after = {value}")),
        )
        .unwrap();
        let (_, printed) = check(&config);
        assert!(printed.contains(says), "{value}: {printed}");
    }
    std::fs::write(
        &config,
        text.replace("stale_after = 0", "stale_after = \"soon\""),
    )
    .unwrap();
    let (passed, printed) = check(&config);
    assert!(!passed && printed.contains("stale_after"), "{printed}");
}

/// The calls of a rendered snapshot, as [`state_of`] reads them, without buffered rows
/// (calls that ended during the period, which the events ended already).
fn active_state_of(snapshot: &[u8]) -> State {
    let text = std::str::from_utf8(snapshot).unwrap();
    let active: String = text
        .lines()
        .filter(|line| !line.contains("\"buffered\":true"))
        .map(|line| format!("{line}\n"))
        .collect();
    state_of(&active)
}

#[test]
fn a_switchs_events_leave_the_state_its_next_snapshot_has_among_other_nodes() {
    for buffering in [false, true] {
        let agent = start();
        let feed = agent.agent().feed_addr().unwrap();
        let mut switch = active_calls_agent::lab::sems::Switch::new(21).buffering(buffering);
        let at = 1_764_081_000;
        switch.fill(300, at);
        agent.post_snapshot(std::str::from_utf8(&switch.render(at)).unwrap());
        agent.post_snapshot(SAMPLE_SNAPSHOT_2);
        // Node 1's period and node 7's sample events, interleaved as they arrive.
        let generated = switch.period_with_events(at + 5, 5);
        assert!(generated.len() > 20, "{}", generated.len());
        let mut poster = active_calls_agent::lab::client::EventPoster::new(feed);
        let mut status = agent.agent().feed_status();
        let before = status.borrow_and_update().events;
        let samples = EVENTS.iter().map(|e| e.as_bytes());
        let mut posted = 0;
        for (i, body) in generated.iter().map(|e| e.body.as_slice()).enumerate() {
            assert_eq!(poster.post(body).unwrap(), 200);
            posted += 1;
            if i % 5 == 0
                && let Some(sample) = samples.clone().nth(i / 5)
            {
                assert_eq!(poster.post(sample).unwrap(), 200);
                posted += 1;
            }
        }
        for sample in samples.skip(generated.len().div_ceil(5)) {
            assert_eq!(poster.post(sample).unwrap(), 200);
            posted += 1;
        }
        agent.wait_for(&mut status, |s| s.events >= before + posted);
        let next = switch.render(at + 5);
        let mut expected = active_state_of(&next);
        expected.extend(state_of(sample_3()));
        assert_eq!(
            scraped(&agent),
            expected,
            "buffering {buffering}: the events"
        );
        // The snapshots then change nothing the events had not done.
        let scrape_before = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
        agent.post_snapshot(std::str::from_utf8(&next).unwrap());
        agent.post_snapshot(sample_3());
        assert_eq!(
            scraped(&agent),
            expected,
            "buffering {buffering}: the snapshots"
        );
        let scrape_after = agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
        assert_ne!(
            scrape_after.body, scrape_before.body,
            "the snapshots add the headers"
        );
    }
}

#[test]
fn events_that_come_while_a_snapshot_applies_are_kept_even_when_it_is_rejected() {
    for rejected in [false, true] {
        let agent = start();
        let feed = agent.agent().feed_addr().unwrap();
        agent.post_snapshot(SAMPLE_SNAPSHOT_2);
        // A large snapshot of another node, taking a while; rejected at its last line.
        let mut switch = active_calls_agent::lab::sems::Switch::new(4);
        switch.fill(8_000, 1_764_081_000);
        let mut big = switch.render(1_764_081_000);
        if rejected {
            big.extend_from_slice(b"not a row\n");
        }
        let posting = std::thread::spawn(move || post(feed, "/", &[], &big).status);
        let mut poster = active_calls_agent::lab::client::EventPoster::new(feed);
        let mut taken = Vec::new();
        while !posting.is_finished() {
            let tag = format!("DURING-{}", taken.len());
            assert_eq!(
                poster
                    .post(EVENTS[2].replace(LIVE, &tag).as_bytes())
                    .unwrap(),
                200
            );
            taken.push(tag);
        }
        assert_eq!(posting.join().unwrap(), if rejected { 400 } else { 200 });
        // The queue's count goes back to zero only once every event is committed.
        let mut status = agent.agent().feed_status();
        agent.wait_for(&mut status, |s| s.events >= taken.len() as u64);
        let current = scraped(&agent);
        for tag in &taken {
            assert!(current.contains_key(tag), "rejected {rejected}: {tag} lost");
        }
        assert_eq!(
            current.len(),
            taken.len() + state_of(SAMPLE_SNAPSHOT_2).len() + if rejected { 0 } else { 8_000 },
            "rejected {rejected}"
        );
        // Everything committed: the bound counts nothing still waiting.
        let metrics = agent.request("GET", "/metrics", &[]).text();
        assert!(metrics.contains("active_calls_agent_event_visible_seconds_count"));
    }
}

#[test]
fn an_event_does_not_bring_back_the_calls_of_a_node_that_expired() {
    let mut agent =
        start_with(|c| c.feed.stale_after = active_calls_agent::config::StaleAfter::Seconds(2));
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    assert_eq!(scraped(&agent).len(), 20);
    // Down while the node went silent past its limit; then the node's next event.
    agent.agent.take().expect("running").stop();
    std::thread::sleep(Duration::from_millis(2_500));
    agent.restart();
    agent.event(EVENTS[2]);
    let current = scraped(&agent);
    assert_eq!(
        current.keys().collect::<Vec<_>>(),
        [LIVE],
        "only what the event made"
    );
}

#[test]
fn a_file_that_drops_a_node_keeps_the_calls_events_made_after_it() {
    let agent = start();
    let feed = agent.agent().feed_addr().unwrap();
    let mut switch = active_calls_agent::lab::sems::Switch::new(8);
    let now = unix_now() as i64;
    switch.fill(30, now - 10);
    let mut status = agent.agent().feed_status();
    write_file(&agent.snapshot_path(), &switch.render(now - 10));
    agent.wait_for(&mut status, |s| s.applied > 0);
    assert_eq!(scraped(&agent).len(), 30);
    // Events dated after the next file is written (the agent's clock is the switch's),
    // however slow a loaded machine is to get there.
    let events = switch.events(30, (now + 60) * 1000, (now + 61) * 1000);
    let mut poster = active_calls_agent::lab::client::EventPoster::new(feed);
    let before = status.borrow_and_update().events;
    for event in &events {
        assert_eq!(poster.post(&event.body).unwrap(), 200);
    }
    agent.wait_for(&mut status, |s| s.events >= before + events.len() as u64);
    // The node leaves the file: its calls go, but those events made or answered since.
    let made: Vec<String> = {
        let mut ended = std::collections::HashSet::new();
        let mut made = Vec::new();
        for event in events.iter().rev() {
            match event.kind {
                active_calls_agent::call::EventKind::Disconnected => {
                    ended.insert(event.local_tag.clone());
                }
                // Started or answered after the file: newer than it.
                _ if !ended.contains(&event.local_tag) && !made.contains(&event.local_tag) => {
                    made.push(event.local_tag.clone())
                }
                _ => {}
            }
        }
        made
    };
    assert!(!made.is_empty());
    let applied = status.borrow_and_update().applied;
    write_file(&agent.snapshot_path(), b"");
    agent.wait_for(&mut status, |s| s.applied > applied);
    let mut left: Vec<String> = scraped(&agent).into_keys().collect();
    let mut made = made;
    left.sort();
    made.sort();
    assert_eq!(left, made);
}

#[test]
fn what_an_event_cannot_apply_changes_nothing_seen() {
    let agent = start();
    agent.post_snapshot(SAMPLE_SNAPSHOT_2);
    let scrape = || agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    let before = scrape();
    // No type: ignored and counted. An end of a call never seen, from a node never seen:
    // remembered, but it shows nothing, and the scrape's ETag stays.
    assert_eq!(
        agent
            .post_event(&EVENTS[2].replace(",\"type\":\"started\"", ""))
            .status,
        200
    );
    agent.event(&EVENTS[1].replace("\"node_id\":7", "\"node_id\":99"));
    let after = scrape();
    assert_eq!(after.header("etag"), before.header("etag"));
    assert_eq!(after.header("x-node-periods"), Some("7=unknown"));
    let metrics = agent.request("GET", "/metrics", &[]).text();
    assert!(
        metrics.contains("active_calls_agent_events_total{type=\"other\",outcome=\"ignored\"} 1")
    );
    // An answer whose routing does not convert still answers a call the agent knows.
    let broken = EVENTS[6].replace("\"customer_acc_id\":104,", "\"customer_acc_id\":\"x\",");
    agent.event(&broken);
    assert_eq!(
        scraped(&agent)[RINGING_ANSWERED].connect_time.as_deref(),
        Some("2025-11-25 14:30:09")
    );
}
