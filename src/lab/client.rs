//! A minimal blocking HTTP/1.1 client over keep-alive connections: how the tools (`demo`,
//! `bench`, `soak`) drive the agent, as a switch and its customers do.
//!
//! It writes requests by hand, byte for byte, so that a post looks like libcurl's (SEMS's
//! `http_client` module) and a load generator costs next to nothing beside the agent it
//! measures. It reads `Content-Length` bodies only: what the agent sends to these requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// Bodies above this go with `Expect: 100-continue`, as libcurl sends them (its
/// `EXPECT_100_THRESHOLD`): a snapshot does, a call event does not.
const EXPECT_CONTINUE_ABOVE: usize = 1024 * 1024;

/// The `Content-Type` libcurl gives a post whose destination sets none (the active-calls
/// destinations of SEMS).
pub const FORM: &str = "application/x-www-form-urlencoded";

/// One keep-alive connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// An answer: its status, `X-Runtime` (the agent's own time, seconds) and body.
pub struct Reply {
    pub status: u16,
    pub runtime: Option<f64>,
    pub body: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?),
            writer: stream,
        })
    }

    /// A customer's `GET` with its token.
    pub fn get(&mut self, target: &str, token: &str) -> anyhow::Result<Reply> {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        self.writer.write_all(head.as_bytes())?;
        self.read_reply()
    }

    /// A `POST` as libcurl's `CURLOPT_POSTFIELDS` sends it: `content_type`, and a large
    /// body only once the server said `100 Continue`.
    pub fn post(&mut self, target: &str, content_type: &str, body: &[u8]) -> anyhow::Result<Reply> {
        let expect = body.len() > EXPECT_CONTINUE_ABOVE;
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: agent\r\nAccept: */*\r\nContent-Length: {}\r\n\
             Content-Type: {content_type}\r\n{}\r\n",
            body.len(),
            if expect {
                "Expect: 100-continue\r\n"
            } else {
                ""
            }
        );
        self.writer.write_all(head.as_bytes())?;
        if expect {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            if !line.starts_with("HTTP/1.1 100") {
                bail!("no 100 Continue: {}", line.trim_end());
            }
            self.reader.read_line(&mut line)?; // the blank line after it
        }
        self.writer.write_all(body)?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split(' ').nth(1).context("no status line")?.parse()?;
        let (mut length, mut runtime) = (0usize, None);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                } else if name.eq_ignore_ascii_case("x-runtime") {
                    runtime = value.trim().parse().ok();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(Reply {
            status,
            runtime,
            body,
        })
    }
}

/// POSTs a snapshot to the feed listener at `feed` as a switch does, and waits for its 200.
pub fn post_snapshot(feed: SocketAddr, body: &[u8]) -> anyhow::Result<()> {
    let reply = Conn::open(feed)?.post("/", FORM, body)?;
    if reply.status != 200 {
        bail!(
            "snapshot refused: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}

/// POSTs a snapshot with curl, the switch's own client: SEMS posts through libcurl
/// (`CURLOPT_POSTFIELDS`), and `curl --data-binary @file` is that library, sending at its
/// pace (`samples/README.md`). The benchmark's applies and their floors are posted so, since
/// the agent cannot take a snapshot faster than the switch's client gives it.
///
/// The body is written to a file first (not timed), and the time is curl's whole run, as
/// `time curl --data-binary @file` gives it: curl reading the file (from the page cache),
/// connecting, sending, and the answer.
pub fn curl_post_snapshot(feed: SocketAddr, body: &[u8]) -> anyhow::Result<Duration> {
    let file = std::env::temp_dir().join(format!("active-calls-post-{}", std::process::id()));
    std::fs::write(&file, body)?;
    let started = std::time::Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\\n%{http_code}", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{feed}/"))
        .output();
    let took = started.elapsed();
    let _ = std::fs::remove_file(&file);
    let out = out.context("the benchmark posts snapshots with curl, as a switch does")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (answer, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    if !out.status.success() || status != "200" {
        bail!("snapshot refused: {status} {answer}");
    }
    Ok(took)
}

/// Posts call events to the feed listener at `feed` as a node's `http_events_destination`
/// does: one request each, over a kept connection, opened again if the agent closed it.
pub struct EventPoster {
    feed: SocketAddr,
    conn: Option<Conn>,
}

/// The `content_type` of the README's events destination.
pub const EVENT_CONTENT_TYPE: &str = "application/json";

impl EventPoster {
    pub fn new(feed: SocketAddr) -> EventPoster {
        EventPoster { feed, conn: None }
    }

    /// Posts one event; the status the agent answered.
    pub fn post(&mut self, body: &[u8]) -> anyhow::Result<u16> {
        if let Some(conn) = &mut self.conn {
            match conn.post("/events", EVENT_CONTENT_TYPE, body) {
                Ok(reply) => return Ok(reply.status),
                // A kept connection the agent closed meanwhile: once more on a new one.
                Err(e) => {
                    tracing::debug!(error = %e, "posting an event: reconnecting");
                    self.conn = None;
                }
            }
        }
        let conn = self.conn.insert(Conn::open(self.feed)?);
        Ok(conn.post("/events", EVENT_CONTENT_TYPE, body)?.status)
    }
}
