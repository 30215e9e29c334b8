//! `active-calls-agent bench`: the performance benchmark (BENCHMARKS.md).
//!
//! It runs the real agent as a child process (so its memory is its own), over a fresh
//! folder, and drives it as the switch and the customers do: snapshots POSTed to the
//! socket source or renamed into the watched file, queries over HTTP/1.1 keep-alive
//! connections on loopback. Snapshots look like a switch's: ~100 keys and ~2.3 KB a row,
//! 1,000 accounts of 50 customers, one account holding 30% of the calls. Times come from
//! the client's clock (and, for applies, from the agent's own log line too); memory from
//! `/proc/<pid>/status`, the peak reset before each apply through `/proc/<pid>/clear_refs`.
//! Nothing here asserts a timing: it measures and prints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;

mod events;
mod hostile;
mod streams;

pub(crate) use crate::lab::agent::{AgentProcess, rss_mb};
use crate::lab::agent::{scrape, wait_for_spooled};
use crate::lab::client::{Conn, post_snapshot};
pub use hostile::small_buffer_connection;

use crate::auth::Authenticator;
use crate::clock::unix_now;
use crate::lab::sems::{
    ACCOUNTS, BIG_ACCOUNT, CUSTOMERS, Style, Switch, customer_of, directory_json, uuid_of,
};

/// The benchmark's options (the `bench` command's flags).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Calls in the large snapshot.
    pub calls: usize,
    /// Calls in the small snapshot.
    pub small_calls: usize,
    /// Seconds of each throughput run.
    pub seconds: u64,
    /// Connections of the throughput runs.
    pub connections: usize,
    /// Where to keep the agent's files (a temporary folder when not given).
    pub dir: Option<PathBuf>,
    /// Also write the large snapshot, the directory and the queries here (for the
    /// ClickHouse comparison of BENCHMARKS.md).
    pub dump: Option<PathBuf>,
    /// Only the hostile clients' figures (issue 13): trickling feed senders, and slow
    /// readers of the largest answer, of the scrape and of the metrics.
    pub hostile: bool,
    /// Only the call events' figures (issue 19): answers, visibility, the sustained rate,
    /// and the CPU of a long period with events against a short one without.
    pub events: bool,
    /// Only the live streams' figures (issue 21): latency, memory and CPU with 100 and
    /// 1,000 streams, a period's reach, and streams whose clients never read.
    pub streams: bool,
}

pub(crate) const SECRET: &str = "bench-secret";
/// The aggregators' token the benchmark's agent lists.
pub(crate) const SCRAPE_TOKEN: &str = "bench-scrape-token-0123456789";
pub(crate) const ENDPOINT: &str = crate::api::OUTGOING_ACTIVE_CALLS;

// ---------------------------------------------------------------------------------------
// Queries

/// A random account-filtered query: a small account, 0–3 random filters of SPEC 1.2.
pub(crate) fn random_query(rng: &mut fastrand::Rng) -> (String, i64) {
    let account = rng.i64(2..=ACCOUNTS);
    let mut target = format!("{ENDPOINT}?account-id={}", uuid_of(account));
    let columns = [
        "src-name-in",
        "src-prefix-in",
        "dst-prefix-in",
        "src-prefix-routing",
        "dst-prefix-routing",
    ];
    for _ in 0..rng.usize(0..=3) {
        let filter = match rng.u8(..8) {
            0 => format!("auth-orig-port={}", if rng.bool() { 5060 } else { 5061 }),
            1 => format!(
                "connect-time-null={}",
                if rng.bool() { "true" } else { "false" }
            ),
            2 => format!("auth-orig-transport-protocol-id={}", rng.u8(1..4)),
            3 => format!("{}-eq={}", columns[rng.usize(..5)], rng.u32(..1000)),
            4 => format!(
                "{}-starts-with={}",
                columns[rng.usize(1..5)],
                ["38", "44", "49", "1", "7"][rng.usize(..5)]
            ),
            5 => format!("{}-ends-with={}", columns[rng.usize(1..5)], rng.u8(..100)),
            6 => format!(
                "src-name-in-contains={}",
                ["ali", "B", "x", "%25"][rng.usize(..4)]
            ),
            _ => format!("auth-orig-ip=10.20.{}.{}", rng.u8(..), rng.u8(..)),
        };
        target.push('&');
        target.push_str(&filter);
    }
    (target, customer_of(account))
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

pub(crate) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// "p50 / p99 ms" of measurements in milliseconds.
pub(crate) fn p50_p99(values: Vec<f64>) -> String {
    let values = sorted(values);
    format!(
        "{:.3} / {:.3} ms",
        percentile(&values, 0.5),
        percentile(&values, 0.99)
    )
}

pub(crate) fn tokens() -> HashMap<i64, String> {
    let auth = Authenticator::new(Some(SECRET.as_bytes()), Duration::ZERO);
    (1..=CUSTOMERS)
        .filter_map(|c| Some((c, auth.issue_for_access(c, SystemTime::now())?)))
        .collect()
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

// ---------------------------------------------------------------------------------------
// The run

struct Row {
    what: String,
    value: String,
    target: &'static str,
}

/// The seconds between two snapshots of the simulated switch.
pub(crate) const PERIOD: i64 = 5;

/// One switch's snapshots for the apply measurements, in the order they are applied: all
/// calls into an empty store, the same calls resent (nothing changed), one 5-second
/// period, a 10%-churn snapshot; then `extra` more periods, for the runs under load.
pub(crate) struct Series {
    pub(crate) switch: Switch,
    pub(crate) full: Vec<u8>,
    pub(crate) resent: Vec<u8>,
    pub(crate) period: Vec<u8>,
    pub(crate) churn: Vec<u8>,
    pub(crate) more_periods: Vec<Vec<u8>>,
}

impl Series {
    fn render(style: Style, seed: u64, calls: usize, now: i64, extra: usize) -> Series {
        let mut switch = Switch::with_style(seed, style);
        switch.fill(calls, now);
        let full = switch.render(now);
        let resent = switch.render(now + PERIOD);
        switch.period(now + 2 * PERIOD, PERIOD);
        let period = switch.render(now + 2 * PERIOD);
        switch.churn(now + 3 * PERIOD);
        let churn = switch.render(now + 3 * PERIOD);
        let more_periods = (0..extra as i64)
            .map(|i| {
                let at = now + (4 + i) * PERIOD;
                switch.period(at, PERIOD);
                switch.render(at)
            })
            .collect();
        Series {
            switch,
            full,
            resent,
            period,
            churn,
            more_periods,
        }
    }
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

/// `n` random customer queries over one keep-alive connection (after 200 of warm-up): the
/// client's and the server's (`X-Runtime`) times, ms; and the queries asked.
pub(crate) fn latencies(
    api: SocketAddr,
    tokens: &HashMap<i64, String>,
    seed: u64,
    until: impl Fn(usize) -> bool,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<String>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut conn = Conn::open(api)?;
    let (mut client, mut server, mut queries) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while !until(i) {
        let (target, customer) = random_query(&mut rng);
        let started = Instant::now();
        let reply = conn.get(&target, &tokens[&customer])?;
        if i >= 200 {
            client.push(started.elapsed().as_secs_f64() * 1000.0);
            server.extend(reply.runtime.map(|r| r * 1000.0));
        }
        if reply.status != 200 {
            bail!("{target}: {}", reply.status);
        }
        queries.push(target);
        i += 1;
    }
    Ok((client, server, queries))
}

/// Sleeps until `at` (at once if it has passed).
fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// Runs the benchmark and prints its table.
pub fn run(options: BenchOptions) -> anyhow::Result<()> {
    let scratch;
    let base = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            scratch =
                std::env::temp_dir().join(format!("active-calls-bench-{}", std::process::id()));
            scratch.clone()
        }
    };
    let _ = std::fs::remove_dir_all(&base);
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |what: &str, value: String, target: &'static str| {
        eprintln!("  {what}: {value}");
        rows.push(Row {
            what: what.into(),
            value,
            target,
        });
    };
    // A switch stamps its snapshots with the period-aligned time.
    let now = unix_now() / PERIOD * PERIOD;
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    // The runs under load last this many periods.
    let loaded_periods = 4;

    eprintln!(
        "generating snapshots ({} and {} calls, SEMS's bytes and the old layout)…",
        options.small_calls, options.calls
    );
    let mut large = Series::render(Style::Sems, 2, options.calls, now, loaded_periods);
    let legacy = Series::render(Style::Legacy, 2, options.calls, now, 0);
    let small = Series::render(Style::Sems, 1, options.small_calls, now, 0);
    let row_bytes = large.full.len() / options.calls.max(1);
    add(
        "snapshot size (SEMS's bytes / the old layout)",
        format!(
            "{} calls, {:.1} MB, {} B a row / {:.1} MB",
            options.calls,
            large.full.len() as f64 / 1e6,
            row_bytes,
            legacy.full.len() as f64 / 1e6,
        ),
        "",
    );
    if let Some(dump) = &options.dump {
        std::fs::create_dir_all(dump)?;
        std::fs::write(dump.join("snapshot.jsonl"), &large.full)?;
        std::fs::write(dump.join("directory.json"), directory_json())?;
    }

    if options.events {
        events::run(&[options.small_calls, options.calls], &base, &mut add)?;
        events::cpu_per_minute(options.small_calls, &base, &mut add)?;
        let _ = std::fs::remove_dir_all(&base);
        print_rows(rows);
        return Ok(());
    }
    if options.streams {
        streams::run(&[options.small_calls, options.calls], &base, &mut add)?;
        let _ = std::fs::remove_dir_all(&base);
        print_rows(rows);
        return Ok(());
    }
    if options.hostile {
        hostile::hostile(&options, &base, &large, &mut add)?;
        let _ = std::fs::remove_dir_all(&base);
        print_rows(rows);
        return Ok(());
    }

    // The small node: its full snapshot, then a period.
    {
        let agent = AgentProcess::start(&base.join("small-socket"))?;
        let full = agent.measured_post(&small.full)?;
        add(
            &format!("full {}-call snapshot, socket", options.small_calls),
            full.text(),
            "",
        );
        let period = agent.measured_post(&small.period)?;
        add(
            &format!("a 5-second period, {} calls, socket", options.small_calls),
            period.text(),
            "≤ 40 ms",
        );
        let agent = AgentProcess::start(&base.join("small-file"))?;
        let (wall, logged) = agent.feed_file(&small.full)?;
        add(
            &format!("full {}-call snapshot, file", options.small_calls),
            format!("{} (applied in {logged:.0} ms)", ms(wall)),
            "",
        );
    }

    // The old layout, for comparison: the same calls and changes.
    let old = {
        let agent = AgentProcess::start(&base.join("legacy-socket"))?;
        let mut old = Vec::new();
        for body in [&legacy.full, &legacy.resent, &legacy.period, &legacy.churn] {
            old.push(agent.measured_post(body)?);
        }
        old
    };

    // The large node through the socket: the applies, then the queries on its calls.
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
            "≤ 1,500 ms",
        ),
        ("the same calls resent", &large.resent, "≤ 250 ms"),
        (
            "a 5-second period (3% ended, 3% new, 3% answered)",
            &large.period,
            "≤ 400 ms, ≤ 0.5 CPU-s",
        ),
        ("10% churn", &large.churn, "≤ 600 ms"),
    ];
    let mut peaks = Vec::new();
    for (i, (what, body, target)) in steps.into_iter().enumerate() {
        agent.reset_peak();
        let applied = agent.measured_post(body)?;
        peaks.push(agent.peak_mb());
        add(
            &format!("{}k calls, socket: {what}", options.calls / 1000),
            format!("{} · old layout: {}", applied.text(), old[i].text()),
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

    let tokens = tokens();
    let (client, server, mut queries) = latencies(agent.api, &tokens, 7, |i| i >= 3000)?;
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

    // Under load: the switch's periods keep coming while customers ask.
    let loaded = Duration::from_secs(PERIOD as u64 * loaded_periods as u64);
    let feeder = Feeder::start(agent.feed, std::mem::take(&mut large.more_periods));
    let started = Instant::now();
    let (client, server, _) = latencies(agent.api, &tokens, 9, |_| started.elapsed() >= loaded)?;
    let applies = feeder.stop()?;
    add(
        "latency while 5-second periods arrive, client / server p50 / p99",
        format!("{} / {}", p50_p99(client), p50_p99(server)),
        "≤ 0.3 ms p50",
    );
    add("… the periods meanwhile", applies_text(&applies), "");

    let (rps, errors) = throughput(agent.api, options.connections, options.seconds, &tokens)?;
    add(
        &format!(
            "throughput, {} connections, small answers",
            options.connections
        ),
        format!("{rps:.0} req/s ({errors} errors)"),
        "≥ 10,000 req/s",
    );
    let again = Series::render(Style::Sems, 3, options.calls, now, loaded_periods);
    agent.post(&again.full)?;
    let feeder = Feeder::start(agent.feed, again.more_periods);
    let (rps_fed, errors_fed) =
        throughput(agent.api, options.connections, loaded.as_secs(), &tokens)?;
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
    drop(agent);

    // The relay's share of an apply: the same snapshots with the relay on, its ClickHouse
    // down (so they stay spooled; the sender's work is not in the writer's path anyway).
    {
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
                "{} / {} ({} while the spooler compressed the one before)",
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
    }

    // Large snapshot through the file.
    {
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
    }
    let _ = std::fs::remove_dir_all(&base);
    print_rows(rows);
    Ok(())
}

fn print_rows(rows: Vec<Row>) {
    println!("| measure | result | target |");
    println!("|---|---|---|");
    for row in rows {
        println!("| {} | {} | {} |", row.what, row.value, row.target);
    }
}
