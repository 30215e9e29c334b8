//! What the integration tests share: a real agent on port 0 over a temporary folder, a
//! plain HTTP/1.1 client (raw bytes, so hostile requests go out exactly as written), and
//! token minting.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, SystemTime};

use active_calls_agent::config::{Config, StaleAfter};
use active_calls_agent::feed::ApplyReport;
use active_calls_agent::lab::agent::AgentProcess;
use active_calls_agent::lab::sse::Dechunker;
use active_calls_agent::{Agent, FeedStatus};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

pub const SECRET: &str = "integration-secret";
pub const ENDPOINT: &str = "/api/rest/customer/v1/outgoing-active-calls";
/// The keys of an answer row, in SPEC 1.3's order.
pub const OUTPUT_KEYS: [&str; 26] = [
    "snapshot_timestamp",
    "start_time",
    "connect_time",
    "destination_prefix",
    "destination_initial_interval",
    "destination_initial_rate",
    "destination_next_interval",
    "destination_next_rate",
    "destination_fee",
    "src_name_in",
    "src_prefix_in",
    "dst_prefix_in",
    "src_prefix_routing",
    "dst_prefix_routing",
    "from_domain",
    "to_domain",
    "ruri_domain",
    "diversion_in",
    "pai_in",
    "ppi_in",
    "privacy_in",
    "rpid_in",
    "rpid_privacy_in",
    "auth_orig_transport_protocol_id",
    "auth_orig_ip",
    "auth_orig_port",
];

/// A snapshot of node 7 byte for byte as a yeti node posts it (`INSERT` line, then one
/// compact line per call: keys in byte order, non-ASCII as `\uXXXX`): 20 calls, taken
/// at `2025-11-25 14:30:00`. A copy of the project's `samples/snapshot-1.jsonl`.
pub const SAMPLE_SNAPSHOT: &str = include_str!("../fixtures/snapshot-1.jsonl");
/// The same node's next snapshot, five seconds later (`2025-11-25 14:30:05`): every call
/// has a fresh `id`, `snapshot_timestamp` and `end_time`; besides that, call
/// `A399F82A-DC6B-00000000` (account 103) ended, `NEW-EAFF1A09-4A14-00000000` (account
/// 102) is new, and `922631C6-DCD0-00000005` (account 101) was answered.
pub const SAMPLE_SNAPSHOT_2: &str = include_str!("../fixtures/snapshot-2.jsonl");
/// The directory that owns those calls' accounts, as the samples give it (the tests need
/// no entry it lacks): accounts 101, 102 of customer 1001 and 103, 104 of customer 1002;
/// API accesses 5001 (1001, every account), 6001 (1001, account 101 only), 5002 (1002),
/// 6002 (1002, account 103 only); portal access profiles 1 and 2.
/// The seven call events of `samples/events/`, in the order the node posts them between
/// snapshot-2 and snapshot-3.
pub const SAMPLE_EVENTS: [&str; 7] = [
    include_str!("../fixtures/events/01-started-EPH.json"),
    include_str!("../fixtures/events/02-disconnected-EPH.json"),
    include_str!("../fixtures/events/03-started-LIVE.json"),
    include_str!("../fixtures/events/04-disconnected-922631C6.json"),
    include_str!("../fixtures/events/05-disconnected-81CC8265.json"),
    include_str!("../fixtures/events/06-connected-LIVE.json"),
    include_str!("../fixtures/events/07-connected-9F66AD57.json"),
];
pub const SAMPLE_DIRECTORY: &str = include_str!("../fixtures/directory.json");
/// The node the sample snapshots come from.
pub const SAMPLE_NODE: i64 = 7;

/// Accounts of the sample directory.
pub const ACCOUNT_101: &str = "21636369-8b52-1b4a-97b7-50923ceb3ffd"; // customer 1001
pub const ACCOUNT_102: &str = "795b929e-9a9a-10fd-aa7b-5bf55eb561a4"; // customer 1001
pub const ACCOUNT_103: &str = "9b08923d-10c6-1fd9-94b2-b8fda02f34a6"; // customer 1002
pub const ACCOUNT_104: &str = "781f9c58-d664-1fa9-a8a8-529f035efa25"; // customer 1002

/// A running agent over its own temporary folder, on its own runtime, so that tests are
/// plain blocking code like any client of the agent.
pub struct TestAgent {
    pub runtime: tokio::runtime::Runtime,
    pub agent: Option<Agent>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestAgent {
    /// The sample directory, no snapshot yet, nodes never stale.
    pub fn start() -> TestAgent {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.api.listen = "127.0.0.1:0".into();
        config.api.jwt_secret = Some(SECRET.into());
        config.store.path = dir.path().join("db/active-calls.db");
        config.feed.watch = dir.path().join("feed/snapshot.jsonl");
        config.feed.listen = String::new();
        config.feed.stale_after = StaleAfter::Seconds(0);
        config.directory.path = dir.path().join("directory.json");
        std::fs::write(&config.directory.path, SAMPLE_DIRECTORY).unwrap();
        adjust(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let agent = runtime
            .block_on(Agent::start(&config))
            .expect("agent starts");
        let agent = TestAgent {
            runtime,
            agent: Some(agent),
            dir,
            config,
        };
        agent.wait_for_first_file_check();
        agent
    }

    /// Waits until the agent has looked at the snapshot file once, as it does at start.
    fn wait_for_first_file_check(&self) {
        if !self.config.feed.watch.as_os_str().is_empty() {
            self.wait_for(&mut self.agent().feed_status(), |s| s.file_checks > 0);
        }
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.agent().api_addr()
    }

    /// Stops the agent and starts a new one on the same files.
    pub fn restart(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
        let agent = self.runtime.block_on(Agent::start(&self.config));
        self.agent = Some(agent.expect("agent restarts"));
        self.wait_for_first_file_check();
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.config.feed.watch.clone()
    }

    /// Writes the snapshot file (temporary file + rename) and waits until the agent has
    /// applied or rejected it. Returns the feed status after it.
    pub fn feed(&self, content: &str) -> FeedStatus {
        self.feed_bytes(content.as_bytes())
    }

    /// [`feed`](Self::feed) with content that need not be UTF-8.
    pub fn feed_bytes(&self, content: &[u8]) -> FeedStatus {
        let mut status = self.agent().feed_status();
        let before = status.borrow_and_update().clone();
        write_file(&self.snapshot_path(), content);
        self.wait_for(&mut status, |s| {
            s.applied + s.rejected > before.applied + before.rejected
        })
    }

    /// Waits (at most 10 s) until the feed status satisfies `done`.
    pub fn wait_for(
        &self,
        status: &mut tokio::sync::watch::Receiver<FeedStatus>,
        done: impl Fn(&FeedStatus) -> bool,
    ) -> FeedStatus {
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| done(s)))
                .await
                .expect("the feed reacted within 10 s")
                .expect("agent alive")
                .clone()
        })
    }

    /// GET with a valid token of API access 5001 (customer 1001, all accounts).
    pub fn get(&self, query: &str) -> Reply {
        let token = token_for(5001);
        request(
            self.addr(),
            "GET",
            &format!("{ENDPOINT}?{query}"),
            &[("Authorization", &token)],
        )
    }

    /// A request with the given headers.
    pub fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        request(self.addr(), method, target, headers)
    }
}

/// The report of the last snapshot, once the feed has applied `applied` snapshots and
/// rejected none.
pub fn applied_report(status: FeedStatus, applied: u64) -> ApplyReport {
    assert_eq!(
        (status.applied, status.rejected),
        (applied, 0),
        "{:?}",
        status.last_error
    );
    status.last_report.expect("a report of the last snapshot")
}

/// Writes `dir/config.toml` for the real binary: both listeners on port 0, the store,
/// snapshot and sample directory in `dir`. `api` is the rest of the `[api]` section
/// (empty: the test secret inline).
pub fn write_process_config(dir: &Path, api: &str) -> PathBuf {
    let api = if api.is_empty() {
        format!("jwt_secret = \"{SECRET}\"")
    } else {
        api.to_owned()
    };
    let config = dir.join("config.toml");
    std::fs::write(dir.join("directory.json"), SAMPLE_DIRECTORY).unwrap();
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n{api}\n[store]\npath = {:?}\n\
             [feed]\nwatch = {:?}\nlisten = \"127.0.0.1:0\"\nstale_after = 0\n\
             [directory]\npath = {:?}\n",
            dir.join("calls.db"),
            dir.join("snapshot.jsonl"),
            dir.join("directory.json"),
        ),
    )
    .unwrap();
    config
}

/// Runs `active-calls-agent check --config <config>` (the real binary, as an operator
/// does): whether it passed, and what it printed.
pub fn check(config: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The agent as a child process (the real binary), through the lab's driver, which
/// `bench` and `soak` start it with too; what a test waits for is a failure if it does not
/// come.
pub struct Process(AgentProcess);

impl Deref for Process {
    type Target = AgentProcess;
    fn deref(&self) -> &AgentProcess {
        &self.0
    }
}

impl DerefMut for Process {
    fn deref_mut(&mut self) -> &mut AgentProcess {
        &mut self.0
    }
}

impl Process {
    pub fn start(config: &Path) -> Process {
        Self::start_with_env(config, &[])
    }

    /// Starts the binary with extra environment variables, and waits until it has logged
    /// both listeners.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Process {
        let binary = Path::new(env!("CARGO_BIN_EXE_active-calls-agent"));
        Process(AgentProcess::spawn(binary, config, env).expect("the agent starts"))
    }

    pub fn kill(self) {
        self.0.kill().expect("SIGKILL");
    }

    /// Sends `signal` (libc's number) to the process.
    pub fn signal(&self, signal: i32) {
        self.0.signal(signal).expect("kill()");
    }

    /// Waits (at most `limit`) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.0.wait_exit(limit).unwrap()
    }

    /// Waits (at most 30 s: a loaded machine is slow, a passing test is not) for a log
    /// line containing `text`, and returns it.
    pub fn wait_log(&self, text: &str) -> String {
        self.0
            .wait_log(text, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The names of account 101's calls, and how many there are.
    pub fn answer(&self) -> (Vec<String>, usize) {
        let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
        let rows = request(
            self.api,
            "GET",
            &target,
            &[("Authorization", &token_for(5001))],
        )
        .rows();
        let mut kinds: Vec<String> = rows
            .iter()
            .map(|r| r["src_name_in"].as_str().unwrap().to_owned())
            .collect();
        kinds.dedup();
        (kinds, rows.len())
    }
}

/// A socket snapshot of `calls` calls of account 101 named `name` (`src_name_in`), as the
/// switch posts it.
pub fn named_snapshot(name: &str, calls: usize) -> Vec<u8> {
    let mut body = b"INSERT INTO active_calls FORMAT JSONEachRow\n".to_vec();
    for i in 0..calls {
        let row = serde_json::json!({"node_id": 1, "local_tag": format!("{name}-{i}"), "customer_id": 1001,
            "customer_acc_id": 101, "start_time": "2025-11-25 10:00:00", "src_name_in": name,
            "src_prefix_in": format!("{i}"), "dst_prefix_in": format!("44{i}"), "padding": "x".repeat(200)});
        body.extend_from_slice(format!("{row}\n").as_bytes());
    }
    body
}

/// The value of one series (`name{labels}`) in a metrics exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Writes a file as a well-behaved writer does: a temporary file, then a rename.
pub fn write_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("writing");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A signed token with these claims.
pub fn sign(claims: &Value) -> String {
    sign_with(claims, SECRET.as_bytes())
}

pub fn sign_with(claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = None;
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A static token for an API access id.
pub fn token_for(access_id: i64) -> String {
    sign(&serde_json::json!({"aud": ["customer-v1"], "sub": access_id}))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data` rows of a 200 answer.
    pub fn rows(&self) -> Vec<Value> {
        assert_eq!(self.status, 200, "{}", self.text());
        let body = self.json();
        let rows = body["data"].as_array().expect("data array").clone();
        assert_eq!(body["rows"], rows.len(), "rows counts data");
        rows
    }

    /// The `local_tag`-free identity of the rows: their `start_time`s.
    pub fn start_times(&self) -> Vec<String> {
        self.rows()
            .iter()
            .map(|r| r["start_time"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// Sends one request over a new connection and reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
    send(addr, method, target, headers, None)
}

/// POSTs `body` (with its Content-Length) and reads the whole answer.
pub fn post(addr: SocketAddr, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    send(addr, "POST", target, headers, Some(body))
}

fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(body) = body {
        // The server may answer (413, 400) before reading it all, and close.
        let _ = stream.write_all(body);
    }
    let mut raw = Vec::new();
    // A reset after a complete answer (the server would not read a refused body) is fine.
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw, method == "HEAD")
}

/// Reads one answer off a kept-alive connection: its head, then as many body bytes as its
/// Content-Length says (none for an interim `100 Continue`).
pub fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("an answer head");
        raw.push(byte[0]);
    }
    let mut reply = parse_reply(&raw, true);
    let length = reply
        .header("content-length")
        .map_or(0, |v| v.parse().expect("a Content-Length"));
    reply.body = vec![0; length];
    stream.read_exact(&mut reply.body).expect("the whole body");
    reply
}

/// A chunked body's content; panics when it was cut before its last chunk.
pub fn dechunked(raw: &[u8]) -> Vec<u8> {
    let (mut chunks, mut body) = (Dechunker::default(), Vec::new());
    chunks.feed(raw, &mut body).expect("chunk sizes in hex");
    assert!(chunks.ended(), "a chunked body cut before its last chunk");
    body
}

pub fn parse_reply(raw: &[u8], head_only: bool) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head_only {
        Vec::new()
    } else if chunked {
        dechunked(&raw[end + 4..])
    } else {
        raw[end + 4..].to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}
