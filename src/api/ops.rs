//! The operator's endpoints: `/metrics` for Prometheus, `/healthz` and `/readyz` for
//! whatever watches the service.
//!
//! `/healthz` is 200 whenever the process answers at all. `/readyz` says whether the
//! answers customers get are worth having: the store answers, a JWT secret is configured,
//! the directory has been read, the writer thread runs, and no node's calls are past
//! their silence limit (expiry keeps up). Each failed check is one line of the 503 body, so a
//! `curl` tells the operator what to fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use hyper::StatusCode;

use crate::api::ApiState;
use crate::clock::unix_millis;
use crate::http::{Body, text, with_body};
use crate::metrics::CONTENT_TYPE;
use crate::store::NodeStats;

pub const METRICS: &str = "/metrics";
pub const HEALTHZ: &str = "/healthz";
pub const READYZ: &str = "/readyz";

/// What readiness needs to know beyond the store and the secret.
#[derive(Default)]
pub struct Health {
    /// A directory file has been read successfully at least once.
    pub directory_loaded: AtomicBool,
    /// The writer thread is running (it clears this as it ends, also by a panic).
    pub writer_running: Arc<AtomicBool>,
}

/// `GET /metrics`: never a 500. A store that cannot be read leaves out its per-node
/// series (`store_readable 0`) and every other series is still there: losing the process
/// metrics with the store would blind the operator when it matters.
pub fn metrics(state: &ApiState) -> hyper::Response<Body> {
    let nodes = match tokio::task::block_in_place(|| state.readers.node_stats()) {
        Ok(nodes) => Some(nodes),
        Err(e) => {
            tracing::error!(error = %e, "reading node statistics for /metrics failed; their series are left out");
            None
        }
    };
    let now = unix_millis(SystemTime::now());
    let text = state
        .metrics
        .render(nodes.as_deref(), now, state.readers.file_sizes());
    with_body(StatusCode::OK, CONTENT_TYPE, text.into_bytes())
}

/// `GET /healthz`.
pub fn healthz() -> hyper::Response<Body> {
    text(StatusCode::OK, "ok")
}

/// `GET /readyz`: 200 `ready`, or 503 with one line per reason.
pub fn readyz(state: &ApiState) -> hyper::Response<Body> {
    let problems = not_ready_because(state);
    if problems.is_empty() {
        return text(StatusCode::OK, "ready");
    }
    let mut body = String::from("not ready:");
    for problem in problems {
        body.push_str("\n- ");
        body.push_str(&problem);
    }
    text(StatusCode::SERVICE_UNAVAILABLE, &body)
}

fn not_ready_because(state: &ApiState) -> Vec<String> {
    let mut problems = Vec::new();
    if !state.auth.load().has_secret() {
        problems.push("no JWT secret configured (api.jwt_secret or api.jwt_secret_file): every token gets 401".into());
    }
    if !state.health.directory_loaded.load(Ordering::Acquire) {
        problems
            .push("the directory file has not been read successfully: no account is known".into());
    }
    if !state.health.writer_running.load(Ordering::Acquire) {
        problems.push("the store's writer thread has stopped: snapshots are not applied".into());
    }
    problems.extend(state.readers.health().problems());
    match tokio::task::block_in_place(|| state.readers.node_stats()) {
        Ok(nodes) => problems.extend(stale(&nodes, unix_millis(SystemTime::now()))),
        Err(e) => {
            tracing::error!(error = %e, "reading the store for /readyz failed");
            problems.push("the store cannot be read".into());
        }
    }
    problems
}

/// How long past its expiry a node may linger before it counts against readiness: expiry
/// runs between snapshots, so a node can outlive its limit by an apply's duration.
const EXPIRY_SLACK_MS: i64 = 30_000;

/// Nodes whose calls outlived their silence limit (customers no longer see them, but
/// expiry should have removed them: the writer is not keeping up).
fn stale(nodes: &[NodeStats], now_ms: i64) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| now_ms.saturating_sub(n.expires_at_ms) > EXPIRY_SLACK_MS)
        .map(|n| {
            format!(
                "node {}: last heard {} s ago, past feed.stale_after, not expired",
                n.node_id,
                (now_ms - n.heard_at_ms) / 1000
            )
        })
        .collect()
}
