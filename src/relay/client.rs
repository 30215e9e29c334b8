//! One attempt to insert one spooled snapshot into one ClickHouse URL, and what its
//! answer means (SPEC 6).
//!
//! HTTP/1.1 over a fresh connection per attempt, with hyper's client connection: one
//! snapshot every few seconds does not need a pool, and a fresh connection never meets
//! one that ClickHouse (or a proxy) closed while it sat idle. `https://` URLs go through
//! rustls ([`Tls`]), verified against the system's CA certificates or the operator's own
//! (`upstream.ca_file`). The body streams from the spooled file, so a large snapshot is
//! never held in memory whole.

use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt may take, and how long it may go without a byte either way.
///
/// Both bounds matter. The idle one frees the URL from a peer that stopped reading or
/// answering. The total one, sized to the body, ends a peer that keeps the attempt alive
/// with a byte now and then (a slow proxy trickling its answer): without it, one attempt
/// could last for ever while the spool fills.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub total: Duration,
}

impl Limits {
    /// Silence for this long ends an attempt.
    const IDLE: Duration = Duration::from_secs(30);
    /// Every attempt may take this long, plus [`Self::PER_SECOND`] of body per second
    /// beyond it: about 1 Mbit/s, slower than any link a relay should use, so that a
    /// 15 MB snapshot on a slow but honest link still gets the three minutes it needs.
    const BASE: Duration = Duration::from_secs(60);
    const PER_SECOND: u64 = 128 * 1024;

    /// The limits of an attempt that sends `len` bytes.
    pub fn for_body(len: u64) -> Limits {
        Limits {
            idle: Self::IDLE,
            total: Self::BASE + Duration::from_secs(len / Self::PER_SECOND),
        }
    }
}
/// How much of an error answer is read, and how much of it a log line quotes.
const ANSWER_BYTES: usize = 4096;
const MESSAGE_CHARS: usize = 300;
/// What a URL parameter's value may hold unencoded: RFC 3986's unreserved characters (so
/// that a logged URL stays readable: `active_calls`, not `active%5Fcalls`).
const PARAM_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A configured ClickHouse URL, ready to send to.
#[derive(Clone)]
pub struct Endpoint {
    /// The URL without credentials and query: the metrics' `url` label and the logs' name.
    pub label: String,
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// For an `https://` URL, the name its certificate must carry (the URL's host), and
    /// the TLS configuration, given by [`Endpoint::use_tls`].
    https: Option<(ServerName<'static>, Option<Tls>)>,
    path: String,
    /// The URL's own parameters, raw, without `query` and `insert_deduplication_token`.
    params: Vec<String>,
    user: String,
    password: String,
}

// Never the password, even in a debug print.
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// Why a configured URL cannot be used. The messages never quote the URL, which may hold
/// a password.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not an http:// or https:// URL")]
    NotHttp,
    #[error("no host, or an invalid host or port")]
    BadHost,
    #[error("the user or password holds a character a header cannot carry")]
    BadCredentials,
    #[error(
        "a password without a user would never be sent (ClickHouse takes a key only with \
         its user): set upstream.user (ClickHouse's own default user is \"default\"), or \
         put user:password in the URL"
    )]
    PasswordWithoutUser,
}

impl Endpoint {
    /// Parses `http[s]://[user[:password]@]host[:port][/path][?params]`. Credentials in
    /// the URL win over `user`/`password` (the `[upstream]` ones). An `https://` one needs
    /// [`use_tls`](Self::use_tls) before it can send.
    pub fn parse(url: &str, user: &str, password: &str) -> Result<Endpoint, UrlError> {
        let scheme_end = url.find("://").ok_or(UrlError::NotHttp)?;
        let (https, rest) = match &url[..scheme_end] {
            s if s.eq_ignore_ascii_case("http") => (false, &url[scheme_end + 3..]),
            s if s.eq_ignore_ascii_case("https") => (true, &url[scheme_end + 3..]),
            _ => return Err(UrlError::NotHttp),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(end);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = if path.is_empty() { "/" } else { path };
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let parsed: hyper::http::uri::Authority = host.parse().map_err(|_| UrlError::BadHost)?;
        // `Authority` takes any digits as a port, and then says there is none.
        let port_given = host.rsplit(']').next().is_some_and(|h| h.contains(':'));
        if parsed.host().is_empty() || (port_given && parsed.port_u16().is_none()) {
            return Err(UrlError::BadHost);
        }
        let default_port = if https { 443 } else { 80 };
        let port = parsed.port_u16().unwrap_or(default_port);
        let authority = format!("{}:{port}", parsed.host());
        let https = if https {
            let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned()).map_err(|_| UrlError::BadHost)?;
            Some((name, None))
        } else {
            None
        };
        let scheme = if https.is_some() { "https" } else { "http" };
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let (user, password) = match userinfo {
            Some(info) => {
                let (u, p) = info.split_once(':').unwrap_or((info, ""));
                (decode(u), decode(p))
            }
            None => (user.to_owned(), password.to_owned()),
        };
        if HeaderValue::from_str(&user).is_err() || HeaderValue::from_str(&password).is_err() {
            return Err(UrlError::BadCredentials);
        }
        if user.is_empty() && !password.is_empty() {
            return Err(UrlError::PasswordWithoutUser);
        }
        let params = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let name = decode(p.split('=').next().unwrap_or_default());
                name != "query" && name != "insert_deduplication_token"
            })
            .map(str::to_owned)
            .collect();
        Ok(Endpoint {
            label: format!("{scheme}://{authority}{path}"),
            authority,
            https,
            path: path.to_owned(),
            params,
            user,
            password,
        })
    }

    /// Whether this is an `https://` URL.
    pub fn is_https(&self) -> bool {
        self.https.is_some()
    }

    /// Gives an `https://` URL the TLS configuration it connects with (nothing for an
    /// `http://` one).
    pub fn use_tls(&mut self, tls: &Tls) {
        if let Some((_, config)) = &mut self.https {
            *config = Some(tls.clone());
        }
    }

    /// The request target for inserting into `table` with `token` (where the server knows
    /// the setting): the URL's parameters, then `query` and `insert_deduplication_token`.
    fn target(&self, table: &str, token: Option<&str>) -> String {
        let query = format!("INSERT INTO {table} FORMAT JSONEachRow");
        let mut params = self.params.clone();
        params.push(format!(
            "query={}",
            utf8_percent_encode(&query, PARAM_VALUE)
        ));
        if let Some(token) = token {
            params.push(format!(
                "insert_deduplication_token={}",
                utf8_percent_encode(token, PARAM_VALUE)
            ));
        }
        format!("{}?{}", self.path, params.join("&"))
    }
}

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ClickHouse took the snapshot (2xx).
    Sent,
    /// Try again later: the network, a timeout, a 5xx or 408/429 without a cause named.
    Retry(String),
    /// The destination cannot take any snapshot as it is (an unknown table, database or
    /// setting, authentication, read-only, too many parts, memory, a proxy's 404: told
    /// by ClickHouse's exception code, `code`, or by an HTTP refusal without one, `None`).
    /// The snapshots stay spooled and are retried; the relay says it is blocked, and why.
    Blocked { code: Option<u16>, message: String },
    /// The server does not know `insert_deduplication_token` (ClickHouse before 22.2):
    /// the same snapshot goes again at once, without it.
    NoDedupToken,
    /// This snapshot's content is what ClickHouse refused (it cannot be parsed, a type
    /// mismatch): it will never take it, and it is dropped alone.
    Refused { status: u16, message: String },
}

/// ClickHouse's exception codes for a snapshot it cannot take whatever the destination
/// does (ErrorCodes.cpp): CANNOT_PARSE_TEXT, CANNOT_PARSE_QUOTED_STRING,
/// CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_READ_ALL_DATA, CANNOT_PARSE_DATE,
/// CANNOT_PARSE_DATETIME, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE,
/// CANNOT_PARSE_NUMBER, INCORRECT_DATA, TOO_LARGE_STRING_SIZE,
/// VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN,
/// CANNOT_PARSE_BOOL. Every other code names a cause of the destination's.
pub const SNAPSHOT_ERRORS: [u16; 15] = [
    6, 26, 27, 33, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 467,
];
/// UNKNOWN_SETTING: with `insert_deduplication_token` in its message, an older server.
const UNKNOWN_SETTING: u16 = 115;

/// The exception code of a ClickHouse answer: its `X-ClickHouse-Exception-Code` header,
/// or the `Code: N` its text starts with (older servers send no header).
pub fn exception_code(header: Option<u16>, message: &str) -> Option<u16> {
    header.or_else(|| {
        let rest = &message[message.find("Code: ")? + 6..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// What an answer with `status`, ClickHouse's exception `code` and its `message` means.
pub fn classify(status: StatusCode, code: Option<u16>, message: String) -> Outcome {
    let http = status.as_u16();
    if status.is_success() {
        return Outcome::Sent;
    }
    let code = exception_code(code, &message);
    if code == Some(UNKNOWN_SETTING) && message.contains("insert_deduplication_token") {
        return Outcome::NoDedupToken;
    }
    // INCORRECT_DATA is also what a table missing a key says to every snapshot (no
    // `input_format_skip_unknown_fields`): the destination's, not the snapshot's.
    let snapshot_error =
        code.is_some_and(|c| SNAPSHOT_ERRORS.contains(&c)) && !message.contains("Unknown field");
    match code {
        _ if snapshot_error || (code.is_none() && http == 413) => Outcome::Refused {
            status: http,
            message,
        },
        Some(code) => Outcome::Blocked {
            code: Some(code),
            message,
        },
        // A refusal without a code (a proxy's, a URL that is not ClickHouse's): the
        // operator fixes it, and the snapshots wait.
        None if status.is_client_error() && !matches!(http, 408 | 429) => Outcome::Blocked {
            code: None,
            message: format!("HTTP {http}: {message}"),
        },
        None => Outcome::Retry(format!("HTTP {http}: {message}")),
    }
}

/// One attempt to insert the gzip file `body` (`len` bytes) with `token` (`None`: the server
/// does not know the setting), within `limits`.
pub async fn attempt(
    endpoint: &Endpoint,
    table: &str,
    token: Option<&str>,
    body: std::fs::File,
    len: u64,
    limits: Limits,
) -> Outcome {
    let progress = Arc::new(Progress::new());
    let send = send(endpoint, table, token, body, len, progress.clone());
    tokio::pin!(send);
    let Limits { idle, total } = limits;
    let give_up = tokio::time::Instant::now() + total;
    loop {
        tokio::select! {
            sent = &mut send => return sent.unwrap_or_else(Outcome::Retry),
            _ = tokio::time::sleep_until(give_up) => {
                return Outcome::Retry(format!(
                    "the attempt took longer than {total:?}, the most a {len}-byte snapshot is given"
                ));
            }
            _ = tokio::time::sleep_until(progress.last() + idle) => {
                if progress.last() + idle <= tokio::time::Instant::now() {
                    return Outcome::Retry(format!("nothing sent or received for {idle:?}"));
                }
            }
        }
    }
}

/// The TLS configuration of the `https://` URLs: rustls with ring, and the CA
/// certificates a server's certificate must lead to. Loaded once, when the configuration
/// is read, so that `check` and the start say what is wrong with them.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
}

impl Tls {
    /// The CA certificates of `ca_file` (PEM, one or more), or with an empty path those
    /// the system trusts (Debian's `ca-certificates`, or `SSL_CERT_FILE`/`SSL_CERT_DIR`).
    /// A private CA file replaces the system's, as curl's `--cacert` does.
    pub fn load(ca_file: &Path) -> anyhow::Result<Tls> {
        use anyhow::Context as _;
        let mut roots = rustls::RootCertStore::empty();
        if ca_file.as_os_str().is_empty() {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none installed".to_owned(), ToString::to_string);
                anyhow::bail!(
                    "https:// URLs need CA certificates and the system has none ({why}): \
                     install ca-certificates, or set upstream.ca_file"
                );
            }
        } else {
            let shown = ca_file.display();
            let certs = CertificateDer::pem_file_iter(ca_file)
                .with_context(|| format!("upstream.ca_file {shown}"))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("upstream.ca_file {shown}: not PEM certificates"))?;
            if certs.is_empty() {
                anyhow::bail!("upstream.ca_file {shown} holds no PEM certificate");
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("upstream.ca_file {shown}: a certificate"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }
}

async fn send(
    endpoint: &Endpoint,
    table: &str,
    token: Option<&str>,
    body: std::fs::File,
    len: u64,
    progress: Arc<Progress>,
) -> Result<Outcome, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&endpoint.authority))
        .await
        .map_err(|_| format!("connecting: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = stream.set_nodelay(true);
    // Progress is counted below TLS: bytes on the wire, the handshake's too.
    let stream = Tracked {
        inner: stream,
        progress,
    };
    let stream: Box<dyn Connection> = match &endpoint.https {
        None => Box::new(stream),
        Some((name, Some(tls))) => Box::new(
            tls.connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?,
        ),
        // Settings::from_config gives every https:// URL its configuration.
        Some((_, None)) => return Err("no TLS configuration for this https:// URL".to_owned()),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    // The connection is driven beside the request, and dropped with this attempt.
    let driver = AbortOnDrop(tokio::spawn(connection));
    let mut request = Request::post(endpoint.target(table, token))
        .header(header::HOST, &endpoint.authority)
        .header(header::CONTENT_ENCODING, "gzip")
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::USER_AGENT,
            concat!("active-calls-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(FileBody::new(body, len))
        .map_err(|e| format!("building the request: {e}"))?;
    if !endpoint.user.is_empty() {
        let headers = request.headers_mut();
        // Checked when the configuration was read.
        if let (Ok(user), Ok(key)) = (
            HeaderValue::from_str(&endpoint.user),
            HeaderValue::from_str(&endpoint.password),
        ) {
            headers.insert("x-clickhouse-user", user);
            headers.insert("x-clickhouse-key", key);
        }
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let status = response.status();
    let exception_code = response
        .headers()
        .get("x-clickhouse-exception-code")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok());
    let message = if status.is_success() {
        String::new()
    } else {
        read_message(response.into_body()).await
    };
    drop(driver);
    Ok(classify(status, exception_code, message))
}

/// The start of an error answer, on one line: ClickHouse says there what it refused.
async fn read_message(mut body: hyper::body::Incoming) -> String {
    let mut text = Vec::new();
    while text.len() < ANSWER_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MESSAGE_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// A connection to ClickHouse, plain or TLS: one type for the exchange over either.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection for S {}

/// When an attempt last sent or received a byte.
struct Progress {
    started: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis();
        self.last_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection that records its [`Progress`]: every byte read or written.
struct Tracked<S> {
    inner: S,
    progress: Arc<Progress>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.progress.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request body read from a file in chunks on the blocking pool, a few chunks ahead.
struct FileBody {
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
}

impl FileBody {
    const CHUNK: usize = 256 * 1024;

    fn new(mut file: std::fs::File, len: u64) -> FileBody {
        let (tx, chunks) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut buf = vec![0; Self::CHUNK];
                let chunk = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                };
                let failed = chunk.is_err();
                // The receiver is gone when the attempt ended: stop reading.
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        FileBody { chunks, left: len }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.chunks.poll_recv(cx).map(|chunk| {
            chunk.map(|chunk| {
                let data = chunk?;
                self.left = self.left.saturating_sub(data.len() as u64);
                Ok(Frame::data(data))
            })
        })
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Posts `bytes` of body to a peer that takes the connection and then reads slowly
    /// (a pause of `pause` between 64 KB reads) or, with no pause, never reads at all;
    /// once it has read everything it answers 200, one byte every `trickle`.
    fn attempt_against(
        bytes: usize,
        pause: Option<Duration>,
        trickle: Duration,
        limits: Limits,
    ) -> Outcome {
        use std::io::{Read as _, Seek as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let Some(pause) = pause else {
                std::thread::sleep(Duration::from_secs(2));
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < bytes {
                std::thread::sleep(pause);
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" {
                if conn.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(trickle);
            }
        });
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![b'x'; bytes]).unwrap();
        file.rewind().unwrap();
        let endpoint = Endpoint::parse(&url, "", "").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(60),
                attempt(&endpoint, "t", Some("x"), file, bytes as u64, limits),
            )
            .await
            .expect("the attempt ended")
        });
        drop(runtime);
        let _ = peer.join();
        outcome
    }

    #[test]
    fn a_peer_that_stops_reading_is_given_up_after_the_idle_time() {
        // 64 MB: more than any socket buffers hold, so the writes stall.
        let limits = Limits {
            idle: Duration::from_millis(300),
            total: Duration::from_secs(60),
        };
        let outcome = attempt_against(64 << 20, None, Duration::ZERO, limits);
        match outcome {
            Outcome::Retry(why) => assert!(why.contains("nothing sent or received"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slow_peer_that_keeps_reading_is_not_cut_off() {
        // The whole upload takes longer than the idle time, each pause much less.
        let started = std::time::Instant::now();
        let limits = Limits {
            idle: Duration::from_secs(1),
            total: Duration::from_secs(60),
        };
        let outcome = attempt_against(
            16 << 20,
            Some(Duration::from_millis(5)),
            Duration::ZERO,
            limits,
        );
        assert!(matches!(outcome, Outcome::Sent), "{outcome:?}");
        assert!(started.elapsed() > Duration::from_secs(1));
    }

    #[test]
    fn a_peer_that_trickles_its_answer_is_given_up_after_the_total_time() {
        // A byte every 100 ms is never idle for the 1 s allowed, and the answer's 38 bytes
        // would take 3.8 s: the total bound, 1.5 s, ends it.
        let limits = Limits {
            idle: Duration::from_secs(1),
            total: Duration::from_millis(1500),
        };
        let started = std::time::Instant::now();
        let outcome = attempt_against(
            1000,
            Some(Duration::ZERO),
            Duration::from_millis(100),
            limits,
        );
        match outcome {
            Outcome::Retry(why) => assert!(why.contains("took longer than"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn the_total_time_grows_with_the_body() {
        let small = Limits::for_body(10_000).total;
        let large = Limits::for_body(15 << 20).total;
        assert_eq!(small, Duration::from_secs(60));
        assert_eq!(large, Duration::from_secs(60 + 120));
    }

    #[test]
    fn a_url_keeps_its_parameters_and_loses_its_credentials() {
        let e = Endpoint::parse(
            "http://relay:p%40ss@ch.example:8123/?database=calls&query=x&async_insert=0#frag",
            "ignored",
            "ignored",
        )
        .unwrap();
        assert_eq!(e.label, "http://ch.example:8123/");
        assert_eq!((e.user.as_str(), e.password.as_str()), ("relay", "p@ss"));
        assert_eq!(
            e.target("db.active_calls", Some("n1-ab")),
            "/?database=calls&async_insert=0\
             &query=INSERT%20INTO%20db.active_calls%20FORMAT%20JSONEachRow\
             &insert_deduplication_token=n1-ab"
        );
        assert!(!format!("{e:?}").contains("p@ss"));
        let plain = Endpoint::parse("HTTP://10.0.0.5", "u", "k").unwrap();
        assert_eq!(plain.label, "http://10.0.0.5:80/");
        assert_eq!((plain.user.as_str(), plain.password.as_str()), ("u", "k"));
        assert_eq!(
            plain.target("t", Some("x")),
            "/?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow&insert_deduplication_token=x"
        );
        // A server without the setting gets the insert alone.
        assert_eq!(
            plain.target("t", None),
            "/?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow"
        );
        let ipv6 = Endpoint::parse("http://[::1]:8123/ch", "", "").unwrap();
        assert_eq!(ipv6.label, "http://[::1]:8123/ch");
    }

    #[test]
    fn http_and_https_urls_are_taken_and_nothing_else() {
        let parse = |url| Endpoint::parse(url, "", "").map(|_| ());
        let https = Endpoint::parse("HTTPS://ch.example/?database=yeti", "", "").unwrap();
        assert!(https.is_https());
        assert_eq!(https.label, "https://ch.example:443/");
        let ip = Endpoint::parse("https://[::1]:8443/", "", "").unwrap();
        assert_eq!(ip.label, "https://[::1]:8443/");
        assert!(!Endpoint::parse("http://ch/", "", "").unwrap().is_https());
        assert_eq!(parse("ch.example:8123"), Err(UrlError::NotHttp));
        assert_eq!(parse("ftp://ch/"), Err(UrlError::NotHttp));
        assert_eq!(parse("http:///x"), Err(UrlError::BadHost));
        assert_eq!(parse("http://ch:99999/"), Err(UrlError::BadHost));
        assert_eq!(
            Endpoint::parse("http://ch/", "u", "bad\nkey").map(|_| ()),
            Err(UrlError::BadCredentials)
        );
        assert_eq!(
            Endpoint::parse("http://ch/", "", "key").map(|_| ()),
            Err(UrlError::PasswordWithoutUser)
        );
        assert_eq!(
            Endpoint::parse("http://:key@ch/", "u", "").map(|_| ()),
            Err(UrlError::PasswordWithoutUser)
        );
        assert!(Endpoint::parse("http://u:key@ch/", "", "").is_ok());
    }

    #[test]
    fn what_is_retried_what_blocks_and_what_is_refused() {
        let of = |status: u16, header, message: &str| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                header,
                message.into(),
            )
        };
        assert_eq!(of(200, None, ""), Outcome::Sent);
        for status in [500, 502, 503, 504, 408, 429, 301] {
            assert!(
                matches!(of(status, None, "m"), Outcome::Retry(_)),
                "{status}"
            );
        }
        // The destination's causes, by code (in the header or only in the text, as older
        // servers send it), whatever the HTTP status: kept and retried.
        for (status, header, message) in [
            (
                404,
                None,
                "Code: 60. DB::Exception: Table yeti.active_calls doesn't exist.",
            ),
            (404, Some(81), "Database yeti doesn't exist"),
            (
                403,
                None,
                "Code: 516. DB::Exception: default: Authentication failed",
            ),
            (500, Some(164), "Cannot execute query in readonly mode"),
            (500, None, "Code: 252. DB::Exception: Too many parts (300)."),
            (
                500,
                None,
                "Code: 241. DB::Exception: Memory limit (total) exceeded",
            ),
            (
                400,
                None,
                "Code: 117. DB::Exception: Unknown field found while parsing JSONEachRow format: pop_id",
            ),
            (400, None, "Code: 62. DB::Exception: Syntax error"),
        ] {
            assert!(
                matches!(
                    of(status, header, message),
                    Outcome::Blocked { code: Some(_), .. }
                ),
                "{status} {message}"
            );
        }
        for status in [400, 401, 403, 404, 415] {
            assert!(
                matches!(of(status, None, "m"), Outcome::Blocked { code: None, .. }),
                "{status}"
            );
        }
        // The snapshot's own fault: dropped alone.
        for (header, message) in [
            (
                None,
                "Code: 27. DB::Exception: Cannot parse input: expected '\"'",
            ),
            (Some(53), "Type mismatch"),
            (None, "Code: 117. DB::Exception: Cannot parse JSON string"),
        ] {
            assert!(
                matches!(of(400, header, message), Outcome::Refused { .. }),
                "{message}"
            );
        }
        assert!(matches!(
            of(413, None, "too large"),
            Outcome::Refused { .. }
        ));
        // An older server: the token goes.
        let old = "Code: 115, e.displayText() = DB::Exception: Unknown setting insert_deduplication_token";
        assert_eq!(of(404, None, old), Outcome::NoDedupToken);
        assert!(matches!(
            of(404, None, "Code: 115. Unknown setting max_bogus"),
            Outcome::Blocked { .. }
        ));
        assert_eq!(exception_code(None, "Code: 60. x"), Some(60));
        assert_eq!(exception_code(Some(7), "Code: 60. x"), Some(7));
        assert_eq!(exception_code(None, "no code"), None);
    }
}
