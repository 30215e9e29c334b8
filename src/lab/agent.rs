//! The one driver of the real agent from outside: the release or test binary run as a
//! child process (so its memory and CPU are its own), the addresses and lines it logs,
//! signals, and what is read of it from `/proc`. `bench`, `soak` and the integration tests
//! all start the agent through [`AgentProcess`], so they agree on how a start is
//! recognised and how a run is stopped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::lab::bench::{SCRAPE_TOKEN, SECRET};
use crate::lab::client::curl_post_snapshot;
use crate::lab::sems::directory_json;

/// How long a start may take before its listeners are logged.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The agent as a child process, with the addresses it logged and the rest of its log.
/// Dropped, it is killed: a run that fails leaves no agent behind.
pub struct AgentProcess {
    pub child: Child,
    pub api: SocketAddr,
    pub feed: SocketAddr,
    /// The metrics listener, when the configuration has one.
    pub metrics: Option<SocketAddr>,
    /// The lines logged since the start, as they come.
    pub log: mpsc::Receiver<String>,
    /// The lines logged until both listeners were (what a start logs about itself).
    pub start_log: Vec<String>,
    /// The watched snapshot file, for an agent of [`start`](Self::start)'s folder.
    snapshot_file: PathBuf,
}

impl AgentProcess {
    /// Runs `binary serve --config <config>` (at `info`, with `env` added), and waits until
    /// it has logged its API and feed listeners.
    pub fn spawn(binary: &Path, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("the agent's stderr")?;
        let (lines_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut api, mut feed, mut metrics) = (None, None, None);
        let mut start_log = Vec::new();
        while api.is_none() || feed.is_none() {
            let line = log
                .recv_timeout(START_LIMIT)
                .with_context(|| format!("the agent did not log its listeners: {start_log:#?}"))?;
            let addr = line.rsplit('=').next().and_then(|a| a.trim().parse().ok());
            if line.contains("serving /api") {
                api = addr;
            } else if line.contains("taking snapshots over HTTP") {
                feed = addr;
            } else if line.contains("serving /metrics") {
                metrics = addr;
            }
            start_log.push(line);
        }
        Ok(AgentProcess {
            child,
            api: api.context("no API address")?,
            feed: feed.context("no feed address")?,
            metrics,
            log,
            start_log,
            snapshot_file: config.with_file_name("snapshot.jsonl"),
        })
    }

    /// The benchmark's agent: this binary over `dir` (created), fed by the simulated
    /// switch's directory, a watched snapshot file and an HTTP feed.
    pub(crate) fn start(dir: &Path) -> anyhow::Result<AgentProcess> {
        Self::start_with(dir, "")
    }

    /// [`start`](Self::start) with more `[upstream]` keys.
    pub(crate) fn start_with(dir: &Path, upstream: &str) -> anyhow::Result<AgentProcess> {
        Self::start_configured(dir, "", upstream)
    }

    /// [`start`](Self::start) with more `[api]` and `[upstream]` keys.
    pub(crate) fn start_configured(
        dir: &Path,
        api: &str,
        upstream: &str,
    ) -> anyhow::Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        std::fs::write(dir.join("directory.json"), directory_json())?;
        std::fs::write(dir.join("scrape-tokens"), SCRAPE_TOKEN)?;
        std::fs::write(
            &config,
            format!(
                "[api]\nlisten = \"127.0.0.1:0\"\njwt_secret = \"{SECRET}\"\n{api}[store]\npath = {:?}\n\
                 [feed]\nwatch = {:?}\nlisten = \"127.0.0.1:0\"\nstale_after = 0\n\
                 [directory]\npath = {:?}\n[upstream]\nscrape_tokens_file = {:?}\n{upstream}\n",
                dir.join("active-calls.db"),
                dir.join("snapshot.jsonl"),
                dir.join("directory.json"),
                dir.join("scrape-tokens"),
            ),
        )?;
        // Another build of the agent to drive (the same bench against the agent without a
        // change, in the same session): `BENCH_AGENT=path/to/active-calls-agent`.
        let agent = match std::env::var_os("BENCH_AGENT") {
            Some(path) => path.into(),
            None => std::env::current_exe()?,
        };
        Self::spawn(&agent, &config, &[])
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(mut self) -> std::io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Sends `signal` (libc's number) to it.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill() only sends a signal to our own child; it touches no memory.
        match unsafe { libc::kill(pid, signal) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Waits (at most `limit`) for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) for a log line containing `text`, and returns it.
    pub fn wait_log(&self, text: &str, limit: Duration) -> anyhow::Result<String> {
        self.wait_log_for(limit, |line| line.contains(text).then(|| line.to_owned()))
            .with_context(|| format!("no log line with {text:?} within {limit:?}"))
    }

    /// The first log line (within `limit`) that `found` makes something of; the lines
    /// passed over are in the error.
    fn wait_log_for<T>(
        &self,
        limit: Duration,
        found: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.log.recv_timeout(left) else {
                anyhow::bail!("it logged:\n{}", seen.join("\n"));
            };
            if let Some(found) = found(&line) {
                return Ok(found);
            }
            if line.contains("snapshot rejected") {
                eprintln!("agent: {line}");
            }
            seen.push(line);
        }
    }

    /// The apply duration (ms) of the next snapshot the agent logs as applied.
    fn next_applied_ms(&self) -> anyhow::Result<f64> {
        self.logged_ms("snapshot applied", Duration::from_secs(120))
            .context("no snapshot was logged as applied")
    }

    /// The `duration_ms` of the next log line saying `what`, within `limit`.
    pub(crate) fn logged_ms(&self, what: &str, limit: Duration) -> anyhow::Result<f64> {
        self.wait_log_for(limit, |line| {
            let rest = line
                .split("duration_ms=")
                .nth(1)
                .filter(|_| line.contains(what))?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// Forgets the lines logged so far, so that what is waited for next is new.
    fn skip_log(&self) {
        while self.log.try_recv().is_ok() {}
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, MB.
    pub fn rss_mb(&self) -> f64 {
        rss_mb(self.pid())
    }

    /// Peak resident memory since the last reset, MB.
    pub(crate) fn peak_mb(&self) -> f64 {
        proc_status(self.pid(), "VmHWM:") as f64 / 1024.0
    }

    pub(crate) fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// POSTs a snapshot with the switch's own client ([`curl_post_snapshot`]); curl's
    /// whole run until the 200 (reading the body included, as for the floor), and the
    /// apply time the agent logged.
    pub(crate) fn post(&self, body: &[u8]) -> anyhow::Result<(Duration, f64)> {
        self.skip_log();
        let took = curl_post_snapshot(self.feed, body)?;
        let ms = self.next_applied_ms()?;
        Ok((took, ms))
    }

    /// CPU seconds the agent has used so far (all its threads).
    pub(crate) fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Waits until the agent's CPU time stops growing (the WAL copied back after an
    /// apply), at most 5 s; its CPU seconds then.
    pub(crate) fn settled_cpu(&self) -> f64 {
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
    pub(crate) fn measured_post(&self, body: &[u8]) -> anyhow::Result<Applied> {
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
        self.skip_log();
        let started = Instant::now();
        std::fs::rename(&tmp, &self.snapshot_file)?;
        let ms = self.next_applied_ms()?;
        Ok((started.elapsed(), ms))
    }
}

/// What one posted snapshot cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applied {
    pub(crate) wall: Duration,
    pub(crate) logged_ms: f64,
    /// The agent's CPU seconds until the 200, and until it went quiet again.
    pub(crate) cpu: f64,
    pub(crate) cpu_total: f64,
}

impl Applied {
    pub(crate) fn text(&self) -> String {
        format!(
            "{:.0} ms ({:.0} ms logged), {:.2} CPU-s (+{:.2} after the answer)",
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
pub(crate) fn proc_status(pid: u32, key: &str) -> u64 {
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

/// Waits until the relay's spool holds `count` compressed snapshots for its one URL;
/// returns how long that took.
pub(crate) fn wait_for_spooled(spool: &Path, count: usize) -> anyhow::Result<Duration> {
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
pub(crate) struct Scraped {
    pub(crate) status: u16,
    pub(crate) bytes: usize,
    pub(crate) time: Duration,
}

/// One scrape over a new connection, read to its end; and its ETag.
pub(crate) fn scrape(
    api: SocketAddr,
    headers: &[(&str, &str)],
) -> anyhow::Result<(Scraped, String)> {
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
