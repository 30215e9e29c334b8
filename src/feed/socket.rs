//! The socket source: the part of ClickHouse's HTTP interface a yeti switch uses to post
//! its active-calls snapshots, so `statistics.active-calls.clickhouse.destinations` can
//! point at the agent unchanged (SPEC 2.3).
//!
//! `POST /` with `INSERT INTO <table> FORMAT JSONEachRow` as the `query` URL parameter or
//! as the body's first line, then the rows; `Content-Encoding: gzip` accepted; `GET /ping`
//! answers `Ok.`. The answer comes once the snapshot is applied (200, empty) or refused
//! (400 with a one-line reason, 413 past `feed.max_body_bytes`), and a refused snapshot
//! changes nothing.
//!
//! **The writer waits on no client for long.** A body from this host (the switch's own
//! libcurl over loopback) whose first [`IN_MEMORY_BYTES`] come within [`PROBE_WITHIN`] is
//! handed to the writer as it arrives ([`pipe`]): receiving overlaps applying, and the body
//! is copied nowhere else, one body at a time. The writer then waits for the rest at
//! most [`pipe::WAIT_BASE`] in all, and [`pipe::WAIT_PER_64_MIB`] more per 64 MiB declared;
//! a body that slows down past that is refused (503, send it again) and, for
//! [`DIRECT_PAUSE`], every body is received whole first. Any other body
//! (from another host, slow from its start, chunked) is received whole before the writer
//! hears of it: in memory up to [`IN_MEMORY_BYTES`], past that into an unlinked file
//! beside the store (page cache, rarely the disk: it is gone a moment later), which the
//! writer reads at its own pace. So a sender that trickles or stalls costs its own
//! connection, and snapshots of other nodes never queue behind it for more than the
//! budget. (Streaming every body into the writer once let one POST sending a byte every
//! 5 s hold every snapshot for up to 300 s; receiving every body whole first cost a
//! 100k-call period twice the floor, measured in issue 23.)
//!
//! `POST /events` takes the switch's call events (SPEC 2.4), one per request, with the same
//! credentials: each is read, checked ([`super::event`]) and queued for the writer, and
//! answered at once (200, empty), never after a snapshot being applied: the switch holds
//! that call's next event until it has the answer. Not an event: 400 with the reason;
//! the writer's queue full: 503 with `Retry-After`, so the switch posts it again.
//!
//! Credentials, when `feed.user`/`feed.password` are set, are read the three ways
//! ClickHouse clients send them (`X-ClickHouse-User`/`X-ClickHouse-Key`, the `user` and
//! `password` URL parameters, HTTP Basic). Wrong ones get **401** with a
//! `WWW-Authenticate` challenge, the status every HTTP client understands, rather than
//! ClickHouse's own 516: either way the switch logs a failed post.

use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::feed::event::{self, MAX_EVENT_BYTES, Posted};
use crate::feed::writer::{Job, NotQueued, StreamResult, WriterHandle};
use crate::feed::{InsertLine, SnapshotError, is_disk_full, strip_insert};
use crate::http::{self, Body, ConnectionSocket, empty, form_pairs, text};
use crate::metrics::{EventOutcome, Metrics};
use crate::store::{Origin, StoreHealth, is_damage};

mod pipe;

/// A client that stops sending its body for this long is cut off.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Nor may a body take longer than this in all: a trickle holds a connection (and a
/// file) no longer.
const BODY_TOTAL_TIMEOUT: Duration = Duration::from_secs(300);
/// A body is held in memory up to this size (a switch of a few hundred calls), and goes
/// to a file past it, so the feed's connections hold at most `max_connections` times this.
pub const IN_MEMORY_BYTES: usize = 256 * 1024;
/// A body is applied as it arrives when its first [`IN_MEMORY_BYTES`] came within this of
/// its first byte: over 1 MB/s, which a trickle never is and libcurl over loopback always
/// is (by far; the wait budget of `pipe` holds a sender to ~64 MB/s after).
const PROBE_WITHIN: Duration = Duration::from_millis(200);
/// How long a refused body that is still arriving is read on (and dropped) before the
/// answer, so that the client reads the answer rather than a reset connection.
const DRAIN_FOR: Duration = Duration::from_secs(1);
/// After a body stalled while it was applied, bodies are received whole for this long.
const DIRECT_PAUSE: Duration = Duration::from_secs(60);

/// The paths the socket source answers, each counted under its own name in the request
/// metrics (see [`http::ListenerSettings::routes`]).
pub const ROUTES: &[&str] = &["/", "/ping", EVENTS];

/// Where the switch posts its call events.
pub const EVENTS: &str = "/events";

/// What the socket source needs from the configuration.
#[derive(Debug, Clone)]
pub struct SocketSettings {
    pub user: String,
    pub password: String,
    pub max_body_bytes: u64,
    /// Where bodies larger than [`IN_MEMORY_BYTES`] are received (the store's folder).
    pub spill_dir: std::path::PathBuf,
    /// Told when a body cannot be received into its file (`/readyz` says so).
    pub store: Arc<StoreHealth>,
    /// Whether a body may be applied as it arrives.
    pub direct: Arc<Direct>,
}

/// Whether a posted body may go to the writer as it arrives (see the module's doc): it
/// comes from this host, says its length, no body stalled in the last [`DIRECT_PAUSE`],
/// and no other body is arriving so (one at a time: another would only wait for the
/// writer, holding its queue's memory meanwhile).
#[derive(Debug, Default)]
pub struct Direct {
    stalled_at: Mutex<Option<Instant>>,
    arriving: std::sync::atomic::AtomicBool,
}

/// The one body allowed to arrive into the writer ([`Direct`]), until dropped.
struct DirectTurn<'a>(&'a Direct);

impl Drop for DirectTurn<'_> {
    fn drop(&mut self) {
        self.0
            .arriving
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Direct {
    /// The `declared` length of a body that may arrive into the writer once its start came
    /// fast ([`turn`](Self::turn)).
    fn allows(&self, req: &Request<Incoming>, declared: Option<u64>) -> Option<u64> {
        let declared = declared?;
        let local = req
            .extensions()
            .get::<ConnectionSocket>()
            .is_some_and(|socket| socket.peer().ip().to_canonical().is_loopback());
        let calm = self
            .stalled_at
            .lock()
            .is_ok_and(|at| at.is_none_or(|at| at.elapsed() >= DIRECT_PAUSE));
        (local && calm).then_some(declared)
    }

    /// The turn to arrive into the writer, unless another body has it. Taken once a body's
    /// start came fast, so that a sender slow from its start never holds it.
    fn turn(&self) -> Option<DirectTurn<'_>> {
        use std::sync::atomic::Ordering;
        self.arriving
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(DirectTurn(self))
    }

    fn stalled(&self) {
        if let Ok(mut at) = self.stalled_at.lock() {
            *at = Some(Instant::now());
        }
    }
}

/// Serves the socket source on `listener` until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    writer: WriterHandle,
    settings: Arc<SocketSettings>,
    counted: http::ListenerSettings,
    shutdown: watch::Receiver<bool>,
) {
    let metrics = counted.metrics.clone();
    http::serve(listener, counted, shutdown, move |req| {
        let (writer, settings, metrics) = (writer.clone(), settings.clone(), metrics.clone());
        async move { handle(req, &writer, &settings, &metrics).await }
    })
    .await;
}

async fn handle(
    req: Request<Incoming>,
    writer: &WriterHandle,
    settings: &SocketSettings,
    metrics: &Metrics,
) -> Response<Body> {
    let allow = |methods| {
        let mut r = empty(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(methods));
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/" | "/ping") => text(StatusCode::OK, "Ok."),
        (&Method::POST, "/") => insert(req, writer, settings, metrics).await,
        (&Method::POST, EVENTS) => call_event(req, writer, settings, metrics).await,
        (_, "/" | "/ping") => allow("GET, HEAD, POST"),
        (_, EVENTS) => allow("POST"),
        _ => empty(StatusCode::NOT_FOUND),
    }
}

/// The answer to a request with wrong credentials.
fn unauthorized() -> Response<Body> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "Authentication failed: wrong user or password",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"active-calls-agent\""),
    );
    r
}

/// `POST /events`: one call event, answered as soon as it is queued.
async fn call_event(
    req: Request<Incoming>,
    writer: &WriterHandle,
    settings: &SocketSettings,
    metrics: &Metrics,
) -> Response<Body> {
    if !authorized(&req, settings) {
        return unauthorized();
    }
    let gzip = match content_encoding(&req) {
        Ok(gzip) => gzip,
        Err(refused) => return refused,
    };
    let max = MAX_EVENT_BYTES as u64;
    let body = match receive(req.into_body(), max, &settings.spill_dir, None).await {
        Ok(Received::Whole(Whole::InMemory(body))) => body,
        // Larger than an event can be, so never spilled nor arriving (not `direct`):
        // MAX_EVENT_BYTES < IN_MEMORY_BYTES.
        Ok(Received::Whole(Whole::Spilled(_)) | Received::Arriving { .. })
        | Err(BodyError::TooLarge(_)) => {
            return event_too_large();
        }
        Err(e @ BodyError::Slow) => return text(StatusCode::REQUEST_TIMEOUT, &e.to_string()),
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let body = if gzip {
        let mut unpacked = Vec::new();
        let mut limited = Limited {
            inner: flate2::read::MultiGzDecoder::new(&body[..]),
            left: max,
            max,
        };
        if let Err(e) = limited.read_to_end(&mut unpacked) {
            return match e.get_ref().and_then(|e| e.downcast_ref::<BodyError>()) {
                Some(_) => event_too_large(),
                None => text(
                    StatusCode::BAD_REQUEST,
                    &format!("Cannot read the body: {e}"),
                ),
            };
        }
        unpacked
    } else {
        body
    };
    let event = match event::parse(&body, SystemTime::now(), std::time::Instant::now()) {
        Ok(Posted::Event(event)) => event,
        Ok(Posted::Unknown) => {
            metrics.event(None, EventOutcome::Ignored);
            return empty(StatusCode::OK);
        }
        Err(invalid) => {
            metrics.event(invalid.kind, EventOutcome::Invalid);
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Cannot read the event: {invalid}"),
            );
        }
    };
    let kind = event.kind;
    match writer.queue_event(event) {
        Ok(()) => {
            metrics.event(Some(kind), EventOutcome::Queued);
            empty(StatusCode::OK)
        }
        Err(NotQueued::Full) => {
            metrics.event(Some(kind), EventOutcome::Overloaded);
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many call events waiting to be applied; post it again",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(NotQueued::Stopped) => empty(StatusCode::SERVICE_UNAVAILABLE),
    }
}

fn event_too_large() -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("an event is larger than {MAX_EVENT_BYTES} bytes"),
    )
}

/// Whether a body is gzipped, or the answer refusing its `Content-Encoding`.
#[allow(clippy::result_large_err)]
fn content_encoding(req: &Request<Incoming>) -> Result<bool, Response<Body>> {
    match req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes())
    {
        None | Some(b"identity") => Ok(false),
        Some(b"gzip" | b"x-gzip") => Ok(true),
        Some(_) => Err(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only gzip Content-Encoding is supported",
        )),
    }
}

/// Why a body stopped short; carried inside the `io::Error` the writer sees.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is larger than feed.max_body_bytes = {0}")]
    TooLarge(u64),
    #[error("the body came too slowly (30 s without data, or 300 s in all)")]
    Slow,
    #[error("the body was cut short: {0}")]
    Cut(hyper::Error),
    #[error("receiving the body: {0}")]
    Spill(std::io::Error),
}

/// A posted snapshot: checked, received (whole, or enough to tell that it comes fast),
/// handed to the writer, and answered once the writer has applied or refused it.
async fn insert(
    req: Request<Incoming>,
    writer: &WriterHandle,
    settings: &SocketSettings,
    metrics: &Metrics,
) -> Response<Body> {
    let (insert_line, gzip, declared) = match accepted_head(&req, settings) {
        Ok(head) => head,
        Err(refused) => return refused,
    };
    let max = settings.max_body_bytes;
    let declared = settings.direct.allows(&req, declared);
    let direct = declared.map(|_| &*settings.direct);
    let (wire, arriving) = match received(req.into_body(), settings, metrics, direct).await {
        Ok(Received::Arriving {
            first,
            frames,
            turn,
        }) => {
            let (sender, reader) = pipe::pipe(first, declared.unwrap_or(0));
            let wire: Box<dyn BufRead + Send> = Box::new(reader);
            (wire, Some((sender, frames, turn)))
        }
        Ok(Received::Whole(whole)) => (whole.into_reader(), None),
        Err(refused) => return refused,
    };
    let input: Box<dyn BufRead + Send> = if gzip {
        Box::new(BufReader::with_capacity(
            64 * 1024,
            Limited {
                inner: flate2::read::MultiGzDecoder::new(wire),
                left: max,
                max,
            },
        ))
    } else {
        wire
    };
    let (reply_tx, mut reply_rx) = oneshot::channel();
    let job = Job::ApplyStream {
        input,
        insert_line,
        received_at: SystemTime::now(),
        reply: reply_tx,
    };
    if !writer.send(job) {
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    let reply = match arriving {
        None => reply_rx.await,
        Some((sender, frames, _turn)) => {
            let feeding = feed_pipe(frames, sender);
            tokio::pin!(feeding);
            tokio::select! {
                // The writer finished first: it refused the body, or gave up waiting for
                // it. What the client still sends is read on a moment, and dropped.
                reply = &mut reply_rx => {
                    let _ = tokio::time::timeout(DRAIN_FOR, &mut feeding).await;
                    reply
                }
                () = &mut feeding => reply_rx.await,
            }
        }
    };
    if let Ok(Err(SnapshotError::Io(e))) = &reply
        && pipe::is_stalled(e)
    {
        settings.direct.stalled();
        tracing::warn!(
            error = %e,
            "a posted snapshot stalled while it was applied: refused (503); bodies are \
             received whole before they apply for the next {} s",
            DIRECT_PAUSE.as_secs()
        );
    }
    applied(reply)
}

/// Passes the rest of an arriving body to the writer until it ends; once the writer
/// stopped reading, drops what still comes (the caller bounds how long).
async fn feed_pipe(mut frames: Frames, sender: pipe::PipeSender) {
    let mut reader_gone = false;
    loop {
        let failed = match frames.next().await {
            Ok(None) => {
                let _ = sender.end().await;
                return;
            }
            Ok(Some(data)) => {
                if !reader_gone {
                    // Err: the writer is done with it (refused, or stalled).
                    reader_gone = sender.send(data).await.is_err();
                }
                continue;
            }
            Err(BodyError::TooLarge(_)) if reader_gone => continue,
            Err(failed) => failed,
        };
        sender.fail(std::io::Error::other(failed)).await;
        return;
    }
}

/// What a post's head says of its body (whether an INSERT line must open it, whether it
/// is gzipped, and its declared length), or the answer refusing it before a byte of the
/// body is read: bad credentials, another query, another encoding, a declared length past
/// the bound.
#[allow(clippy::result_large_err)]
fn accepted_head(
    req: &Request<Incoming>,
    settings: &SocketSettings,
) -> Result<(InsertLine, bool, Option<u64>), Response<Body>> {
    if !authorized(req, settings) {
        return Err(unauthorized());
    }
    let query = url_param(req, b"query");
    let insert_line = match &query {
        None => InsertLine::Required,
        Some(query) => match strip_insert(query) {
            Some((_, rest)) if rest.trim_ascii().is_empty() => InsertLine::Optional,
            _ => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "only INSERT INTO <table> FORMAT JSONEachRow is supported",
                ));
            }
        },
    };
    let gzip = content_encoding(req)?;
    let max = settings.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &BodyError::TooLarge(max).to_string(),
        ));
    }
    Ok((insert_line, gzip, declared))
}

/// The body, received ([`receive`]), or the answer to a body that could not be: too
/// large, too slow, cut, or not written to its file (counted and told as a spill failure,
/// which a body that could be clears).
async fn received<'a>(
    body: Incoming,
    settings: &SocketSettings,
    metrics: &Metrics,
    direct: Option<&'a Direct>,
) -> Result<Received<'a>, Response<Body>> {
    match receive(body, settings.max_body_bytes, &settings.spill_dir, direct).await {
        Ok(wire) => {
            if matches!(wire, Received::Whole(Whole::Spilled(_))) {
                settings.store.set_spill_failure(None);
            }
            Ok(wire)
        }
        Err(e @ BodyError::TooLarge(_)) => Err(text(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string())),
        Err(e @ BodyError::Slow) => Err(text(StatusCode::REQUEST_TIMEOUT, &e.to_string())),
        Err(e @ BodyError::Cut(_)) => Err(text(StatusCode::BAD_REQUEST, &e.to_string())),
        Err(BodyError::Spill(e)) => {
            let dir = settings.spill_dir.display();
            tracing::error!(error = %e, %dir, "cannot receive a posted snapshot into a file");
            metrics.snapshot(Origin::Socket.as_str(), Err("spill"));
            settings.store.set_spill_failure(Some(format!(
                "posted snapshots cannot be received into {dir} ({e}): they are refused with 507"
            )));
            Err(text(
                StatusCode::INSUFFICIENT_STORAGE,
                &format!("Cannot receive the snapshot into a file: {e}"),
            ))
        }
    }
}

/// The answer to a posted snapshot, from the writer's `reply`.
fn applied(reply: Result<StreamResult, oneshot::error::RecvError>) -> Response<Body> {
    match reply {
        Ok(Ok(_report)) => empty(StatusCode::OK),
        Ok(Err(SnapshotError::Malformed { line, reason })) => text(
            StatusCode::BAD_REQUEST,
            &format!("Cannot parse snapshot: line {line}: {reason}"),
        ),
        Ok(Err(SnapshotError::Io(e))) => {
            // A body received whole can only fail its unpacking (bad gzip, or more than
            // max_body_bytes unpacked); one applied as it arrived, its receiving too.
            if pipe::is_stalled(&e) {
                let mut r = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{e}: send it again"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
            match e.get_ref().and_then(|e| e.downcast_ref::<BodyError>()) {
                Some(cut @ BodyError::TooLarge(_)) => {
                    text(StatusCode::PAYLOAD_TOO_LARGE, &cut.to_string())
                }
                Some(slow @ BodyError::Slow) => {
                    text(StatusCode::REQUEST_TIMEOUT, &slow.to_string())
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    &format!("Cannot read the body: {e}"),
                ),
            }
        }
        // The writer has logged these, and acted (a damaged store is replaced already).
        Ok(Err(SnapshotError::Store(e))) if is_damage(&e) => {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store could not be read and has been created anew: send the snapshot again",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Ok(Err(SnapshotError::Store(e))) if is_disk_full(&e) => text(
            StatusCode::INSUFFICIENT_STORAGE,
            &format!("Cannot store the snapshot: {e}"),
        ),
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

/// A body received whole, or its start and the rest still to come.
enum Received<'a> {
    Whole(Whole),
    /// Its first bytes came fast: the rest is applied as it arrives, in its turn.
    Arriving {
        first: Vec<u8>,
        frames: Frames,
        turn: DirectTurn<'a>,
    },
}

/// A body received whole.
enum Whole {
    InMemory(Vec<u8>),
    /// Past [`IN_MEMORY_BYTES`]: an unlinked file, at its start.
    Spilled(std::fs::File),
}

impl Whole {
    fn into_reader(self) -> Box<dyn BufRead + Send> {
        match self {
            Whole::InMemory(bytes) => Box::new(std::io::Cursor::new(bytes)),
            Whole::Spilled(file) => Box::new(BufReader::with_capacity(256 * 1024, file)),
        }
    }
}

/// A posted body's data, read within `max` bytes in all, [`BODY_IDLE_TIMEOUT`] between
/// frames and [`BODY_TOTAL_TIMEOUT`] from the start: how [`receive`] reads a body, and
/// [`feed_pipe`] the rest of one arriving into the writer.
struct Frames {
    body: Incoming,
    total: u64,
    max: u64,
    deadline: tokio::time::Instant,
}

impl Frames {
    fn new(body: Incoming, max: u64) -> Frames {
        let deadline = tokio::time::Instant::now() + BODY_TOTAL_TIMEOUT;
        Frames {
            body,
            total: 0,
            max,
            deadline,
        }
    }

    /// The next piece of data (trailers are skipped); `None` once the body ended.
    async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            let idle = tokio::time::Instant::now() + BODY_IDLE_TIMEOUT;
            let frame =
                match tokio::time::timeout_at(idle.min(self.deadline), self.body.frame()).await {
                    Ok(None) => return Ok(None),
                    Ok(Some(Ok(frame))) => frame,
                    Ok(Some(Err(e))) => return Err(BodyError::Cut(e)),
                    Err(_) => return Err(BodyError::Slow),
                };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            self.total += data.len() as u64;
            if self.total > self.max {
                return Err(BodyError::TooLarge(self.max));
            }
            return Ok(Some(data));
        }
    }
}

/// Receives the body, within `max` bytes and the timeouts: in memory while it is small,
/// else in an unlinked file in `spill_dir`, unless `direct` allows it to be applied as it
/// arrives, its first [`IN_MEMORY_BYTES`] came within [`PROBE_WITHIN`], and it gets the
/// turn.
async fn receive<'a>(
    body: Incoming,
    max: u64,
    spill_dir: &std::path::Path,
    direct: Option<&'a Direct>,
) -> Result<Received<'a>, BodyError> {
    let mut frames = Frames::new(body, max);
    let mut held = Vec::new();
    let mut file: Option<std::fs::File> = None;
    let mut first_at = None;
    while let Some(data) = frames.next().await? {
        let first_at = *first_at.get_or_insert_with(Instant::now);
        held.extend_from_slice(&data);
        if held.len() >= IN_MEMORY_BYTES {
            let turn = direct
                .filter(|_| file.is_none() && first_at.elapsed() <= PROBE_WITHIN)
                .and_then(Direct::turn);
            if let Some(turn) = turn {
                return Ok(Received::Arriving {
                    first: held,
                    frames,
                    turn,
                });
            }
            let piece = std::mem::take(&mut held);
            file = Some(spill(file.take(), spill_dir, piece, false).await?);
        }
    }
    Ok(Received::Whole(match file {
        None => Whole::InMemory(held),
        Some(file) => Whole::Spilled(spill(Some(file), spill_dir, held, true).await?),
    }))
}

/// Appends `piece` to a body's file (made unlinked in `dir` the first time), on the
/// blocking pool: page cache, but a write. `rewind`: the body is whole, and its file goes
/// back to its start for the writer to read.
async fn spill(
    file: Option<std::fs::File>,
    dir: &std::path::Path,
    piece: Vec<u8>,
    rewind: bool,
) -> Result<std::fs::File, BodyError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut file = match file {
            Some(file) => file,
            None => tempfile::tempfile_in(&dir)?,
        };
        file.write_all(&piece)?;
        if rewind {
            file.seek(std::io::SeekFrom::Start(0))?;
        }
        Ok(file)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(BodyError::Spill)
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
