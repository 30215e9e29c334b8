//! Live streams (SPEC 7): the customer endpoint and the node scrape as Server-Sent Events.
//!
//! A stream is the endpoint's request kept open. It is authenticated and checked exactly
//! as the plain request (401 and 400 come before any stream), then answers `snapshot`: the
//! rows a plain request would get, each with its opaque `call` id. From then on a task of
//! its own follows the change feed ([`live::Feed`]): for each commit that may touch what
//! it selects it reads the store there, through its [`View`], and sends the difference as
//! `changes` (nothing when nothing it selects changed).
//!
//! What a stream may hold is bounded. Its socket buffers little ([`SEND_BUFFER`]); the
//! bytes the socket has not taken (queued here, or held by hyper) are counted, and while
//! they are past [`MAX_UNSENT`] the stream reads nothing more: the changes meanwhile merge
//! into one scope, read once the client has caught up. Events go out in pieces of 64 KiB,
//! and a client that has not taken a piece [`SLOW_AFTER`] after it was queued is ended as
//! `slow`: what was queued for it is dropped (but the rest of an event begun), and it gets
//! the `end` event. An event past 64 KiB (the snapshot too) holds its bytes out of the
//! customer answers' budget (`api.max_answer_bytes`; a node's stream out of the scrapes'
//! half too) until it is written; when the budget has no room, the stream waits (its
//! changes merge) and reads again, and a snapshot is answered 503. So all streams together
//! hold at most that budget, plus [`MAX_UNSENT`] and 64 KiB each, plus their views (a few
//! dozen bytes per call shown).
//!
//! It also ends, with `event: end` and a one-word reason, when its token expires
//! (`expired`), when a directory reload or a SIGHUP takes away its access, account or
//! scrape token (`revoked`), when the agent stops (`stopping`), and when the store cannot
//! be read (`error`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::answers::Held;
use super::{ApiState, params};
use crate::clock::unix_millis;
use crate::http::{Body, ConnectionSocket, empty};
use crate::live::{Scope, Subscription, View};
use crate::metrics::OpenStream;
use crate::store::Selection;

/// A comment goes out after this long without an event (SPEC 7: at most 15 s).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// What `retry:` asks of a client that lost the stream (ms).
pub const RETRY_MS: u64 = 2000;
/// Bytes a stream's client may leave unread before the stream stops reading changes for
/// it (they merge meanwhile).
pub const MAX_UNSENT: usize = 256 * 1024;
/// How long an event may wait for its client to take it before the stream is ended as
/// `slow` (below the connection's write timeout, so that `slow` is what the client hears).
pub const SLOW_AFTER: Duration = Duration::from_secs(10);
/// How often a stream whose client is behind looks whether it caught up.
const BEHIND_POLL: Duration = Duration::from_millis(50);
/// What the kernel buffers for a stream's client (`SO_SNDBUF`; Linux doubles it): past
/// it, what the client has not taken is counted as unsent.
const SEND_BUFFER: usize = 64 * 1024;
/// How long a stream whose event found no room in the budget waits to read again.
const BUDGET_WAIT: Duration = Duration::from_millis(500);

/// Whether a request asks for a stream: `Accept` names `text/event-stream`.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            let media = media.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("text/event-stream")
        })
}

/// The request headers a stream's holder is checked by again: its token, wherever it came
/// from (the rest of the request is not kept).
pub fn credentials(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [header::AUTHORIZATION, header::COOKIE] {
        for value in headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// Who holds a stream open, checked again at every reload of the directory or the
/// configuration.
pub enum Holder {
    /// A customer, with the request's credentials and query, and what they gave then.
    Customer {
        headers: HeaderMap,
        query: Vec<u8>,
        customer_id: i64,
        account_id: i64,
        expires: Option<SystemTime>,
    },
    /// An aggregator, with the request's credentials (its scrape token).
    Node { headers: HeaderMap },
}

impl Holder {
    /// An aggregator's: its large events take from the scrapes' share of the budget too.
    fn is_node(&self) -> bool {
        matches!(self, Holder::Node { .. })
    }

    fn kind(&self) -> &'static str {
        if self.is_node() { "node" } else { "customer" }
    }

    /// Whether the request would still be answered as it was.
    fn still_allowed(&self, state: &ApiState) -> bool {
        match self {
            Holder::Customer {
                headers,
                query,
                customer_id,
                account_id,
                ..
            } => {
                let directory = state.directory.load();
                let Ok(auth) = state.auth.load().authenticate(headers, &directory) else {
                    return false;
                };
                auth.context.customer_id == *customer_id
                    && params::parse(query, &auth.context, &directory)
                        .is_ok_and(|(account, _)| account == *account_id)
            }
            Holder::Node { headers } => state.scrape_tokens.load().admit(headers),
        }
    }

    fn expires(&self) -> Option<SystemTime> {
        match self {
            Holder::Customer { expires, .. } => *expires,
            Holder::Node { .. } => None,
        }
    }
}

/// Opens a stream of `selection` for `holder`: 503 past `api.max_streams`, else 200 with
/// the `snapshot` event, the rest sent by a task of its own.
pub fn open(
    state: &Arc<ApiState>,
    socket: Option<&ConnectionSocket>,
    selection: Selection,
    holder: Holder,
) -> Response<Body> {
    let Ok(permit) = state.streams.clone().try_acquire_owned() else {
        return busy(state);
    };
    let mut view = View::new(selection);
    // Before the snapshot is read: a commit after it is in the feed.
    let changes = state.live.subscribe(view.account());
    let now_ms = unix_millis(SystemTime::now());
    let head = event_head(1, "snapshot");
    let snapshot = tokio::task::block_in_place(|| view.snapshot(&state.readers, now_ms, &head));
    let mut event = match snapshot {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(error = %e, "reading a live stream's snapshot failed");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    event.extend_from_slice(b"\n\n");
    let Ok(held) = state.answers.hold(event.len(), holder.is_node()) else {
        return busy(state);
    };
    if let Some(socket) = socket {
        socket.limit_send_buffer(SEND_BUFFER);
    }
    let (pieces, received) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared::default());
    let kind = holder.kind();
    let mut stream = Stream {
        state: state.clone(),
        view,
        holder,
        pieces,
        shared: shared.clone(),
        next_id: 2,
        last_sent: Instant::now(),
        queued: 0,
        queued_at: VecDeque::new(),
        _open: state.metrics.streams.opened(kind),
        _permit: permit,
    };
    stream.state.metrics.streams.sent("snapshot");
    stream.queue(event, held, false);
    tokio::spawn(stream.run(changes));
    let body = SseBody {
        received,
        shared,
        mid_event: false,
    }
    .boxed();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    // A proxy (nginx) in front must pass each event on as it comes.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// 503 with `Retry-After`: no turn for another stream, or no room for its snapshot.
fn busy(state: &ApiState) -> Response<Body> {
    state.metrics.streams.refused();
    let mut busy = empty(StatusCode::SERVICE_UNAVAILABLE);
    busy.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    busy
}

/// The head of event `id` (`retry:` before the first).
fn event_head(id: u64, event: &str) -> Vec<u8> {
    let retry = if id == 1 {
        format!("retry: {RETRY_MS}\n")
    } else {
        String::new()
    };
    format!("{retry}id: {id}\nevent: {event}\ndata: ").into_bytes()
}

/// What a connection takes of an event at a time: a client's progress shows piece by
/// piece, however large the event.
const PIECE_BYTES: usize = 64 * 1024;

/// An event's bytes and its share of the answers' budget, until every piece is written.
struct Whole {
    bytes: Vec<u8>,
    _held: Option<Held>,
}

impl AsRef<[u8]> for Whole {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// One piece of an event, unsent until hyper has written it (and dropped it).
struct Tracked {
    bytes: Bytes,
    shared: Arc<Shared>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        (self.shared.unsent).fetch_sub(self.bytes.len(), Ordering::AcqRel);
        self.shared.written.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a stream and its body share.
#[derive(Default)]
struct Shared {
    /// Bytes queued and not yet written to the connection's socket.
    unsent: AtomicUsize,
    /// Pieces written (or dropped), of those queued.
    written: AtomicU64,
    /// The stream ended as slow: what is queued is dropped, but the rest of an event
    /// begun and the `end`.
    abandon: AtomicBool,
}

/// A piece of an event: whether it ends its event, and whether that event is the `end`.
struct Piece {
    bytes: Bytes,
    ends_event: bool,
    last: bool,
}

/// The stream's body: the pieces its task queues.
struct SseBody {
    received: mpsc::UnboundedReceiver<Piece>,
    shared: Arc<Shared>,
    /// The last piece given to the connection did not end its event.
    mid_event: bool,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            let Some(piece) = std::task::ready!(self.received.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let abandoned = self.shared.abandon.load(Ordering::Acquire);
            if piece.last || self.mid_event || !abandoned {
                self.mid_event = !piece.ends_event;
                return Poll::Ready(Some(Ok(Frame::data(piece.bytes))));
            }
        }
    }
}

/// A stream's task: it follows the change feed until the stream ends.
struct Stream {
    state: Arc<ApiState>,
    view: View,
    holder: Holder,
    pieces: mpsc::UnboundedSender<Piece>,
    shared: Arc<Shared>,
    next_id: u64,
    last_sent: Instant,
    /// Pieces queued, and when each not yet written was.
    queued: u64,
    queued_at: VecDeque<Instant>,
    _open: OpenStream,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    async fn run(mut self, mut changes: Subscription) {
        let mut reloads = self.state.reloads.clone();
        reloads.borrow_and_update();
        // A reload between the request's own check and now would otherwise go unseen.
        if !self.holder.still_allowed(&self.state) {
            return self.end("revoked");
        }
        let mut stopping = self.state.stopping.clone();
        let expires = self.holder.expires().map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        // Changes not yet read, since the publication of the oldest of them.
        let mut pending = Scope::default();
        let mut oldest: Option<Instant> = None;
        let mut starved_until: Option<Instant> = None;
        let reason = loop {
            // A client that has not taken an event queued SLOW_AFTER ago is not keeping up.
            let unwritten = self.oldest_unwritten();
            if unwritten.is_some_and(|at| at.elapsed() >= SLOW_AFTER) {
                break "slow";
            }
            let starved = starved_until.is_some_and(|until| Instant::now() < until);
            let room = self.shared.unsent.load(Ordering::Acquire) <= MAX_UNSENT;
            if !pending.is_empty() && room && !starved {
                match self.send_changes(&pending, oldest) {
                    Ok(true) => (pending, oldest, starved_until) = (Scope::default(), None, None),
                    Ok(false) => starved_until = Some(Instant::now() + BUDGET_WAIT),
                    Err(e) => {
                        tracing::error!(error = %e, "reading a live stream's changes failed");
                        break "error";
                    }
                }
            }
            let heartbeat = tokio::time::sleep_until((self.last_sent + HEARTBEAT).into());
            let expiry = async {
                match expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Changes wait: for room (the client reads) or for the budget.
            let unwritten = self.oldest_unwritten();
            let look_again = async {
                match (pending.is_empty(), unwritten) {
                    (false, _) => tokio::time::sleep(BEHIND_POLL).await,
                    (true, Some(at)) => tokio::time::sleep_until((at + SLOW_AFTER).into()).await,
                    (true, None) => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => break "stopping",
                _ = expiry => break "expired",
                _ = reloads.changed() => {
                    if !self.holder.still_allowed(&self.state) {
                        break "revoked";
                    }
                }
                change = changes.recv() => match change {
                    Some(change) => {
                        oldest.get_or_insert(change.published);
                        pending.merge(&change.scope);
                        while let Some(more) = changes.try_recv() {
                            pending.merge(&more.scope);
                        }
                    }
                    None => break "stopping",
                },
                _ = self.pieces.closed() => {
                    self.state.metrics.streams.ended("client");
                    return;
                }
                _ = heartbeat => self.queue(b":\n\n".to_vec(), None, false),
                _ = look_again => {}
            }
        };
        self.end(reason);
    }

    /// Reads what `scope` changed for this stream, and sends it unless nothing did.
    /// `false`: the budget had no room for it (nothing was sent, nor counted as sent).
    fn send_changes(
        &mut self,
        scope: &Scope,
        published: Option<Instant>,
    ) -> rusqlite::Result<bool> {
        let now_ms = unix_millis(SystemTime::now());
        let delta =
            tokio::task::block_in_place(|| self.view.read(&self.state.readers, now_ms, scope))?;
        if delta.is_empty() {
            self.view.accept(delta);
            return Ok(true);
        }
        let mut event = delta.json_after(&event_head(self.next_id, "changes"));
        event.extend_from_slice(b"\n\n");
        let Ok(held) = self.state.answers.hold(event.len(), self.holder.is_node()) else {
            return Ok(false);
        };
        self.view.accept(delta);
        self.next_id += 1;
        self.state.metrics.streams.sent("changes");
        self.queue(event, held, false);
        if let Some(published) = published {
            (self.state.metrics.streams).publish_to_send(published.elapsed());
        }
        Ok(true)
    }

    /// Ends the stream with `event: end`; a slow client's queue is dropped first.
    fn end(mut self, reason: &'static str) {
        if reason == "slow" {
            self.shared.abandon.store(true, Ordering::Release);
        }
        let mut event = event_head(self.next_id, "end");
        event.extend_from_slice(reason.as_bytes());
        event.extend_from_slice(b"\n\n");
        self.state.metrics.streams.sent("end");
        self.queue(event, None, true);
        self.state.metrics.streams.ended(reason);
    }

    /// When the oldest piece the socket has not taken yet was queued.
    fn oldest_unwritten(&mut self) -> Option<Instant> {
        let written = self.shared.written.load(Ordering::Acquire);
        // Pieces are written in the order they were queued.
        while self.queued - (self.queued_at.len() as u64) < written {
            self.queued_at.pop_front();
        }
        self.queued_at.front().copied()
    }

    /// Queues an event in pieces, each unsent until written; `held` (its share of the
    /// budget) is given back once all are.
    fn queue(&mut self, event: Vec<u8>, held: Option<Held>, last: bool) {
        let whole = Bytes::from_owner(Whole {
            bytes: event,
            _held: held,
        });
        let mut start = 0;
        while start < whole.len() {
            let end = (start + PIECE_BYTES).min(whole.len());
            (self.shared.unsent).fetch_add(end - start, Ordering::AcqRel);
            self.queued += 1;
            self.queued_at.push_back(Instant::now());
            let bytes = Bytes::from_owner(Tracked {
                bytes: whole.slice(start..end),
                shared: self.shared.clone(),
            });
            let ends_event = end == whole.len();
            // A client gone: the task sees the channel closed at its next turn.
            let _ = self.pieces.send(Piece {
                bytes,
                ends_event,
                last: last && ends_event,
            });
            start = end;
        }
        self.last_sent = Instant::now();
    }
}
