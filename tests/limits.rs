//! Limits that hold under abuse: huge heads, more connections than the listener takes, slow
//! clients, a flood of feed posts. Each is bounded, gets the right status, and leaves the
//! API answering.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn assert_answers(agent: &TestAgent) {
    let reply = agent.get(&format!("account-id={ACCOUNT_101}"));
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn huge_heads_get_431_and_the_api_keeps_answering() {
    let agent = TestAgent::start();
    let addr = agent.addr();
    let long_query = format!(
        "GET {ENDPOINT}?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "src-name-in-eq=x&".repeat(100_000)
    );
    let huge_cookie = format!(
        "GET {ENDPOINT} HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\n",
        "c".repeat(1 << 20)
    );
    let many_headers = format!(
        "GET {ENDPOINT} HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect::<String>()
    );
    for request in [long_query, huge_cookie, many_headers] {
        let answer = raw_exchange(addr, request.as_bytes());
        assert!(
            answer.starts_with("HTTP/1.1 431 "),
            "{}",
            &answer[..answer.len().min(200)]
        );
        assert_answers(&agent);
    }
}

#[test]
fn at_max_connections_idle_ones_make_room_and_busy_ones_get_503() {
    let agent = TestAgent::start_with(|c| {
        c.api.max_connections = 8;
        c.feed.listen = "127.0.0.1:0".into();
        c.feed.max_connections = 2;
        c.metrics.listen = "127.0.0.1:0".into();
    });
    let metrics = agent.agent().metrics_addr().unwrap();
    let series = |name: &str, listener: &str| {
        metric(
            &request(metrics, "GET", "/metrics", &[]).text(),
            &format!(r#"active_calls_agent_{name}{{listener="{listener}"}}"#),
        )
    };
    let wait_for = |name: &str, listener: &str, n: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while series(name, listener) != Some(n) {
            assert!(
                Instant::now() < deadline,
                "{name}{{{listener}}} never reached {n}"
            );
        }
    };
    // Eight kept-alive clients, each between two requests, take every slot of the API...
    let keep_alive = |stream: &mut TcpStream| {
        let head = format!(
            "GET {ENDPOINT}?account-id={ACCOUNT_101} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            token_for(5001)
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
    };
    let mut idle: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut stream = TcpStream::connect(agent.addr()).unwrap();
            keep_alive(&mut stream);
            stream
        })
        .collect();
    wait_for("http_connections", "api", 8.0);
    // ...and a customer still gets an answer: the oldest idle one makes room.
    assert_answers(&agent);
    assert_eq!(series("http_connections_evicted_total", "api"), Some(1.0));
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The oldest was closed: the rest of its answer, then the end (not the read timeout).
    idle[0].read_to_end(&mut Vec::new()).unwrap();
    idle.clear();
    wait_for("http_connections", "api", 0.0);

    // Eight silent clients that just connected may still be sending their first request:
    // they keep their slots for a grace of two seconds (a new client gets 503 meanwhile),
    // and only then make room.
    let connected = Instant::now();
    let _silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(agent.addr()).unwrap())
        .collect();
    wait_for("http_connections", "api", 8.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = agent.get(&format!("account-id={ACCOUNT_101}"));
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(Instant::now() < deadline, "the silent ones never made room");
    }
    assert!(connected.elapsed() >= Duration::from_secs(2));

    // Two snapshot uploads in progress hold both feed slots: a third gets 503.
    let feed = agent.agent().feed_addr().unwrap();
    let uploads: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut upload = TcpStream::connect(feed).unwrap();
            upload
                .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nINSERT INTO t FORMAT JSONEachRow\n")
                .unwrap();
            upload
        })
        .collect();
    wait_for("http_connections", "feed", 2.0);
    let busy = post(feed, "/", &[], &named_snapshot("C", 1));
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(series("http_connections_refused_total", "feed"), Some(1.0));
    drop(uploads);
    wait_for("http_connections", "feed", 0.0);
    assert_eq!(post(feed, "/", &[], &named_snapshot("C", 1)).status, 200);
}

#[test]
fn a_slow_client_does_not_hold_up_the_others() {
    let agent = TestAgent::start();
    let addr = agent.addr();
    let mut slow = TcpStream::connect(addr).unwrap();
    let head = format!("GET {ENDPOINT}?account-id={ACCOUNT_101} HTTP/1.1\r\nHost: x\r\n");
    // One byte at a time, while fifty other queries come and go.
    let mut sent = 0;
    for _ in 0..50 {
        if sent < head.len() {
            slow.write_all(&head.as_bytes()[sent..sent + 1]).unwrap();
            sent += 1;
        }
        assert_answers(&agent);
    }
    // The slow one is still served when it finally finishes.
    slow.write_all(&head.as_bytes()[sent..]).unwrap();
    slow.write_all(
        format!(
            "Authorization: {}\r\nConnection: close\r\n\r\n",
            token_for(5001)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[test]
fn a_flood_of_feed_posts_is_bounded_and_applies_whole_snapshots() {
    let agent = TestAgent::start_with(|c| {
        c.feed.listen = "127.0.0.1:0".into();
        c.feed.max_connections = 4;
    });
    let feed = agent.agent().feed_addr().unwrap();
    let posts: Vec<_> = (0..24)
        .map(|i| {
            std::thread::spawn(move || {
                let name = format!("S{i}");
                let reply = post(feed, "/", &[], &named_snapshot(&name, 500));
                (name, reply.status)
            })
        })
        .collect();
    // The API answers while the flood goes on.
    for _ in 0..20 {
        assert_answers(&agent);
    }
    let statuses: Vec<(String, u16)> = posts.into_iter().map(|p| p.join().unwrap()).collect();
    let applied: Vec<&String> = statuses
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(n, _)| n)
        .collect();
    assert!(
        statuses.iter().all(|(_, s)| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(!applied.is_empty(), "{statuses:?}");
    assert_eq!(
        agent.agent().feed_status().borrow().applied,
        applied.len() as u64
    );
    // The store holds one whole snapshot of those applied.
    let rows = agent.get(&format!("account-id={ACCOUNT_101}")).rows();
    assert_eq!(rows.len(), 500);
    let name = rows[0]["src_name_in"].as_str().unwrap().to_owned();
    assert!(rows.iter().all(|r| r["src_name_in"] == name.as_str()));
    assert!(applied.contains(&&name), "{name} was not answered 200");
}

#[test]
fn a_client_that_never_reads_is_closed_after_the_write_timeout() {
    let agent = TestAgent::start_with(|c| c.metrics.listen = "127.0.0.1:0".into());
    agent.feed(SAMPLE_SNAPSHOT);
    let metrics = agent.agent().metrics_addr().unwrap();
    let open = || {
        metric(
            &request(metrics, "GET", "/metrics", &[]).text(),
            r#"active_calls_agent_http_connections{listener="api"}"#,
        )
    };
    // Pipelined queries whose answers (megabytes) are never read: the agent's writes stall
    // once the socket buffers are full.
    let stream = TcpStream::connect(agent.addr()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let query = format!(
        "GET {ENDPOINT}?account-id={ACCOUNT_101} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        token_for(5001)
    );
    std::thread::spawn(move || {
        for _ in 0..20_000 {
            // Fails once the agent has closed the connection.
            if writer.write_all(query.as_bytes()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() != Some(1.0) {
        assert!(Instant::now() < deadline, "the connection was never taken");
    }
    let limit = active_calls_agent::http::WRITE_TIMEOUT + Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    while open() != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "a client that never reads is kept"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Other customers were served all along.
    assert_answers(&agent);
    drop(stream);
}

/// Sends a GET for `query` and reads its status line only.
fn begin_get(addr: SocketAddr, query: &str) -> (TcpStream, String) {
    let mut stream = active_calls_agent::lab::bench::small_buffer_connection(addr).unwrap();
    let request = format!(
        "GET {ENDPOINT}?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        token_for(5001)
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).unwrap();
    (stream, String::from_utf8_lossy(&status).into_owned())
}

/// Issue 13: slow readers of the largest answer share one copy of it, and the bytes held
/// for answers stay within `api.max_answer_bytes`: a different large answer waits its
/// turn (503, Retry-After), small ones are answered all along.
#[test]
fn slow_readers_share_one_answer_within_the_budget() {
    let agent = TestAgent::start_with(|c| {
        c.feed.listen = "127.0.0.1:0".into();
        c.api.max_answer_bytes = 16 << 20;
    });
    let feed = agent.agent().feed_addr().unwrap();
    // ~9 MB answered for the account: more than the kernel buffers of a slow reader.
    assert_eq!(
        post(feed, "/", &[], &named_snapshot("big", 16_000)).status,
        200
    );
    let all = format!("account-id={ACCOUNT_101}");
    let readers: Vec<(TcpStream, String)> = (0..5).map(|_| begin_get(agent.addr(), &all)).collect();
    for (_, status) in &readers {
        assert_eq!(
            status, "HTTP/1.1 200",
            "identical requests share the answer"
        );
    }
    // Another large answer (the calls whose src_prefix_in starts with 1: ~3,000) does not
    // fit beside the one being read.
    let other = format!("{all}&src-prefix-in-starts-with=1");
    let busy = agent.get(&other);
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert_eq!(busy.header("retry-after"), Some("1"));
    // A small answer is served meanwhile, and its ETag revalidates.
    let small = agent.get(&format!("{all}&dst-prefix-in-eq=4412345"));
    assert_eq!(small.status, 200);
    assert_eq!(small.rows().len(), 1);
    let etag = small.header("etag").unwrap().to_owned();
    let token = token_for(5001);
    let again = agent.request(
        "GET",
        &format!("{ENDPOINT}?{all}&dst-prefix-in-eq=4412345"),
        &[
            ("Authorization", token.as_str()),
            ("if-none-match", etag.as_str()),
        ],
    );
    assert_eq!(again.status, 304);
    // Once the readers are gone, the other answer goes out.
    drop(readers);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = agent.get(&other);
        if reply.status == 200 {
            assert!(reply.rows().len() > 1000);
            break;
        }
        assert_eq!(reply.status, 503);
        assert!(Instant::now() < deadline, "the budget was never given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}
