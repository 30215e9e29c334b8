//! What the agent's two HTTP listeners share: the accept loop on hyper, the body type, and
//! the small answers.
//!
//! Both the customer API and the socket feed are plain HTTP/1.1 over hyper, with the same
//! limits on a slow client, the same request metrics and the same way to stop; only the
//! handler differs.
//!
//! Stopping is graceful, as systemd's SIGTERM expects: the listener takes the connections
//! already queued and closes (new ones are refused, not left hanging), a connection between
//! two requests closes, a connection just taken gets a moment for its first request, and
//! a request already begun is answered, up to [`SHUTDOWN_GRACE`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::metrics::{self, Metrics};

/// Every answer's body: built whole, then sent.
pub type Body = Full<Bytes>;

/// A client that sends no complete request head within this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Past this many open connections, a new one is answered 503 and closed: idle or slow
    /// clients cannot take every file descriptor, and the others keep being served.
    pub max_connections: usize,
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
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let mut stopping = false;
    loop {
        let accepted = if stopping {
            // Connections already queued in the kernel are taken and answered like the
            // others, rather than reset by the closing listener; then it closes.
            match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                Ok(accepted) => accepted,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped(&mut shutdown) => {
                    stopping = true;
                    continue;
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(_) if stopping => break,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            settings.metrics.connection_refused(settings.name);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let settings = settings.clone();
        let mut shutdown = shutdown.clone();
        let open = open_tx.clone();
        let counted_open = settings.metrics.connection(settings.name);
        tokio::spawn(async move {
            let (begun_tx, mut begun) = watch::channel(false);
            let service = service_fn(move |req| {
                begun_tx.send_replace(true);
                let started = Instant::now();
                let route = metrics::route_of(req.uri().path());
                let answer = handler(req);
                let settings = settings.clone();
                async move {
                    let response = answer.await;
                    let status = response.status().as_u16();
                    settings
                        .metrics
                        .request(settings.name, route, status, started.elapsed());
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let running = tokio::select! {
                served = conn.as_mut() => Some(served),
                _ = stopped(&mut shutdown) => None,
            };
            let served = match running {
                Some(served) => served,
                None => {
                    // hyper would close a connection that has sent nothing yet: a client
                    // that has just connected gets a moment for its first request.
                    let first_request = async {
                        tokio::select! {
                            served = conn.as_mut() => Some(served),
                            _ = begun.wait_for(|begun| *begun) => None,
                        }
                    };
                    match tokio::time::timeout(FIRST_REQUEST_GRACE, first_request).await {
                        Ok(Some(served)) => served,
                        _ => {
                            // Closes the connection if idle, else after the answer in
                            // progress.
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
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop((open, counted_open, slot));
        });
    }
    drop(listener);
    drop(open_tx);
    let _ = all_closed.recv().await;
}

/// Answers a connection past the cap with 503 and closes it. The request is read (a little,
/// briefly) before the close, so that the client gets the answer rather than a reset.
async fn refuse(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
        retry-after: 1\r\nconnection: close\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
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

/// An answer with a body of the given content type.
pub fn with_body(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let length = body.len();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}
