//! The real binary as systemd runs it: readiness and watchdog notifications, SIGHUP
//! reloads, a graceful SIGTERM under load, and `check --config`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The next notification that is not a watchdog ping (unless `want` is one).
fn next_notification(socket: &UnixDatagram, want: &str) -> String {
    let mut buf = [0u8; 512];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within 10 s, waiting for {want}: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        if text != "WATCHDOG=1" || want == "WATCHDOG=1" {
            return text;
        }
    }
}

#[test]
fn tells_systemd_ready_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = Process::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    assert_eq!(next_notification(&socket, "READY=1"), "READY=1");
    // Pings at half the watchdog period, while the writer runs.
    for _ in 0..3 {
        assert_eq!(next_notification(&socket, "WATCHDOG=1"), "WATCHDOG=1");
    }
    agent.signal(libc::SIGHUP);
    assert_eq!(next_notification(&socket, "RELOADING=1"), "RELOADING=1");
    assert_eq!(next_notification(&socket, "READY=1"), "READY=1");
    agent.signal(libc::SIGTERM);
    assert_eq!(next_notification(&socket, "STOPPING=1"), "STOPPING=1");
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn sighup_applies_a_new_secret_and_log_level() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt_secret");
    std::fs::write(&secret_file, "first-secret-value\n").unwrap();
    let config = write_process_config(dir.path(), &format!("jwt_secret_file = {secret_file:?}"));
    // RUST_LOG would override log.level: this agent takes its level from the file.
    let mut agent = Process::start_with_env(&config, &[("RUST_LOG", "")]);
    let claims = json!({"aud": ["customer-v1"], "sub": 5001});
    let first = sign_with(&claims, b"first-secret-value");
    let second = sign_with(&claims, b"second-secret-value");
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let status =
        |token: &str| request(agent.api, "GET", &target, &[("Authorization", token)]).status;
    assert_eq!((status(&first), status(&second)), (200, 401));

    std::fs::write(&secret_file, "second-secret-value\n").unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[log]\nlevel = \"warn\"\n")).unwrap();
    agent.signal(libc::SIGHUP);
    // The reload ends with the directory read again (logged at info, before the new
    // level applies... the level applies first, so wait on the effect instead).
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&second) != 200 {
        assert!(Instant::now() < deadline, "the new secret never applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&first), 401, "the old secret is gone");

    // At level warn, a snapshot's info line is no longer logged; its warning-level
    // neighbours still are.
    let reply = post(agent.feed, "/", &[], &named_snapshot("A", 3));
    assert_eq!(reply.status, 200);
    let reply = post(
        agent.feed,
        "/",
        &[],
        b"INSERT INTO t FORMAT JSONEachRow\n[1]\n",
    );
    assert_eq!(reply.status, 400);
    // No snapshot was applied before the reload: an "applied" line would be the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = agent
            .log
            .recv_timeout(left)
            .expect("the rejection is logged");
        assert!(
            !line.contains("snapshot applied"),
            "an info line at level warn: {line}"
        );
        if line.contains("snapshot rejected") {
            break;
        }
    }

    // A configuration that no longer parses keeps the running one.
    std::fs::write(&config, "[api\n").unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_log("configuration not reloaded");
    assert_eq!(status(&second), 200);
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
}

/// Reads an answer to the end and says whether it is a whole 200 (its body as long as its
/// Content-Length says), or what it was.
fn read_answer(stream: &mut TcpStream) -> Result<(), String> {
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        return Err(format!("no answer ({read:?})"));
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("a cut head: {text:?}"));
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("not 200: {head}"));
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .ok_or_else(|| format!("no content-length: {head}"))?;
    if body.len() != length {
        return Err(format!("a cut body: {} of {length} bytes", body.len()));
    }
    Ok(())
}

fn open_connections(metrics: SocketAddr, listener: &str) -> Option<f64> {
    let text = request(metrics, "GET", "/metrics", &[]).text();
    metric(
        &text,
        &format!(r#"active_calls_agent_http_connections{{listener="{listener}"}}"#),
    )
}

#[test]
fn sigterm_under_load_answers_every_request_begun() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}[metrics]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let mut agent = Process::start(&config);
    let metrics = agent.metrics.expect("metrics listener");
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("A", 100)).status,
        200
    );

    // Two requests begun, half sent, when SIGTERM comes: a customer query, and a
    // snapshot whose body is still arriving.
    let token = token_for(5001);
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let mut query = TcpStream::connect(agent.api).unwrap();
    query
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n").as_bytes(),
        )
        .unwrap();
    let snapshot = named_snapshot("B", 2_000);
    let mut upload = TcpStream::connect(agent.feed).unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        snapshot.len()
    );
    upload.write_all(head.as_bytes()).unwrap();
    // Less than the 256 KB that would have it applied as it arrives (and refused once it
    // stalls a second): received whole, it waits for its sender as long as the load lasts.
    let sent = 100_000;
    assert!(snapshot.len() > 2 * sent);
    upload.write_all(&snapshot[..sent]).unwrap();
    for stream in [&query, &upload] {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_connections(metrics, "api") != Some(1.0)
        || open_connections(metrics, "feed") != Some(1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the begun requests were never accepted"
        );
    }

    // Load: four clients, a new connection per query, until the listener refuses them.
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (api, token, target) = (agent.api, token.clone(), target.clone());
            let (answered, stop) = (answered.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut failures, mut unanswered) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(api) else {
                        break; // refused: the agent no longer takes connections
                    };
                    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let request = format!(
                        "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
                    );
                    if let Err(e) = stream.write_all(request.as_bytes()) {
                        unanswered.push(format!("write: {e}"));
                        continue;
                    }
                    match read_answer(&mut stream) {
                        Ok(()) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.starts_with("no answer") => unanswered.push(e),
                        Err(e) => failures.push(e),
                    }
                }
                (failures, unanswered)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the load never got going");
        std::thread::yield_now();
    }

    agent.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(agent.api).is_ok() {
        assert!(Instant::now() < deadline, "the API still takes connections");
    }
    // The begun requests finish after the listeners closed, and are answered.
    query.write_all(b"\r\n").unwrap();
    upload.write_all(&snapshot[sent..]).unwrap();
    assert_eq!(read_answer(&mut query), Ok(()), "the begun query");
    let mut raw = Vec::new();
    upload.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 200 "),
        "the begun snapshot: {text}"
    );

    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    stop.store(true, Ordering::Relaxed);
    let mut unanswered = Vec::new();
    for client in clients {
        let (failures, none) = client.join().unwrap();
        assert!(
            failures.is_empty(),
            "broken answers under load: {failures:?}"
        );
        unanswered.extend(none);
    }
    // A connection the agent took is answered; at most the few the kernel queued in the
    // instant between the last accept and the close can go unanswered.
    assert!(unanswered.len() <= 4, "queries unanswered: {unanswered:?}");

    // The WAL was checkpointed into the database, and the begun snapshot is in it.
    let wal = dir.path().join("calls.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(0, |m| m.len()) == 0,
        "the WAL is not empty"
    );
    let agent = Process::start(&config);
    assert_eq!(agent.answer(), (vec!["B".to_string()], 2_000));
    agent.kill();
}

#[test]
fn check_says_exactly_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt_secret");
    std::fs::write(&secret_file, "a-long-enough-secret\n").unwrap();
    let private = std::fs::Permissions::from_mode(0o640);
    std::fs::set_permissions(&secret_file, private).unwrap();
    let config = write_process_config(dir.path(), &format!("jwt_secret_file = {secret_file:?}"));
    let (ok, text) = check(&config);
    assert!(ok, "{text}");
    assert!(text.contains("ok: JWT secret: 20 bytes"), "{text}");
    assert!(text.contains("ok: directory"), "{text}");
    assert!(text.contains("warning: feed.stale_after = 0"), "{text}");
    assert!(text.ends_with("0 error(s), 1 warning(s)\n"), "{text}");

    // The things an operator gets wrong, each named.
    std::fs::remove_file(&secret_file).unwrap();
    std::fs::write(dir.path().join("directory.json"), "{\"accounts\": 5}").unwrap();
    let (ok, text) = check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("error: reading api.jwt_secret_file"),
        "{text}"
    );
    assert!(
        text.contains("error:") && text.contains("directory.json"),
        "{text}"
    );

    // A missing file is no "empty" one in the agent's log either.
    let agent = Process::start(&config);
    let log = agent.start_log.join("\n");
    assert!(log.contains("no usable JWT secret"), "{log}");
    assert!(!log.contains("is empty"), "{log}");
    agent.kill();

    // The packaged secret file as installed, empty: said as such by check, by token and
    // in the agent's log, not as a missing setting.
    std::fs::write(&secret_file, "").unwrap();
    let (ok, text) = check(&config);
    assert!(!ok, "{text}");
    let empty = format!("api.jwt_secret_file {} is empty", secret_file.display());
    assert!(text.contains(&format!("error: {empty}")), "{text}");
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
        .args(["token", "--access-id", "5001", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!token.status.success());
    assert!(
        String::from_utf8_lossy(&token.stderr).contains(&empty),
        "{token:?}"
    );
    let agent = Process::start(&config);
    let warned = format!("{empty}: every request will get 401");
    assert!(
        agent.start_log.iter().any(|line| line.contains(&warned)),
        "{:?}",
        agent.start_log
    );
    agent.kill();

    // The feed open to other hosts without credentials is an error; with them, or on
    // loopback, it is fine.
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&secret_file, "a-long-enough-secret\n").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(dir.path().join("directory.json"), SAMPLE_DIRECTORY).unwrap();
    let open = original.replace(
        "listen = \"127.0.0.1:0\"\nstale_after",
        "listen = \"0.0.0.0:0\"\nstale_after",
    );
    assert_ne!(open, original, "the feed's listen line");
    std::fs::write(&config, &open).unwrap();
    let (ok, text) = check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "error: feed.listen = 0.0.0.0:0 takes snapshots from other hosts without credentials"
        ),
        "{text}"
    );
    // serve still starts (a switch on another host is a real layout), and says why not.
    let agent = Process::start(&config);
    assert!(
        agent
            .start_log
            .iter()
            .any(|l| l.contains("WARN") && l.contains("without credentials")),
        "{:?}",
        agent.start_log
    );
    agent.kill();
    let with_credentials = open.replace(
        "[directory]",
        "user = \"switch\"\npassword = \"s3cret\"\n[directory]",
    );
    std::fs::write(&config, &with_credentials).unwrap();
    let (ok, text) = check(&config);
    assert!(ok, "{text}");
    std::fs::write(&config, &original).unwrap();

    // A typo in a key is an error naming the key; nothing else is looked at.
    std::fs::write(&config, original.replace("stale_after", "stale_afer")).unwrap();
    std::fs::remove_file(&secret_file).unwrap();
    let (ok, text) = check(&config);
    assert!(!ok);
    assert!(text.contains("stale_afer"), "{text}");

    // A store of another schema version is rebuilt: a warning, not an error.
    std::fs::write(&config, &original).unwrap();
    std::fs::write(&secret_file, "a-long-enough-secret").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(dir.path().join("directory.json"), SAMPLE_DIRECTORY).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("calls.db")).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    let (ok, text) = check(&config);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: store") && text.contains("schema version 1"),
        "{text}"
    );
}
