//! The socket source: the part of ClickHouse's HTTP interface a yeti switch uses to post
//! its active-calls snapshots, so `statistics.active-calls.clickhouse.destinations` can
//! point at the agent unchanged (SPEC 2.3).
//!
//! `POST /` with `INSERT INTO <table> FORMAT JSONEachRow` as the `query` URL parameter or
//! as the body's first line, then the rows; `Content-Encoding: gzip` accepted; `GET /ping`
//! answers `Ok.`. The body is never held whole: it flows through a small bounded channel
//! into the writer thread, which parses and applies it as it arrives, in one transaction.
//! The answer comes once the snapshot is applied (200, empty) or refused (400 with a
//! one-line reason, 413 past `feed.max_body_bytes`), and a refused snapshot changes
//! nothing.
//!
//! Credentials, when `feed.user`/`feed.password` are set, are read the three ways
//! ClickHouse clients send them (`X-ClickHouse-User`/`X-ClickHouse-Key`, the `user` and
//! `password` URL parameters, HTTP Basic). Wrong ones get **401** with a
//! `WWW-Authenticate` challenge, the status every HTTP client understands, rather than
//! ClickHouse's own 516: either way the switch logs a failed post.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::feed::writer::{Job, WriterHandle};
use crate::feed::{InsertLine, SnapshotError, strip_insert};
use crate::http::{self, Body, empty, form_pairs, text};

/// A client that stops sending its body for this long is cut off: the writer is waiting.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Nor may a body take longer than this in all (a trickle must not hold the writer).
const BODY_TOTAL_TIMEOUT: Duration = Duration::from_secs(300);
/// Body chunks in flight between the connection and the writer: the memory a post holds
/// is at most this many chunks of about [`CHUNK_BYTES`].
const CHANNEL_CHUNKS: usize = 8;
const CHUNK_BYTES: usize = 256 * 1024;

/// The paths the socket source answers, each counted under its own name in the request
/// metrics (see [`http::ListenerSettings::routes`]).
pub const ROUTES: &[&str] = &["/", "/ping"];

/// What the socket source needs from the configuration.
#[derive(Debug, Clone)]
pub struct SocketSettings {
    pub user: String,
    pub password: String,
    pub max_body_bytes: u64,
}

/// Serves the socket source on `listener` until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    writer: WriterHandle,
    settings: Arc<SocketSettings>,
    counted: http::ListenerSettings,
    shutdown: watch::Receiver<bool>,
) {
    http::serve(listener, counted, shutdown, move |req| {
        let (writer, settings) = (writer.clone(), settings.clone());
        async move { handle(req, &writer, &settings).await }
    })
    .await;
}

async fn handle(
    req: Request<Incoming>,
    writer: &WriterHandle,
    settings: &SocketSettings,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/" | "/ping") => text(StatusCode::OK, "Ok."),
        (&Method::POST, "/") => insert(req, writer, settings).await,
        (_, "/" | "/ping") => {
            let mut r = empty(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            r
        }
        _ => empty(StatusCode::NOT_FOUND),
    }
}

/// Why a body stopped short; carried inside the `io::Error` the writer sees.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is larger than feed.max_body_bytes = {0}")]
    TooLarge(u64),
    #[error("the body came too slowly (30 s without data, or 300 s in all)")]
    Slow,
}

async fn insert(
    req: Request<Incoming>,
    writer: &WriterHandle,
    settings: &SocketSettings,
) -> Response<Body> {
    if !authorized(&req, settings) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "Authentication failed: wrong user or password",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"active-calls-agent\""),
        );
        return r;
    }
    let query = url_param(&req, b"query");
    let insert_line = match &query {
        None => InsertLine::Required,
        Some(query) => match strip_insert(query) {
            Some((_, rest)) if rest.trim_ascii().is_empty() => InsertLine::Optional,
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "only INSERT INTO <table> FORMAT JSONEachRow is supported",
                );
            }
        },
    };
    let gzip = match req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes())
    {
        None | Some(b"identity") => false,
        Some(b"gzip" | b"x-gzip") => true,
        Some(_) => {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "only gzip Content-Encoding is supported",
            );
        }
    };
    let max = settings.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &BodyError::TooLarge(max).to_string(),
        );
    }

    let (chunks_tx, chunks_rx) = mpsc::channel(CHANNEL_CHUNKS);
    let wire = ChannelReader {
        chunks: chunks_rx,
        current: Bytes::new(),
        ended: false,
    };
    let input: Box<dyn BufRead + Send> = if gzip {
        let unpacked = Gunzip::Pending(wire);
        Box::new(BufReader::with_capacity(
            64 * 1024,
            Limited {
                inner: unpacked,
                left: max,
                max,
            },
        ))
    } else {
        Box::new(wire)
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let job = Job::ApplyStream {
        input,
        insert_line,
        received_at: SystemTime::now(),
        reply: reply_tx,
    };
    if !writer.send(job) {
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    pump(req.into_body(), chunks_tx, max).await;
    match reply_rx.await {
        Ok(Ok(_report)) => empty(StatusCode::OK),
        Ok(Err(SnapshotError::Malformed { line, reason })) => text(
            StatusCode::BAD_REQUEST,
            &format!("Cannot parse snapshot: line {line}: {reason}"),
        ),
        Ok(Err(SnapshotError::Io(e))) => {
            match e.get_ref().and_then(|e| e.downcast_ref::<BodyError>()) {
                Some(cut @ BodyError::TooLarge(_)) => {
                    text(StatusCode::PAYLOAD_TOO_LARGE, &cut.to_string())
                }
                Some(cut @ BodyError::Slow) => text(StatusCode::REQUEST_TIMEOUT, &cut.to_string()),
                None => text(
                    StatusCode::BAD_REQUEST,
                    &format!("Cannot read the body: {e}"),
                ),
            }
        }
        Ok(Err(SnapshotError::Store(e))) => {
            tracing::error!(error = %e, "storing a posted snapshot failed");
            empty(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Err(_) => {
            tracing::error!("the writer ended before answering a posted snapshot");
            empty(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// Moves the request body into the channel the writer reads, until the body ends (then
/// an empty chunk says so), the writer stops reading (it has refused the snapshot), or a
/// limit is hit.
async fn pump(mut body: Incoming, chunks: mpsc::Sender<std::io::Result<Bytes>>, max: u64) {
    let mut total = 0u64;
    let mut pending = Vec::new();
    let deadline = tokio::time::Instant::now() + BODY_TOTAL_TIMEOUT;
    loop {
        let idle = tokio::time::Instant::now() + BODY_IDLE_TIMEOUT;
        let frame = match tokio::time::timeout_at(idle.min(deadline), body.frame()).await {
            Ok(None) => {
                if !pending.is_empty() && chunks.send(Ok(Bytes::from(pending))).await.is_err() {
                    return;
                }
                let _ = chunks.send(Ok(Bytes::new())).await;
                return;
            }
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                let _ = chunks.send(Err(std::io::Error::other(e))).await;
                return;
            }
            Err(_) => {
                let _ = chunks
                    .send(Err(std::io::Error::other(BodyError::Slow)))
                    .await;
                return;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue; // only the end marker is empty
        }
        total += data.len() as u64;
        if total > max {
            let _ = chunks
                .send(Err(std::io::Error::other(BodyError::TooLarge(max))))
                .await;
            return;
        }
        // Hyper yields the body as it reads it, often in pieces of a few kilobytes: each
        // piece sent alone costs the writer a wake-up, so small ones go on together.
        if pending.is_empty() && data.len() >= CHUNK_BYTES {
            if chunks.send(Ok(data)).await.is_err() {
                return;
            }
            continue;
        }
        pending.extend_from_slice(&data);
        if pending.len() >= CHUNK_BYTES {
            let full = std::mem::replace(&mut pending, Vec::with_capacity(CHUNK_BYTES));
            if chunks.send(Ok(Bytes::from(full))).await.is_err() {
                return;
            }
        }
    }
}

/// The request body as a blocking `Read`, for the writer thread. The body ends only at
/// [`pump`]'s end marker: a channel closed without it is a body cut short (its connection
/// dropped, say at the end of a stop's grace), which must not pass for a whole snapshot.
struct ChannelReader {
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    ended: bool,
}

impl ChannelReader {
    /// The next piece of the body, unless the current one still has bytes.
    fn next_piece(&mut self) -> std::io::Result<()> {
        while self.current.is_empty() && !self.ended {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Some(chunk) => self.current = chunk?,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the body was cut short",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.next_piece()?;
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The pieces are the buffer: an identity body is read without another copy.
impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.next_piece()?;
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        let _ = self.current.split_to(amount.min(self.current.len()));
    }
}

/// A gzip decoder made on the first read: making one reads the gzip header at once, and
/// that must happen on the writer thread, not on the connection's async task.
enum Gunzip {
    Pending(ChannelReader),
    Reading(flate2::read::MultiGzDecoder<ChannelReader>),
    Taken,
}

impl Read for Gunzip {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Gunzip::Pending(_) = self
            && let Gunzip::Pending(wire) = std::mem::replace(self, Gunzip::Taken)
        {
            *self = Gunzip::Reading(flate2::read::MultiGzDecoder::new(wire));
        }
        match self {
            Gunzip::Reading(decoder) => decoder.read(buf),
            _ => Ok(0),
        }
    }
}

/// Refuses to unpack more than `left` bytes: a small gzip body may inflate without bound.
struct Limited<R> {
    inner: R,
    left: u64,
    max: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| std::io::Error::other(BodyError::TooLarge(self.max)))?;
        Ok(n)
    }
}

/// The last value of a URL parameter.
fn url_param(req: &Request<Incoming>, name: &[u8]) -> Option<Vec<u8>> {
    let query = req.uri().query()?.as_bytes();
    form_pairs(query)
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .last()
}

/// Whether the request carries the configured credentials (any request does when none are).
fn authorized(req: &Request<Incoming>, settings: &SocketSettings) -> bool {
    if settings.user.is_empty() && settings.password.is_empty() {
        return true;
    }
    let (user, password) = credentials(req);
    // ClickHouse's user when a client names none.
    let wanted_user = if settings.user.is_empty() {
        "default"
    } else {
        &settings.user
    };
    // Both compared, always, in time that does not depend on where they differ.
    same(&user, wanted_user.as_bytes()) & same(&password, settings.password.as_bytes())
}

/// The user and password a ClickHouse client sent, the three ways it may.
fn credentials(req: &Request<Incoming>) -> (Vec<u8>, Vec<u8>) {
    let headers = req.headers();
    if let Some(user) = headers.get("x-clickhouse-user") {
        let key = headers
            .get("x-clickhouse-key")
            .map(|k| k.as_bytes().to_vec());
        return (user.as_bytes().to_vec(), key.unwrap_or_default());
    }
    let user = url_param(req, b"user");
    let password = url_param(req, b"password");
    if user.is_some() || password.is_some() {
        return (
            user.unwrap_or_else(|| b"default".to_vec()),
            password.unwrap_or_default(),
        );
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim_ascii())
                .ok()
        });
    if let Some(pair) = basic {
        let colon = pair.iter().position(|&b| b == b':').unwrap_or(pair.len());
        let password = pair.get(colon + 1..).unwrap_or_default().to_vec();
        return (pair[..colon].to_vec(), password);
    }
    (b"default".to_vec(), Vec::new())
}

/// Byte equality without an early exit (the length alone may show).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_of(chunks: &[&'static [u8]], end_marker: bool) -> ChannelReader {
        let (tx, rx) = mpsc::channel(8);
        for chunk in chunks {
            tx.try_send(Ok(Bytes::from_static(chunk))).unwrap();
        }
        if end_marker {
            tx.try_send(Ok(Bytes::new())).unwrap();
        }
        ChannelReader {
            chunks: rx,
            current: Bytes::new(),
            ended: false,
        }
    }

    #[test]
    fn a_body_cut_short_is_an_error_even_at_a_line_end() {
        let mut out = Vec::new();
        let whole = reader_of(&[b"{\"a\":1}\n", b"{\"a\":2}\n"], true).read_to_end(&mut out);
        assert_eq!(whole.unwrap(), 16);
        // The sender is gone without the end marker: the connection was dropped.
        let cut = reader_of(&[b"{\"a\":1}\n"], false).read_to_end(&mut Vec::new());
        assert_eq!(cut.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn limited_refuses_past_its_bound() {
        let mut reader = Limited {
            inner: &[0u8; 10][..],
            left: 5,
            max: 5,
        };
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).is_err());
        let mut reader = Limited {
            inner: &[0u8; 10][..],
            left: 10,
            max: 10,
        };
        assert_eq!(reader.read_to_end(&mut out).unwrap(), 10);
    }

    #[test]
    fn same_compares_whole_values() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret!"));
        assert!(same(b"", b""));
    }
}
