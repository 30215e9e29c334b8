//! The aggregators' scrape (SPEC 6), over real HTTP against a real agent: contents equal to
//! the union of the nodes' latest snapshots, in order; the ETag and 304; gzip; the tokens.

mod common;

use active_calls_agent::config::StaleAfter;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SCRAPE: &str = "/api/rest/node/v1/active-calls";
const SCRAPE_TOKEN: &str = "scrape-token-0123456789abcdef";
const BEARER: &str = "Bearer scrape-token-0123456789abcdef";

/// The keys a scrape row starts with, before SPEC 1.3's ([`OUTPUT_KEYS`]).
const IDENTITY_KEYS: [&str; 4] = ["node_id", "local_tag", "customer_id", "customer_acc_id"];

/// An agent with the socket source on and one scrape token.
fn start() -> TestAgent {
    start_with(|_| {})
}

fn start_with(adjust: impl FnOnce(&mut active_calls_agent::config::Config)) -> TestAgent {
    TestAgent::start_with(|c| {
        let tokens = c.directory.path.with_file_name("scrape-tokens");
        std::fs::write(&tokens, format!("# aggregators\n{SCRAPE_TOKEN}\n")).unwrap();
        c.upstream.scrape_tokens_file = tokens;
        c.feed.listen = "127.0.0.1:0".into();
        adjust(c);
    })
}

fn scrape(agent: &TestAgent, query: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("Authorization", BEARER)];
    all.extend_from_slice(headers);
    agent.request("GET", &format!("{SCRAPE}?{query}"), &all)
}

/// The rows of a JSONEachRow answer, with their keys in the order they came.
fn each_row(reply: &Reply) -> Vec<Vec<(String, Value)>> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/x-ndjson"));
    let text = reply.text();
    assert!(text.is_empty() || text.ends_with('\n'), "{text}");
    text.lines().map(ordered_object).collect()
}

/// A JSON object's members in the order of the text (serde_json's map would sort them).
fn ordered_object(text: &str) -> Vec<(String, Value)> {
    let mut members = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    struct Visit<'a>(&'a mut Vec<(String, Value)>);
    impl<'de> serde::de::Visitor<'de> for Visit<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                self.0.push((k, v));
            }
            Ok(())
        }
    }
    serde::Deserializer::deserialize_map(&mut de, Visit(&mut members)).unwrap();
    members
}

/// The sample snapshot's rows (of node 7) as node `node` sends them, keeping those `keep`
/// accepts.
fn sample_of_node(node: i64, keep: impl Fn(usize) -> bool) -> String {
    let sample_node = format!("\"node_id\":{SAMPLE_NODE},");
    let mut out = String::new();
    for (i, line) in SAMPLE_SNAPSHOT.lines().skip(1).enumerate() {
        if keep(i) {
            assert!(line.contains(&sample_node), "{line}");
            out.push_str(&line.replace(&sample_node, &format!("\"node_id\":{node},")));
            out.push('\n');
        }
    }
    out
}

fn post_snapshot(agent: &TestAgent, body: &str) {
    let feed = agent.agent().feed_addr().unwrap();
    let reply = post(
        feed,
        "/?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow",
        &[],
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// (node_id, local_tag) → (customer_id, customer_acc_id) of snapshot lines.
fn calls_of(lines: &str) -> BTreeMap<(i64, String), (i64, i64)> {
    lines
        .lines()
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            (
                (
                    row["node_id"].as_i64().unwrap(),
                    row["local_tag"].as_str().unwrap().to_owned(),
                ),
                (
                    row["customer_id"].as_i64().unwrap(),
                    row["customer_acc_id"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn a_scrape_is_the_union_of_every_nodes_latest_snapshot_in_order() {
    let agent = start();
    // Node 7 from the file, node 2 over the socket, then node 7 again with half its calls.
    agent.feed(&sample_of_node(SAMPLE_NODE, |_| true));
    let node_2 = sample_of_node(2, |i| i % 3 != 0);
    post_snapshot(&agent, &node_2);
    let node_7 = sample_of_node(SAMPLE_NODE, |i| i % 2 == 0);
    agent.feed(&node_7);

    let rows = each_row(&scrape(&agent, "", &[]));
    for row in &rows {
        let keys: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys[..4], IDENTITY_KEYS);
        assert_eq!(keys[4..], OUTPUT_KEYS);
    }
    let scraped: Vec<((i64, String), (i64, i64))> = rows
        .iter()
        .map(|row| {
            let int = |i: usize| row[i].1.as_i64().unwrap();
            (
                (int(0), row[1].1.as_str().unwrap().to_owned()),
                (int(2), int(3)),
            )
        })
        .collect();
    let mut expected = calls_of(&node_7);
    expected.extend(calls_of(&node_2));
    // BTreeMap order is (node_id, local_tag) in byte order: the scrape's order.
    let expected: Vec<_> = expected.into_iter().collect();
    assert_eq!(scraped, expected);

    // Each call shows what the customer endpoint shows of it.
    for account in [ACCOUNT_101, ACCOUNT_102] {
        let customer = agent.get(&format!("account-id={account}")).rows();
        let account_id = if account == ACCOUNT_101 { 101 } else { 102 };
        let mut from_scrape: Vec<String> = rows
            .iter()
            .filter(|row| row[3].1 == account_id)
            .map(|row| {
                let answer: serde_json::Map<String, Value> = row[4..].iter().cloned().collect();
                Value::Object(answer).to_string()
            })
            .collect();
        let mut from_customer: Vec<String> = customer.iter().map(Value::to_string).collect();
        from_scrape.sort();
        from_customer.sort();
        assert!(!from_customer.is_empty());
        assert_eq!(from_scrape, from_customer);
    }

    // The same in the JSON format.
    let json = scrape(&agent, "format=JSON", &[]);
    assert_eq!(
        json.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let body = json.json();
    assert_eq!(body["rows"], rows.len());
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), rows.len());
    assert_eq!(data[0]["local_tag"], rows[0][1].1);
}

#[test]
fn the_etag_changes_exactly_when_the_answer_does() {
    let agent = start();
    agent.feed(&sample_of_node(SAMPLE_NODE, |_| true));
    let first = scrape(&agent, "", &[]);
    let etag = first.header("etag").unwrap().to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");

    let unchanged = scrape(&agent, "", &[("If-None-Match", &etag)]);
    assert_eq!(unchanged.status, 304);
    assert!(unchanged.body.is_empty());
    assert_eq!(unchanged.header("etag"), Some(etag.as_str()));

    // The switch sends the same calls again: a new snapshot, the same answer.
    std::fs::remove_file(agent.snapshot_path()).unwrap();
    agent.feed(&sample_of_node(SAMPLE_NODE, |_| true));
    assert_eq!(
        scrape(&agent, "", &[("If-None-Match", &etag)]).status,
        304,
        "a resend of the same calls keeps the ETag"
    );

    // Another node appears: the answer changes, and so does the ETag.
    post_snapshot(&agent, &sample_of_node(2, |i| i < 3));
    let grown = scrape(&agent, "", &[("If-None-Match", &etag)]);
    assert_eq!(grown.status, 200);
    let grown_etag = grown.header("etag").unwrap().to_owned();
    assert_ne!(grown_etag, etag);
    assert_ne!(grown.body, first.body);

    // One call of node 7 changes only its rate.
    let changed_rate = sample_of_node(SAMPLE_NODE, |_| true).replacen(
        "\"destination_next_rate\":\"",
        "\"destination_next_rate\":\"9",
        1,
    );
    assert!(changed_rate.contains("\"destination_next_rate\":\"9"));
    agent.feed(&changed_rate);
    let after = scrape(&agent, "", &[("If-None-Match", &grown_etag)]);
    assert_eq!(after.status, 200);
    assert_ne!(after.header("etag"), Some(grown_etag.as_str()));

    // A call ends: the answer changes.
    let after_etag = after.header("etag").unwrap().to_owned();
    agent.feed(
        &changed_rate
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    let shrunk = scrape(&agent, "", &[("If-None-Match", &after_etag)]);
    assert_eq!(shrunk.status, 200);
    assert_eq!(each_row(&shrunk).len(), 19 + 3);
    let shrunk_etag = shrunk.header("etag").unwrap().to_owned();

    // A rejected snapshot changes nothing, the ETag included.
    let status = agent.feed("{\"node_id\": 1, \"local_tag\": \"x\"\nnot json\n");
    assert!(status.last_error.is_some());
    assert_eq!(
        scrape(&agent, "", &[("If-None-Match", &shrunk_etag)]).status,
        304
    );

    // Each format has its own ETag.
    let json_etag = scrape(&agent, "format=JSON", &[])
        .header("etag")
        .unwrap()
        .to_owned();
    assert_ne!(Some(json_etag.as_str()), after.header("etag"));
    assert_eq!(
        scrape(&agent, "format=JSON", &[("If-None-Match", &json_etag)]).status,
        304
    );
}

#[test]
fn a_database_made_anew_never_repeats_an_old_etag() {
    let mut agent = start();
    agent.feed(&sample_of_node(SAMPLE_NODE, |_| true));
    let etag = scrape(&agent, "", &[]).header("etag").unwrap().to_owned();
    // The database goes (deleted, or rebuilt for a new schema); the switch sends other calls.
    agent.agent.take().unwrap().stop();
    let store = agent.config.store.path.clone();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
    }
    std::fs::remove_file(agent.snapshot_path()).unwrap();
    agent.restart();
    agent.feed(&sample_of_node(SAMPLE_NODE, |i| i < 5));
    let reply = scrape(&agent, "", &[("If-None-Match", &etag)]);
    assert_eq!(reply.status, 200);
    assert_eq!(each_row(&reply).len(), 5);
}

#[test]
fn a_node_gone_stale_leaves_the_answer_and_changes_the_etag() {
    let agent = start_with(|c| c.feed.stale_after = StaleAfter::Seconds(5));
    post_snapshot(&agent, &sample_of_node(2, |_| true));
    let fresh = scrape(&agent, "", &[]);
    assert_eq!(each_row(&fresh).len(), 20);
    let etag = fresh.header("etag").unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = scrape(&agent, "", &[("If-None-Match", &etag)]);
        if now.status == 200 {
            assert_eq!(each_row(&now).len(), 0);
            break;
        }
        assert_eq!(now.status, 304);
        assert!(Instant::now() < deadline, "node 2 never went stale");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn gzip_is_the_same_answer_compressed() {
    let agent = start();
    agent.feed(&sample_of_node(SAMPLE_NODE, |_| true));
    post_snapshot(&agent, &sample_of_node(2, |_| true));
    for format in ["", "format=JSON"] {
        let plain = scrape(&agent, format, &[]);
        let gzipped = scrape(&agent, format, &[("Accept-Encoding", "br, gzip")]);
        assert_eq!(gzipped.status, 200);
        assert_eq!(gzipped.header("content-encoding"), Some("gzip"));
        assert_eq!(gzipped.header("vary"), Some("Accept-Encoding"));
        assert_eq!(gzipped.header("etag"), plain.header("etag"));
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&gzipped.body[..])
            .read_to_end(&mut unpacked)
            .unwrap();
        assert!(gzipped.body.len() < plain.body.len());
        assert_eq!(unpacked, plain.body);
        assert_eq!(plain.header("content-encoding"), None);
    }
    let refused = scrape(&agent, "", &[("Accept-Encoding", "gzip;q=0")]);
    assert_eq!(refused.header("content-encoding"), None);
}

#[test]
fn only_listed_tokens_may_scrape() {
    let agent = start();
    agent.feed(SAMPLE_SNAPSHOT);
    let with = |headers: &[(&str, &str)]| agent.request("GET", SCRAPE, headers);

    let customer = with(&[("Authorization", &token_for(5001))]);
    assert_eq!(customer.status, 403);
    assert_eq!(
        customer.json(),
        serde_json::json!({"error": "a customer token may not scrape the node"})
    );
    for headers in [
        vec![],
        vec![("Authorization", "Bearer not-the-token")],
        vec![("Authorization", "Bearer scrape-token-0123456789abcde")],
        vec![("Authorization", SCRAPE_TOKEN)],
        vec![("Authorization", "Bearer # aggregators")],
        vec![("Authorization", "Basic c2NyYXBlOg==")],
    ] {
        let refused = with(&headers);
        assert_eq!(refused.status, 401, "{headers:?}");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            refused.json(),
            serde_json::json!({"error": "a scrape token is required"})
        );
    }
    let lower_case = format!("bearer  {SCRAPE_TOKEN}");
    assert_eq!(with(&[("Authorization", &lower_case)]).status, 200);

    // A customer token never reads other customers' calls through the scrape, even in a
    // query string that asks for it.
    let sneaky = agent.request(
        "GET",
        &format!("{SCRAPE}?format=JSON&account-id={ACCOUNT_103}"),
        &[("Authorization", &token_for(5001))],
    );
    assert_eq!(sneaky.status, 403);

    // Bad formats, after authentication.
    for bad in ["format=CSV", "format=json", "format=", "format=JSON%00"] {
        let reply = scrape(&agent, bad, &[]);
        assert_eq!(reply.status, 400, "{bad}");
        assert_eq!(
            reply.json(),
            serde_json::json!({"error": "invalid value format"})
        );
    }
    assert_eq!(
        agent
            .request("POST", SCRAPE, &[("Authorization", BEARER)])
            .status,
        405
    );
}

#[test]
fn without_a_tokens_file_nobody_scrapes_and_a_reload_lets_them_in() {
    let mut agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let scrape_now = |agent: &TestAgent| agent.request("GET", SCRAPE, &[("Authorization", BEARER)]);
    assert_eq!(scrape_now(&agent).status, 401);
    assert_eq!(
        agent
            .request("GET", SCRAPE, &[("Authorization", &token_for(5001))])
            .status,
        403
    );
    let tokens = agent.dir.path().join("tokens");
    std::fs::write(&tokens, format!("{SCRAPE_TOKEN}\n")).unwrap();
    agent.config.upstream.scrape_tokens_file = tokens.clone();
    agent.agent().reload(&agent.config);
    assert_eq!(scrape_now(&agent).status, 200);
    // An unreadable file afterwards: nobody, rather than the old list.
    std::fs::remove_file(&tokens).unwrap();
    agent.agent().reload(&agent.config);
    assert_eq!(scrape_now(&agent).status, 401);
}

#[test]
fn head_and_an_empty_node_answer_like_get() {
    let agent = start();
    let empty = scrape(&agent, "", &[]);
    assert_eq!(each_row(&empty).len(), 0);
    assert_eq!(
        scrape(&agent, "format=JSON", &[]).json(),
        serde_json::json!({"data": [], "rows": 0})
    );
    agent.feed(SAMPLE_SNAPSHOT);
    let get = scrape(&agent, "", &[]);
    let head = agent.request("HEAD", SCRAPE, &[("Authorization", BEARER)]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("etag"), get.header("etag"));
    assert_eq!(head.header("content-type"), get.header("content-type"));
}

/// Posts a snapshot of `calls` calls of node 3 with ~1 KB rows: ~`calls` KB of answer.
fn post_big_node(agent: &TestAgent, calls: usize) {
    let mut big = String::new();
    for i in 0..calls {
        let row = serde_json::json!({"node_id": 3, "local_tag": format!("big-{i:05}"),
            "customer_id": 1001, "customer_acc_id": 101, "start_time": "2025-11-25 10:00:00",
            "src_name_in": "x".repeat(500)});
        big.push_str(&format!("{row}\n"));
    }
    post_snapshot(agent, &big);
}

/// Starts a scrape and reads only its status line, from a socket with a small receive
/// buffer: the agent's sending side then fills and waits, mid-answer.
fn stalled_scrape(agent: &TestAgent) -> TcpStream {
    use std::os::fd::AsRawFd;
    let mut stalled = TcpStream::connect(agent.addr()).unwrap();
    let size: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int, on a socket
    // this function owns.
    let set = unsafe {
        libc::setsockopt(
            stalled.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    write!(
        stalled,
        "GET {SCRAPE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {BEARER}\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 12];
    stalled.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    stalled
}

#[test]
fn scrapes_that_stop_reading_hold_up_neither_snapshots_nor_customers() {
    let agent = start();
    // ~8 MB of answer: more than the agent's socket buffer and its chunks in flight.
    post_big_node(&agent, 8000);
    let etag = scrape(&agent, "", &[("If-None-Match", "x")])
        .header("etag")
        .unwrap()
        .to_owned();
    let stalled = [stalled_scrape(&agent), stalled_scrape(&agent)];

    // Their readers wait on their clients, mid-transaction; snapshots still apply.
    let mut status = agent.agent().feed_status();
    let before = status.borrow_and_update().applied;
    post_snapshot(&agent, &sample_of_node(SAMPLE_NODE, |_| true));
    agent.wait_for(&mut status, |s| s.applied > before);
    assert_eq!(agent.get(&format!("account-id={ACCOUNT_101}")).status, 200);

    // Their reads wait on their clients a second at most, then read on into memory: the
    // turns come back while the clients still stall, and a full scrape gets the new state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let reply = scrape(&agent, "", &[("If-None-Match", &etag)]);
        if reply.status == 200 {
            break each_row(&reply);
        }
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("retry-after"), Some("5"));
        assert!(Instant::now() < deadline, "the turns never came back");
    };
    assert_eq!(rows.len(), 8020);
    let head = agent.request("HEAD", SCRAPE, &[("Authorization", BEARER)]);
    let new_etag = head.header("etag").unwrap().to_owned();
    assert_ne!(new_etag, etag);
    assert_eq!(
        scrape(&agent, "", &[("If-None-Match", &new_etag)]).status,
        304
    );

    // The stalled clients read at last: each gets its answer whole, of the state it began
    // on.
    for mut client in stalled {
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let body = String::from_utf8(dechunked(&rest[head_end + 4..])).unwrap();
        assert_eq!(body.lines().count(), 8000);
    }
}

#[test]
fn a_streaming_scrape_is_never_evicted_for_a_new_connection() {
    let agent = start_with(|c| c.api.max_connections = 1);
    post_big_node(&agent, 3000);
    let mut stalled = stalled_scrape(&agent);
    // The one slot is busy streaming: a customer gets 503 rather than cutting it.
    let customer = agent.get(&format!("account-id={ACCOUNT_101}"));
    assert_eq!(customer.status, 503);
    // The scrape goes on to its end, whole.
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).unwrap();
    let mut whole = b"HTTP/1.1 200".to_vec();
    whole.extend_from_slice(&rest);
    let head_end = whole.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let body = String::from_utf8(dechunked(&whole[head_end + 4..])).unwrap();
    assert_eq!(body.lines().count(), 3000);
}

#[test]
fn check_names_a_missing_or_weak_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let tokens = dir.path().join("scrape-tokens");
    let with_tokens = |content: Option<&str>| {
        match content {
            Some(content) => std::fs::write(&tokens, content).unwrap(),
            None => {
                let _ = std::fs::remove_file(&tokens);
            }
        }
        let mut text = std::fs::read_to_string(&config).unwrap();
        if !text.contains("[upstream]") {
            text.push_str(&format!("[upstream]\nscrape_tokens_file = {tokens:?}\n"));
            std::fs::write(&config, text).unwrap();
        }
        check(&config)
    };
    let (ok, text) = with_tokens(Some(&format!("{SCRAPE_TOKEN}\n")));
    assert!(ok, "{text}");
    assert!(text.contains("scrape-tokens: 1 token(s)"), "{text}");
    let (ok, text) = with_tokens(Some("short\n"));
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: a scrape token is shorter"),
        "{text}"
    );
    let (ok, text) = with_tokens(Some("# none yet\n"));
    assert!(ok, "{text}");
    assert!(text.contains("lists no token"), "{text}");
    let (ok, text) = with_tokens(None);
    assert!(!ok, "{text}");
    assert!(
        text.contains("error: reading upstream.scrape_tokens_file"),
        "{text}"
    );
}
