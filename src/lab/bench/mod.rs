//! `active-calls-agent bench`: the performance benchmark (BENCHMARKS.md).
//!
//! It runs the real agent as a child process (so its memory is its own), over a fresh
//! folder, and drives it as the switch and the customers do: snapshots POSTed to the
//! socket source or renamed into the watched file, queries over HTTP/1.1 keep-alive
//! connections on loopback. Snapshots look like a switch's: ~100 keys and ~2.3 KB a row,
//! 1,000 accounts of 50 customers, one account holding 30% of the calls. Times come from
//! the client's clock (and, for applies, from the agent's own log line too); memory from
//! `/proc/<pid>/status`, the peak reset before each apply through `/proc/<pid>/clear_refs`.
//! Each posted apply is also printed as a multiple of its floor (`floor`): the same bytes
//! posted by the same client to a sink that only reads them, measured in the same run, so
//! that a figure can be compared across days on a shared machine. Nothing here asserts a
//! timing: it measures and prints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;

mod events;
mod floor;
mod hostile;
mod node;
mod streams;

pub(crate) use crate::lab::agent::{AgentProcess, rss_mb};
use crate::lab::client::Conn;
pub use hostile::small_buffer_connection;

use crate::auth::Authenticator;
use crate::clock::unix_now;
use crate::lab::sems::{ACCOUNTS, CUSTOMERS, Style, Switch, customer_of, directory_json, uuid_of};

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
    /// Only the large node's four applies beside their floors (issue 23).
    pub applies: bool,
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

/// A duration as whole milliseconds: `1265 ms`.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
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

// ---------------------------------------------------------------------------------------
// The run

struct Row {
    what: String,
    value: String,
    target: &'static str,
}

/// The seconds between two snapshots of the simulated switch.
pub(crate) const PERIOD: i64 = 5;
/// The runs under load last this many periods.
const LOADED_PERIODS: usize = 4;

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
pub fn run(mut options: BenchOptions) -> anyhow::Result<()> {
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
    // The default scenario compares with the ClickHouse engine on the same data: it dumps
    // what that needs, and the whole series only when asked to.
    let asked_to_dump = options.dump.is_some();
    let default = !(options.events || options.streams || options.hostile || options.applies);
    if default && !asked_to_dump {
        options.dump = Some(base.join("dump"));
    }
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

    eprintln!(
        "generating snapshots ({} and {} calls, SEMS's bytes and the old layout)…",
        options.small_calls, options.calls
    );
    let large = Series::render(Style::Sems, 2, options.calls, now, LOADED_PERIODS);
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
        // The snapshot for ClickHouse; the rest of the series to post by hand (with a
        // profiler on the agent).
        let series = [
            ("snapshot", &large.full),
            ("resent", &large.resent),
            ("period", &large.period),
            ("churn", &large.churn),
        ];
        let wanted = if asked_to_dump { series.len() } else { 1 };
        for (name, body) in &series[..wanted] {
            std::fs::write(dump.join(format!("{name}.jsonl")), body)?;
        }
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

    if options.applies {
        node::applies(&options, &base, &large, &mut add)?;
    } else {
        node::run(&options, &base, now, large, &small, &legacy, &mut add)?;
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
