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
    AgentProcess, BenchOptions, ENDPOINT, LOADED_PERIODS, PERIOD, Series, latencies, ms, p50_p99,
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
    let (agent, full_ms) = large_node(options, base, &large, Some(&old), &floor, add)?;
    let tokens = tokens();
    let latencies = queries(options, &agent, &large, &tokens, add)?;
    if let Some(dump) = &options.dump {
        against_clickhouse(dump, full_ms, &latencies, add)?;
    }
    under_load(options, &agent, &mut large, now, &tokens, add)?;
    drop(agent);
    with_relay(options, base, &large, &floor, add)?;
    file_and_scrape(options, base, &large, add)
}

/// Only the large node's applies beside their floors: the quick loop of issue 23.
pub(super) fn applies(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    large_node(options, base, large, None, &Floor::start()?, add).map(drop)
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

/// How many times the large node's four applies are measured, each time into a new agent:
/// each multiple is printed as the median of these and their spread.
const APPLY_RUNS: usize = 3;

/// The large node's four applies, in the order a switch could send them.
const STEPS: [(&str, &str); 4] = [
    ("full snapshot into an empty store", "≤ 4× the floor"),
    ("the same calls resent", "≤ 1.25× the floor"),
    (
        "a 5-second period (3% ended, 3% new, 3% answered)",
        "≤ 2× the floor, ≤ 0.5 CPU-s",
    ),
    ("10% churn", "≤ 3× the floor"),
];

/// The large node through the socket: its idle memory, the four applies [`APPLY_RUNS`]
/// times (against the old layout's), their peaks, and its idle memory once they are done.
/// The last run's agent is kept for the queries; with it, the full apply's median logged
/// time with its indexes (ms).
fn large_node(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    old: Option<&[Applied]>,
    floor: &Floor,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<(AgentProcess, f64)> {
    let bodies = [&large.full, &large.resent, &large.period, &large.churn];
    let (mut full_ms, mut indexed_ms) = (Vec::new(), Vec::new());
    let mut multiples: [Vec<f64>; 4] = Default::default();
    let mut peaks = [0f64; 4];
    let mut last = None;
    for run in 0..APPLY_RUNS {
        drop(last.take()); // the run before's agent, so that it costs this one nothing
        let agent = AgentProcess::start(&base.join(format!("large-socket-{run}")))?;
        if run == 0 {
            std::thread::sleep(Duration::from_millis(500));
            add(
                "idle RSS, empty store",
                format!("{:.1} MB", agent.rss_mb()),
                "≤ 20 MB",
            );
        }
        let mut applies = Vec::new();
        for (i, body) in bodies.into_iter().enumerate() {
            let floor = floor.of(body)?;
            agent.reset_peak();
            let applied = agent.measured_post(body)?;
            peaks[i] = peaks[i].max(agent.peak_mb());
            multiples[i].push(applied.wall.as_secs_f64() / floor.as_secs_f64().max(1e-9));
            if i == 0 {
                // None from an agent that builds them in the snapshot (`BENCH_AGENT`).
                let indexed = agent
                    .logged_ms("indexes built", Duration::from_secs(10))
                    .unwrap_or(0.0);
                full_ms.push(applied.logged_ms + indexed);
                indexed_ms.push(indexed);
            }
            eprintln!("    run {}: {}", run + 1, multiple(applied.wall, floor));
            applies.push((applied, floor));
        }
        last = Some((agent, applies));
    }
    let Some((agent, applies)) = last else {
        anyhow::bail!("no run");
    };
    for (i, ((what, target), (applied, floor))) in STEPS.iter().zip(&applies).enumerate() {
        let spread = spread(&mut multiples[i]);
        let last = format!(
            "last run: {}, {}",
            multiple(applied.wall, *floor),
            applied.text()
        );
        add(
            &format!("{}k calls, socket: {what}", options.calls / 1000),
            match old {
                Some(old) => format!("{spread} · {last} · old layout: {}", old[i].text()),
                None => format!("{spread} · {last}"),
            },
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
        "… the full snapshot's indexes, built after its answer (median)",
        format!("{:.0} ms", percentile(&sorted(indexed_ms), 0.5)),
        "",
    );
    add(
        "peak RSS during the full apply / the period / the churn (the highest of the runs)",
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
    Ok((agent, percentile(&sorted(full_ms), 0.5)))
}

/// `1.42× the floor (1.38–1.51× in 3 runs)`: the median multiple and the spread.
fn spread(multiples: &mut [f64]) -> String {
    multiples.sort_by(f64::total_cmp);
    let (Some(low), Some(high)) = (multiples.first(), multiples.last()) else {
        return "no run".into();
    };
    format!(
        "**{:.2}× the floor** ({low:.2}–{high:.2}× in {} runs)",
        multiples[multiples.len() / 2],
        multiples.len()
    )
}

/// The queries on the large node's calls: random ones on one connection, then selective
/// ones in the big account (and the queries asked, with `--dump`).
fn queries(
    options: &BenchOptions,
    agent: &AgentProcess,
    large: &Series,
    tokens: &HashMap<i64, String>,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<Latencies> {
    let (client, server, mut queries) = latencies(agent.api, tokens, 7, |i| i >= 3000)?;
    let measured = Latencies {
        client: sorted(client.clone()),
        server: sorted(server.clone()),
    };
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
    Ok(measured)
}

/// The random queries' times (ms, sorted): as the client saw them, and the agent's own.
struct Latencies {
    client: Vec<f64>,
    server: Vec<f64>,
}

/// The ClickHouse engine (chdb, `scripts/clickhouse_bench.py`) on the same snapshot and
/// the same queries, in this run: the agent's figures as multiples of its. Said and skipped
/// when chdb is not installed.
fn against_clickhouse(
    dump: &Path,
    full_ms: f64,
    agent: &Latencies,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clickhouse_bench.py");
    let summary = dump.join("clickhouse.json");
    let _ = std::fs::remove_file(&summary); // a run before's, with --dump
    eprintln!("the ClickHouse engine on the same data (chdb)…");
    let ran = std::process::Command::new("python3")
        .arg(&script)
        .arg("--dir")
        .arg(dump)
        .args(["--insert-runs", "1", "--reps", "20", "--summary"])
        .arg(&summary)
        .stdout(std::process::Stdio::null())
        .output();
    let what = "the ClickHouse engine (chdb) on the same snapshot and queries";
    let parsed = std::fs::read(&summary)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let (Ok(ran), Some(ch)) = (ran, parsed) else {
        add(
            what,
            "not measured: python3 or chdb missing (pip install chdb)".into(),
            "",
        );
        return Ok(());
    };
    if !ran.status.success() {
        let stderr = String::from_utf8_lossy(&ran.stderr);
        add(what, format!("not measured: {}", stderr.trim()), "");
        return Ok(());
    }
    let ms = |key: &str, i: usize| ch[key][i].as_f64().unwrap_or(f64::NAN);
    let insert = ch["insert_ms"].as_f64().unwrap_or(f64::NAN);
    let times = |ours: f64, theirs: f64| {
        format!(
            "{:.3}× ({ours:.3} ms against {theirs:.3} ms)",
            ours / theirs
        )
    };
    add(
        "the full apply and its indexes (logged, median) against ClickHouse's insert of it",
        times(full_ms, insert),
        "",
    );
    for (i, p) in [(0, 0.5), (1, 0.99)] {
        add(
            &format!(
                "random queries p{:.0}, client against the chdb call",
                p * 100.0
            ),
            times(percentile(&agent.client, p), ms("wall_ms", i)),
            "",
        );
        add(
            &format!(
                "random queries p{:.0}, X-Runtime against ClickHouse's elapsed",
                p * 100.0
            ),
            times(percentile(&agent.server, p), ms("elapsed_ms", i)),
            "",
        );
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
