//! `GET /api/rest/node/v1/active-calls`: every current call of the node, for aggregators
//! (SPEC 6).
//!
//! An aggregator scrapes every node every few seconds, and a node may hold 100k calls, so
//! the answer is shaped around two facts:
//!
//! * It is mostly unchanged. The `ETag` is known before a single row is read: it is a
//!   hash of the current nodes and the generation in which what each node's calls show
//!   last changed (kept by the writer), so `If-None-Match` costs one small read, no body,
//!   and no wait for a turn.
//! * It is large. It streams: a blocking task reads the rows in one read transaction
//!   (one state of the store), frames them, gzips them when the client accepts it, and
//!   hands chunks of [`CHUNK_BYTES`] to the connection. While the client keeps up,
//!   [`CHUNKS_IN_FLIGHT`] chunks are all the memory a scrape holds, whatever the number of
//!   calls.
//! * Its read must not wait on the client. A read transaction keeps the WAL from being
//!   copied back and started again, and every snapshot applied meanwhile grows it (a
//!   reader at 128 KB/s grew it to 168 MB in 40 s). So the task waits for a slow client
//!   [`MAX_READ_WAIT`] at most, all told; then it reads the rest at its own pace, the
//!   chunks the client has not taken yet held out of the customer answers' budget
//!   (`api.max_answer_bytes`). An answer that would pass it is cut, logged and counted.
//!   A client that stops reading is cut by the listener's write timeout, one that trickles
//!   by [`MAX_SCRAPE_TIME`]. [`MAX_SCRAPES`] read at once; the others wait up to
//!   [`TURN_WAIT`].

use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use flate2::Compression;
use flate2::write::GzEncoder;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{ApiState, header_value, if_none_match, json};
use crate::clock::unix_millis;
use crate::http::{self, Body, empty, form_pairs};
use crate::metrics::Metrics;
use crate::store::{NodeGeneration, Readers, Selection};

/// The scrape's path.
pub const ACTIVE_CALLS: &str = "/api/rest/node/v1/active-calls";

/// Scrapes read at the same time; more wait their turn. Each holds a read connection and a
/// thread for as long as its client takes.
pub const MAX_SCRAPES: usize = 2;
/// How long a scrape waits for its turn before it is answered 503.
const TURN_WAIT: Duration = Duration::from_secs(5);
/// The longest a scrape's body may take: a client that trickles its reads (each within the
/// write timeout) must not hold its connection, its turn and its memory for ever. At 100k
/// calls the answer is ~80 MB, ~15 MB gzipped.
const MAX_SCRAPE_TIME: Duration = Duration::from_secs(120);
/// How long, all told, the read may wait for the client to take its chunks: as long as a
/// client on a LAN takes to read a 100k-call answer. Past it the rows are read at once.
const MAX_READ_WAIT: Duration = Duration::from_secs(1);
/// The size of the pieces the body is sent in: the budget's unit.
const CHUNK_BYTES: usize = super::answers::UNIT;
/// Pieces between the reading task and the connection: with [`CHUNK_BYTES`], the memory a
/// scrape holds.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The answer's formats, as ClickHouse names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// One JSON object per line (the default).
    JsonEachRow,
    /// `{"data":[…],"rows":N}`.
    Json,
}

impl Format {
    /// The `format` parameter of `query` (the last one given), if every one given is valid.
    fn of_query(query: &str) -> Result<Format, ()> {
        let mut format = Format::JsonEachRow;
        for (name, value) in form_pairs(query.as_bytes()) {
            if name != b"format" {
                continue;
            }
            format = match value.as_slice() {
                b"JSONEachRow" => Format::JsonEachRow,
                b"JSON" => Format::Json,
                _ => return Err(()),
            };
        }
        Ok(format)
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::JsonEachRow => "application/x-ndjson",
            Format::Json => "application/json; charset=utf-8",
        }
    }
}

/// What the reading task has decided once it has read the nodes, in its transaction.
struct Head {
    nodes: Nodes,
    not_modified: bool,
}

/// What the answer's headers say of the nodes it shows: the `ETag` made of them, and each
/// node's learned period (`X-Node-Periods`, SPEC 2.5).
struct Nodes {
    etag: String,
    periods: String,
}

impl Nodes {
    fn of(format: Format, nodes: &[NodeGeneration]) -> Nodes {
        Nodes {
            etag: etag_of(format, nodes),
            periods: periods_of(nodes),
        }
    }
}

/// Answers a scrape (SPEC 6).
pub async fn active_calls(state: &Arc<ApiState>, req: &Request<Incoming>) -> Response<Body> {
    if !state.scrape_tokens.load().admit(req.headers()) {
        return refused(state, req.headers());
    }
    let Ok(format) = Format::of_query(req.uri().query().unwrap_or("")) else {
        return json(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid value format"}"#.to_vec(),
        );
    };
    if req.method() == Method::GET && super::stream::wanted(req.headers()) {
        let holder = super::stream::Holder::Node {
            headers: super::stream::credentials(req.headers()),
        };
        let socket = req.extensions().get();
        return super::stream::open(state, socket, Selection::Node, holder);
    }
    let gzip = accepts_gzip(req.headers());
    let now_ms = unix_millis(SystemTime::now());
    // Revalidations and HEAD need only the nodes: one small read, no turn to wait for.
    let nodes = tokio::task::block_in_place(|| state.readers.node_generations(now_ms));
    let seen = match nodes {
        Ok(nodes) => Nodes::of(format, &nodes),
        Err(e) => {
            tracing::error!(error = %e, "reading the nodes for a scrape failed");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    if if_none_match(req.headers(), &seen.etag) {
        return not_modified(&seen);
    }
    if req.method() == Method::HEAD {
        return with_calls(format, gzip, Body::default(), &seen);
    }
    let permit = tokio::time::timeout(TURN_WAIT, state.scrapes.clone().acquire_owned()).await;
    let Ok(Ok(permit)) = permit else {
        let mut busy = empty(StatusCode::SERVICE_UNAVAILABLE);
        busy.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return busy;
    };
    let (head_tx, head_rx) = oneshot::channel();
    let read = ScrapeRead {
        format,
        gzip,
        now_ms,
        request_headers: req.headers().clone(),
        readers: state.readers.clone(),
        metrics: state.metrics.clone(),
        head: head_tx,
    };
    let Some((chunks, chunks_rx)) = chunks(state) else {
        return empty(StatusCode::INTERNAL_SERVER_ERROR);
    };
    tokio::task::spawn_blocking(move || read.run(chunks, permit));
    match head_rx.await {
        Ok(head) if head.not_modified => not_modified(&head.nodes),
        Ok(head) => streamed(state, format, gzip, chunks_rx, &head.nodes),
        Err(_) => empty(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// The chunks a scrape's rows go out in, within the customer answers' budget, and the
/// connection's end of them; `None` if the final word cannot be reserved.
fn chunks(state: &ApiState) -> Option<(Chunks, mpsc::Receiver<io::Result<Bytes>>)> {
    let (budget, share, units) = state.answers.scrape_budget();
    // Room for every chunk the budget may hold, those in flight, and the final word.
    let (chunks_tx, chunks_rx) = mpsc::channel(units + CHUNKS_IN_FLIGHT + 1);
    let last_word = chunks_tx.clone().try_reserve_owned().ok()?;
    let chunks = Chunks {
        buffer: Vec::with_capacity(CHUNK_BYTES),
        to_connection: chunks_tx,
        last_word: Some(last_word),
        in_flight: Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT)),
        budget,
        share,
        wait_left: MAX_READ_WAIT,
        runtime: tokio::runtime::Handle::current(),
    };
    Some((chunks, chunks_rx))
}

/// One scrape's read, on a blocking thread, holding its turn: the nodes again and the
/// rows, in one read transaction; what it decided (`head`) is sent before any row.
struct ScrapeRead {
    format: Format,
    gzip: bool,
    now_ms: i64,
    request_headers: HeaderMap,
    readers: Arc<Readers>,
    metrics: Arc<Metrics>,
    head: oneshot::Sender<Head>,
}

impl ScrapeRead {
    fn run(self, chunks: Chunks, permit: OwnedSemaphorePermit) {
        let _permit = permit;
        let ScrapeRead {
            format,
            gzip,
            now_ms,
            request_headers,
            readers,
            metrics,
            head,
        } = self;
        let mut out = Framed::new(format, gzip, chunks);
        let mut send_body = false;
        let mut client_gone = false;
        let read = readers.scrape(
            now_ms,
            |nodes| {
                // Read again, in the transaction the rows come from.
                let nodes = Nodes::of(format, nodes);
                let not_modified = if_none_match(&request_headers, &nodes.etag);
                send_body = !not_modified;
                let _ = head.send(Head {
                    nodes,
                    not_modified,
                });
                send_body
            },
            |row| match out.row(row) {
                Ok(()) => true,
                Err(e) => {
                    if e.kind() == io::ErrorKind::OutOfMemory {
                        metrics.answer_cut("api", "budget", "a scrape's client read too slowly, and what it had not read passed api.max_answer_bytes");
                        out.abort();
                    }
                    client_gone = true;
                    false
                }
            },
        );
        match read {
            // Before the head, the handler answers 500; after it, the cut body says it.
            Err(e) => {
                tracing::error!(error = %e, "scrape failed");
                out.abort();
            }
            Ok(()) if send_body && !client_gone => {
                if let Err(e) = out.finish() {
                    tracing::debug!(error = %e, "scrape client left");
                }
            }
            Ok(()) => {}
        }
    }
}

/// The answer whose body is the chunks the read sends, cut past [`MAX_SCRAPE_TIME`].
fn streamed(
    state: &ApiState,
    format: Format,
    gzip: bool,
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    nodes: &Nodes,
) -> Response<Body> {
    let metrics = state.metrics.clone();
    let cut = move |limit: Duration| {
        let what = format!(
            "a scrape took longer than its limit of {} s",
            limit.as_secs()
        );
        metrics.answer_cut("api", "time", &what);
    };
    let body = http::channel(chunks, MAX_SCRAPE_TIME, cut);
    with_calls(format, gzip, body, nodes)
}

/// The answer to a request without a scrape token: 403 for a customer, else 401.
fn refused(state: &ApiState, headers: &HeaderMap) -> Response<Body> {
    let directory = state.directory.load();
    if state.auth.load().authenticate(headers, &directory).is_ok() {
        return json(
            StatusCode::FORBIDDEN,
            br#"{"error":"a customer token may not scrape the node"}"#.to_vec(),
        );
    }
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        br#"{"error":"a scrape token is required"}"#.to_vec(),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// 200 with the calls in `body`.
fn with_calls(format: Format, gzip: bool, body: Body, nodes: &Nodes) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    node_headers(response, nodes)
}

fn not_modified(nodes: &Nodes) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    node_headers(response, nodes)
}

/// The headers of both 200 and 304: revalidate every time; the nodes' periods.
fn node_headers(mut response: Response<Body>, nodes: &Nodes) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(header::ETAG, header_value(&nodes.etag));
    headers.insert(
        hyper::header::HeaderName::from_static("x-node-periods"),
        header_value(&nodes.periods),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    response
}

/// `W/"<hash>"` of the format and the current nodes with their generations: it changes
/// when the answer does, and a resend of the same calls keeps it (gzip or not, the same
/// calls: a weak ETag). Rarely it changes for an answer that did not (a call rewritten
/// and rewritten back within one snapshot): one needless transfer, never a stale one.
fn etag_of(format: Format, nodes: &[NodeGeneration]) -> String {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&[format as u8]);
    for node in nodes {
        hasher.update(&node.node_id.to_le_bytes());
        hasher.update(&node.changed_in.to_le_bytes());
    }
    format!("W/\"n{:032x}\"", hasher.digest128())
}

/// `7=5, 9=unknown`: each node shown, with its learned snapshot period in seconds.
fn periods_of(nodes: &[NodeGeneration]) -> String {
    let mut text = String::new();
    for node in nodes {
        if !text.is_empty() {
            text.push_str(", ");
        }
        let _ = match node.period_ms {
            Some(ms) => write!(text, "{}={}", node.node_id, ms as f64 / 1000.0),
            None => write!(text, "{}=unknown", node.node_id),
        };
    }
    text
}

/// Whether `Accept-Encoding` accepts gzip (by name or `*`, with a q-value above 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for coding in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q > 0.0),
            "*" => any = Some(q > 0.0),
            _ => {}
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// The body's bytes, cut into [`CHUNK_BYTES`] pieces for the connection. Each piece holds
/// what it costs until the connection has written it: a place in flight, or (once the
/// read has waited [`MAX_READ_WAIT`]) its share of the budget.
struct Chunks {
    buffer: Vec<u8>,
    to_connection: mpsc::Sender<io::Result<Bytes>>,
    /// A place kept for the error that cuts the answer, so that it always fits.
    last_word: Option<mpsc::OwnedPermit<io::Result<Bytes>>>,
    in_flight: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    /// The scrapes' share of the budget, taken from too.
    share: Arc<Semaphore>,
    /// How much longer the read may wait for the client.
    wait_left: Duration,
    runtime: tokio::runtime::Handle,
}

/// A chunk and what it holds while the connection has not written it.
struct Held {
    chunk: Vec<u8>,
    _cost: Cost,
}

/// What a chunk holds: a place in flight; or its bytes of the scrapes' share of the
/// budget, and of the budget.
type Cost = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.chunk
    }
}

impl Chunks {
    /// Sends what is buffered. An error when the connection is gone (`BrokenPipe`), or
    /// when the client is so far behind that the budget cannot hold more (`OutOfMemory`).
    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        let cost = match self.in_flight.clone().try_acquire_owned() {
            Ok(place) => (place, None),
            Err(_) => self.wait_or_borrow(chunk.len())?,
        };
        let piece = Bytes::from_owner(Held { chunk, _cost: cost });
        match self.to_connection.try_send(Ok(piece)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::OutOfMemory.into()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Waits for a place in flight while the read may still wait, else takes `len` bytes
    /// from the budget.
    fn wait_or_borrow(&mut self, len: usize) -> io::Result<Cost> {
        if !self.wait_left.is_zero() {
            let started = std::time::Instant::now();
            let place = self.runtime.block_on(tokio::time::timeout(
                self.wait_left,
                self.in_flight.clone().acquire_owned(),
            ));
            self.wait_left = self.wait_left.saturating_sub(started.elapsed());
            if let Ok(Ok(place)) = place {
                return Ok((place, None));
            }
            self.wait_left = Duration::ZERO;
        }
        if self.to_connection.is_closed() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let units = u32::try_from(len.div_ceil(super::answers::UNIT)).unwrap_or(u32::MAX);
        let over = |_| io::Error::from(io::ErrorKind::OutOfMemory);
        let share = self
            .share
            .clone()
            .try_acquire_many_owned(units)
            .map_err(over)?;
        let bytes = self
            .budget
            .clone()
            .try_acquire_many_owned(units)
            .map_err(over)?;
        Ok((share, Some(bytes)))
    }
}

impl Write for Chunks {
    /// Fills chunks to exactly [`CHUNK_BYTES`], the budget's unit: a chunk a byte over
    /// would cost two.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let taken = data.len().min(CHUNK_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Rows in, the answer's bytes out: framed per [`Format`], gzipped if asked.
struct Framed {
    format: Format,
    out: Encoded,
    rows: u64,
}

enum Encoded {
    Identity(Chunks),
    Gzip(GzEncoder<Chunks>),
}

impl Framed {
    fn new(format: Format, gzip: bool, chunks: Chunks) -> Framed {
        // The fastest level: the point is bytes on the wire, and the node's CPU is the
        // switch's.
        let out = if gzip {
            Encoded::Gzip(GzEncoder::new(chunks, Compression::fast()))
        } else {
            Encoded::Identity(chunks)
        };
        Framed {
            format,
            out,
            rows: 0,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.out {
            Encoded::Identity(chunks) => chunks.write_all(data),
            Encoded::Gzip(gzip) => gzip.write_all(data),
        }
    }

    fn row(&mut self, row: &[u8]) -> io::Result<()> {
        match self.format {
            Format::JsonEachRow => {
                self.write(row)?;
                self.write(b"\n")?;
            }
            Format::Json => {
                self.write(if self.rows == 0 { b"{\"data\":[" } else { b"," })?;
                self.write(row)?;
            }
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        if self.format == Format::Json {
            if self.rows == 0 {
                self.write(b"{\"data\":[")?;
            }
            let end = format!("],\"rows\":{}}}", self.rows);
            self.write(end.as_bytes())?;
        }
        let mut chunks = match self.out {
            Encoded::Identity(chunks) => chunks,
            Encoded::Gzip(gzip) => gzip.finish()?,
        };
        chunks.send()
    }

    /// Ends the body with an error: the connection is cut, not ended cleanly.
    fn abort(&mut self) {
        let chunks = match &mut self.out {
            Encoded::Identity(chunks) => chunks,
            Encoded::Gzip(gzip) => gzip.get_mut(),
        };
        if let Some(last_word) = chunks.last_word.take() {
            last_word.send(Err(io::Error::other("the scrape was cut")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_the_last_one_given_and_nothing_else() {
        assert_eq!(Format::of_query(""), Ok(Format::JsonEachRow));
        assert_eq!(Format::of_query("format=JSON"), Ok(Format::Json));
        assert_eq!(
            Format::of_query("x=1&format=JSONEachRow"),
            Ok(Format::JsonEachRow)
        );
        assert_eq!(
            Format::of_query("format=JSON&format=JSONEachRow"),
            Ok(Format::JsonEachRow)
        );
        assert_eq!(Format::of_query("%66ormat=%4ASON"), Ok(Format::Json));
        assert_eq!(Format::of_query("format=json"), Err(()));
        assert_eq!(Format::of_query("format="), Err(()));
        assert_eq!(Format::of_query("format=CSV"), Err(()));
    }

    #[test]
    fn gzip_is_taken_when_offered_with_a_weight() {
        let accepts = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
            accepts_gzip(&headers)
        };
        assert!(accepts("gzip"));
        assert!(accepts("br, GZIP;q=0.5"));
        assert!(accepts("*"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("gzip;q=0, *"));
        assert!(!accepts("identity"));
        assert!(!accepts("*;q=0"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn etags_differ_by_format_and_by_any_node_change() {
        let nodes = [NodeGeneration {
            node_id: 1,
            changed_in: 7,
            period_ms: Some(5_000),
        }];
        let same = etag_of(Format::JsonEachRow, &nodes);
        assert_eq!(same, etag_of(Format::JsonEachRow, &nodes));
        assert_ne!(same, etag_of(Format::Json, &nodes));
        assert_ne!(same, etag_of(Format::JsonEachRow, &[]));
        let changed = [NodeGeneration {
            node_id: 1,
            changed_in: 8,
            period_ms: None,
        }];
        assert_ne!(same, etag_of(Format::JsonEachRow, &changed));
        assert_eq!(periods_of(&nodes), "1=5");
        assert_eq!(periods_of(&[nodes[0], changed[0]]), "1=5, 1=unknown");
        assert_eq!(periods_of(&[]), "");
    }
}
