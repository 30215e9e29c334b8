//! The operator's endpoints from outside: `/metrics` as Prometheus scrapes it, `/healthz`
//! and `/readyz`, and a graceful stop that answers the request already begun.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use std::path::Path;

use common::*;
use serde_json::json;

fn scrape(agent: &TestAgent) -> String {
    let reply = agent.request("GET", "/metrics", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        reply.headers
    );
    reply.text()
}

fn socket_body(node: i64, tags: &[&str], extra_lines: &str) -> Vec<u8> {
    let mut body = "INSERT INTO active_calls FORMAT JSONEachRow\n".to_string();
    for tag in tags {
        let row = json!({"node_id": node, "local_tag": tag, "customer_id": 1001,
            "customer_acc_id": 101, "start_time": "2025-11-25 10:00:00"});
        body.push_str(&format!("{row}\n"));
    }
    body.push_str(extra_lines);
    body.into_bytes()
}

#[test]
fn metrics_follow_snapshots_requests_and_reloads() {
    let agent = TestAgent::start_with(|c| c.feed.listen = "127.0.0.1:0".into());
    let feed = agent.agent().feed_addr().unwrap();
    let text = scrape(&agent);
    assert_eq!(
        metric(&text, r#"active_calls_agent_calls{node_id="7"}"#),
        None
    );
    assert_eq!(
        metric(
            &text,
            r#"active_calls_agent_directory_loads_total{result="ok"}"#
        ),
        Some(1.0)
    );
    // Counters an alert takes `increase()` of are there at 0 before their first event,
    // which the alert would otherwise miss.
    for source in ["file", "socket"] {
        for result in ["applied", "rejected"] {
            let series = format!(
                "active_calls_agent_snapshots_total{{source=\"{source}\",result=\"{result}\"}}"
            );
            assert_eq!(metric(&text, &series), Some(0.0), "{series}");
        }
        let series = format!("active_calls_agent_rows_skipped_total{{source=\"{source}\"}}");
        assert_eq!(metric(&text, &series), Some(0.0), "{series}");
    }

    // The file: the sample snapshot of node 7.
    agent.feed(SAMPLE_SNAPSHOT);
    // A socket snapshot of node 2: two calls and a row with a bad value, skipped.
    let bad_row = r#"{"node_id": 2, "local_tag": "bad", "customer_acc_id": "x"}"#;
    let reply = post(
        feed,
        "/",
        &[],
        &socket_body(2, &["a", "b"], &format!("{bad_row}\n")),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    // A snapshot that is not JSON rows: rejected whole.
    let reply = post(feed, "/", &[], b"INSERT INTO t FORMAT JSONEachRow\n[1]\n");
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(agent.get(&format!("account-id={ACCOUNT_101}")).status, 200);

    let text = scrape(&agent);
    let expect = [
        (r#"active_calls_agent_calls{node_id="7"}"#, 20.0),
        (r#"active_calls_agent_calls{node_id="2"}"#, 2.0),
        (
            r#"active_calls_agent_snapshots_total{source="file",result="applied"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_snapshots_total{source="socket",result="applied"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_snapshots_total{source="socket",result="rejected"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_rows_skipped_total{source="socket"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_apply_duration_seconds_count{source="socket"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_http_requests_total{listener="api",route="/api/rest/customer/v1/outgoing-active-calls",status="200"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_http_requests_total{listener="feed",route="/",status="400"}"#,
            1.0,
        ),
        (
            r#"active_calls_agent_http_requests_total{listener="api",route="/metrics",status="200"}"#,
            1.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    let age = metric(
        &text,
        r#"active_calls_agent_snapshot_age_seconds{node_id="2"}"#,
    )
    .expect("node 2's snapshot age");
    assert!((0.0..60.0).contains(&age), "age {age}");

    // A directory file that is not JSON is counted as a failed load.
    let mut reloads = agent.agent().directory_reloads();
    reloads.borrow_and_update();
    write_file(&agent.config.directory.path, b"{not json");
    agent.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), reloads.changed())
            .await
            .expect("reread within 10 s")
            .unwrap();
    });
    let text = scrape(&agent);
    assert_eq!(
        metric(
            &text,
            r#"active_calls_agent_directory_loads_total{result="failed"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn health_and_readiness() {
    let agent = TestAgent::start();
    let healthz = agent.request("GET", "/healthz", &[]);
    assert_eq!((healthz.status, healthz.text().as_str()), (200, "ok\n"));
    let readyz = agent.request("GET", "/readyz", &[]);
    assert_eq!((readyz.status, readyz.text().as_str()), (200, "ready\n"));
    assert_eq!(agent.request("HEAD", "/readyz", &[]).status, 200);
    let post = agent.request("POST", "/readyz", &[]);
    assert_eq!(post.status, 405);
}

#[test]
fn not_ready_says_why() {
    let agent = TestAgent::start_with(|c| {
        c.api.jwt_secret = None;
        c.directory.path = c.directory.path.with_file_name("missing.json");
    });
    let readyz = agent.request("GET", "/readyz", &[]);
    assert_eq!(readyz.status, 503, "{}", readyz.text());
    let text = readyz.text();
    assert!(text.starts_with("not ready:\n"), "{text}");
    assert!(text.contains("no JWT secret configured"), "{text}");
    assert!(text.contains("directory file has not been read"), "{text}");
    // Alive all the same.
    assert_eq!(agent.request("GET", "/healthz", &[]).status, 200);

    // The directory appears: one reason left.
    let mut reloads = agent.agent().directory_reloads();
    reloads.borrow_and_update();
    write_file(&agent.config.directory.path, SAMPLE_DIRECTORY.as_bytes());
    agent.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), reloads.changed())
            .await
            .expect("read within 10 s")
            .unwrap();
    });
    let text = agent.request("GET", "/readyz", &[]).text();
    assert!(!text.contains("directory"), "{text}");
    assert!(text.contains("no JWT secret configured"), "{text}");
}

#[test]
fn a_separate_metrics_listener_keeps_metrics_off_the_api() {
    let agent = TestAgent::start_with(|c| c.metrics.listen = "127.0.0.1:0".into());
    let metrics = agent.agent().metrics_addr().expect("metrics listener");
    assert_eq!(agent.request("GET", "/metrics", &[]).status, 404);
    assert_eq!(agent.request("GET", "/readyz", &[]).status, 200);

    let reply = request(metrics, "GET", "/metrics", &[]);
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .text()
            .contains("active_calls_agent_http_requests_total")
    );
    assert_eq!(request(metrics, "GET", "/readyz", &[]).status, 200);
    let customer = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let token = token_for(5001);
    let reply = request(metrics, "GET", &customer, &[("Authorization", &token)]);
    assert_eq!(
        reply.status, 404,
        "no customer answers on the metrics listener"
    );
}

#[test]
fn a_stop_answers_the_request_already_begun() {
    // Scrapes go to a listener of their own, so the API's connection count is ours alone.
    let mut agent = TestAgent::start_with(|c| c.metrics.listen = "127.0.0.1:0".into());
    let metrics = agent.agent().metrics_addr().unwrap();
    agent.feed(SAMPLE_SNAPSHOT);
    let addr = agent.addr();
    let token = token_for(5001);
    let head = format!(
        "GET {ENDPOINT}?account-id={ACCOUNT_101} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
    );
    // Half a request is on the wire when the stop begins: on a new connection, and on a
    // kept-alive one after a first answer.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(format!("{head}\r\n").as_bytes()).unwrap();
    let first = read_reply(&mut kept);
    assert_eq!(first.status, 200, "{}", first.text());
    kept.write_all(head.as_bytes()).unwrap();
    // Until the server has accepted it, the connection waits in the kernel's backlog,
    // which the closing listener would reset: wait until the metrics count it.
    let open = r#"active_calls_agent_http_connections{listener="api"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&request(metrics, "GET", "/metrics", &[]).text(), open) != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "the connection was never accepted"
        );
    }

    let running = agent.agent.take().unwrap();
    let stopping = agent.runtime.spawn(running.shutdown());
    // New connections are refused once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "the listener still accepts");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !stopping.is_finished(),
        "the stop waits for the begun request"
    );

    for (which, stream) in [("new", &mut stream), ("kept-alive", &mut kept)] {
        stream.write_all(b"\r\n").unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{which}: {text}");
        assert!(text.contains(r#""rows":"#), "a whole body: {text}");
    }
    agent
        .runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), stopping).await })
        .expect("the stop ends once the request is answered")
        .unwrap();
}

/// The process metrics every exporter has, under their standard names, and the store's
/// size: what the operator's dashboards expect to find.
#[test]
fn standard_process_metrics_and_the_store_size() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    // The test process is the agent's process here. It may not have used one clock tick
    // of CPU yet (a counter of 0 is then right): it works until it has, and the counter
    // must then lie between the kernel's figures before and after the scrape.
    let own_cpu = || {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
    };
    let mut spin = 0u64;
    while own_cpu() == 0.0 {
        spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(1));
    }
    let cpu_before = own_cpu();
    let text = scrape(&agent);
    let cpu_after = own_cpu();
    let value =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e10, "{rss}");
    let cpu = value("process_cpu_seconds_total");
    assert!(
        cpu > 0.0 && (cpu_before..=cpu_after).contains(&cpu),
        "{cpu_before} <= {cpu} <= {cpu_after}"
    );
    assert!(value("process_open_fds") >= 3.0);
    let started = value("process_start_time_seconds");
    let now = unix_now() as f64;
    assert!(
        // btime has whole seconds, and unix_now() truncates: a second or two either way.
        started <= now + 2.0 && started > now - 3600.0,
        "{started} vs {now}"
    );
    assert!(value("active_calls_agent_store_bytes") > 4096.0);
    for family in [
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_cpu_seconds counter",
        "# TYPE process_open_fds gauge",
        "# TYPE process_start_time_seconds gauge",
    ] {
        assert!(text.contains(family), "{family}");
    }
    assert!(text.trim_end().ends_with("# EOF"), "one EOF, at the end");
    assert_eq!(text.matches("# EOF").count(), 1);
}

/// Issue 14: a 401 says nothing to the client, but the operator can tell why: each reason
/// is counted, and logged (rate-limited) without the token.
#[test]
fn refusals_are_counted_and_logged_by_reason_never_with_the_token() {
    let agent = TestAgent::start();
    let refusals = |text: &str, reason: &str| {
        metric(
            text,
            &format!("active_calls_agent_auth_refusals_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or_else(|| panic!("no series for {reason}"))
    };
    let before = scrape(&agent);
    let future = unix_now() + 3600;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no_token", None),
        ("malformed", Some("not-a-jwt".into())),
        (
            "bad_signature",
            Some(sign_with(
                &json!({"aud": ["customer-v1"], "sub": 5001}),
                b"another secret",
            )),
        ),
        (
            "wrong_audience",
            Some(sign(&json!({"aud": ["admin"], "sub": 5001}))),
        ),
        (
            "expired",
            Some(sign(
                &json!({"aud": ["customer-v1"], "sub": 5001, "exp": 1_000_000}),
            )),
        ),
        (
            "unknown_access",
            Some(sign(&json!({"aud": ["customer-v1"], "sub": 999_999}))),
        ),
        (
            "unknown_customer",
            Some(sign(
                &json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 424_242}, "exp": future}),
            )),
        ),
    ];
    for (reason, token) in &cases {
        let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("Authorization", t)])
            .unwrap_or_default();
        let reply = agent.request("GET", &target, &headers);
        assert_eq!(reply.status, 401, "{reason}");
        assert!(reply.body.is_empty(), "{reason}: the client learns nothing");
    }
    let after = scrape(&agent);
    for (reason, _) in &cases {
        assert_eq!(
            refusals(&after, reason) - refusals(&before, reason),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(refusals(&after, "no_secret"), 0.0);

    // The real binary's log: the reason, never the token.
    let dir = tempfile::tempdir().unwrap();
    let process = Process::start(&write_process_config(dir.path(), ""));
    let forged = sign_with(&json!({"aud": ["customer-v1"], "sub": 5001}), b"forged");
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let reply = request(process.api, "GET", &target, &[("Authorization", &forged)]);
    assert_eq!(reply.status, 401);
    let line = process.wait_log("request refused: 401");
    assert!(line.contains("reason=\"bad_signature\""), "{line}");
    assert!(
        !line.contains(&forged) && !line.contains(forged.split('.').nth(1).unwrap()),
        "{line}"
    );
    process.kill();
}

/// `token --access-id N` for an N the directory does not have: the token is printed, and
/// a warning says the agent would refuse it.
#[test]
fn a_token_for_an_unknown_access_is_printed_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let token = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
            .args([
                "token",
                "--config",
                config.to_str().unwrap(),
                "--access-id",
                id,
            ])
            .output()
            .unwrap()
    };
    let known = token("5001");
    assert!(known.status.success());
    assert!(
        known.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&known.stderr)
    );
    let unknown = token("999999");
    assert!(unknown.status.success());
    assert_eq!(
        String::from_utf8_lossy(&unknown.stdout)
            .matches('.')
            .count(),
        2
    );
    let warning = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        warning.contains("warning: API access 999999 is not in the directory"),
        "{warning}"
    );
}

/// `check` binds each listen address as serve would: one held by another program is
/// said (a warning, since on a live node it is the agent's own), one this host does not
/// have is an error.
#[test]
fn check_tries_the_listen_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "listen = \"127.0.0.1:0\"\njwt",
        &format!("listen = \"127.0.0.1:{port}\"\njwt"),
    );
    std::fs::write(&config, &text).unwrap();
    let (_, report) = check(&config);
    assert!(
        report.contains(&format!(
            "warning: api.listen = 127.0.0.1:{port} is in use now"
        )),
        "{report}"
    );
    std::fs::write(
        &config,
        text.replace(&format!("127.0.0.1:{port}"), "192.0.2.1:8080"),
    )
    .unwrap();
    let (ok, report) = check(&config);
    assert!(
        !ok && report.contains("error: api.listen = 192.0.2.1:8080: cannot listen"),
        "{report}"
    );
    drop(held);
}

/// `check` gives serve's verdicts: a watched file whose folder is missing is a warning
/// (serve starts and watches it once it appears); a spool folder that cannot be made is
/// an error (the relay would not start), even where access(2) says a root user could.
#[test]
fn check_says_what_serve_would_do_with_folders() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let base = std::fs::read_to_string(&config).unwrap();
    let missing = dir.path().join("not-yet").join("snapshot.jsonl");
    std::fs::write(
        &config,
        base.replace(
            &format!("watch = {:?}", dir.path().join("snapshot.jsonl")),
            &format!("watch = {missing:?}"),
        ) + "[upstream]\nclickhouse_urls = [\"http://ch:8123/\"]\nspool_dir = \"/proc/nope\"\n",
    )
    .unwrap();
    let (ok, report) = check(&config);
    assert!(!ok, "{report}");
    assert!(
        report.contains("warning: feed.watch") && report.contains("does not exist yet"),
        "{report}"
    );
    assert!(
        report.contains("error: upstream.spool_dir /proc/nope: cannot be created"),
        "{report}"
    );
    assert!(!Path::new("/proc/nope").exists());
}
