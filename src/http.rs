//! What the agent's two HTTP listeners share: the accept loop on hyper, the body type, the
//! small answers, and the query-string decoder.
//!
//! Both the customer API and the socket feed are plain HTTP/1.1 over hyper, with the same
//! limits on a slow client, the same request metrics and the same way to stop; only the
//! handler differs. Both read parameters from the query string too (the API its filters
//! and the scrape's format, the feed its `query` and credentials), so [`form_pairs`] is
//! here, below both, as one decoder.
//!
//! Stopping is graceful, as systemd's SIGTERM expects: the listener takes the connections
//! already queued and closes (new ones are refused, not left hanging), a connection between
//! two requests closes, a connection just taken gets a moment for its first request, and
//! a request already begun is answered, up to [`SHUTDOWN_GRACE`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};

use crate::metrics::Metrics;

/// Every answer's body: most are built whole ([`full`]); the scrape streams. An error
/// mid-stream cuts the connection, so a client never takes half an answer for a whole one.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A body built whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A client that sends no complete request head within this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection whose answer cannot be written for this long (a client that does not
/// read) is closed: it would otherwise hold its slot and its answer's memory for ever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping listener waits for requests already begun.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a stopping listener waits for the first request of a connection it has just
/// taken (hyper would close it at once): a client that connected gets its answer.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// What a listener is beyond its socket: its name in logs and metrics, where its requests
/// are counted, and how many connections it holds at most.
#[derive(Clone)]
pub struct ListenerSettings {
    pub name: &'static str,
    pub metrics: Arc<Metrics>,
    /// Past this many open connections, a new one takes the place of the oldest idle one,
    /// or, when all are busy, is answered 503 (see [`Slots`]).
    pub max_connections: usize,
    /// Paths counted under their own name in the request metrics; any other is counted as
    /// `other`, so that a scan of random URLs cannot create unbounded series.
    pub routes: &'static [&'static str],
}

/// The `route` label of a request for `path` on a listener serving `routes`.
fn route_of(routes: &'static [&'static str], path: &str) -> &'static str {
    routes
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
}

/// A body streamed from a channel: each `Ok` is a piece of it, an `Err` cuts the
/// connection, and the end of the channel ends the body. Past `time_limit` the connection
/// is cut too (and the channel closed, which tells its sender to stop), however slowly
/// the client keeps reading; `on_cut` is told so.
pub fn channel(
    pieces: mpsc::Receiver<std::io::Result<Bytes>>,
    time_limit: Duration,
    on_cut: impl Fn(Duration) + Send + Sync + Unpin + 'static,
) -> Body {
    struct Channel<F> {
        pieces: mpsc::Receiver<std::io::Result<Bytes>>,
        deadline: Pin<Box<tokio::time::Sleep>>,
        time_limit: Duration,
        on_cut: F,
    }
    impl<F: Fn(Duration) + Send + Sync + Unpin> hyper::body::Body for Channel<F> {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            if self.deadline.as_mut().poll(cx).is_ready() {
                (self.on_cut)(self.time_limit);
                return Poll::Ready(Some(Err(std::io::ErrorKind::TimedOut.into())));
            }
            self.pieces
                .poll_recv(cx)
                .map(|piece| piece.map(|piece| piece.map(hyper::body::Frame::data)))
        }
    }
    Channel {
        pieces,
        deadline: Box::pin(tokio::time::sleep(time_limit)),
        time_limit,
        on_cut,
    }
    .boxed()
}

/// The socket of the connection a request came on (in the request's extensions), for
/// an answer that must tune it, and its peer.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSocket(std::os::fd::RawFd, SocketAddr);

impl ConnectionSocket {
    /// Who is on the other end.
    pub fn peer(self) -> SocketAddr {
        self.1
    }

    /// Caps what the kernel buffers for the client at about `bytes` (`SO_SNDBUF`): a
    /// long-lived answer then counts what its client has not taken in its own memory,
    /// where it is bounded and seen, not in the kernel's (up to 4 MB a socket).
    pub fn limit_send_buffer(self, bytes: usize) {
        let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt reads `size` (a live c_int, its length given) and changes an
        // option of the socket; it touches no other memory. The descriptor is the
        // connection's, open while hyper runs the service that has this request.
        unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Binds a listener (port 0 picks a free port).
pub async fn bind(listen: &str, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    use anyhow::Context;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the {what} listener {listen}"))?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Accepts connections on `listener` and answers each request with `handler`, until
/// `shutdown` becomes true; then returns once the requests already begun are answered.
pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Every connection task holds a sender; `recv` returns None once all have ended.
    let (open_tx, mut all_closed) = mpsc::channel::<()>(1);
    let slots = Arc::new(Slots::new(settings.max_connections));
    let mut stopping = false;
    while let Some((stream, peer)) = accept(&listener, &mut shutdown, &mut stopping).await {
        let Some(slot) = slots.admit(&settings) else {
            settings.metrics.connection_refused(settings.name);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let counted_open = settings.metrics.connection(settings.name);
        let held = (open_tx.clone(), counted_open, slot);
        tokio::spawn(connection(
            stream,
            peer,
            settings.clone(),
            handler.clone(),
            shutdown.clone(),
            held,
        ));
    }
    drop(listener);
    drop(open_tx);
    let _ = all_closed.recv().await;
}

/// The next connection to answer; `None` once the listener is to close. Once `shutdown`
/// is true (`stopping`), the connections already queued in the kernel are taken and
/// answered like the others, rather than reset by the closing listener; then it closes.
async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    stopping: &mut bool,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = if *stopping {
            match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                Ok(accepted) => accepted,
                Err(_) => return None,
            }
        } else {
            tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped(shutdown) => {
                    *stopping = true;
                    continue;
                }
            }
        };
        match accepted {
            Ok(conn) => return Some(conn),
            Err(_) if *stopping => return None,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection's task: answers its requests until it ends, is evicted, or the listener
/// stops. `held` counts it (for the listener's wait, the gauge, and its slot) until then.
async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    settings: ListenerSettings,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    held: (mpsc::Sender<()>, crate::metrics::OpenConnection, Slot),
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let socket = ConnectionSocket(std::os::fd::AsRawFd::as_raw_fd(&stream), peer);
    let (name, metrics) = (settings.name, settings.metrics.clone());
    let slot = &held.2;
    let activity = slot.entry.activity.clone();
    let mut watched = activity.subscribe();
    let service = service_fn(move |req: Request<Incoming>| {
        answer(req, socket, &activity, &settings, &handler)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(
            WriteDeadline::new(TokioIo::new(stream), name, metrics),
            service,
        );
    tokio::pin!(conn);
    let ending = tokio::select! {
        served = conn.as_mut() => Ok(served),
        _ = stopped(&mut shutdown) => Err(true),
        _ = slot.entry.evict.notified() => Err(false),
    };
    let served = match ending {
        Ok(served) => served,
        Err(stopping) => close(conn, &mut watched, stopping, peer).await,
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(held);
}

/// One request: marks the connection busy, answers with `handler`, and counts it; the
/// answer's body keeps the connection busy until it is sent.
fn answer<H, F>(
    mut req: Request<Incoming>,
    socket: ConnectionSocket,
    activity: &watch::Sender<Activity>,
    settings: &ListenerSettings,
    handler: &H,
) -> impl Future<Output = Result<Response<BusyUntilSent>, Infallible>> + Send + use<H, F>
where
    H: Fn(Request<Incoming>) -> F,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    req.extensions_mut().insert(socket);
    activity.send_modify(|a| {
        a.begun += 1;
        a.busy = true;
    });
    let started = Instant::now();
    let route = route_of(settings.routes, req.uri().path());
    let answer = handler(req);
    let (settings, activity) = (settings.clone(), activity.clone());
    async move {
        let response = answer.await;
        let status = response.status().as_u16();
        settings
            .metrics
            .request(settings.name, route, status, started.elapsed());
        let response = response.map(|body| BusyUntilSent { body, activity });
        Ok::<_, Infallible>(response)
    }
}

/// Ends a connection the listener's stop (`stopping`) or an eviction interrupted.
/// Stopping, a connection with no request in progress gets a moment for its next one
/// (hyper would close it at once); an evicted one does not. A request counts as begun
/// once hyper has called the service, even if it was answered within the same poll.
async fn close<S>(
    mut conn: Pin<&mut http1::Connection<WriteDeadline<TokioIo<TcpStream>>, S>>,
    watched: &mut watch::Receiver<Activity>,
    stopping: bool,
    peer: SocketAddr,
) -> hyper::Result<()>
where
    S: hyper::service::HttpService<Incoming, ResBody = BusyUntilSent>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let at_stop = watched.borrow_and_update().begun;
    let next_request = async {
        tokio::select! {
            served = conn.as_mut() => Some(served),
            _ = watched.wait_for(|a| a.busy || a.begun != at_stop) => None,
        }
    };
    let grace = if stopping {
        FIRST_REQUEST_GRACE
    } else {
        Duration::ZERO
    };
    match tokio::time::timeout(grace, next_request).await {
        Ok(Some(served)) => served,
        _ => {
            // Closes the connection if idle, else after the answer in progress.
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, conn)
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(%peer, "a request was unanswered at the end of the grace");
                    Ok(())
                })
        }
    }
}

/// An answer's body, which keeps its connection busy (see [`Slots`]) until it has been
/// sent or dropped: a streamed answer is never taken for an idle connection.
struct BusyUntilSent {
    body: Body,
    activity: watch::Sender<Activity>,
}

impl Drop for BusyUntilSent {
    fn drop(&mut self) {
        self.activity.send_modify(|a| a.busy = false);
    }
}

impl hyper::body::Body for BusyUntilSent {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket with a deadline on writes: a write (or flush) that makes no
/// progress for [`WRITE_TIMEOUT`] fails, and hyper closes the connection.
/// Each cut is counted and logged (`answers_cut_total{reason="slow"}`).
struct WriteDeadline<T> {
    inner: T,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    listener: &'static str,
    metrics: Arc<Metrics>,
    /// The deadline passed (counted once; every later write fails at once).
    cut: bool,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, listener: &'static str, metrics: Arc<Metrics>) -> Self {
        WriteDeadline {
            inner,
            stalled: None,
            listener,
            metrics,
            cut: false,
        }
    }

    /// What a write that made no progress answers: still pending, or past the deadline.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) if self.cut => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Ready(()) => {
                self.cut = true;
                self.metrics.answer_cut(
                    self.listener,
                    "slow",
                    &format!(
                        "the client read nothing for {} s (the write timeout)",
                        WRITE_TIMEOUT.as_secs()
                    ),
                );
                Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(
        &mut self,
        result: Poll<std::io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<R>> {
        match result {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections of a listener, oldest first, up to its `max_connections`.
///
/// At the cap, a new connection takes the slot of the oldest one that has no request in
/// progress (idle between requests, or connected and silent for [`FIRST_REQUEST_GRACE`]):
/// that one is closed the way a stop closes it. So idle clients, however many, cannot lock
/// the others out; only when every connection is busy is a new one refused with 503.
///
/// A connection younger than the grace counts as busy: its request may be on the way, and
/// closing it would leave that client with a reset instead of an answer.
struct Slots {
    max: usize,
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<SlotEntry>>>,
}

struct SlotEntry {
    opened: Instant,
    /// The requests begun on the connection, and whether one is in progress.
    activity: watch::Sender<Activity>,
    /// Tells the connection to close.
    evict: Notify,
}

#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    begun: u64,
    busy: bool,
}

/// A connection's place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    entry: Arc<SlotEntry>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max,
            next_id: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// A slot for a new connection, evicting the oldest idle one at the cap; `None` when
    /// every open connection is busy.
    fn admit(self: &Arc<Self>, settings: &ListenerSettings) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let idle = open
                .iter()
                .find(|(_, entry)| entry.evictable())
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&idle) {
                evicted.evict.notify_one();
                settings.metrics.connection_evicted(settings.name);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(SlotEntry {
            opened: Instant::now(),
            activity: watch::Sender::new(Activity::default()),
            evict: Notify::new(),
        });
        open.insert(id, entry.clone());
        Some(Slot {
            slots: self.clone(),
            id,
            entry,
        })
    }
}

impl SlotEntry {
    /// Whether the connection may make room for a new one (see [`Slots`]).
    fn evictable(&self) -> bool {
        let activity = *self.activity.borrow();
        !activity.busy && (activity.begun > 0 || self.opened.elapsed() >= FIRST_REQUEST_GRACE)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
    }
}

/// How much of a refused request is read and dropped before the close: closing with unread
/// bytes sends a reset, which throws away the 503 the client has not read yet.
const REFUSED_READ_BYTES: usize = 1 << 20;
/// How long a refused client has to send its request (a client closes as soon as it has
/// read the 503, so this only matters to one the machine is starving).
const REFUSED_LINGER: Duration = Duration::from_secs(5);

/// Answers a connection past the cap with 503 and closes it. The request is read (up to
/// [`REFUSED_READ_BYTES`], for up to [`REFUSED_LINGER`]) before the close, so that the client gets
/// the answer rather than a reset.
async fn refuse(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
        retry-after: 1\r\nconnection: close\r\n\r\n";
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 16 * 1024];
        let mut read = 0;
        while read < REFUSED_READ_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// An answer with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

/// A plain-text answer ending with a line break (ClickHouse's answers, the health ones).
pub fn text(status: StatusCode, text: &str) -> Response<Body> {
    with_body(
        status,
        "text/plain; charset=utf-8",
        format!("{text}\n").into_bytes(),
    )
}

/// An answer with a body of the given content type.
pub fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let body: Bytes = body.into();
    let length = body.len();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// The decoded `(name, value)` pairs of a query string, in order; a pair without `=` has
/// an empty value.
pub fn form_pairs(query: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(i) => (decode(&pair[..i]), decode(&pair[i + 1..])),
            None => (decode(pair), Vec::new()),
        })
}

/// Decodes one form-urlencoded component (`+` is a space) to bytes.
fn decode(component: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = component
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_are_other() {
        const ROUTES: &[&str] = &["/", "/healthz"];
        assert_eq!(route_of(ROUTES, "/healthz"), "/healthz");
        assert_eq!(route_of(ROUTES, "/"), "/");
        assert_eq!(route_of(ROUTES, "/x"), "other");
        assert_eq!(route_of(ROUTES, "/healthz/"), "other");
    }
}
