//! Live streams (SPEC 7, issue 21), from outside: real agents over HTTP, fed the sample
//! snapshots and the seven sample events byte for byte. A stream sees exactly the calls
//! the endpoint answers, then one `changes` event per event that touches what it selects
//! and none for the rest; its running state equals a fresh GET at every step. Then how a
//! stream ends: token expiry, directory removal, SIGTERM, a reader that stops reading; and
//! `api.max_streams`.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use active_calls_agent::lab::sse::{Event, EventReader};
use common::*;
use serde_json::Value;

const SCRAPE: &str = "/api/rest/node/v1/active-calls";
const SCRAPE_TOKEN: &str = "scrape-token-streams-0123456789";
const EVENTS: [&str; 7] = SAMPLE_EVENTS;
const SNAPSHOT_3: &str = include_str!("fixtures/snapshot-3.jsonl");

/// A stream read as a client reads it, through the lab's reader: the head, then events
/// as they come.
struct Sse {
    socket: TcpStream,
    status: u16,
    headers: Vec<(String, String)>,
    reader: EventReader,
    /// Events read and not yet taken.
    ready: VecDeque<Event>,
}

impl Sse {
    fn open(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Sse {
        let mut head =
            format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut socket = TcpStream::connect(addr).unwrap();
        socket.write_all(head.as_bytes()).unwrap();
        let mut reader = EventReader::new(usize::MAX);
        let mut ready = VecDeque::new();
        let mut byte = [0u8; 1];
        // Byte by byte until the head is whole, so that an error's body stays unread.
        while reader.head().is_none() {
            socket.read_exact(&mut byte).expect("an answer head");
            ready.extend(reader.feed(&byte).unwrap());
        }
        let Reply {
            status, headers, ..
        } = parse_reply(reader.head().unwrap(), true);
        Sse {
            socket,
            status,
            headers,
            reader,
            ready,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next event (comments skipped), within `limit`; `None` when the body ended.
    fn next_within(&mut self, limit: Duration) -> Option<Event> {
        let deadline = Instant::now() + limit;
        let mut ended = false;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if ended || self.reader.ended() {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no event within {limit:?}");
            self.socket.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 65536];
            match self.socket.read(&mut buf) {
                Ok(0) => ended = true,
                Ok(n) => self.ready.extend(self.reader.feed(&buf[..n]).unwrap()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => ended = true,
            }
        }
    }

    fn next(&mut self) -> Event {
        self.next_within(Duration::from_secs(10))
            .expect("an event before the stream ended")
    }
}

/// What a client keeps of a stream: its rows by `call` id.
#[derive(Default)]
struct Running {
    rows: BTreeMap<String, Value>,
    last_id: u64,
    changes: u64,
}

impl Running {
    /// Starts from the `snapshot` event, which must come first, with `retry:`.
    fn from_snapshot(sse: &mut Sse) -> Running {
        let first = sse.next();
        assert_eq!(first.event, "snapshot");
        assert!(first.retry.is_some(), "retry: with the first event");
        let body: Value = serde_json::from_str(&first.data).unwrap();
        let rows = body["data"].as_array().unwrap();
        assert_eq!(body["rows"], rows.len());
        let mut running = Running {
            last_id: first.id.expect("an id"),
            ..Running::default()
        };
        for row in rows {
            running.put(row);
        }
        running
    }

    fn put(&mut self, row: &Value) {
        let id = row["call"].as_str().expect("a call id").to_owned();
        assert_eq!(id.len(), 32, "{id}");
        self.rows.insert(id, row.clone());
    }

    /// Applies the next `changes` event.
    fn apply(&mut self, sse: &mut Sse) -> Event {
        let event = sse.next();
        assert_eq!(event.event, "changes", "{event:?}");
        let id = event.id.expect("an id");
        assert!(id > self.last_id, "ids grow: {id} after {}", self.last_id);
        self.last_id = id;
        self.changes += 1;
        let delta: Value = serde_json::from_str(&event.data).unwrap();
        for row in delta["added"].as_array().unwrap() {
            let call = row["call"].as_str().unwrap();
            assert!(!self.rows.contains_key(call), "added twice: {call}");
            self.put(row);
        }
        for row in delta["changed"].as_array().unwrap() {
            let call = row["call"].as_str().unwrap();
            assert!(self.rows.contains_key(call), "changed before added: {call}");
            self.put(row);
        }
        for call in delta["removed"].as_array().unwrap() {
            let call = call.as_str().unwrap();
            assert!(self.rows.remove(call).is_some(), "removed unknown: {call}");
        }
        event
    }

    /// The rows without their `call`, sorted: what a GET's rows are compared with.
    fn shown(&self) -> Vec<String> {
        let mut rows: Vec<String> = (self.rows.values())
            .map(|row| {
                let mut row = row.clone();
                row.as_object_mut().unwrap().remove("call");
                row.to_string()
            })
            .collect();
        rows.sort();
        rows
    }
}

fn sorted(rows: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = rows.iter().map(Value::to_string).collect();
    rows.sort();
    rows
}

/// One stream of the test, and the plain request it must always agree with.
struct Watched {
    name: &'static str,
    sse: Sse,
    running: Running,
    /// A fresh GET of the same rows.
    fetch: Box<dyn Fn() -> Vec<Value>>,
}

impl Watched {
    fn open(
        name: &'static str,
        addr: SocketAddr,
        target: String,
        auth: String,
        fetch_target: String,
    ) -> Watched {
        let mut sse = Sse::open(addr, &target, &[("Authorization", &auth)]);
        assert_eq!(sse.status, 200, "{name}");
        assert_eq!(
            sse.header("content-type"),
            Some("text/event-stream; charset=utf-8")
        );
        let running = Running::from_snapshot(&mut sse);
        let fetch = Box::new(move || {
            let reply = request(addr, "GET", &fetch_target, &[("Authorization", &auth)]);
            reply.rows()
        });
        let watched = Watched {
            name,
            sse,
            running,
            fetch,
        };
        watched.agrees("its snapshot");
        watched
    }

    /// The node's stream, agreeing with the scrape's `format=JSON` rows.
    fn node(name: &'static str, addr: SocketAddr) -> Watched {
        let target = format!("{SCRAPE}?format=JSON");
        Watched::open(
            name,
            addr,
            SCRAPE.into(),
            format!("Bearer {SCRAPE_TOKEN}"),
            target,
        )
    }

    fn agrees(&self, step: &str) {
        assert_eq!(
            self.running.shown(),
            sorted(&(self.fetch)()),
            "{}: the stream's state after {step} is not a fresh GET's",
            self.name
        );
    }
}

fn start() -> TestAgent {
    TestAgent::start_with(|c| {
        let tokens = c.directory.path.with_file_name("scrape-tokens");
        std::fs::write(&tokens, format!("{SCRAPE_TOKEN}\n")).unwrap();
        c.upstream.scrape_tokens_file = tokens;
        c.feed.listen = "127.0.0.1:0".into();
    })
}

fn post_snapshot(agent: &TestAgent, body: &str) {
    let mut status = agent.agent().feed_status();
    let before = status.borrow_and_update().applied;
    let reply = post(
        agent.agent().feed_addr().unwrap(),
        "/",
        &[],
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    agent.wait_for(&mut status, |s| s.applied > before);
}

fn post_event(agent: &TestAgent, body: &str) {
    let mut status = agent.agent().feed_status();
    let before = status.borrow_and_update().events;
    let reply = post(
        agent.agent().feed_addr().unwrap(),
        "/events",
        &[],
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    agent.wait_for(&mut status, |s| s.events > before);
}

#[test]
fn streams_follow_the_sample_events_exactly() {
    let agent = start();
    post_snapshot(&agent, SAMPLE_SNAPSHOT_2);
    let addr = agent.addr();
    let customer = |name, uuid: &str, filters: &str, access| {
        let target = format!("{ENDPOINT}?account-id={uuid}{filters}");
        Watched::open(name, addr, target.clone(), token_for(access), target)
    };
    let mut streams = [
        customer("101", ACCOUNT_101, "", 5001),
        customer("101 ringing", ACCOUNT_101, "&connect-time-null=true", 5001),
        customer("102", ACCOUNT_102, "", 5001),
        customer("103", ACCOUNT_103, "", 5002),
        customer("104", ACCOUNT_104, "", 5002),
        Watched::node("node", addr),
    ];
    // Which streams each sample event touches (samples/README.md): 01–02 an attempt of
    // account 103; 03, 04, 06 account 101 (04 ends an answered call, 06 answers the new
    // one, which then leaves the ringing stream); 05 and 07 account 104.
    let touches: [&[&str]; 7] = [
        &["103", "node"],
        &["103", "node"],
        &["101", "101 ringing", "node"],
        &["101", "node"],
        &["104", "node"],
        &["101", "101 ringing", "node"],
        &["104", "node"],
    ];
    for (i, (event, touched)) in EVENTS.iter().zip(touches).enumerate() {
        post_event(&agent, event);
        for stream in streams.iter_mut().filter(|s| touched.contains(&s.name)) {
            stream.running.apply(&mut stream.sse);
            stream.agrees(&format!("event {:02}", i + 1));
        }
    }
    // Snapshot-3 changes every stream's rows (their snapshot_timestamp at least): one
    // event each, whose id says how many came before it. None came for an event that did
    // not touch the stream, and the state is the snapshot's.
    post_snapshot(&agent, SNAPSHOT_3);
    for stream in &mut streams {
        let before = stream.running.changes;
        let event = stream.running.apply(&mut stream.sse);
        let touched = touches.iter().filter(|t| t.contains(&stream.name)).count() as u64;
        assert_eq!(before, touched, "{}", stream.name);
        assert_eq!(
            event.id,
            Some(touched + 2),
            "{}: an event no event called for",
            stream.name
        );
        stream.agrees("snapshot-3");
    }
    // The same snapshot without account 104's call: only what shows it hears of it. Then
    // the next period (a new snapshot_timestamp) changes every row: one event each, whose
    // id proves that no stream got an event of unchanged rows.
    let without_104: String = (SNAPSHOT_3.lines())
        .filter(|line| !line.contains("9F66AD57"))
        .map(|line| format!("{line}\n"))
        .collect();
    post_snapshot(&agent, &without_104);
    for stream in streams
        .iter_mut()
        .filter(|s| ["104", "node"].contains(&s.name))
    {
        let event = stream.running.apply(&mut stream.sse);
        let delta: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(
            delta["removed"].as_array().unwrap().len(),
            1,
            "{}",
            stream.name
        );
        assert_eq!(
            delta["added"].as_array().unwrap().len(),
            0,
            "{}",
            stream.name
        );
        assert_eq!(
            delta["changed"].as_array().unwrap().len(),
            0,
            "{}",
            stream.name
        );
        stream.agrees("the call's removal");
    }
    let stamp = r#""snapshot_timestamp":"2025-11-25 14:30:10""#;
    post_snapshot(
        &agent,
        &without_104.replace(stamp, &stamp.replace(":10", ":15")),
    );
    // (Account 104 has no call left to change.)
    for stream in streams.iter_mut().filter(|s| !s.running.rows.is_empty()) {
        let before = stream.running.last_id;
        let event = stream.running.apply(&mut stream.sse);
        assert_eq!(
            event.id,
            Some(before + 1),
            "{}: an event of unchanged rows",
            stream.name
        );
        stream.agrees("the next period");
    }
    // A call keeps its id across streams and reconnects; the ids say nothing of the tags.
    let node = &streams[5].running;
    let again = Watched::node("node again", addr);
    assert_eq!(
        node.rows.keys().collect::<Vec<_>>(),
        again.running.rows.keys().collect::<Vec<_>>()
    );
    let of_101: Vec<&String> = streams[0].running.rows.keys().collect();
    assert!(of_101.iter().all(|id| node.rows.contains_key(*id)));
    // The ids are keyed by the store, not made of the tag alone: another agent with the
    // same calls names them otherwise.
    let other = start();
    post_snapshot(&other, SAMPLE_SNAPSHOT_2);
    let elsewhere = Watched::node("another agent", other.addr());
    let tags = |running: &Running| -> BTreeMap<String, String> {
        (running.rows.iter())
            .map(|(id, row)| (row["local_tag"].as_str().unwrap().to_owned(), id.clone()))
            .collect()
    };
    let (here, there) = (tags(node), tags(&elsewhere.running));
    for (tag, id) in &here {
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        if let Some(theirs) = there.get(tag) {
            assert_ne!(id, theirs, "{tag}: the same id under another store's key");
        }
    }
}

#[test]
fn a_call_moved_to_another_account_leaves_one_stream_for_the_other() {
    let agent = start();
    post_snapshot(&agent, SAMPLE_SNAPSHOT_2);
    let open = |uuid: &str| {
        let target = format!("{ENDPOINT}?account-id={uuid}");
        Watched::open(
            "moved",
            agent.addr(),
            target.clone(),
            token_for(5001),
            target,
        )
    };
    let (mut from, mut to) = (open(ACCOUNT_101), open(ACCOUNT_102));
    // The same snapshot, but one call of 101 is now on 102 (same customer).
    let moved = "0948F14B-FF09-00000007";
    let body: String = (SAMPLE_SNAPSHOT_2.lines())
        .map(|line| match line.contains(moved) {
            true => line.replace("\"customer_acc_id\":101", "\"customer_acc_id\":102"),
            false => line.to_owned(),
        } + "\n")
        .collect();
    assert_ne!(body, SAMPLE_SNAPSHOT_2);
    post_snapshot(&agent, &body);
    let left: Value = serde_json::from_str(&from.running.apply(&mut from.sse).data).unwrap();
    let came: Value = serde_json::from_str(&to.running.apply(&mut to.sse).data).unwrap();
    assert_eq!(left["removed"].as_array().unwrap().len(), 1, "{left}");
    assert_eq!(came["added"].as_array().unwrap().len(), 1, "{came}");
    assert_eq!(
        came["added"][0]["call"], left["removed"][0],
        "one call, one id"
    );
    from.agrees("the move");
    to.agrees("the move");
}

#[test]
fn a_stream_answers_errors_as_the_endpoint_and_other_accepts_are_untouched() {
    let agent = start();
    post_snapshot(&agent, SAMPLE_SNAPSHOT_2);
    let stream = [("Accept", "text/event-stream")];
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let reply = agent.request("GET", &target, &stream);
    assert_eq!((reply.status, reply.body.len()), (401, 0));
    let token = token_for(5001);
    let with = |accept: &'static str| [("Accept", accept), ("Authorization", token.as_str())];
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?x=1"),
        &with("text/event-stream"),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.text(),
        r#"{"error":"missing required param(s) account-id"}"#
    );
    let reply = agent.request("GET", SCRAPE, &with("text/event-stream"));
    assert_eq!(reply.status, 403, "a customer token on the node stream");
    for accept in ["application/json", "*/*", "text/plain"] {
        let reply = agent.request("GET", &target, &with(accept));
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(reply.rows().len(), 6);
    }
}

#[test]
fn streams_end_on_token_expiry_and_directory_removal() {
    let agent = start();
    post_snapshot(&agent, SAMPLE_SNAPSHOT_2);
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let expiring =
        sign(&serde_json::json!({"aud": "customer-v1", "sub": 5001, "exp": unix_now() + 2}));
    let mut expires = Sse::open(agent.addr(), &target, &[("Authorization", &expiring)]);
    assert_eq!(expires.status, 200);
    let mut removed = Sse::open(
        agent.addr(),
        &format!("{ENDPOINT}?account-id={ACCOUNT_103}"),
        &[("Authorization", &token_for(5002))],
    );
    let mut stays = Sse::open(
        agent.addr(),
        &target,
        &[("Authorization", &token_for(5001))],
    );
    for sse in [&mut expires, &mut removed, &mut stays] {
        assert_eq!(sse.next().event, "snapshot");
    }
    let end = expires.next();
    assert_eq!((end.event.as_str(), end.data.as_str()), ("end", "expired"));
    assert!(
        expires.next_within(Duration::from_secs(10)).is_none(),
        "the body ends"
    );

    // The access of customer 1002 leaves the directory: its stream ends at the reload.
    let mut directory: Value = serde_json::from_str(SAMPLE_DIRECTORY).unwrap();
    let accesses = directory["api_accesses"].as_array_mut().unwrap();
    accesses.retain(|a| a["id"] != 5002);
    let mut reloads = agent.agent().directory_reloads();
    let before = *reloads.borrow_and_update();
    write_file(
        &agent.config.directory.path,
        directory.to_string().as_bytes(),
    );
    agent.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|n| *n > before))
            .await
            .unwrap()
            .unwrap();
    });
    let end = removed.next();
    assert_eq!((end.event.as_str(), end.data.as_str()), ("end", "revoked"));
    // The other stream goes on: the next change reaches it.
    post_event(&agent, EVENTS[2]);
    assert_eq!(stays.next().event, "changes");
    let metrics = agent.request("GET", "/metrics", &[]).text();
    for (reason, count) in [("expired", 1.0), ("revoked", 1.0), ("slow", 0.0)] {
        let series = format!("active_calls_agent_streams_ended_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&metrics, &series), Some(count), "{series}");
    }
    assert_eq!(
        metric(
            &metrics,
            "active_calls_agent_streams_open{kind=\"customer\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn past_max_streams_the_answer_is_503() {
    let agent = TestAgent::start_with(|c| c.api.max_streams = 2);
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let token = token_for(5001);
    let auth = [("Authorization", token.as_str())];
    let mut first = Sse::open(agent.addr(), &target, &auth);
    let mut second = Sse::open(agent.addr(), &target, &auth);
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(first.next().event, "snapshot");
    assert_eq!(second.next().event, "snapshot");
    let third = Sse::open(agent.addr(), &target, &auth);
    assert_eq!(third.status, 503);
    assert!(third.header("retry-after").is_some());
    // A plain request still gets its answer.
    assert_eq!(agent.get(&format!("account-id={ACCOUNT_101}")).status, 200);
    // Once a client leaves, its turn is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = Sse::open(agent.addr(), &target, &auth);
        if again.status == 200 {
            assert_eq!(again.next().event, "snapshot");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the left stream's turn never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reader_that_stops_reading_is_ended_as_slow_and_sigterm_ends_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("scrape-tokens");
    std::fs::write(&tokens, format!("{SCRAPE_TOKEN}\n")).unwrap();
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap()
        + &format!("[upstream]\nscrape_tokens_file = {tokens:?}\n");
    std::fs::write(&config, text).unwrap();
    let mut agent = Process::start(&config);
    let auth = format!("Bearer {SCRAPE_TOKEN}");
    let mut stalled = Sse::open(agent.api, SCRAPE, &[("Authorization", &auth)]);
    let mut reading = Sse::open(agent.api, SCRAPE, &[("Authorization", &auth)]);
    assert_eq!((stalled.status, reading.status), (200, 200));
    // The stalled client never reads again; the kernel buffers fill, then its stream
    // holds what the agent queues for it, up to its bound.
    let before = agent.rss_mb();
    let mut posted = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut highest = before;
    loop {
        let body = named_snapshot(&format!("slow{}", posted % 2), 2000);
        let reply = post(agent.feed, "/", &[], &body);
        assert_eq!(reply.status, 200);
        posted += 1;
        // The reading client keeps up.
        while reading
            .next_within(Duration::from_secs(10))
            .is_some_and(|e| e.event != "changes")
        {}
        highest = highest.max(agent.rss_mb());
        let metrics = request(agent.api, "GET", "/metrics", &[]).text();
        let slow = metric(
            &metrics,
            "active_calls_agent_streams_ended_total{reason=\"slow\"}",
        );
        if slow == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled stream was not ended as slow"
        );
    }
    // Each post changed 2,000 rows (~600 KB to send) for each stream: the stalled one was
    // ended holding at most its bound, not everything posted meanwhile.
    assert!(posted >= 3, "{posted} posts");
    assert!(
        highest < before + 64.0,
        "RSS rose from {before:.1} to {highest:.1} MiB over {posted} posts"
    );
    // The stalled client, reading at last, finds the end after what it had received.
    let mut last = None;
    while let Some(event) = stalled.next_within(Duration::from_secs(30)) {
        last = Some(event);
    }
    let last = last.expect("the end event");
    assert_eq!((last.event.as_str(), last.data.as_str()), ("end", "slow"));

    // A second client stops reading, and is still stuck (behind by more than its socket
    // holds, not yet ended) when SIGTERM comes: it must not hold the stop up.
    let stuck = Sse::open(agent.api, SCRAPE, &[("Authorization", &auth)]);
    assert_eq!(stuck.status, 200);
    for i in 0..3 {
        let reply = post(
            agent.feed,
            "/",
            &[],
            &named_snapshot(&format!("stuck{i}"), 2000),
        );
        assert_eq!(reply.status, 200);
        while reading
            .next_within(Duration::from_secs(10))
            .is_some_and(|e| e.event != "changes")
        {}
    }
    // SIGTERM: the reading stream gets its end before the agent exits, within its budget.
    let stopping = Instant::now();
    agent.signal(libc::SIGTERM);
    let mut last = None;
    while let Some(event) = reading.next_within(Duration::from_secs(20)) {
        last = Some(event);
    }
    let last = last.expect("the end event");
    assert_eq!(
        (last.event.as_str(), last.data.as_str()),
        ("end", "stopping")
    );
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "{:?}",
        stopping.elapsed()
    );
    drop(stuck.socket);
}
