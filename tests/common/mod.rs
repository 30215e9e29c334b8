//! What the integration tests share: a real agent on port 0 over a temporary folder, a
//! plain HTTP/1.1 client (raw bytes, so hostile requests go out exactly as written), and
//! token minting.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use active_calls_agent::config::Config;
use active_calls_agent::{Agent, FeedStatus};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

pub const SECRET: &str = "integration-secret";
pub const ENDPOINT: &str = "/api/rest/customer/v1/outgoing-active-calls";
pub const SAMPLE_SNAPSHOT: &str = include_str!("../fixtures/snapshot.jsonl");
pub const SAMPLE_DIRECTORY: &str = include_str!("../fixtures/directory.json");

/// Accounts of the sample directory.
pub const ACCOUNT_101: &str = "f38b2ffc-80a4-1f5a-91c9-bc701e7ea419"; // customer 1001
pub const ACCOUNT_102: &str = "f3f49249-dc28-1f90-a5ae-c7978306d03b"; // customer 1001
pub const ACCOUNT_103: &str = "e5121482-3929-1d22-a255-accb1a466884"; // customer 1002
pub const ACCOUNT_104: &str = "6bad6be2-8e7a-16e9-9f19-950499dd251d"; // customer 1002

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
        config.feed.stale_after = 0;
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

fn parse_reply(raw: &[u8], head_only: bool) -> Reply {
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
    let body = if head_only {
        Vec::new()
    } else {
        raw[end + 4..].to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}
