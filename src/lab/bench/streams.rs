//! Issue 21's figures (`bench --streams`): live streams on a node of 10k and of 100k
//! calls, SEMS's bytes, events posted as the simulated switch posts them (its own bodies,
//! at the instants they carry).
//!
//! - a `started` event posted until the stream of its account has the row it adds, with
//!   100 streams open (the client's clock: an upper bound of publish-to-receive, which
//!   the agent's own `stream_publish_to_send` histogram gives from the other side);
//! - the agent's RSS with 1,000 streams open, against the same agent before them;
//! - the agent's CPU for the same ten seconds of events with no stream, 100 and 1,000;
//! - a period's snapshot of the node: from its commit (the POST's answer) until every
//!   stream has its `changes`;
//! - 50 streams (of 50 accounts) whose clients never read, while periods go on: the
//!   agent's peak RSS over the same agent before them, and when the last was ended as slow.
//!
//! The streams' clients run on one thread of their own (tokio), beside the agent on the
//! same two cores.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ENDPOINT, PERIOD, p50_p99, sleep_until, small_buffer_connection};
use crate::clock::unix_now;
use crate::lab::agent::AgentProcess;
use crate::lab::client::{EventPoster, post_snapshot};
use crate::lab::sems::{ACCOUNTS, BIG_ACCOUNT, CallEvent, Switch, customer_of, uuid_of};
use crate::lab::sse::EventReader;

/// How long each run of events lasts.
const EVENTS_FOR: Duration = Duration::from_secs(10);
/// The share of a node's calls that end in a minute (as `bench --events`).
const ENDED_PER_MINUTE: f64 = 0.36;
/// The agent's settings for this: room for the streams, and their connections.
const API: &str = "max_streams = 2000\nmax_connections = 4096\n";

/// A `changes` event, or the `snapshot`, as a client received it.
struct Seen {
    stream: usize,
    at: Instant,
    changes: bool,
    /// The `dst_prefix_in` of each row a small `changes` added (how a started call is
    /// told apart).
    added: Vec<String>,
}

/// Streams followed by a client thread until dropped.
struct Clients {
    runtime: Option<tokio::runtime::Runtime>,
    seen: mpsc::Receiver<Seen>,
    sender: mpsc::Sender<Seen>,
    /// Each stream's account (`None`: the node's).
    accounts: Vec<Option<i64>>,
}

impl Clients {
    fn new() -> anyhow::Result<Clients> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (sender, seen) = mpsc::channel();
        Ok(Clients {
            runtime: Some(runtime),
            seen,
            sender,
            accounts: Vec::new(),
        })
    }

    /// Opens a stream of `account`'s calls, and waits for its snapshot.
    fn open(
        &mut self,
        api: SocketAddr,
        account: i64,
        tokens: &HashMap<i64, String>,
    ) -> anyhow::Result<()> {
        let target = format!("{ENDPOINT}?account-id={}", uuid_of(account));
        let token = tokens[&customer_of(account)].clone();
        let stream = self.accounts.len();
        self.accounts.push(Some(account));
        let sender = self.sender.clone();
        let runtime = self.runtime.as_ref().context("clients stopped")?;
        runtime.spawn(async move {
            if let Err(e) = follow(api, &target, &token, stream, sender).await {
                eprintln!("stream {stream}: {e:#}");
            }
        });
        // Its snapshot, before the next is opened.
        loop {
            let seen = self
                .seen
                .recv_timeout(Duration::from_secs(30))
                .context("a stream's snapshot")?;
            if seen.stream == stream {
                return Ok(());
            }
        }
    }

    /// Drops what was seen so far.
    fn drain(&self) {
        while self.seen.try_recv().is_ok() {}
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Reads one stream, telling `seen` of each event as it arrives.
async fn follow(
    api: SocketAddr,
    target: &str,
    token: &str,
    stream: usize,
    seen: mpsc::Sender<Seen>,
) -> anyhow::Result<()> {
    let mut socket = tokio::net::TcpStream::connect(api).await?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    // A snapshot's data is not kept: only a change's added rows are read.
    let mut events = EventReader::new(64 * 1024 - 1);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let at = Instant::now();
        let completed = events.feed(&buf[..n])?;
        if let Some(head) = events.head()
            && !head.starts_with(b"HTTP/1.1 200")
        {
            bail!("{}", String::from_utf8_lossy(head));
        }
        for event in completed {
            let changes = event.event == "changes";
            if changes || event.event == "snapshot" {
                let added = if changes {
                    added_prefixes(event.data.as_bytes())
                } else {
                    Vec::new()
                };
                let _ = seen.send(Seen {
                    stream,
                    at,
                    changes,
                    added,
                });
            }
        }
    }
}

/// Runs the stream figures for `sizes` (calls), each on an agent of its own in `base`.
pub(super) fn run(
    sizes: &[usize],
    base: &Path,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let tokens = super::tokens();
    for &calls in sizes {
        let size = format!("{}k calls", calls / 1000);
        let agent =
            AgentProcess::start_configured(&base.join(format!("streams-{calls}")), API, "")?;
        let mut switch = Switch::new(calls as u64);
        let mut now = unix_now() / PERIOD * PERIOD;
        switch.fill(calls, now);
        agent.post(&switch.render(now))?;
        let mut poster = EventPoster::new(agent.feed);

        // Ten seconds of events with no stream, then with 100, then with 1,000.
        let (posted, _, cpu_none) = post_events(&agent, &mut poster, &mut switch, &mut now, calls)?;
        // The same reads as the streams' snapshots, as plain requests: the read pool's
        // page cache (bounded, and the same whoever reads) is then warm in both figures.
        let mut conn = crate::lab::client::Conn::open(agent.api)?;
        for account in 1..=ACCOUNTS {
            let target = format!("{ENDPOINT}?account-id={}", uuid_of(account));
            conn.get(&target, &tokens[&customer_of(account)])?;
        }
        drop(conn);
        let rss_none = settled_rss(&agent);
        let mut clients = Clients::new()?;
        let hundred: Vec<i64> = std::iter::once(BIG_ACCOUNT).chain(2..=100).collect();
        for &account in &hundred {
            clients.open(agent.api, account, &tokens)?;
        }
        clients.drain();
        let (posted_100, made, cpu_100) =
            post_events(&agent, &mut poster, &mut switch, &mut now, calls)?;
        let latencies = received_after(&clients, &made);
        add(
            &format!(
                "{size}, 100 streams: a started call posted until its account's stream has its row (p50 / p99)"
            ),
            format!("{} ({} calls)", p50_p99(latencies.clone()), latencies.len()),
            "≤ 5 / 50 ms",
        );
        for account in 101..=ACCOUNTS {
            clients.open(agent.api, account, &tokens)?;
        }
        clients.drain();
        let rss_with = settled_rss(&agent);
        add(
            &format!("{size}: the agent's RSS with 1,000 streams open"),
            format!(
                "{rss_with:.1} MB, {:+.1} MB over the same agent without them, having \
                 answered the same 1,000 accounts ({rss_none:.1} MB)",
                rss_with - rss_none
            ),
            "≤ +40 MB",
        );
        let (posted_1000, _, cpu_1000) =
            post_events(&agent, &mut poster, &mut switch, &mut now, calls)?;
        let per = |cpu: f64, n: usize| cpu / n.max(1) as f64 * 1e6;
        add(
            &format!("{size}: agent CPU per event posted, with 0 / 100 / 1,000 streams"),
            format!(
                "{:.0} / {:.0} / {:.0} µs ({} / {} / {} events in {} s)",
                per(cpu_none, posted),
                per(cpu_100, posted_100),
                per(cpu_1000, posted_1000),
                posted,
                posted_100,
                posted_1000,
                EVENTS_FOR.as_secs(),
            ),
            "",
        );

        // A period of the node, with 1,000 streams open.
        clients.drain();
        now += PERIOD;
        switch.period(now, PERIOD);
        let body = switch.render(now);
        let (apply, _) = agent.post(&body)?;
        let committed = Instant::now();
        let mut last = committed;
        // Every stream of an account with calls has their new snapshot_timestamp.
        let mut have: Vec<bool> = (clients.accounts.iter())
            .map(|account| account.is_some_and(|a| switch.count_in(a) == 0))
            .collect();
        let mut left = have.iter().filter(|have| !**have).count();
        let streams_with_calls = left;
        let deadline = committed + Duration::from_secs(120);
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            let seen = clients
                .seen
                .recv_timeout(wait)
                .context("a stream without the period")?;
            if seen.changes && !have[seen.stream] {
                have[seen.stream] = true;
                left -= 1;
                last = last.max(seen.at);
            }
        }
        add(
            &format!("{size}: a period's snapshot, from its commit until every stream has it"),
            format!(
                "{:.0} ms for the {streams_with_calls} of 1,000 streams whose account has calls \
                 (the POST took {:.0} ms)",
                last.duration_since(committed).as_secs_f64() * 1000.0,
                apply.as_secs_f64() * 1000.0
            ),
            "",
        );
        drop(clients);
        non_readers(&agent, &mut switch, &mut now, &tokens, &size, add)?;
    }
    Ok(())
}

/// A call a posted `started` event made: when it was posted, its account and its
/// `dst_prefix_in`.
type Made = (Instant, i64, String);

/// Posts ten seconds of the switch's events at the instants they carry: how many, the
/// calls the `started` ones make (when each was posted, its account and `dst_prefix_in`),
/// and the agent's CPU seconds meanwhile.
fn post_events(
    agent: &AgentProcess,
    poster: &mut EventPoster,
    switch: &mut Switch,
    now: &mut i64,
    calls: usize,
) -> anyhow::Result<(usize, Vec<Made>, f64)> {
    let per_run =
        (calls as f64 * ENDED_PER_MINUTE * 20.0 / 7.0 * EVENTS_FOR.as_secs_f64() / 60.0) as usize;
    let from = *now * 1000 + 1;
    *now += EVENTS_FOR.as_secs() as i64;
    let events = switch.events(per_run, from, *now * 1000);
    let cpu = agent.settled_cpu();
    let started = Instant::now();
    let mut made = Vec::new();
    for event in &events {
        sleep_until(started + Duration::from_millis((event.at_ms - from).max(0) as u64));
        let at = Instant::now();
        if poster.post(&event.body)? != 200 {
            bail!("an event was refused");
        }
        if let Some((account, prefix)) = started_call(event)? {
            made.push((at, account, prefix));
        }
    }
    Ok((events.len(), made, agent.settled_cpu() - cpu))
}

/// A `started` event's account and the `dst_prefix_in` of the call it makes.
fn started_call(event: &CallEvent) -> anyhow::Result<Option<(i64, String)>> {
    if event.kind != crate::call::EventKind::Started {
        return Ok(None);
    }
    let body: Value = serde_json::from_slice(&event.body)?;
    let routing = &body["data"]["routing"];
    let account = routing["customer_acc_id"].as_i64().context("no account")?;
    let prefix = routing["dst_prefix_in"]
        .as_str()
        .context("no dst_prefix_in")?;
    Ok(Some((account, prefix.to_owned())))
}

/// The `dst_prefix_in` of each row a `changes` event's data adds.
fn added_prefixes(data: &[u8]) -> Vec<String> {
    let Ok(changes) = serde_json::from_slice::<Value>(data) else {
        return Vec::new();
    };
    (changes["added"].as_array().into_iter().flatten())
        .filter_map(|row| Some(row["dst_prefix_in"].as_str()?.to_owned()))
        .collect()
}

/// For each call a posted `started` made and each stream of its account: the time until
/// that stream received the row (ms).
fn received_after(clients: &Clients, made: &[Made]) -> Vec<f64> {
    let mut received: HashMap<(usize, String), Instant> = HashMap::new();
    // The last events' changes may still be on their way.
    let quiet = Duration::from_millis(500);
    while let Ok(seen) = clients.seen.recv_timeout(quiet) {
        for prefix in seen.added {
            received.entry((seen.stream, prefix)).or_insert(seen.at);
        }
    }
    let mut by_account: HashMap<i64, Vec<usize>> = HashMap::new();
    for (stream, account) in clients.accounts.iter().enumerate() {
        if let Some(account) = account {
            by_account.entry(*account).or_default().push(stream);
        }
    }
    let mut latencies = Vec::new();
    for (at, account, prefix) in made {
        for &stream in by_account.get(account).into_iter().flatten() {
            if let Some(got) = received.get(&(stream, prefix.clone())) {
                latencies.push(got.duration_since(*at).as_secs_f64() * 1000.0);
            }
        }
    }
    latencies
}

/// The agent's RSS (MB) once it has released what an apply holds (10 s after a write).
fn settled_rss(agent: &AgentProcess) -> f64 {
    std::thread::sleep(Duration::from_secs(11));
    agent.rss_mb()
}

/// 50 streams whose clients never read (of 50 accounts with calls), while periods go on: the
/// agent's peak RSS over its peak for the same periods without them, and when the last
/// was ended as slow.
fn non_readers(
    agent: &AgentProcess,
    switch: &mut Switch,
    now: &mut i64,
    tokens: &HashMap<i64, String>,
    size: &str,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let period = |switch: &mut Switch, now: &mut i64| -> anyhow::Result<()> {
        *now += PERIOD;
        switch.period(*now, PERIOD);
        post_snapshot(agent.feed, &switch.render(*now))
    };
    agent.reset_peak();
    for _ in 0..10 {
        period(switch, now)?;
    }
    let without = agent.peak_mb();
    let mut stalled = Vec::new();
    // Accounts with calls: a stream of none would never hear of a change.
    let accounts: Vec<i64> = (2..=ACCOUNTS)
        .filter(|&a| switch.count_in(a) > 0)
        .take(50)
        .collect();
    for &account in &accounts {
        let mut socket = small_buffer_connection(agent.api)?;
        write!(
            socket,
            "GET {ENDPOINT}?account-id={} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {}\r\n\r\n",
            uuid_of(account),
            tokens[&customer_of(account)],
        )?;
        stalled.push(socket);
    }
    agent.reset_peak();
    let started = Instant::now();
    let mut ended_at = None;
    while started.elapsed() < Duration::from_secs(90) {
        period(switch, now)?;
        if slow_ended(agent)? >= accounts.len() as f64 {
            ended_at = Some(started.elapsed());
            break;
        }
    }
    let peak = agent.peak_mb();
    add(
        &format!("{size}: 50 streams that never read, periods going on"),
        format!(
            "peak RSS {peak:.1} MB, {:+.1} MB over ten periods without them; all {} ended \
             as slow {}",
            peak - without,
            accounts.len(),
            match ended_at {
                Some(at) => format!("within {:.0} s", at.as_secs_f64()),
                None => "NOT within 90 s".into(),
            }
        ),
        "bounded; ended slow",
    );
    drop(stalled);
    Ok(())
}

/// How many streams the agent has ended as slow, from its metrics.
fn slow_ended(agent: &AgentProcess) -> anyhow::Result<f64> {
    let mut conn = crate::lab::client::Conn::open(agent.api)?;
    let reply = conn.get("/metrics", "")?;
    let text = String::from_utf8_lossy(&reply.body);
    let series = "active_calls_agent_streams_ended_total{reason=\"slow\"} ";
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}
