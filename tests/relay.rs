//! The relay checked from outside: snapshots posted to the agent and written to its file,
//! received by an HTTP server in the test that plays the central ClickHouse: it takes
//! inserts, fails, goes away, refuses one snapshot, or never answers.
//!
//! Nothing here sleeps to synchronise: every wait polls something observable (what the
//! fake received, a metric, a file count) against a generous deadline, and the agent's
//! retry wait is shortened with `upstream.retry_max_ms`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use active_calls_agent::config::Config;
use common::*;
use serde_json::json;
use tokio_rustls::rustls;

/// Generous: the machine has two cores, shared.
const DEADLINE: Duration = Duration::from_secs(60);
const QUERY: &str = "INSERT INTO active_calls FORMAT JSONEachRow";
const POISON: &str = "POISON";

// --- The fake ClickHouse ------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Store inserts (deduplicated by token, as ClickHouse does) and answer 200.
    Accept,
    /// Answer every insert with this status.
    Fail(u16),
    /// Read the insert and never answer.
    Hang,
    /// An older ClickHouse (before 22.2): refuses `insert_deduplication_token` as it does,
    /// stores what comes without it.
    Old,
    /// Answer every insert with this status and text (a ClickHouse exception).
    Refuse(u16, &'static str),
}

/// One insert as the fake received it.
#[derive(Debug, Clone)]
struct Insert {
    path: String,
    params: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    /// The body, gunzipped.
    rows: String,
}

impl Insert {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn token(&self) -> &str {
        self.param("insert_deduplication_token").unwrap_or("")
    }
}

struct State {
    mode: Mode,
    /// Every insert answered 2xx that was not a duplicate, in order.
    stored: Vec<Insert>,
    /// Inserts answered 2xx whose token was stored already (ClickHouse drops them).
    duplicates: Vec<Insert>,
    /// Every answer given, in order: (status, token).
    answers: Vec<(u16, String)>,
    /// Connections of [`Mode::Hang`], held open.
    hung: Vec<Box<dyn Send>>,
}

/// An HTTP server that plays ClickHouse's insert interface, on a std listener.
struct FakeClickHouse {
    port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeClickHouse {
    fn start(mode: Mode) -> FakeClickHouse {
        let state = Arc::new(Mutex::new(State {
            mode,
            stored: Vec::new(),
            duplicates: Vec::new(),
            answers: Vec::new(),
            hung: Vec::new(),
        }));
        Self::listen(0, state, None)
    }

    /// The same over TLS, with this server configuration (certificate and key).
    fn start_tls(mode: Mode, tls: Arc<rustls::ServerConfig>) -> FakeClickHouse {
        let fake = Self::start(mode);
        let (port, state) = (fake.port, fake.state.clone());
        drop(fake);
        Self::listen(port, state, Some(tls))
    }

    fn listen(
        port: u16,
        state: Arc<Mutex<State>>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeClickHouse {
        // The port of a fake that went down is free again at once (std sets SO_REUSEADDR).
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("the fake binds");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (state, stop, server_tls) = (state.clone(), stop.clone(), tls.clone());
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        let (state, tls) = (state.clone(), server_tls.clone());
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                        std::thread::spawn(move || match tls {
                            None => serve(stream, &state),
                            Some(tls) => {
                                let Ok(session) = rustls::ServerConnection::new(tls) else {
                                    return;
                                };
                                serve(rustls::StreamOwned::new(session, stream), &state)
                            }
                        });
                    }
                }
            }
        });
        FakeClickHouse {
            port,
            tls,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL to configure, with parameters of its own that must reach ClickHouse.
    fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/?database=yeti&max_insert_block_size=5000",
            self.port
        )
    }

    /// The metrics' `url` label of [`url`](Self::url).
    fn label(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Closes the listener: connections are refused until [`up`](Self::up).
    fn down(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept
            thread.join().unwrap();
        }
    }

    /// Listens again on the same port, with the same record.
    fn up(&mut self) {
        self.down();
        *self = Self::listen(self.port, self.state.clone(), self.tls.clone());
    }

    fn stored(&self) -> Vec<Insert> {
        self.state.lock().unwrap().stored.clone()
    }

    fn answers(&self) -> Vec<(u16, String)> {
        self.state.lock().unwrap().answers.clone()
    }

    /// Polls until `n` inserts are stored; returns them.
    fn wait_stored(&self, n: usize) -> Vec<Insert> {
        eventually(&format!("{n} inserts stored"), || {
            let stored = self.stored();
            (stored.len() >= n).then_some(stored)
        })
    }
}

impl Drop for FakeClickHouse {
    fn drop(&mut self) {
        self.down();
    }
}

/// Reads one request, answers it as the mode says, and closes.
fn serve<S: Read + Write + Send + 'static>(stream: S, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // the wake-up connection of down(), or a client that gave up
    }
    let target = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let gzip = headers
        .iter()
        .any(|(n, v)| n == "content-encoding" && v == "gzip");
    let mut rows = String::new();
    if gzip {
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut rows)
            .expect("a gzip body");
    } else {
        rows = String::from_utf8(body).unwrap();
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let insert = Insert {
        path: path.to_owned(),
        params: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(decode_pair)
            .collect(),
        headers,
        rows,
    };

    let mut state = state.lock().unwrap();
    let (status, text) = match state.mode {
        Mode::Hang => {
            state.hung.push(Box::new(reader.into_inner()));
            return;
        }
        Mode::Fail(status) => (
            status,
            "Code: 242. DB::Exception: Table is in readonly mode",
        ),
        Mode::Refuse(status, text) => (status, text),
        Mode::Old if insert.param("insert_deduplication_token").is_some() => (
            404,
            "Code: 115, e.displayText() = DB::Exception: Unknown setting insert_deduplication_token, e.what() = DB::Exception",
        ),
        Mode::Old => {
            state.stored.push(insert.clone());
            (200, "")
        }
        Mode::Accept if insert.rows.contains(POISON) => (
            400,
            "Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'POISON'",
        ),
        Mode::Accept => {
            let token = insert.token().to_owned();
            match state.stored.iter().find(|s| s.token() == token) {
                Some(_) => state.duplicates.push(insert.clone()),
                None => state.stored.push(insert.clone()),
            }
            (200, "")
        }
    };
    state.answers.push((status, insert.token().to_owned()));
    drop(state);
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.flush();
}

fn decode_pair(pair: &str) -> (String, String) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    (decode(name), decode(value))
}

// --- Helpers ------------------------------------------------------------------------

/// Polls `check` every 20 ms until it gives a value, or fails after [`DEADLINE`].
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rows of a snapshot of node 1 named `name`: every key a switch sends that the agent
/// does not read stays, and one row the agent skips (no customer) is in it too.
fn rows(name: &str, calls: usize) -> String {
    let mut text = String::new();
    for i in 0..calls {
        let row = json!({"node_id": 1, "local_tag": format!("{name}-{i}"), "customer_id": 1001,
            "customer_acc_id": 101, "start_time": "2025-11-25 10:00:00",
            "snapshot_timestamp": "2025-11-25 14:30:00", "src_name_in": name,
            "legA_remote_ip": "192.168.0.1", "term_call_id": format!("t-{name}-{i}"),
            "noise": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))});
        text.push_str(&format!("{row}\n"));
    }
    text.push_str(&format!(
        "{}\n",
        json!({"node_id": 1, "local_tag": format!("{name}-skipped"), "start_time": "2025-11-25 10:00:00"})
    ));
    text
}

/// The token the agent must send for `rows` of node 1.
fn token_of(rows: &str) -> String {
    format!("n1-{:032x}", xxhash_rust::xxh3::xxh3_128(rows.as_bytes()))
}

/// The agent's spool folder in a [`TestAgent`] configuration: beside its store.
fn spool_dir(config: &Config) -> PathBuf {
    config.store.path.parent().unwrap().join("spool")
}

fn start_relaying(fake: &FakeClickHouse, adjust: impl FnOnce(&mut Config)) -> TestAgent {
    let url = fake.url();
    TestAgent::start_with(move |c| {
        c.feed.listen = "127.0.0.1:0".into();
        c.upstream.clickhouse_urls = vec![url];
        c.upstream.spool_dir = spool_dir(c);
        c.upstream.retry_max_ms = 100;
        adjust(c);
    })
}

/// POSTs a body to the agent's socket source as the switch does: the INSERT line first.
fn post_snapshot(feed: std::net::SocketAddr, rows: &str) {
    let reply = post(feed, "/", &[], format!("{QUERY}\n{rows}").as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
}

fn metrics_of(addr: std::net::SocketAddr) -> String {
    request(addr, "GET", "/metrics", &[]).text()
}

/// The value of relay series `name` for URL label `url` (0 when absent).
fn relay_metric(text: &str, name: &str, url: &str) -> f64 {
    let series = format!("active_calls_agent_{name}{{url=\"{url}\"}}");
    metric(text, &series).unwrap_or(0.0)
}

/// The compressed snapshots in the (only) URL folder of `spool`, and their total size.
fn spooled(spool: &Path) -> (usize, u64) {
    let mut found = (0, 0);
    for dir in std::fs::read_dir(spool).unwrap().flatten() {
        if dir.path().join("url").exists() {
            let (files, bytes) = files_in(&dir.path(), ".jsonl.gz");
            found = (found.0 + files, found.1 + bytes);
        }
    }
    found
}

/// The spool folder of the URL labelled `label` (its `url` file names it).
fn url_folder(spool: &Path, label: &str) -> PathBuf {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .find(|d| std::fs::read_to_string(d.join("url")).is_ok_and(|u| u.trim() == label))
        .unwrap_or_else(|| panic!("no spool folder for {label}"))
}

/// The files of `dir` whose names end with `suffix`, and their total size (none when
/// `dir` is not a folder).
fn files_in(dir: &Path, suffix: &str) -> (usize, u64) {
    let mut found = (0, 0);
    for file in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if file.file_name().to_string_lossy().ends_with(suffix) {
            found.0 += 1;
            found.1 += file.metadata().map_or(0, |m| m.len());
        }
    }
    found
}

/// The `src_name_in` of every call of account 101 the agent serves now.
fn served_names(agent: &TestAgent) -> Vec<String> {
    agent
        .get(&format!("account-id={ACCOUNT_101}"))
        .rows()
        .iter()
        .map(|r| r["src_name_in"].as_str().unwrap().to_owned())
        .collect()
}

/// The value of an unlabelled series of the agent (0 when absent).
fn plain_metric(text: &str, name: &str) -> f64 {
    metric(text, &format!("active_calls_agent_{name}")).unwrap_or(0.0)
}

fn tokens(inserts: &[Insert]) -> Vec<String> {
    inserts.iter().map(|i| i.token().to_owned()).collect()
}

// --- Tests --------------------------------------------------------------------------

#[test]
fn every_applied_snapshot_arrives_once_in_order_as_the_switch_sent_it() {
    let fake = FakeClickHouse::start(Mode::Accept);
    let url = fake.label();
    let agent = start_relaying(&fake, |c| {
        c.upstream.user = "relay".into();
        c.upstream.password = "s3cret".into();
    });
    let feed = agent.agent().feed_addr().unwrap();

    // A posted snapshot with its INSERT line; a rejected one; a file; a gzip post with the
    // query in the URL; an empty file (no rows: nothing to insert).
    let a = rows("A", 3);
    post_snapshot(feed, &a);
    let rejected = post(
        feed,
        "/",
        &[],
        format!("{QUERY}\n{}[1]\n", rows("X", 1)).as_bytes(),
    );
    assert_eq!(rejected.status, 400);
    let b = rows("B", 2);
    agent.feed(&b);
    let c = rows("C", 4);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(c.as_bytes()).unwrap();
    let target = "/?query=INSERT%20INTO%20active_calls%20FORMAT%20JSONEachRow";
    let reply = post(
        feed,
        target,
        &[("Content-Encoding", "gzip")],
        &gz.finish().unwrap(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    agent.feed("");

    let stored = fake.wait_stored(3);
    for (insert, sent) in stored.iter().zip([&a, &b, &c]) {
        assert_eq!(
            &insert.rows, sent,
            "the rows exactly as sent, without the INSERT line"
        );
        assert_eq!(insert.path, "/");
        assert_eq!(insert.param("query"), Some(QUERY));
        assert_eq!(insert.param("database"), Some("yeti"));
        assert_eq!(insert.param("max_insert_block_size"), Some("5000"));
        assert_eq!(insert.token(), token_of(sent));
        assert_eq!(insert.header("content-encoding"), Some("gzip"));
        assert_eq!(insert.header("x-clickhouse-user"), Some("relay"));
        assert_eq!(insert.header("x-clickhouse-key"), Some("s3cret"));
    }
    // The metrics say so, and nothing more came: no duplicate, no rejected or empty one.
    let text = eventually("relay_spool_bytes 0", || {
        let text = metrics_of(agent.addr());
        (relay_metric(&text, "relay_spool_bytes", &url) == 0.0).then_some(text)
    });
    assert_eq!(relay_metric(&text, "relay_sent_total", &url), 3.0, "{text}");
    for name in [
        "relay_failed_total",
        "relay_retried_total",
        "relay_dropped_total",
    ] {
        assert_eq!(relay_metric(&text, name, &url), 0.0, "{name}: {text}");
    }
    assert_eq!(
        relay_metric(&text, "relay_spool_oldest_age_seconds", &url),
        0.0
    );
    assert_eq!(fake.answers().len(), 3, "{:?}", fake.answers());
    assert_eq!(spooled(&spool_dir(&agent.config)), (0, 0));
    assert!(
        !text.contains("s3cret"),
        "the metrics show the password: {text}"
    );
}

#[test]
fn an_outage_delays_snapshots_and_a_refused_one_is_dropped_alone() {
    let mut fake = FakeClickHouse::start(Mode::Fail(503));
    let url = fake.label();
    let agent = start_relaying(&fake, |_| {});
    let feed = agent.agent().feed_addr().unwrap();
    let retried = || relay_metric(&metrics_of(agent.addr()), "relay_retried_total", &url);

    let (s1, s2) = (rows("S1", 2), rows("S2", 2));
    post_snapshot(feed, &s1);
    post_snapshot(feed, &s2);
    eventually("503s retried", || (retried() >= 2.0).then_some(()));
    // The spool holds them meanwhile, and says how old the oldest is.
    let text = metrics_of(agent.addr());
    assert!(
        relay_metric(&text, "relay_spool_bytes", &url) > 0.0,
        "{text}"
    );

    // Then ClickHouse is gone altogether: connections are refused.
    fake.down();
    let before = retried();
    let s3 = format!(
        "{}{}\n",
        rows("S3", 1),
        json!({"node_id": 1, "bad": POISON})
    );
    let s4 = rows("S4", 2);
    post_snapshot(feed, &s3);
    post_snapshot(feed, &s4);
    eventually("refused connections retried", || {
        (retried() >= before + 2.0).then_some(())
    });
    let text = metrics_of(agent.addr());
    assert!(
        relay_metric(&text, "relay_spool_oldest_age_seconds", &url) > 0.0,
        "{text}"
    );
    assert!(fake.stored().is_empty());

    // Back: everything arrives once, in order, but the snapshot ClickHouse refuses.
    fake.set_mode(Mode::Accept);
    fake.up();
    let stored = fake.wait_stored(3);
    assert_eq!(tokens(&stored), [&s1, &s2, &s4].map(|r| token_of(r)));
    assert_eq!(stored[2].rows, s4);
    let text = eventually("the spool emptied", || {
        let text = metrics_of(agent.addr());
        (relay_metric(&text, "relay_spool_bytes", &url) == 0.0).then_some(text)
    });
    assert_eq!(relay_metric(&text, "relay_sent_total", &url), 3.0, "{text}");
    assert_eq!(
        relay_metric(&text, "relay_failed_total", &url),
        1.0,
        "{text}"
    );
    assert_eq!(
        relay_metric(&text, "relay_dropped_total", &url),
        0.0,
        "{text}"
    );
    // The refused snapshot was tried once: a 400 is not retried.
    let refused: Vec<_> = fake
        .answers()
        .into_iter()
        .filter(|(status, _)| *status == 400)
        .collect();
    assert_eq!(refused, [(400, token_of(&s3))]);
    assert!(fake.state.lock().unwrap().duplicates.is_empty());
}

#[test]
fn a_restart_during_the_outage_loses_nothing() {
    let mut fake = FakeClickHouse::start(Mode::Fail(503));
    let url = fake.label();
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let spool = dir.path().join("spool");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[upstream]\nclickhouse_urls = [{:?}]\nspool_dir = {spool:?}\nretry_max_ms = 100\n",
        fake.url()
    ));
    std::fs::write(&config, text).unwrap();

    let mut agent = Process::start(&config);
    let (s1, s2, f1, s3) = (rows("S1", 2), rows("S2", 3), rows("F1", 2), rows("S3", 2));
    post_snapshot(agent.feed, &s1);
    post_snapshot(agent.feed, &s2);
    write_file(&dir.path().join("snapshot.jsonl"), f1.as_bytes());
    agent.wait_log("snapshot applied source=\"file\"");
    eventually("503s retried", || {
        let text = metrics_of(agent.api);
        (relay_metric(&text, "relay_retried_total", &url) >= 1.0).then_some(())
    });

    // A graceful stop, with ClickHouse then gone altogether.
    fake.down();
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).success());

    // Started again (it re-applies the file, which the store holds already), a snapshot
    // more, and killed.
    let agent = Process::start(&config);
    post_snapshot(agent.feed, &s3);
    agent.kill();

    // Started again, and ClickHouse is back.
    let agent = Process::start(&config);
    fake.set_mode(Mode::Accept);
    fake.up();
    let stored = fake.wait_stored(4);
    assert_eq!(
        tokens(&stored),
        [&s1, &s2, &f1, &s3].map(|r| token_of(r)),
        "each once, in the order the switch sent them"
    );
    for (insert, sent) in stored.iter().zip([&s1, &s2, &f1, &s3]) {
        assert_eq!(&insert.rows, sent);
    }
    // The file is applied again at each start. At the first, the store held it already:
    // not relayed again (a server without the token would store it twice). At the
    // second, the store held S3 (the same node), so the file changed the calls back and
    // went again, with its token: ClickHouse drops it. (It is spooled after S3, so it may
    // arrive a moment after the fourth snapshot was stored.)
    let duplicates = eventually("the file sent again", || {
        let duplicates = fake.state.lock().unwrap().duplicates.clone();
        (!duplicates.is_empty()).then_some(duplicates)
    });
    assert_eq!(tokens(&duplicates), [token_of(&f1)]);
    assert_eq!(duplicates[0].rows, f1);
    eventually("the spool emptied", || {
        (spooled(&spool) == (0, 0)).then_some(())
    });
    agent.kill();
}

#[test]
fn the_spool_keeps_within_its_bound_dropping_the_oldest() {
    const SNAPSHOTS: usize = 8;
    const MAX_BYTES: u64 = 16_000;
    let fake = FakeClickHouse::start(Mode::Fail(503));
    let url = fake.label();
    // About 6.4 KB compressed each (the random key does not shrink): two fit.
    let agent = start_relaying(&fake, |c| c.upstream.spool_max_bytes = MAX_BYTES);
    let feed = agent.agent().feed_addr().unwrap();
    let spool = spool_dir(&agent.config);
    let sent: Vec<String> = (0..SNAPSHOTS)
        .map(|i| rows(&format!("S{i}"), 200))
        .collect();
    for rows in &sent {
        post_snapshot(feed, rows);
        // Each spooled before the next: the bound, 16 KB, is also the one on raw snapshots
        // waiting for the spooler, and one of these is ~70 KB raw (that bound has its own
        // test below).
        eventually("the snapshot spooled", || {
            let text = metrics_of(agent.addr());
            (plain_metric(&text, "relay_pending_bytes") == 0.0).then_some(())
        });
    }

    // Every snapshot is either spooled or dropped, and what is spooled fits the bound.
    // The sender's view (its metrics, read before and after the folder) must be the
    // folder's: it has taken every snapshot the spooler linked.
    let (kept, dropped) = eventually("every snapshot spooled or dropped", || {
        let view = || {
            let text = metrics_of(agent.addr());
            (
                relay_metric(&text, "relay_dropped_total", &url) as usize,
                relay_metric(&text, "relay_spool_bytes", &url) as u64,
            )
        };
        let before = view();
        let (files, bytes) = spooled(&spool);
        let (dropped, metric_bytes) = view();
        (before == (dropped, metric_bytes) && bytes == metric_bytes && files + dropped == SNAPSHOTS)
            .then_some((files, dropped))
    });
    assert!(dropped >= 1 && kept >= 2, "kept {kept}, dropped {dropped}");
    let (_, bytes) = spooled(&spool);
    assert!(bytes <= MAX_BYTES, "{bytes} bytes spooled");

    // Back: the newest arrive, in order; the oldest were the ones dropped.
    fake.set_mode(Mode::Accept);
    let stored = fake.wait_stored(kept);
    let expected: Vec<String> = sent[dropped..].iter().map(|r| token_of(r)).collect();
    assert_eq!(tokens(&stored), expected);
    eventually("the spool emptied", || {
        (spooled(&spool) == (0, 0)).then_some(())
    });
    let text = metrics_of(agent.addr());
    assert_eq!(relay_metric(&text, "relay_sent_total", &url), kept as f64);
}

#[test]
fn a_clickhouse_that_never_answers_blocks_nothing() {
    let fake = FakeClickHouse::start(Mode::Hang);
    let url = fake.label();
    let mut agent = start_relaying(&fake, |_| {});
    let feed = agent.agent().feed_addr().unwrap();

    // The sender is stuck in its first attempt (30 s before it gives up); snapshots keep
    // applying at once and customers get the newest.
    let started = Instant::now();
    for i in 0..5 {
        let name = format!("H{i}");
        post_snapshot(feed, &rows(&name, 20));
        let names = served_names(&agent);
        assert_eq!(names, vec![name; 20]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "applying waited for the relay: {:?}",
        started.elapsed()
    );
    eventually("the hung attempt and the spooled rest", || {
        let held = fake.state.lock().unwrap().hung.len();
        // At least one: past the attempt's timeout, a second attempt holds another.
        (held >= 1 && spooled(&spool_dir(&agent.config)).0 == 5).then_some(())
    });
    let text = metrics_of(agent.addr());
    assert_eq!(relay_metric(&text, "relay_sent_total", &url), 0.0);

    // Stopping does not wait for the attempt either.
    let stopping = Instant::now();
    if let Some(running) = agent.agent.take() {
        running.stop();
    }
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
}

#[test]
fn check_names_what_keeps_the_relay_from_working() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let base = std::fs::read_to_string(&config).unwrap();
    let check_upstream = |upstream: &str| {
        std::fs::write(&config, format!("{base}[upstream]\n{upstream}\n")).unwrap();
        check(&config)
    };
    let spool = dir.path().join("spool");
    let (ok, text) = check_upstream(&format!(
        "clickhouse_urls = [\"http://relay:Hunter2-relay-secret@ch.example:8123/?database=yeti\"]\nspool_dir = {spool:?}"
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains("ok: relay to http://ch.example:8123/ (table active_calls)"),
        "{text}"
    );
    assert!(
        text.contains("upstream.spool_dir") && text.contains("will create it"),
        "{text}"
    );
    assert!(!text.contains("Hunter2-relay-secret"), "{text}");

    // An https:// URL: its CA file is read by check, as by the start.
    let ca = dir.path().join("ca.pem");
    let (ok, text) = check_upstream(&format!(
        "clickhouse_urls = [\"https://ch.example:8443/\"]\nca_file = {ca:?}"
    ));
    assert!(!ok, "{text}");
    assert!(
        text.contains("error: upstream.ca_file") && text.contains("ca.pem"),
        "{text}"
    );
    test_ca(&ca);
    let (ok, text) = check_upstream(&format!(
        "clickhouse_urls = [\"https://ch.example:8443/\"]\nca_file = {ca:?}"
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains("ok: relay to https://ch.example:8443/") && text.contains("ca.pem"),
        "{text}"
    );
    let (_, text) = check_upstream(&format!(
        "clickhouse_urls = [\"http://ch.example:8123/\"]\nca_file = {ca:?}"
    ));
    assert!(text.contains("warning: upstream.ca_file"), "{text}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (ok, text) = check_upstream(&format!(
        "clickhouse_urls = [\"http://ch:8123/\"]\nspool_dir = {:?}",
        file.join("spool")
    ));
    assert!(!ok, "{text}");
    assert!(text.contains("is not a folder"), "{text}");
}

#[test]
fn a_url_folder_that_cannot_take_a_snapshot_costs_that_url_alone() {
    let (a, b) = (
        FakeClickHouse::start(Mode::Accept),
        FakeClickHouse::start(Mode::Accept),
    );
    let (url_a, url_b) = (a.label(), b.label());
    let b_url = b.url();
    let agent = start_relaying(&a, move |c| c.upstream.clickhouse_urls.push(b_url));
    let feed = agent.agent().feed_addr().unwrap();
    let spool = spool_dir(&agent.config);
    let folder_b = url_folder(&spool, &url_b);
    let sent: Vec<String> = (0..4).map(|i| rows(&format!("S{i}"), 3)).collect();

    post_snapshot(feed, &sent[0]);
    b.wait_stored(1);
    eventually("B's folder emptied", || {
        (files_in(&folder_b, ".jsonl.gz").0 == 0).then_some(())
    });
    // B's folder becomes a file: no link can be made there, nor the folder made again.
    std::fs::remove_dir_all(&folder_b).unwrap();
    std::fs::write(&folder_b, "in the way").unwrap();
    post_snapshot(feed, &sent[1]);
    post_snapshot(feed, &sent[2]);
    // A gets them all the same, in order; B counts them dropped.
    let stored = a.wait_stored(3);
    assert_eq!(
        tokens(&stored),
        sent[..3].iter().map(|r| token_of(r)).collect::<Vec<_>>()
    );
    let text = eventually("B's drops counted", || {
        let text = metrics_of(agent.addr());
        (relay_metric(&text, "relay_dropped_total", &url_b) == 2.0).then_some(text)
    });
    assert_eq!(
        relay_metric(&text, "relay_dropped_total", &url_a),
        0.0,
        "{text}"
    );

    // Out of the way: B's folder is made again (its url file too), and B gets the next.
    std::fs::remove_file(&folder_b).unwrap();
    post_snapshot(feed, &sent[3]);
    let stored = a.wait_stored(4);
    assert_eq!(
        tokens(&stored),
        sent.iter().map(|r| token_of(r)).collect::<Vec<_>>()
    );
    let stored_b = b.wait_stored(2);
    assert_eq!(tokens(&stored_b), [&sent[0], &sent[3]].map(|r| token_of(r)));
    assert_eq!(url_folder(&spool, &url_b), folder_b);
    assert!(a.state.lock().unwrap().duplicates.is_empty());
}

#[test]
fn a_spool_deleted_while_running_is_made_again() {
    let fake = FakeClickHouse::start(Mode::Accept);
    let url = fake.label();
    let agent = start_relaying(&fake, |_| {});
    let feed = agent.agent().feed_addr().unwrap();
    let spool = spool_dir(&agent.config);
    let sent: Vec<String> = (0..3).map(|i| rows(&format!("D{i}"), 3)).collect();

    post_snapshot(feed, &sent[0]);
    fake.wait_stored(1);
    eventually("the spool emptied", || {
        (spooled(&spool) == (0, 0)).then_some(())
    });
    std::fs::remove_dir_all(&spool).unwrap();
    post_snapshot(feed, &sent[1]);
    agent.feed(&sent[2]);
    let stored = fake.wait_stored(3);
    assert_eq!(
        tokens(&stored),
        sent.iter().map(|r| token_of(r)).collect::<Vec<_>>()
    );
    let text = metrics_of(agent.addr());
    assert_eq!(
        relay_metric(&text, "relay_dropped_total", &url),
        0.0,
        "{text}"
    );
    assert!(spool.join("pending").is_dir() && spool.join("incoming").is_dir());
}

#[test]
fn a_spooler_that_cannot_keep_up_holds_back_the_copies_not_the_applies() {
    const SNAPSHOTS: usize = 6;
    let fake = FakeClickHouse::start(Mode::Accept);
    let url = fake.label();
    let sent: Vec<String> = (0..SNAPSHOTS).map(|i| rows(&format!("P{i}"), 50)).collect();
    let largest = sent.iter().map(|r| r.len() as u64).max().unwrap();
    // Room for two and a half raw snapshots waiting for the spooler.
    let bound = largest * 5 / 2;
    let agent = start_relaying(&fake, |c| c.upstream.spool_max_bytes = bound);
    let feed = agent.agent().feed_addr().unwrap();
    let spool = spool_dir(&agent.config);
    let pending = spool.join("pending");

    // The spooler cannot spool anything: its URL folder is a file.
    let folder = url_folder(&spool, &url);
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, "in the way").unwrap();
    for (i, rows) in sent.iter().enumerate() {
        post_snapshot(feed, rows);
        let names = served_names(&agent);
        assert_eq!(names, vec![format!("P{i}"); 50], "applies go on");
        let (_, bytes) = files_in(&pending, ".jsonl");
        assert!(
            bytes <= bound + largest,
            "{bytes} bytes pending, bound {bound}"
        );
    }
    // Nothing was dropped from pending; the copies past the bound were not made, and
    // counted; the gauge says what waits.
    let (kept, bytes) = files_in(&pending, ".jsonl");
    let text = eventually("the gauge counts what is pending", || {
        let text = metrics_of(agent.addr());
        (plain_metric(&text, "relay_pending_bytes") == bytes as f64).then_some(text)
    });
    let skipped = relay_metric(&text, "relay_dropped_total", &url) as usize;
    assert!(kept >= 1 && skipped >= 1, "kept {kept}, skipped {skipped}");
    assert_eq!(kept + skipped, SNAPSHOTS, "{text}");

    // The folder back: what was kept arrives, in order, and the relay takes new ones again.
    std::fs::remove_file(&folder).unwrap();
    let stored = fake.wait_stored(kept);
    let expected: Vec<String> = sent[..kept].iter().map(|r| token_of(r)).collect();
    assert_eq!(tokens(&stored), expected);
    eventually("pending drained", || {
        let text = metrics_of(agent.addr());
        (plain_metric(&text, "relay_pending_bytes") == 0.0).then_some(())
    });
    let after = rows("P-after", 5);
    post_snapshot(feed, &after);
    let stored = fake.wait_stored(kept + 1);
    assert_eq!(stored[kept].token(), token_of(&after));
}

#[test]
fn a_spool_that_cannot_be_made_leaves_the_agent_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[upstream]\nclickhouse_urls = [\"http://relay:Hunter2-pw@127.0.0.1:9/\"]\nspool_dir = {:?}\n",
        file.join("spool")
    ));
    std::fs::write(&config, text).unwrap();

    let agent = Process::start(&config);
    let error = agent
        .start_log
        .iter()
        .find(|l| l.contains("the relay could not start"))
        .unwrap_or_else(|| panic!("no error logged: {:#?}", agent.start_log));
    assert!(
        error.contains("ERROR") && error.contains("spool"),
        "{error}"
    );
    assert!(!agent.start_log.iter().any(|l| l.contains("Hunter2-pw")));
    post_snapshot(agent.feed, &rows("R", 2));
    assert_eq!(agent.answer(), (vec!["R".to_owned()], 2));
    let metrics = metrics_of(agent.api);
    assert_eq!(plain_metric(&metrics, "relay_running"), 0.0, "{metrics}");
    agent.kill();
}

/// ClickHouse before 22.2 (Debian's 18.16 among them) refuses the deduplication setting:
/// every snapshot still arrives, once, without it, and the relay says so.
#[test]
fn an_older_clickhouse_gets_every_snapshot_without_the_token() {
    let fake = FakeClickHouse::start(Mode::Old);
    let url = fake.label();
    let agent = start_relaying(&fake, |_| {});
    let feed = agent.agent().feed_addr().unwrap();
    let sent: Vec<String> = (1..=3).map(|i| rows(&format!("O{i}"), 2)).collect();
    for rows in &sent {
        post_snapshot(feed, rows);
    }
    let stored = fake.wait_stored(3);
    assert_eq!(
        stored.iter().map(|s| s.rows.clone()).collect::<Vec<_>>(),
        sent
    );
    assert!(
        stored
            .iter()
            .all(|s| s.param("insert_deduplication_token").is_none())
    );
    let text = metrics_of(agent.addr());
    assert_eq!(
        relay_metric(&text, "relay_dedup_token", &url),
        0.0,
        "{text}"
    );
    assert_eq!(
        relay_metric(&text, "relay_failed_total", &url),
        0.0,
        "{text}"
    );
    // Refused with the token once, not once a snapshot.
    let refusals = fake.answers().iter().filter(|(s, _)| *s == 404).count();
    assert_eq!(refusals, 1);
}

/// A refusal whose cause is the destination (here the table is missing) is not the
/// snapshots' fault: they stay spooled, the relay says it is blocked and why, and they all
/// arrive once it is fixed.
#[test]
fn a_destination_that_refuses_every_snapshot_keeps_them_until_fixed() {
    let fake = FakeClickHouse::start(Mode::Refuse(
        404,
        "Code: 60. DB::Exception: Table yeti.active_calls doesn't exist.",
    ));
    let url = fake.label();
    let agent = start_relaying(&fake, |_| {});
    let feed = agent.agent().feed_addr().unwrap();
    let sent: Vec<String> = (1..=3).map(|i| rows(&format!("B{i}"), 2)).collect();
    for rows in &sent {
        post_snapshot(feed, rows);
    }
    eventually("the refusals retried", || {
        let text = metrics_of(agent.addr());
        (relay_metric(&text, "relay_retried_total", &url) >= 3.0).then_some(())
    });
    let text = metrics_of(agent.addr());
    assert_eq!(relay_metric(&text, "relay_blocked", &url), 60.0, "{text}");
    assert_eq!(
        relay_metric(&text, "relay_failed_total", &url),
        0.0,
        "{text}"
    );
    assert!(fake.stored().is_empty());

    fake.set_mode(Mode::Accept);
    let stored = fake.wait_stored(3);
    assert_eq!(
        tokens(&stored),
        sent.iter().map(|r| token_of(r)).collect::<Vec<_>>()
    );
    let text = metrics_of(agent.addr());
    assert_eq!(relay_metric(&text, "relay_blocked", &url), 0.0, "{text}");
    assert_eq!(
        relay_metric(&text, "relay_failed_total", &url),
        0.0,
        "{text}"
    );
}

#[test]
fn the_bound_holds_while_an_attempt_hangs() {
    // The case: a peer that takes the body and keeps the attempt open (here it
    // never answers; a trickled answer is the same to the spool, and the attempt's total
    // time has its own unit test). Before, nothing was dropped until the attempt ended.
    const SNAPSHOTS: usize = 8;
    const MAX_BYTES: u64 = 16_000;
    let fake = FakeClickHouse::start(Mode::Hang);
    let url = fake.label();
    let agent = start_relaying(&fake, |c| c.upstream.spool_max_bytes = MAX_BYTES);
    let feed = agent.agent().feed_addr().unwrap();
    let spool = spool_dir(&agent.config);
    for i in 0..SNAPSHOTS {
        post_snapshot(feed, &rows(&format!("B{i}"), 200));
        eventually("the snapshot spooled", || {
            let text = metrics_of(agent.addr());
            (plain_metric(&text, "relay_pending_bytes") == 0.0).then_some(())
        });
    }
    let dropped = eventually("every snapshot spooled or dropped", || {
        let text = metrics_of(agent.addr());
        let dropped = relay_metric(&text, "relay_dropped_total", &url) as usize;
        let (files, _) = spooled(&spool);
        (files + dropped == SNAPSHOTS).then_some(dropped)
    });
    // ~6.4 KB each: at most two fit, so six or more went, the first (being sent) among them.
    assert!(dropped >= SNAPSHOTS - 2, "dropped {dropped}");
    let (_, bytes) = spooled(&spool);
    assert!(bytes <= MAX_BYTES, "{bytes} bytes spooled");
    assert_eq!(fake.stored().len(), 0);
    assert!(!fake.state.lock().unwrap().hung.is_empty());
}

/// A CA made for the test, and a server configuration whose certificate (for 127.0.0.1
/// and localhost) it signed; the CA's certificate is written to `ca_file` as PEM.
fn test_ca(ca_file: &Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(ca_file, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

#[test]
fn https_urls_are_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let fake = FakeClickHouse::start_tls(Mode::Accept, test_ca(&ca_file));
    let https = format!("https://127.0.0.1:{}/?database=yeti", fake.port);
    let label = format!("https://127.0.0.1:{}/", fake.port);

    // With the CA given, the snapshot arrives as over plain HTTP.
    let agent = start_relaying(&fake, |c| {
        c.upstream.clickhouse_urls = vec![https.clone()];
        c.upstream.ca_file = ca_file.clone();
    });
    let sent = rows("TLS", 20);
    post_snapshot(agent.agent().feed_addr().unwrap(), &sent);
    let stored = fake.wait_stored(1);
    assert_eq!(stored[0].rows, sent);
    assert_eq!(stored[0].token(), token_of(&sent));
    assert_eq!(stored[0].param("database"), Some("yeti"));
    let text = metrics_of(agent.addr());
    assert_eq!(relay_metric(&text, "relay_sent_total", &label), 1.0);
    drop(agent);

    // With another CA, which never signed the server's certificate: refused in the
    // handshake, retried, kept, and the agent goes on applying.
    let other_ca = dir.path().join("other-ca.pem");
    test_ca(&other_ca);
    let agent = start_relaying(&fake, |c| {
        c.upstream.clickhouse_urls = vec![https.clone()];
        c.upstream.ca_file = other_ca.clone();
    });
    let feed = agent.agent().feed_addr().unwrap();
    post_snapshot(feed, &rows("TLS2", 20));
    eventually("the handshake refused and retried", || {
        let text = metrics_of(agent.addr());
        (relay_metric(&text, "relay_retried_total", &label) >= 2.0).then_some(())
    });
    assert_eq!(served_names(&agent), vec!["TLS2".to_owned(); 20]);
    assert_eq!(fake.stored().len(), 1);
    assert_eq!(spooled(&spool_dir(&agent.config)).0, 1);
}

#[test]
fn a_repeat_is_relayed_again_only_if_its_copy_never_went() {
    let fake = FakeClickHouse::start(Mode::Accept);
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let base = std::fs::read_to_string(&config).unwrap();
    // Applied by an agent without the relay: its copy never went anywhere.
    let f1 = rows("F1", 2);
    write_file(&dir.path().join("snapshot.jsonl"), f1.as_bytes());
    let agent = Process::start(&config);
    agent.wait_log("snapshot applied source=\"file\"");
    agent.kill();
    // The relay turned on: the file, applied again at the start, is a repeat for the
    // store but was never relayed, so it goes.
    std::fs::write(
        &config,
        format!(
            "{base}[upstream]\nclickhouse_urls = [{:?}]\nspool_dir = {:?}\nretry_max_ms = 100\n",
            fake.url(),
            dir.path().join("spool")
        ),
    )
    .unwrap();
    let agent = Process::start(&config);
    assert_eq!(tokens(&fake.wait_stored(1)), [token_of(&f1)]);
    // The same bytes posted again: a repeat of what was relayed last, not sent again.
    // The same calls with other bytes (a key the agent does not read): sent.
    let s1 = rows("S1", 2);
    post_snapshot(agent.feed, &s1);
    post_snapshot(agent.feed, &s1);
    let s1_other = rows("S1", 2);
    assert_ne!(s1, s1_other);
    post_snapshot(agent.feed, &s1_other);
    let stored = fake.wait_stored(3);
    assert_eq!(
        tokens(&stored),
        [token_of(&f1), token_of(&s1), token_of(&s1_other)]
    );
    // Nothing else on the way: every applied snapshot was handed to the spool or dropped.
    eventually("the spool emptied", || {
        (spooled(&dir.path().join("spool")) == (0, 0)).then_some(())
    });
    assert_eq!(fake.stored().len(), 3);
    assert!(fake.state.lock().unwrap().duplicates.is_empty());
    agent.kill();
}
