//! The default scenario: one node's applies, its answers, both under load, the relay's
//! share and the watched file (BENCHMARKS.md, the first tables). Each step is a function
//! that starts what it needs and adds its rows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::floor::{Floor, multiple};
use super::{
    AgentProcess, BenchOptions, ENDPOINT, LOADED_PERIODS, PERIOD, Series, latencies, p50_p99,
    percentile, sorted, tokens,
};
use crate::lab::agent::{Applied, scrape, wait_for_spooled};
use crate::lab::client::{Conn, post_snapshot};
use crate::lab::sems::{ACCOUNTS, BIG_ACCOUNT, Style, customer_of, uuid_of};

/// Runs the scenario: `large` (with [`LOADED_PERIODS`] more periods) on the large node,
/// `small` on the small one, `legacy` (the old layout of `large`'s calls) for comparison.
pub(super) fn run(
    options: &BenchOptions,
    base: &Path,
    now: i64,
    mut large: Series,
    small: &Series,
    legacy: &Series,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let floor = Floor::start()?;
    small_node(options, base, small, &floor, add)?;
    let old = old_layout(base, legacy)?;
    let agent = large_node(options, base, &large, &old, &floor, add)?;
    let tokens = tokens();
    queries(options, &agent, &large, &tokens, add)?;
    under_load(options, &agent, &mut large, now, &tokens, add)?;
    drop(agent);
    with_relay(options, base, &large, &floor, add)?;
    file_and_scrape(options, base, &large, add)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The small node: its full snapshot, then a period, through the socket; then the full
/// snapshot through the file.
fn small_node(
    options: &BenchOptions,
    base: &Path,
    small: &Series,
    floor: &Floor,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let agent = AgentProcess::start(&base.join("small-socket"))?;
    let floors = (floor.of(&small.full)?, floor.of(&small.period)?);
    let full = agent.measured_post(&small.full)?;
    add(
        &format!("full {}-call snapshot, socket", options.small_calls),
        format!("{} · {}", multiple(full.wall, floors.0), full.text()),
        "",
    );
    let period = agent.measured_post(&small.period)?;
    add(
        &format!("a 5-second period, {} calls, socket", options.small_calls),
        format!("{} · {}", multiple(period.wall, floors.1), period.text()),
        "≤ 40 ms",
    );
    let agent = AgentProcess::start(&base.join("small-file"))?;
    let (wall, logged) = agent.feed_file(&small.full)?;
    add(
        &format!("full {}-call snapshot, file", options.small_calls),
        format!("{} (applied in {logged:.0} ms)", ms(wall)),
        "",
    );
    Ok(())
}

/// The old layout, for comparison: the same calls and changes.
fn old_layout(base: &Path, legacy: &Series) -> anyhow::Result<Vec<Applied>> {
    let agent = AgentProcess::start(&base.join("legacy-socket"))?;
    let mut old = Vec::new();
    for body in [&legacy.full, &legacy.resent, &legacy.period, &legacy.churn] {
        old.push(agent.measured_post(body)?);
    }
    Ok(old)
}

/// The large node through the socket: its idle memory, the four applies (against the old
/// layout's), their peaks, and its idle memory once they are done. The agent is kept for
/// the queries.
fn large_node(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    old: &[Applied],
    floor: &Floor,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<AgentProcess> {
    let agent = AgentProcess::start(&base.join("large-socket"))?;
    std::thread::sleep(Duration::from_millis(500));
    add(
        "idle RSS, empty store",
        format!("{:.1} MB", agent.rss_mb()),
        "≤ 20 MB",
    );
    let steps: [(&str, &Vec<u8>, &'static str); 4] = [
        (
            "full snapshot into an empty store",
            &large.full,
            "≤ 4× the floor",
        ),
        ("the same calls resent", &large.resent, "≤ 1.25× the floor"),
        (
            "a 5-second period (3% ended, 3% new, 3% answered)",
            &large.period,
            "≤ 2× the floor, ≤ 0.5 CPU-s",
        ),
        ("10% churn", &large.churn, "≤ 3× the floor"),
    ];
    let mut peaks = Vec::new();
    for (i, (what, body, target)) in steps.into_iter().enumerate() {
        let floor = floor.of(body)?;
        agent.reset_peak();
        let applied = agent.measured_post(body)?;
        peaks.push(agent.peak_mb());
        add(
            &format!("{}k calls, socket: {what}", options.calls / 1000),
            format!(
                "{} · {} · old layout: {}",
                multiple(applied.wall, floor),
                applied.text(),
                old[i].text()
            ),
            target,
        );
        if i == 2 {
            add(
                "the agent's share of one core per 5-second period",
                format!(
                    "{:.1}% ({:.2} CPU-s of {PERIOD} s, the WAL copy included)",
                    applied.cpu_total / PERIOD as f64 * 100.0,
                    applied.cpu_total
                ),
                "≤ 10%",
            );
        }
    }
    add(
        "peak RSS during the full apply / the period / the churn",
        format!("{:.1} / {:.1} / {:.1} MB", peaks[0], peaks[2], peaks[3]),
        "≤ 96 MB",
    );
    // Idle: no snapshot for longer than the agent keeps its write cache (10 s).
    std::thread::sleep(Duration::from_secs(12));
    add(
        &format!("idle RSS, {} calls stored", options.calls),
        format!("{:.1} MB", agent.rss_mb()),
        "≤ 20 MB",
    );
    Ok(agent)
}

/// The queries on the large node's calls: random ones on one connection, then selective
/// ones in the big account (and the queries asked, with `--dump`).
fn queries(
    options: &BenchOptions,
    agent: &AgentProcess,
    large: &Series,
    tokens: &HashMap<i64, String>,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let (client, server, mut queries) = latencies(agent.api, tokens, 7, |i| i >= 3000)?;
    add(
        "latency, 1 connection, small account, 0–3 random filters (p50 / p99)",
        p50_p99(client),
        "≤ 0.3 / 2 ms",
    );
    add(
        "the same, server time (X-Runtime, p50 / p99)",
        p50_p99(server),
        "≤ 0.3 ms",
    );

    let mut rng = fastrand::Rng::with_seed(8);
    let mut conn = Conn::open(agent.api)?;
    let numbers = large.switch.big_account_numbers();
    let big = uuid_of(BIG_ACCOUNT);
    let big_token = &tokens[&customer_of(BIG_ACCOUNT)];
    add(
        "calls in the big account",
        format!("{}", large.switch.count_in(BIG_ACCOUNT)),
        "",
    );
    for (kind, make) in [
        (
            "-eq",
            (|n: &str| format!("dst-prefix-in-eq={n}")) as fn(&str) -> String,
        ),
        ("-starts-with", |n: &str| {
            format!("dst-prefix-in-starts-with={}", &n[..n.len() - 2])
        }),
        ("-ends-with", |n: &str| {
            format!("dst-prefix-in-ends-with={}", &n[n.len() - 6..])
        }),
    ] {
        let mut server = Vec::new();
        for i in 0..1000 {
            let n = &numbers[rng.usize(..numbers.len())];
            let target = format!("{ENDPOINT}?account-id={big}&{}", make(n));
            let reply = conn.get(&target, big_token)?;
            if i >= 100
                && let Some(runtime) = reply.runtime
            {
                server.push(runtime * 1000.0);
            }
            if i == 0 {
                queries.push(target);
            }
        }
        add(
            &format!("server time (X-Runtime), selective {kind} in the big account (p50 / p99)"),
            p50_p99(server),
            "≤ 0.2 ms",
        );
    }
    if let Some(dump) = &options.dump {
        std::fs::write(dump.join("queries.txt"), queries.join("\n"))?;
    }
    Ok(())
}

/// Under load: the switch's periods keep coming while customers ask; then the throughput
/// of many connections, without and with the periods.
fn under_load(
    options: &BenchOptions,
    agent: &AgentProcess,
    large: &mut Series,
    now: i64,
    tokens: &HashMap<i64, String>,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let loaded = Duration::from_secs(PERIOD as u64 * LOADED_PERIODS as u64);
    let feeder = Feeder::start(agent.feed, std::mem::take(&mut large.more_periods));
    let started = Instant::now();
    let (client, server, _) = latencies(agent.api, tokens, 9, |_| started.elapsed() >= loaded)?;
    let applies = feeder.stop()?;
    add(
        "latency while 5-second periods arrive, client / server p50 / p99",
        format!("{} / {}", p50_p99(client), p50_p99(server)),
        "≤ 0.3 ms p50",
    );
    add("… the periods meanwhile", applies_text(&applies), "");

    let (rps, errors) = throughput(agent.api, options.connections, options.seconds, tokens)?;
    add(
        &format!(
            "throughput, {} connections, small answers",
            options.connections
        ),
        format!("{rps:.0} req/s ({errors} errors)"),
        "≥ 10,000 req/s",
    );
    let again = Series::render(Style::Sems, 3, options.calls, now, LOADED_PERIODS);
    agent.post(&again.full)?;
    let feeder = Feeder::start(agent.feed, again.more_periods);
    let (rps_fed, errors_fed) =
        throughput(agent.api, options.connections, loaded.as_secs(), tokens)?;
    let applies = feeder.stop()?;
    add(
        "throughput, same, while 5-second periods arrive",
        format!(
            "{rps_fed:.0} req/s, {:.0}% of the above ({errors_fed} errors); {}",
            rps_fed / rps * 100.0,
            applies_text(&applies)
        ),
        "≥ 80%, each period applied within 5 s",
    );
    Ok(())
}

/// The relay's share of an apply: the same snapshots with the relay on, its ClickHouse
/// down (so they stay spooled; the sender's work is not in the writer's path anyway).
fn with_relay(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    floor: &Floor,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let floors = (floor.of(&large.full)?, floor.of(&large.churn)?);
    let spool = base.join("relay-spool");
    let agent = AgentProcess::start_with(
        &base.join("relay"),
        &format!("clickhouse_urls = [\"http://127.0.0.1:9/\"]\nspool_dir = {spool:?}"),
    )?;
    agent.reset_peak();
    let (full, _) = agent.post(&large.full)?;
    // The spooler compresses it at the lowest priority; the churn comes after, as a
    // switch's next snapshot would, then one more right away, overlapping it.
    let compressed = wait_for_spooled(&spool, 1)?;
    let (churn, _) = agent.post(&large.churn)?;
    let (overlapped, _) = agent.post(&large.period)?;
    wait_for_spooled(&spool, 3)?;
    add(
        &format!(
            "with the relay on: full {}-call snapshot / churn, socket",
            options.calls
        ),
        format!(
            "{} / {} · {} / {} ({} while the spooler compressed the one before)",
            multiple(full, floors.0),
            multiple(churn, floors.1),
            ms(full),
            ms(churn),
            ms(overlapped)
        ),
        "≈ without",
    );
    add(
        "the spooler compressing the full snapshot (after its apply)",
        ms(compressed),
        "",
    );
    add(
        "peak RSS during them",
        format!("{:.1} MB", agent.peak_mb()),
        "≤ 96 MB",
    );
    Ok(())
}

/// The large snapshot through the file, then the aggregators' scrape of all of it.
fn file_and_scrape(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let agent = AgentProcess::start(&base.join("large-file"))?;
    agent.reset_peak();
    let (wall, logged) = agent.feed_file(&large.full)?;
    add(
        &format!("full {}-call snapshot, file", options.calls),
        format!("{} (applied in {logged:.0} ms)", ms(wall)),
        "≤ 1500 ms",
    );
    add(
        "peak RSS during it",
        format!("{:.1} MB", agent.peak_mb()),
        "≤ 96 MB",
    );
    let (wall, logged) = agent.feed_file(&large.churn)?;
    add(
        "10%-churn snapshot, file",
        format!("{} (applied in {logged:.0} ms)", ms(wall)),
        "≤ 600 ms",
    );

    // The aggregators' scrape of all of it (issue 7): streamed, so the agent's memory
    // must not grow with the answer.
    std::thread::sleep(Duration::from_secs(1));
    let before = agent.rss_mb();
    agent.reset_peak();
    let (plain, etag) = scrape(agent.api, &[])?;
    let (gzipped, _) = scrape(agent.api, &[("Accept-Encoding", "gzip")])?;
    let peak = agent.peak_mb();
    add(
        &format!("scrape of all {} calls, JSONEachRow", options.calls),
        format!(
            "{} for {:.1} MB; gzip: {} for {:.1} MB",
            ms(plain.time),
            plain.bytes as f64 / 1e6,
            ms(gzipped.time),
            gzipped.bytes as f64 / 1e6
        ),
        "streams",
    );
    add(
        "agent RSS before the scrapes / peak during them",
        format!("{before:.1} MB / {peak:.1} MB"),
        "no growth with the answer",
    );
    let mut revalidations = Vec::new();
    for _ in 0..200 {
        let (reply, _) = scrape(agent.api, &[("If-None-Match", &etag)])?;
        anyhow::ensure!(reply.status == 304, "revalidation got {}", reply.status);
        revalidations.push(reply.time.as_secs_f64() * 1000.0);
    }
    add(
        "scrape revalidation, 304 (p50 / p99)",
        p50_p99(revalidations),
        "",
    );
    Ok(())
}

/// Requests/s over `connections` connections for `seconds`, with small answers.
fn throughput(
    api: SocketAddr,
    connections: usize,
    seconds: u64,
    tokens: &HashMap<i64, String>,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..connections)
        .map(|w| {
            let (stop, tokens) = (stop.clone(), tokens.clone());
            std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
                let mut rng = fastrand::Rng::with_seed(100 + w as u64);
                let mut conn = Conn::open(api)?;
                let (mut done, mut errors) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    // A selective filter: answers of zero to a few rows.
                    let account = rng.i64(2..=ACCOUNTS);
                    let target = format!(
                        "{ENDPOINT}?account-id={}&dst-prefix-in-starts-with={}",
                        uuid_of(account),
                        ["3805", "4420", "4930", "9715"][rng.usize(..4)]
                    );
                    let reply = conn.get(&target, &tokens[&customer_of(account)])?;
                    if reply.status == 200 {
                        done += 1;
                    } else {
                        errors += 1;
                    }
                }
                Ok((done, errors))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut errors) = (0, 0);
    for worker in workers {
        let (d, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        done += d;
        errors += e;
    }
    Ok((done as f64 / seconds as f64, errors))
}

/// Snapshots posted every [`PERIOD`] seconds in the background, as a switch does, each
/// apply's client-observed time kept.
struct Feeder {
    running: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Duration>>>,
}

impl Feeder {
    fn start(feed: SocketAddr, bodies: Vec<Vec<u8>>) -> Feeder {
        let running = Arc::new(AtomicBool::new(true));
        let thread = std::thread::spawn({
            let running = running.clone();
            move || {
                let mut applies = Vec::new();
                let period = Duration::from_secs(PERIOD as u64);
                for body in bodies.iter().cycle() {
                    if !running.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    post_snapshot(feed, body)?;
                    applies.push(started.elapsed());
                    let left = period.saturating_sub(started.elapsed());
                    let until = Instant::now() + left;
                    while running.load(Ordering::Relaxed) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Ok(applies)
            }
        });
        Feeder { running, thread }
    }

    /// Stops it; each apply's time.
    fn stop(self) -> anyhow::Result<Vec<Duration>> {
        self.running.store(false, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the feeder panicked"))?
    }
}

/// "median / max ms (n)" of apply times.
fn applies_text(applies: &[Duration]) -> String {
    let ms = sorted(applies.iter().map(|d| d.as_secs_f64() * 1000.0).collect());
    format!(
        "{} periods applied in {:.0} ms median, {:.0} ms at most",
        ms.len(),
        percentile(&ms, 0.5),
        ms.last().copied().unwrap_or(f64::NAN)
    )
}
