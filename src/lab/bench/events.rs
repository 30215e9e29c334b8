//! Issue 19's figures (`bench --events`): call events, as a node with
//! `http_events_destination` posts them (the simulated switch's own bodies, one request
//! each over a kept connection), against a node of 10k and of 100k calls.
//!
//! - how long the agent takes to answer an event, idle and while a snapshot of the node
//!   applies (the switch holds each call's next event until that answer);
//! - how long until the event shows in the endpoint, idle and after an apply in progress;
//! - the event rate the agent sustains beside customer queries, and what it costs them;
//! - the agent's CPU for a minute of a 10k-call node: a 60-second period with events,
//!   against a 5-second period without them, for the same calls changing.
//!
//! Every figure is read from the client's clock on loopback, beside the agent on the same
//! two cores: it includes the client's own work, so it is an upper bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::sleep_until;
use super::{ENDPOINT, PERIOD, latencies, p50_p99, percentile, sorted, tokens};
use crate::call::EventKind;
use crate::clock::unix_now;
use crate::lab::agent::AgentProcess;
use crate::lab::client::{Conn, EventPoster, post_snapshot};
use crate::lab::sems::{CallEvent, Switch, customer_of, uuid_of};

/// Events timed for their answer, and `started` ones timed until they show.
const ANSWERED: usize = 3000;
const SHOWN: usize = 300;
/// The sustained run: its rate, and how long it lasts.
const RATE: u64 = 2000;
const SUSTAINED: Duration = Duration::from_secs(10);
/// The share of a node's calls that end in a minute, for the CPU comparison: a busy
/// node's calls last two to three minutes.
const ENDED_PER_MINUTE: f64 = 0.36;

/// Runs the event figures for `sizes` (calls), each on an agent of its own in `base`.
pub(super) fn run(
    sizes: &[usize],
    base: &Path,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let tokens = tokens();
    for &calls in sizes {
        let size = format!("{}k calls", calls / 1000);
        let agent = AgentProcess::start(&base.join(format!("events-{calls}")))?;
        let mut switch = Switch::new(calls as u64);
        let mut now = unix_now() / PERIOD * PERIOD;
        switch.fill(calls, now);
        agent.post(&switch.render(now))?;
        let mut poster = EventPoster::new(agent.feed);

        // Idle: answers, then starts until they show.
        let events = stream(&mut switch, &mut now, ANSWERED);
        let answers = post_all(&mut poster, &events)?;
        add(
            &format!("{size}: an event answered, idle (p50 / p99)"),
            p50_p99(answers),
            "≤ 2 / 10 ms",
        );
        let mut shown = Vec::new();
        let mut query = Conn::open(agent.api)?;
        while shown.len() < SHOWN {
            for event in stream(&mut switch, &mut now, 60) {
                let posted = Instant::now();
                if poster.post(&event.body)? != 200 {
                    bail!("an event was refused");
                }
                if let Some(call) = Started::of(&event)? {
                    call.wait_shown(&mut query, &tokens, Duration::from_secs(10))?;
                    shown.push(ms(posted.elapsed()));
                }
            }
        }
        add(
            &format!("{size}: an event posted until the endpoint shows it, idle (p50 / p99)"),
            p50_p99(shown),
            "≤ 20 ms p99",
        );

        // While a 10%-churn snapshot of the node applies.
        let (during, after_apply, apply) = beside_an_apply(&agent, &mut switch, &mut now, &tokens)?;
        add(
            &format!("{size}: an event answered while a 10%-churn snapshot applies (p50 / p99)"),
            format!(
                "{} ({} events; the apply took {apply:.0} ms)",
                p50_p99(during.clone()),
                during.len()
            ),
            "≤ 50 ms p99",
        );
        add(
            &format!("{size}: the calls those events started: the first / the last shown"),
            format!(
                "{:.1} / {:.1} ms after the apply ended",
                after_apply.first().copied().unwrap_or(f64::NAN),
                after_apply.last().copied().unwrap_or(f64::NAN),
            ),
            "≤ 50 ms",
        );

        // Sustained, with a customer asking all along.
        let (idle, _, _) = latencies(agent.api, &tokens, 31, |i| i >= 2200)?;
        let (rate, refused, loaded) = sustained(&agent, &mut switch, &mut now, &tokens)?;
        let idle_p50 = percentile(&sorted(idle), 0.5);
        let loaded_p50 = percentile(&sorted(loaded), 0.5);
        add(
            &format!(
                "{size}: {RATE} events/s for {}s with queries running",
                SUSTAINED.as_secs()
            ),
            format!(
                "{rate:.0} events/s taken ({refused} refused); query p50 {loaded_p50:.3} ms, \
                 {:.2}x idle ({idle_p50:.3} ms)",
                loaded_p50 / idle_p50
            ),
            "≥ 2,000 events/s, ≤ 1.2x",
        );
        let most = flat_out(&agent, &mut switch, &mut now)?;
        add(
            &format!("{size}: events/s, four switches' connections posting flat out"),
            format!("{most:.0} events/s"),
            "",
        );
    }
    Ok(())
}

/// The agent's CPU for a minute of a `calls`-call node, the same calls changing: snapshots
/// every 5 s without events, or one snapshot a minute with each change as an event.
pub(super) fn cpu_per_minute(
    calls: usize,
    base: &Path,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let minute = Duration::from_secs(60);
    let ended = (calls as f64 * ENDED_PER_MINUTE) as usize;
    // Five seconds, twelve snapshots: each period ends (and starts) a twelfth of them.
    let agent = AgentProcess::start(&base.join("cpu-5s"))?;
    let mut switch = Switch::new(41);
    let mut now = unix_now() / PERIOD * PERIOD;
    switch.fill(calls, now);
    agent.post(&switch.render(now))?;
    let snapshots: Vec<Vec<u8>> = (1..=12)
        .map(|i| {
            let at = now + i * PERIOD;
            switch.step(ended as f64 / 12.0 / calls as f64, 0.03, at, PERIOD);
            switch.render(at)
        })
        .collect();
    let before = agent.settled_cpu();
    let started = Instant::now();
    for (i, body) in snapshots.iter().enumerate() {
        sleep_until(started + Duration::from_secs(PERIOD as u64) * i as u32);
        post_snapshot(agent.feed, body)?;
    }
    sleep_until(started + minute);
    let five = agent.cpu_seconds() - before;
    drop(agent);

    // Sixty seconds: the same changes as events as they happen, then the minute's snapshot.
    let agent = AgentProcess::start(&base.join("cpu-60s"))?;
    let mut switch = Switch::new(41);
    now = unix_now() / 60 * 60;
    switch.fill(calls, now);
    agent.post(&switch.render(now))?;
    // Of every 20 events 7 end a call (`Switch::events`).
    let events = switch.events(ended * 20 / 7, now * 1000, (now + 60) * 1000);
    let snapshot = switch.render(now + 60);
    let before = agent.settled_cpu();
    let started = Instant::now();
    let mut poster = EventPoster::new(agent.feed);
    for event in &events {
        sleep_until(started + Duration::from_millis((event.at_ms - now * 1000) as u64));
        poster.post(&event.body)?;
    }
    sleep_until(started + minute);
    post_snapshot(agent.feed, &snapshot)?;
    let sixty = agent.settled_cpu() - before;
    add(
        &format!(
            "{}k calls, a minute of changes ({:.0}% of the calls end): agent CPU",
            calls / 1000,
            ENDED_PER_MINUTE * 100.0
        ),
        format!(
            "60-second period with events ({} events, current to the ms): {sixty:.2} CPU-s · \
             5-second period without ({} s old at worst): {five:.2} CPU-s ({:.2}x)",
            events.len(),
            PERIOD,
            sixty / five
        ),
        "events the cheaper",
    );
    Ok(())
}

/// The switch's next `n` events, over the second after `now` (strictly after it: a call
/// started at the very millisecond of a snapshot's date is the snapshot's to tell).
fn stream(switch: &mut Switch, now: &mut i64, n: usize) -> Vec<CallEvent> {
    let from = *now * 1000 + 1;
    *now += 1;
    switch.events(n, from, *now * 1000)
}

/// Posts `events` one after the other; each answer's time, ms.
fn post_all(poster: &mut EventPoster, events: &[CallEvent]) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(events.len());
    for event in events {
        let started = Instant::now();
        let status = poster.post(&event.body)?;
        times.push(ms(started.elapsed()));
        if status != 200 {
            bail!("an event was answered {status}");
        }
    }
    Ok(times)
}

/// A call a `started` event makes, and a query that finds it alone.
struct Started {
    account: i64,
    dst_prefix_in: String,
}

impl Started {
    fn of(event: &CallEvent) -> anyhow::Result<Option<Started>> {
        if event.kind != EventKind::Started {
            return Ok(None);
        }
        let body: Value = serde_json::from_slice(&event.body)?;
        let routing = &body["data"]["routing"];
        Ok(Some(Started {
            account: routing["customer_acc_id"].as_i64().context("no account")?,
            dst_prefix_in: routing["dst_prefix_in"]
                .as_str()
                .context("no dst_prefix_in")?
                .to_owned(),
        }))
    }

    /// Asks until the endpoint shows the call; when it did.
    fn wait_shown(
        &self,
        conn: &mut Conn,
        tokens: &HashMap<i64, String>,
        within: Duration,
    ) -> anyhow::Result<Instant> {
        let target = format!(
            "{ENDPOINT}?account-id={}&dst-prefix-in-eq={}",
            uuid_of(self.account),
            self.dst_prefix_in
        );
        let token = &tokens[&customer_of(self.account)];
        let deadline = Instant::now() + within;
        loop {
            let reply = conn.get(&target, token)?;
            if reply.status == 200 && !reply.body.starts_with(b"{\"data\":[]") {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("an event's call did not show within {within:?}: {target}");
            }
        }
    }
}

/// Events posted while a 10%-churn snapshot of the node applies: each one's answer time;
/// how long after the apply ended the first and the last call they started showed (ms);
/// and the apply's own time (ms).
fn beside_an_apply(
    agent: &AgentProcess,
    switch: &mut Switch,
    now: &mut i64,
    tokens: &HashMap<i64, String>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    *now += PERIOD;
    switch.churn(*now);
    let snapshot = switch.render(*now);
    // Dated after the snapshot: it must not undo them.
    let events = stream(switch, now, 5000);
    let feed = agent.feed;
    let applying = Arc::new(AtomicBool::new(true));
    let apply = std::thread::spawn({
        let applying = applying.clone();
        move || -> anyhow::Result<(Instant, Instant)> {
            let started = Instant::now();
            let result = post_snapshot(feed, &snapshot);
            applying.store(false, Ordering::Release);
            result.map(|()| (started, Instant::now()))
        }
    });
    // From the first byte of the snapshot to its answer: while it is received, and while it
    // applies (the events then wait for the writer).
    let mut poster = EventPoster::new(agent.feed);
    let mut answers = Vec::new();
    // The calls started meanwhile (in order), less those that ended again.
    let mut started_calls: Vec<(String, Started)> = Vec::new();
    for event in &events {
        if !applying.load(Ordering::Acquire) {
            break;
        }
        let posted = Instant::now();
        if poster.post(&event.body)? != 200 {
            bail!("an event was refused during the apply");
        }
        answers.push(ms(posted.elapsed()));
        match Started::of(event)? {
            Some(call) => started_calls.push((event.local_tag.clone(), call)),
            None if event.kind == EventKind::Disconnected => {
                started_calls.retain(|(tag, _)| *tag != event.local_tag)
            }
            None => {}
        }
    }
    let (apply_started, apply_ended) = apply
        .join()
        .map_err(|_| anyhow::anyhow!("the snapshot poster panicked"))??;
    // Applied in the order they came: the first shows first, the last last.
    let mut query = Conn::open(agent.api)?;
    let mut after = Vec::new();
    for (_, call) in [started_calls.first(), started_calls.last()]
        .into_iter()
        .flatten()
    {
        let shown = call.wait_shown(&mut query, tokens, Duration::from_secs(30))?;
        after.push(ms(shown.saturating_duration_since(apply_ended)));
    }
    Ok((answers, after, ms(apply_ended - apply_started)))
}

/// [`RATE`] events a second over four connections for [`SUSTAINED`], while a customer
/// asks on one: the rate taken, the events refused, and the queries' times (ms).
fn sustained(
    agent: &AgentProcess,
    switch: &mut Switch,
    now: &mut i64,
    tokens: &HashMap<i64, String>,
) -> anyhow::Result<(f64, u64, Vec<f64>)> {
    const POSTERS: usize = 4;
    let total = (RATE * SUSTAINED.as_secs()) as usize;
    let events = stream(switch, now, total);
    let started = Instant::now();
    let (taken, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // One call's events stay on one connection, in order, as SEMS's sequencer keeps them.
    let mut shares: Vec<Vec<(Duration, Vec<u8>)>> = vec![Vec::new(); POSTERS];
    let first = events.first().map_or(0, |e| e.at_ms);
    for event in events {
        let due = Duration::from_millis((event.at_ms - first).max(0) as u64);
        let share = (xxhash_rust::xxh3::xxh3_64(event.local_tag.as_bytes()) as usize) % POSTERS;
        shares[share].push((due, event.body));
    }
    let posters: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (feed, taken, refused) = (agent.feed, taken.clone(), refused.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut poster = EventPoster::new(feed);
                for (due, body) in share {
                    sleep_until(started + due);
                    match poster.post(&body)? {
                        200 => taken.fetch_add(1, Ordering::Relaxed),
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Ok(())
            })
        })
        .collect();
    let (loaded, _, _) = latencies(agent.api, tokens, 33, |_| started.elapsed() >= SUSTAINED)?;
    for poster in posters {
        poster
            .join()
            .map_err(|_| anyhow::anyhow!("an event poster panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        taken.load(Ordering::Relaxed) as f64 / seconds,
        refused.load(Ordering::Relaxed),
        loaded,
    ))
}

/// Events a second, four connections posting as fast as the agent answers (up to 5 s).
fn flat_out(agent: &AgentProcess, switch: &mut Switch, now: &mut i64) -> anyhow::Result<f64> {
    const POSTERS: usize = 4;
    let events = stream(switch, now, 100_000);
    let mut shares: Vec<Vec<Vec<u8>>> = vec![Vec::new(); POSTERS];
    for event in events {
        let share = (xxhash_rust::xxh3::xxh3_64(event.local_tag.as_bytes()) as usize) % POSTERS;
        shares[share].push(event.body);
    }
    let started = Instant::now();
    let posters: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let feed: SocketAddr = agent.feed;
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut poster = EventPoster::new(feed);
                let mut done = 0;
                for body in share {
                    if started.elapsed() >= Duration::from_secs(5) {
                        break;
                    }
                    if poster.post(&body)? == 200 {
                        done += 1;
                    }
                }
                Ok(done)
            })
        })
        .collect();
    let mut done = 0;
    for poster in posters {
        done += poster
            .join()
            .map_err(|_| anyhow::anyhow!("an event poster panicked"))??;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
