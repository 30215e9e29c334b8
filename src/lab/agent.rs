//! The agent under test, and the client side of the benchmark: the agent run as a child
//! process over its own folder, a minimal keep-alive HTTP/1.1 client (the load generator
//! must not be the bottleneck), and what is read of the process from `/proc`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::lab::bench::{SCRAPE_TOKEN, SECRET};
use crate::lab::client::post_snapshot;
use crate::lab::sems::directory_json;

pub(crate) struct AgentProcess {
    child: Child,
    pub(crate) api: SocketAddr,
    pub(crate) feed: SocketAddr,
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
        Self::start_configured(dir, "", upstream)
    }

    /// [`start`](Self::start) with more `[api]` and `[upstream]` keys.
    pub(crate) fn start_configured(
        dir: &Path,
        api: &str,
        upstream: &str,
    ) -> anyhow::Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let snapshot_file = dir.join("snapshot.jsonl");
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
    pub(crate) fn rss_mb(&self) -> f64 {
        rss_mb(self.pid())
    }

    /// Peak resident memory since the last reset, MB.
    pub(crate) fn peak_mb(&self) -> f64 {
        proc_status(self.pid(), "VmHWM:") as f64 / 1024.0
    }

    pub(crate) fn reset_peak(&self) {
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
