//! `active-calls-agent soak`: a bounded soak under load (RELIABILITY.md).
//!
//! The real agent runs as a child process, as in [`crate::lab::bench`]. A simulated switch
//! sends a snapshot of 10k–100k calls every second (or as soon as the previous one is
//! in, when an apply takes longer), over the socket and through the file in turn, while
//! several keep-alive connections send a mix of customer queries. It fails (exit 1) on any
//! 5xx or other unexpected status, on any torn answer, or when resident memory grows after
//! warm-up.
//!
//! A torn answer is one that is not exactly the account's calls of one snapshot: every
//! snapshot carries its own `snapshot_timestamp`, and the switch notes, before sending it,
//! how many calls each watched account has in it; an unfiltered answer for a watched
//! account must show one timestamp and exactly that many calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::clock::format_datetime;
use crate::clock::unix_now;
use crate::lab::bench::{AgentProcess, random_query, rss_mb, tokens};
use crate::lab::client::Conn;
use crate::lab::sems::{Switch, customer_of, uuid_of};

/// The soak's options (the `soak` command's flags).
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub seconds: u64,
    pub connections: usize,
    /// Queries a second, over all connections (a busy node's customers, not a flood: the
    /// switch's snapshots must keep coming in).
    pub rate: u64,
    pub min_calls: usize,
    pub max_calls: usize,
}

/// Accounts whose unfiltered answers are checked against the snapshots.
const WATCHED: [i64; 6] = [2, 3, 5, 8, 13, 21];
/// Memory is compared from this point on: by then the store's page caches are full.
const WARM_UP: Duration = Duration::from_secs(20);
/// Resident memory counts as flat when the second half's peak stays within this share
/// (and a few MB of allocator noise) of the first half's.
const FLAT_SHARE: f64 = 1.10;
const FLAT_SLACK_MB: f64 = 5.0;

/// Per snapshot timestamp, the calls each watched account has in it.
type Expected = Arc<Mutex<HashMap<String, [usize; WATCHED.len()]>>>;

#[derive(Debug, Default)]
struct QueryCounts {
    answered: u64,
    checked: u64,
    server_errors: u64,
    unexpected: u64,
    torn: Vec<String>,
}

/// Runs the soak and prints its figures; an error when a check fails.
pub fn run(options: SoakOptions) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("active-calls-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = soak(&options, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn soak(options: &SoakOptions, dir: &std::path::Path) -> anyhow::Result<()> {
    let agent = AgentProcess::start(dir)?;
    let (api, pid) = (agent.api, agent.pid());
    let expected: Expected = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    eprintln!(
        "soak: {} s, {} queries/s over {} connections, a snapshot of {}–{} calls every second \
         (socket and file in turn)",
        options.seconds, options.rate, options.connections, options.min_calls, options.max_calls
    );

    let switch = std::thread::spawn({
        let (expected, stop) = (expected.clone(), stop.clone());
        let (min, max) = (options.min_calls, options.max_calls.max(options.min_calls));
        // The switch thread owns the agent, and hands it back so that it outlives the
        // clients.
        move || -> (AgentProcess, anyhow::Result<(u64, u64)>) {
            let sent = send_snapshots(&agent, &expected, &stop, min, max);
            (agent, sent)
        }
    });
    let tokens = tokens();
    let per_connection = options.rate.max(1) as f64 / options.connections as f64;
    let clients: Vec<_> = (0..options.connections)
        .map(|c| {
            let (expected, stop, tokens) = (expected.clone(), stop.clone(), tokens.clone());
            let period = Duration::from_secs_f64(1.0 / per_connection);
            std::thread::spawn(move || ask(c, api, period, &expected, &stop, &tokens))
        })
        .collect();

    // Resident memory, once a second.
    let started = Instant::now();
    let mut samples: Vec<(Duration, f64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(options.seconds) {
        std::thread::sleep(Duration::from_secs(1));
        samples.push((started.elapsed(), rss_mb(pid)));
    }
    stop.store(true, Ordering::Relaxed);

    let (_agent, sent) = switch
        .join()
        .map_err(|_| anyhow::anyhow!("the switch thread panicked"))?;
    let mut total = QueryCounts::default();
    for client in clients {
        let counts = client
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        total.answered += counts.answered;
        total.checked += counts.checked;
        total.server_errors += counts.server_errors;
        total.unexpected += counts.unexpected;
        total.torn.extend(counts.torn);
    }
    report(options, &samples, sent?, &total)
}

/// One client connection until `stop`: a query every `period`, each answer of a watched
/// account checked against the snapshot it says it is from.
fn ask(
    c: usize,
    api: std::net::SocketAddr,
    period: Duration,
    expected: &Expected,
    stop: &AtomicBool,
    tokens: &HashMap<i64, String>,
) -> anyhow::Result<QueryCounts> {
    let mut rng = fastrand::Rng::with_seed(200 + c as u64);
    let mut conn = Conn::open(api)?;
    let mut counts = QueryCounts::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let watched = rng.usize(..WATCHED.len() * 2);
        let (target, customer) = match WATCHED.get(watched) {
            Some(&account) => (
                format!(
                    "{}?account-id={}",
                    crate::api::OUTGOING_ACTIVE_CALLS,
                    uuid_of(account)
                ),
                customer_of(account),
            ),
            None => random_query(&mut rng),
        };
        let reply = conn.get(&target, &tokens[&customer])?;
        counts.answered += 1;
        match reply.status {
            200 => {}
            500..=599 => {
                counts.server_errors += 1;
                continue;
            }
            _ => {
                counts.unexpected += 1;
                continue;
            }
        }
        if watched < WATCHED.len() {
            counts.checked += 1;
            if let Some(problem) = torn(&reply.body, watched, expected) {
                counts.torn.push(problem);
            }
        }
    }
    Ok(counts)
}

/// Prints the soak's table; an error when a check failed.
fn report(
    options: &SoakOptions,
    samples: &[(Duration, f64)],
    (by_socket, by_file): (u64, u64),
    total: &QueryCounts,
) -> anyhow::Result<()> {
    let warm: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= WARM_UP)
        .map(|(_, mb)| *mb)
        .collect();
    let (first, second) = warm.split_at(warm.len() / 2);
    let peak = |mbs: &[f64]| mbs.iter().copied().fold(0.0, f64::max);
    let flat = !first.is_empty() && peak(second) <= peak(first) * FLAT_SHARE + FLAT_SLACK_MB;

    println!("| soak, {} s | |", options.seconds);
    println!("|---|---|");
    println!("| snapshots applied (socket / file) | {by_socket} / {by_file} |");
    println!(
        "| queries answered ({}/s asked, {} connections) | {} ({:.0}/s) |",
        options.rate,
        options.connections,
        total.answered,
        total.answered as f64 / options.seconds as f64
    );
    println!(
        "| answers checked against their snapshot | {} |",
        total.checked
    );
    println!("| 5xx | {} |", total.server_errors);
    println!("| other unexpected statuses | {} |", total.unexpected);
    println!("| torn answers | {} |", total.torn.len());
    println!(
        "| RSS after warm-up ({} s): peak of first half / second half | {:.1} / {:.1} MB ({}) |",
        WARM_UP.as_secs(),
        peak(first),
        peak(second),
        if flat { "flat" } else { "GROWING" }
    );
    let timeline: Vec<String> = samples
        .iter()
        .step_by(10)
        .map(|(t, mb)| format!("{}s {mb:.0}", t.as_secs()))
        .collect();
    println!("| RSS every 10 s (MB) | {} |", timeline.join(", "));
    for problem in total.torn.iter().take(5) {
        eprintln!("torn: {problem}");
    }
    let passed = total.server_errors == 0
        && total.unexpected == 0
        && total.torn.is_empty()
        && flat
        && total.checked > 0
        && by_socket + by_file > 0;
    if !passed {
        anyhow::bail!("the soak failed (see the table)");
    }
    println!("soak passed");
    Ok(())
}

/// The simulated switch: a snapshot a second (socket and file in turn) until `stop`;
/// how many went by each way.
fn send_snapshots(
    agent: &AgentProcess,
    expected: &Expected,
    stop: &AtomicBool,
    min: usize,
    max: usize,
) -> anyhow::Result<(u64, u64)> {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut switch = Switch::new(3);
    let start = unix_now();
    let (mut by_socket, mut by_file) = (0, 0);
    let mut tick = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        // Each snapshot its own second, so its timestamp names it.
        let now = start + tick;
        switch.churn(now);
        switch.fill(rng.usize(min..=max), now);
        let counts = WATCHED.map(|a| switch.count_in(a));
        expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format_datetime(now), counts);
        let body = switch.render(now);
        if tick % 2 == 0 {
            agent.post(&body).context("a snapshot over the socket")?;
            by_socket += 1;
        } else {
            agent.feed_file(&body).context("a snapshot file")?;
            by_file += 1;
        }
        tick += 1;
        std::thread::sleep(Duration::from_secs(1).saturating_sub(began.elapsed()));
    }
    Ok((by_socket, by_file))
}

/// Why an unfiltered answer for `WATCHED[watched]` is not exactly one snapshot's calls.
fn torn(body: &[u8], watched: usize, expected: &Expected) -> Option<String> {
    let answer: Value = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(e) => return Some(format!("not JSON: {e}")),
    };
    let rows = answer["data"].as_array()?;
    let stamps: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["snapshot_timestamp"].as_str())
        .collect();
    let first = *stamps.first()?;
    if stamps.iter().any(|s| *s != first) {
        return Some(format!(
            "account {}: two snapshots in one answer",
            WATCHED[watched]
        ));
    }
    let want = expected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(first)
        .map(|counts| counts[watched]);
    match want {
        Some(want) if want == rows.len() => None,
        Some(want) => Some(format!(
            "account {}: {} calls of snapshot {first}, which has {want}",
            WATCHED[watched],
            rows.len()
        )),
        None => Some(format!(
            "account {}: unknown snapshot {first}",
            WATCHED[watched]
        )),
    }
}
