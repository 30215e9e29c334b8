//! Crash safety: the real binary, killed with SIGKILL in the middle of applying a large
//! snapshot, restarts with one whole snapshot and an intact database.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The agent as a child process, with the addresses it logged.
struct Process {
    child: Child,
    api: SocketAddr,
    feed: SocketAddr,
}

impl Process {
    fn start(config: &Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let (mut api, mut feed) = (None, None);
        while api.is_none() || feed.is_none() {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the agent logs its listeners within 30 s");
            let addr = || {
                line.rsplit('=')
                    .next()
                    .unwrap()
                    .trim()
                    .parse::<SocketAddr>()
                    .ok()
            };
            if line.contains("serving") {
                api = addr();
            } else if line.contains("taking snapshots over HTTP") {
                feed = addr();
            }
        }
        Process {
            child,
            api: api.unwrap(),
            feed: feed.unwrap(),
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// The names of account 101's calls, and how many there are.
    fn answer(&self) -> (Vec<String>, usize) {
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

fn snapshot(name: &str, calls: usize) -> Vec<u8> {
    let mut body = b"INSERT INTO active_calls FORMAT JSONEachRow\n".to_vec();
    for i in 0..calls {
        let row = json!({"node_id": 1, "local_tag": format!("{name}-{i}"), "customer_id": 1001,
            "customer_acc_id": 101, "start_time": "2025-11-25 10:00:00", "src_name_in": name,
            "src_prefix_in": format!("{i}"), "dst_prefix_in": format!("44{i}"), "padding": "x".repeat(200)});
        body.extend_from_slice(format!("{row}\n").as_bytes());
    }
    body
}

#[test]
fn kill_9_mid_apply_leaves_one_whole_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let db = dir.path().join("calls.db");
    std::fs::write(dir.path().join("directory.json"), SAMPLE_DIRECTORY).unwrap();
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\njwt_secret = \"{SECRET}\"\n[store]\npath = {:?}\n\
             [feed]\nwatch = {:?}\nlisten = \"127.0.0.1:0\"\nstale_after = 0\n[directory]\npath = {:?}\n",
            db,
            dir.path().join("snapshot.jsonl"),
            dir.path().join("directory.json"),
        ),
    )
    .unwrap();

    let agent = Process::start(&config);
    let small = snapshot("A", 100);
    let reply = post(agent.feed, "/", &[], &small);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(agent.answer(), (vec!["A".to_string()], 100));

    // Half of a 40k-call body: the writer is deep inside its transaction when it dies.
    let large = snapshot("B", 40_000);
    let mut stream = TcpStream::connect(agent.feed).unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        large.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&large[..large.len() / 2]).unwrap();
    agent.kill();
    drop(stream);

    let agent = Process::start(&config);
    assert_eq!(
        agent.answer(),
        (vec!["A".to_string()], 100),
        "the old snapshot, whole"
    );

    // The same through the file source, killed at a few points of a large apply: each
    // restart shows the old snapshot or the new one, whole.
    let snapshot_file = dir.path().join("snapshot.jsonl");
    let mut agent = agent;
    for (round, delay_ms) in [20u64, 150, 400].into_iter().enumerate() {
        let name = format!("F{round}");
        write_file(&snapshot_file, &snapshot(&name, 40_000));
        std::thread::sleep(Duration::from_millis(delay_ms)); // when to pull the plug
        agent.kill();
        agent = Process::start(&config);
        // At start the agent applies the file again; read until the store settles on it.
        let (kinds, count) = agent.answer();
        assert!(
            kinds.len() == 1 && (count == 100 || count == 40_000),
            "round {round}: a torn store: {kinds:?} in {count} rows"
        );
    }
    agent.kill();

    let conn = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}
