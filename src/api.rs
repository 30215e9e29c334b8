//! The HTTP API: `GET /api/rest/customer/v1/outgoing-active-calls` (SPEC 1), on hyper.
//!
//! A request goes through the same steps as in the central API, in its order: authenticate
//! (401, empty body), check the parameters ([`params`], 400 with the SPEC's body), run the
//! query on a pooled read connection, and answer with the headers a Rails application sends.
//! The SQLite work runs in place on the worker (tokio's `block_in_place`), so a fast query
//! costs no thread hand-off and a slow scan still never stalls the listener.
//! The body is built in memory and hashed for the `ETag` ([`answers`]: once per state of
//! the store for all who ask the same, within a byte budget); a matching `If-None-Match`
//! gets a 304, and `HEAD` the same headers without a body.
//!
//! The same listener (or a listener of its own, per `metrics.listen`) answers the
//! operator's endpoints of [`ops`].

pub mod answers;
pub mod ops;
pub mod params;
pub mod scrape;
pub mod stream;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::answers::{Answers, Failed};
use crate::api::ops::Health;
use crate::auth::{Authenticated, Authenticator, ScrapeTokens};
use crate::clock::unix_millis;
use crate::directory::{Directory, SwapCell};
use crate::http::{self, Body, ListenerSettings, empty, with_body};
use crate::metrics::Metrics;
use crate::store::{CallQuery, Readers, Selection};

/// The customer endpoint's path.
pub const OUTGOING_ACTIVE_CALLS: &str = "/api/rest/customer/v1/outgoing-active-calls";
/// Where the endpoint's OpenAPI document (`openapi.json`) is served.
pub const OPENAPI: &str = "/api/rest/customer/v1/openapi.json";
/// The OpenAPI 3.1 document of the endpoint, as kept in the repository.
pub const OPENAPI_DOCUMENT: &[u8] = include_bytes!("../openapi.json");
/// The paths the API's listeners answer, each counted under its own name in the request
/// metrics (see [`ListenerSettings::routes`]).
pub const ROUTES: &[&str] = &[
    OUTGOING_ACTIVE_CALLS,
    scrape::ACTIVE_CALLS,
    OPENAPI,
    ops::METRICS,
    ops::HEALTHZ,
    ops::READYZ,
];

/// Everything a request needs, shared by all connections.
pub struct ApiState {
    pub readers: Arc<Readers>,
    pub directory: Arc<SwapCell<Directory>>,
    /// Replaced whole when SIGHUP brings a new secret or token lifetime.
    pub auth: SwapCell<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Who may scrape every call (SPEC 6); replaced whole on SIGHUP.
    pub scrape_tokens: SwapCell<ScrapeTokens>,
    /// Turns for scrapes, [`scrape::MAX_SCRAPES`] at a time.
    pub scrapes: Arc<tokio::sync::Semaphore>,
    /// The customer answers in flight, shared and within their budget.
    pub answers: Answers,
    /// What each commit changed, for live streams ([`stream`]).
    pub live: crate::live::Feed,
    /// Turns for live streams, `api.max_streams` of them.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Counts directory reloads (and SIGHUPs): a stream checks its holder again at each.
    pub reloads: watch::Receiver<u64>,
    /// Becomes true when the agent stops: every stream ends first.
    pub stopping: watch::Receiver<bool>,
}

/// What a listener answers besides the health endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Routes {
    /// The customer endpoint.
    pub customer: bool,
    /// `GET /metrics`.
    pub metrics: bool,
}

/// Serves `routes` on `listener` until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    routes: Routes,
    settings: ListenerSettings,
    shutdown: watch::Receiver<bool>,
) {
    http::serve(listener, settings, shutdown, move |req| {
        let state = state.clone();
        async move { handle(&state, routes, req).await }
    })
    .await;
}

/// Routes one request.
async fn handle(state: &Arc<ApiState>, routes: Routes, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let mut response = match path {
        OUTGOING_ACTIVE_CALLS if routes.customer && get => {
            outgoing_active_calls(state, &req, &request_id).await
        }
        scrape::ACTIVE_CALLS if routes.customer && get => scrape::active_calls(state, &req).await,
        OPENAPI if routes.customer && get => with_body(
            StatusCode::OK,
            "application/json",
            OPENAPI_DOCUMENT.to_vec(),
        ),
        ops::METRICS if routes.metrics && get => ops::metrics(state),
        ops::HEALTHZ if get => ops::healthz(),
        ops::READYZ if get => ops::readyz(state),
        OUTGOING_ACTIVE_CALLS | OPENAPI | scrape::ACTIVE_CALLS if routes.customer => not_allowed(),
        ops::METRICS if routes.metrics => not_allowed(),
        ops::HEALTHZ | ops::READYZ => not_allowed(),
        _ => empty(StatusCode::NOT_FOUND),
    };
    finish(&mut response, &request_id, started);
    if req.method() == Method::HEAD {
        // The GET's headers, Content-Length included, and no body.
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::default());
    }
    response
}

fn not_allowed() -> Response<Body> {
    let mut r = empty(StatusCode::METHOD_NOT_ALLOWED);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

async fn outgoing_active_calls(
    state: &Arc<ApiState>,
    req: &Request<Incoming>,
    request_id: &str,
) -> Response<Body> {
    let directory = state.directory.load();
    let authenticator = state.auth.load();
    let auth = match authenticator.authenticate(req.headers(), &directory) {
        Ok(auth) => auth,
        Err(why) => {
            state.metrics.auth_refused(why, request_id);
            return empty(StatusCode::UNAUTHORIZED);
        }
    };
    let now = SystemTime::now();
    let mut response = authorized(state, req, &auth, &directory, now, request_id).await;
    // As the central API (an after-action), every answer past authentication refreshes a
    // cookie session: 200 and 304, and 400 too.
    if auth.from_cookie
        && let Some(cookie) = authenticator.refreshed_cookie(&auth.context, now)
    {
        let headers = response.headers_mut();
        headers.insert(header::SET_COOKIE, header_value(&cookie));
    }
    response
}

/// The answer to an authenticated request: 400 for a bad parameter, else the calls.
async fn authorized(
    state: &Arc<ApiState>,
    req: &Request<Incoming>,
    auth: &Authenticated,
    directory: &Directory,
    now: SystemTime,
    request_id: &str,
) -> Response<Body> {
    let context = &auth.context;
    let query = req.uri().query().unwrap_or("").as_bytes();
    let (account_id, filters) = match params::parse(query, context, directory) {
        Ok(parsed) => parsed,
        Err(e) => return json(StatusCode::BAD_REQUEST, e.body().into_bytes()),
    };
    let call_query = CallQuery {
        customer_id: context.customer_id,
        account_id,
        filters,
        now_ms: unix_millis(now),
    };
    if req.method() == Method::GET && stream::wanted(req.headers()) {
        let holder = stream::Holder::Customer {
            headers: stream::credentials(req.headers()),
            query: query.to_vec(),
            customer_id: context.customer_id,
            account_id,
            expires: auth.expires,
        };
        let socket = req.extensions().get();
        return stream::open(state, socket, Selection::Customer(call_query), holder);
    }
    let answer = match state
        .answers
        .get(&state.readers, &call_query, etag_of)
        .await
    {
        Ok(answer) => answer,
        Err(Failed::Busy) => {
            let mut r = empty(StatusCode::SERVICE_UNAVAILABLE);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Err(Failed::Store(e)) => {
            tracing::error!(request_id, error = %e, "outgoing-active-calls query failed");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let etag = answer.etag().to_owned();
    let mut response = if if_none_match(req.headers(), &etag) {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        json(StatusCode::OK, answer.into_bytes())
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, header_value(&etag));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=0, private, must-revalidate"),
    );
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}

/// A JSON answer; an error is never cached.
fn json(status: StatusCode, body: impl Into<hyper::body::Bytes>) -> Response<Body> {
    let mut response = with_body(status, "application/json; charset=utf-8", body);
    if status != StatusCode::OK {
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}

/// The headers every answer carries, as a Rails application's middleware adds them.
fn finish(response: &mut Response<Body>, request_id: &str, started: Instant) {
    const SECURITY: [(&str, &str); 5] = [
        ("x-frame-options", "SAMEORIGIN"),
        ("x-xss-protection", "0"),
        ("x-content-type-options", "nosniff"),
        ("x-permitted-cross-domain-policies", "none"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
    ];
    let headers = response.headers_mut();
    for (name, value) in SECURITY {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers.insert(
        HeaderName::from_static("x-request-id"),
        header_value(request_id),
    );
    let runtime = format!("{:.6}", started.elapsed().as_secs_f64());
    headers.insert(HeaderName::from_static("x-runtime"), header_value(&runtime));
}

/// The request's own `X-Request-Id`, stripped to `[A-Za-z0-9_@-]` and 255 characters, or a
/// new uuid when that leaves nothing (as Rails' `ActionDispatch::RequestId`).
fn request_id(headers: &HeaderMap) -> String {
    let given: String = headers
        .get("x-request-id")
        .map(|v| {
            v.as_bytes()
                .iter()
                .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'@' | b'-'))
                .take(255)
                .map(|&b| char::from(b))
                .collect()
        })
        .unwrap_or_default();
    if given.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        given
    }
}

/// A header value from text the agent made itself (always visible ASCII).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `W/"<128-bit hash of the body, in hex>"`, the shape of Rack's weak ETag. The hash is
/// xxh3: an ETag needs no cryptography, and hashing a large answer must cost microseconds.
fn etag_of(body: &[u8]) -> String {
    format!("W/\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body))
}

/// Whether `If-None-Match` names `etag` (weak comparison: `W/` is ignored), or is `*`.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let opaque = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn request_ids_are_stripped_or_made() {
        assert_eq!(
            request_id(&headers(&[("x-request-id", "ab c<>@_-9")])),
            "abc@_-9"
        );
        let long = "x".repeat(300);
        assert_eq!(request_id(&headers(&[("x-request-id", &long)])).len(), 255);
        let made = request_id(&headers(&[("x-request-id", "<>")]));
        assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = etag_of(b"{}");
        let strong = etag.trim_start_matches("W/").to_string();
        assert!(if_none_match(&headers(&[("if-none-match", &etag)]), &etag));
        assert!(if_none_match(
            &headers(&[("if-none-match", &strong)]),
            &etag
        ));
        assert!(if_none_match(
            &headers(&[("if-none-match", &format!("\"x\", {etag}"))]),
            &etag
        ));
        assert!(if_none_match(&headers(&[("if-none-match", "*")]), &etag));
        assert!(!if_none_match(
            &headers(&[("if-none-match", "W/\"other\"")]),
            &etag
        ));
        assert!(!if_none_match(&headers(&[]), &etag));
    }
}
