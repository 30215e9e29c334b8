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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::auth::Authenticator;
use crate::demo::unix_now;
use crate::sems::{
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
}

pub(crate) const SECRET: &str = "bench-secret";
/// The aggregators' token the benchmark's agent lists.
const SCRAPE_TOKEN: &str = "bench-scrape-token-0123456789";
const ENDPOINT: &str = crate::api::OUTGOING_ACTIVE_CALLS;

// ---------------------------------------------------------------------------------------
// The agent under test

pub(crate) struct AgentProcess {
    child: Child,
    pub(crate) api: SocketAddr,
    feed: SocketAddr,
    /// Server-side apply durations (ms) from the agent's log lines, as they come.
    applied: mpsc::Receiver<f64>,
    snapshot_file: PathBuf,
}

impl AgentProcess {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<AgentProcess> {
        Self::start_with(dir, "")
    }

    /// [`start`](Self::start) with more `[upstream]` keys.
    pub(crate) fn start_with(dir: &Path, upstream: &str) -> anyhow::Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let snapshot_file = dir.join("snapshot.jsonl");
        let config = dir.join("config.toml");
        std::fs::write(dir.join("directory.json"), directory_json())?;
        std::fs::write(dir.join("scrape-tokens"), SCRAPE_TOKEN)?;
        std::fs::write(
            &config,
            format!(
                "[api]\nlisten = \"127.0.0.1:0\"\njwt_secret = \"{SECRET}\"\n[store]\npath = {:?}\n\
                 [feed]\nwatch = {:?}\nlisten = \"127.0.0.1:0\"\nstale_after = 0\n\
                 [directory]\npath = {:?}\n[upstream]\nscrape_tokens_file = {:?}\n{upstream}\n",
                dir.join("active-calls.db"),
                snapshot_file,
                dir.join("directory.json"),
                dir.join("scrape-tokens"),
            ),
        )?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let stderr = child.stderr.take().context("the agent's stderr")?;
        let (lines_tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut api, mut feed) = (None, None);
        while api.is_none() || feed.is_none() {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .context("the agent did not start")?;
            let addr = || line.rsplit('=').next()?.trim().parse::<SocketAddr>().ok();
            if line.contains("serving") {
                api = addr();
            } else if line.contains("taking snapshots over HTTP") {
                feed = addr();
            }
        }
        let (applied_tx, applied) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines {
                if line.contains("snapshot rejected") {
                    eprintln!("agent: {line}");
                }
                let ms = line
                    .split("duration_ms=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok());
                if let Some(ms) = ms
                    && applied_tx.send(ms).is_err()
                {
                    break;
                }
            }
        });
        Ok(AgentProcess {
            child,
            api: api.context("no API address")?,
            feed: feed.context("no feed address")?,
            applied,
            snapshot_file,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, MB.
    fn rss_mb(&self) -> f64 {
        rss_mb(self.pid())
    }

    /// Peak resident memory since the last reset, MB.
    fn peak_mb(&self) -> f64 {
        proc_status(self.pid(), "VmHWM:") as f64 / 1024.0
    }

    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// POSTs a snapshot the way a switch does (libcurl's `CURLOPT_POSTFIELDS`: its
    /// `Content-Type`, and `Expect: 100-continue` answered before the body goes); the
    /// client-observed time until the 200, and the apply time the agent logged.
    pub(crate) fn post(&self, body: &[u8]) -> anyhow::Result<(Duration, f64)> {
        while self.applied.try_recv().is_ok() {}
        let started = Instant::now();
        post_snapshot(self.feed, body)?;
        let ms = self
            .applied
            .recv_timeout(Duration::from_secs(120))
            .context("the snapshot was not logged as applied")?;
        Ok((started.elapsed(), ms))
    }

    /// CPU seconds the agent has used so far (all its threads).
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Waits until the agent's CPU time stops growing (the WAL copied back after an
    /// apply), at most 5 s; its CPU seconds then.
    fn settled_cpu(&self) -> f64 {
        let mut last = self.cpu_seconds();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.cpu_seconds();
            if now - last < 0.005 {
                return now;
            }
            last = now;
        }
        last
    }

    /// One snapshot posted: its times, and the agent's CPU for it (until the 200, and
    /// with what follows it: the WAL copied back).
    fn measured_post(&self, body: &[u8]) -> anyhow::Result<Applied> {
        let before = self.settled_cpu();
        let (wall, logged_ms) = self.post(body)?;
        let at_reply = self.cpu_seconds();
        let settled = self.settled_cpu();
        Ok(Applied {
            wall,
            logged_ms,
            cpu: at_reply - before,
            cpu_total: settled - before,
        })
    }

    /// Renames a snapshot file into place; the time until the agent logged it applied,
    /// and the duration it logged.
    pub(crate) fn feed_file(&self, body: &[u8]) -> anyhow::Result<(Duration, f64)> {
        let tmp = self.snapshot_file.with_extension("writing");
        std::fs::write(&tmp, body)?;
        while self.applied.try_recv().is_ok() {}
        let started = Instant::now();
        std::fs::rename(&tmp, &self.snapshot_file)?;
        let ms = self
            .applied
            .recv_timeout(Duration::from_secs(120))
            .context("the file was not applied")?;
        Ok((started.elapsed(), ms))
    }
}

/// POSTs `body` to the feed listener at `feed` as libcurl does, and waits for the 200.
pub(crate) fn post_snapshot(feed: SocketAddr, body: &[u8]) -> anyhow::Result<()> {
    let mut conn = Conn::open(feed)?;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {feed}\r\nAccept: */*\r\nContent-Length: {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.writer.write_all(head.as_bytes())?;
    let mut line = String::new();
    conn.reader.read_line(&mut line)?;
    if line.starts_with("HTTP/1.1 100") {
        conn.reader.read_line(&mut line)?; // the blank line after it
    } else {
        bail!("no 100 Continue: {}", line.trim_end());
    }
    conn.writer.write_all(body)?;
    let reply = conn.read_reply()?;
    if reply.status != 200 {
        bail!(
            "snapshot refused: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}

/// What one posted snapshot cost.
#[derive(Debug, Clone, Copy)]
struct Applied {
    wall: Duration,
    logged_ms: f64,
    /// The agent's CPU seconds until the 200, and until it went quiet again.
    cpu: f64,
    cpu_total: f64,
}

impl Applied {
    fn text(&self) -> String {
        format!(
            "{:.0} ms ({:.0} ms logged), {:.2} CPU-s (+{:.2} copying the WAL back)",
            self.wall.as_secs_f64() * 1000.0,
            self.logged_ms,
            self.cpu,
            self.cpu_total - self.cpu
        )
    }
}

/// The CPU seconds process `pid` has used (user and system, all threads).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    crate::metrics::ProcStat::read(&pid.to_string())
        .and_then(|stat| stat.cpu_seconds())
        .unwrap_or(0.0)
}

/// A `/proc/<pid>/status` figure, in kB.
fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The resident memory of process `pid` now, MB.
pub(crate) fn rss_mb(pid: u32) -> f64 {
    proc_status(pid, "VmRSS:") as f64 / 1024.0
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client (the load generator must not be the bottleneck)

pub(crate) struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    runtime: Option<f64>,
    pub(crate) body: Vec<u8>,
}

impl Conn {
    pub(crate) fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?),
            writer: stream,
        })
    }

    pub(crate) fn get(&mut self, target: &str, token: &str) -> anyhow::Result<Reply> {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        self.writer.write_all(head.as_bytes())?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split(' ').nth(1).context("no status line")?.parse()?;
        let (mut length, mut runtime) = (0usize, None);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                } else if name.eq_ignore_ascii_case("x-runtime") {
                    runtime = value.trim().parse().ok();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(Reply {
            status,
            runtime,
            body,
        })
    }
}

/// Waits until the relay's spool holds `count` compressed snapshots for its one URL;
/// returns how long that took.
fn wait_for_spooled(spool: &Path, count: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut spooled = 0;
        for folder in std::fs::read_dir(spool)? {
            let folder = folder?.path();
            if folder.is_dir() {
                spooled +=
                    crate::relay::spool::list(&folder, crate::relay::spool::COMPRESSED)?.len();
            }
        }
        if spooled >= count {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the spool never held {count} compressed snapshots"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a scrape took: its status, the bytes on the wire, the time to the last byte.
struct Scraped {
    status: u16,
    bytes: usize,
    time: Duration,
}

/// One scrape over a new connection, read to its end; and its ETag.
fn scrape(api: SocketAddr, headers: &[(&str, &str)]) -> anyhow::Result<(Scraped, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(api)?;
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\
         Authorization: Bearer {SCRAPE_TOKEN}\r\n",
        crate::api::scrape::ACTIVE_CALLS
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    stream.write_all(format!("{head}\r\n").as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let time = started.elapsed();
    let text = String::from_utf8_lossy(&raw[..raw.len().min(4096)]).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let etag = text
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap_or_default()
        .to_owned();
    let scraped = Scraped {
        status,
        bytes: raw.len(),
        time,
    };
    Ok((scraped, etag))
}

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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// "p50 / p99 ms" of measurements in milliseconds.
fn p50_p99(values: Vec<f64>) -> String {
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
const PERIOD: i64 = 5;

/// One switch's snapshots for the apply measurements, in the order they are applied: all
/// calls into an empty store, the same calls resent (nothing changed), one 5-second
/// period, a 10%-churn snapshot; then `extra` more periods, for the runs under load.
struct Series {
    switch: Switch,
    full: Vec<u8>,
    resent: Vec<u8>,
    period: Vec<u8>,
    churn: Vec<u8>,
    more_periods: Vec<Vec<u8>>,
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
fn latencies(
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

    if options.hostile {
        hostile(&options, &base, &large, &mut add)?;
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

/// How many slow readers, feed tricklers, and for how long the readers read.
const SLOW_READERS: usize = 50;
const TRICKLERS: usize = 16;
const SLOW_READ_SECONDS: u64 = 10;

/// Issue 13's figures on the large node: a period posted beside trickling feed senders,
/// and resident memory while fifty clients read the largest answer (the big account's),
/// the scrape and the metrics as slowly as a 4 KB receive buffer and 40 KB/s allow.
fn hostile(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let agent = AgentProcess::start(&base.join("hostile"))?;
    agent.post(&large.full)?;
    let (alone, _) = agent.post(&large.period)?;
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| {
            let (feed, stop) = (agent.feed, stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut stream = TcpStream::connect(feed)?;
                stream.write_all(
                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n\
                      INSERT INTO active_calls FORMAT JSONEachRow\n",
                )?;
                while !stop.load(Ordering::Relaxed) {
                    stream.write_all(b" ")?;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (beside, _) = agent.post(&large.more_periods[0])?;
    stop.store(true, Ordering::Relaxed);
    for trickler in tricklers {
        let _ = trickler.join();
    }
    add(
        &format!(
            "a {}-call period posted alone / beside {TRICKLERS} trickling senders",
            options.calls
        ),
        format!("{} / {}", ms(alone), ms(beside)),
        "delayed < 1 s",
    );

    let tokens = tokens();
    let big = format!("{ENDPOINT}?account-id={}", uuid_of(BIG_ACCOUNT));
    let big_token = format!("Bearer {}", tokens[&customer_of(BIG_ACCOUNT)]);
    let scrape_token = format!("Bearer {SCRAPE_TOKEN}");
    let cases = [
        (
            format!(
                "the big account's answer ({} calls)",
                large.switch.count_in(BIG_ACCOUNT)
            ),
            big,
            big_token,
        ),
        (
            format!("the scrape ({} calls)", options.calls),
            crate::api::scrape::ACTIVE_CALLS.to_owned(),
            scrape_token,
        ),
        (
            "the metrics".to_owned(),
            crate::api::ops::METRICS.to_owned(),
            String::new(),
        ),
    ];
    for (what, target, token) in cases {
        std::thread::sleep(Duration::from_secs(1));
        let before = agent.rss_mb();
        agent.reset_peak();
        let readers: Vec<_> = (0..SLOW_READERS)
            .map(|_| {
                let (api, target, token) = (agent.api, target.clone(), token.clone());
                std::thread::spawn(move || slow_read(api, &target, &token))
            })
            .collect();
        let mut statuses: std::collections::BTreeMap<String, usize> = Default::default();
        let mut read = 0u64;
        for reader in readers {
            let (status, bytes) = reader
                .join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
            *statuses.entry(status).or_default() += 1;
            read += bytes;
        }
        let peak = agent.peak_mb();
        add(
            &format!(
                "{SLOW_READERS} clients reading {what} for {SLOW_READ_SECONDS} s at ≤ 40 KB/s"
            ),
            format!(
                "RSS {before:.1} MB before, peak {peak:.1} MB; answers {statuses:?}, {:.1} MB read",
                read as f64 / 1e6
            ),
            "≤ 150 MB",
        );
    }
    Ok(())
}

/// GETs `target` over a connection with a 4 KB receive buffer and reads 4 KB every
/// 100 ms for [`SLOW_READ_SECONDS`]: the status line, and the bytes read.
fn slow_read(api: SocketAddr, target: &str, authorization: &str) -> anyhow::Result<(String, u64)> {
    let mut stream = small_buffer_connection(api)?;
    let auth = if authorization.is_empty() {
        String::new()
    } else {
        format!("Authorization: {authorization}\r\n")
    };
    stream.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let until = Instant::now() + Duration::from_secs(SLOW_READ_SECONDS);
    let mut buf = vec![0u8; 4096];
    let mut first = Vec::new();
    let mut total = 0u64;
    while Instant::now() < until {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.len() < 12 {
            first.extend_from_slice(&buf[..n.min(12)]);
        }
        total += n as u64;
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = String::from_utf8_lossy(&first[..first.len().min(12)]).into_owned();
    Ok((status.trim_start_matches("HTTP/1.1 ").to_owned(), total))
}

/// A connection to `addr` whose receive buffer is 4 KB, so that the agent cannot hand a
/// large answer to the kernel and forget it (a slow reader; the tests use it too).
pub fn small_buffer_connection(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        bail!("the benchmark's agent listens on IPv4");
    };
    // SAFETY: a fresh socket is made, configured and connected through libc, with every
    // pointer to a value that lives across its call; its descriptor is then owned by the
    // TcpStream alone (closed on every error path before that).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        anyhow::ensure!(
            connected == 0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        Ok(stream)
    }
}
