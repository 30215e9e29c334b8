//! The relay: every snapshot the agent applies, forwarded to the central ClickHouse
//! (SPEC 6), so that an outage there delays history instead of losing it.
//!
//! ```text
//!  feed reader thread ──copy of each row line──→ spool/incoming/<seq>.jsonl
//!  writer thread, at commit ──rename──────────→ spool/pending/<seq>.<token>.jsonl
//!  spooler thread ──gzip once, sync, hard link──→ spool/<url-key>/<seq>.<token>.jsonl.gz
//!  one sender task per URL ──POST ?query=INSERT INTO <table> FORMAT JSONEachRow──→ ClickHouse
//! ```
//!
//! The shape follows from two rules. *Applying never waits for the relay*: the writer's
//! share is a rename and a message per snapshot; the rows are copied by the reader thread
//! that already reads them (the exact bytes the switch sent, so ClickHouse gets every key,
//! and rows the agent skipped), uncompressed, because gzip on that path would add about a
//! second per 100k calls. *Nothing is lost to a crash or an outage*: a snapshot is on disk
//! before it is announced, each step from one spool folder to the next is a rename or a
//! link (see [`spool`] for what a restart finds and does), and a file leaves a URL's folder
//! only once that URL answered 2xx, or refused it for good.
//!
//! Each URL has its own folder and sender, so a dead URL delays only itself, and within a
//! URL snapshots go oldest first, one at a time, strictly in order: ClickHouse sees history
//! as the switch produced it. Retries back off exponentially (1 s doubling to
//! `upstream.retry_max_ms`, with jitter so that the nodes of a network do not all come back
//! at once). A resend after a crash or a cut attempt carries the same
//! `insert_deduplication_token` (the node ids and an xxh3-128 of the rows), so ClickHouse
//! stores it once. A snapshot that ClickHouse refuses with a 4xx that no retry can fix is
//! dropped and counted, so that one bad snapshot never blocks the rest; past
//! `upstream.spool_max_bytes`, the oldest are dropped and counted.
//!
//! The sender is the only one that deletes from its folder: it alone enforces the bound,
//! as each snapshot arrives, during an attempt as between them, so "oldest first" holds
//! for drops too. An attempt has a total time sized to its body besides its idle time
//! ([`client::Limits`]), and when the bound drops the snapshot being sent the attempt is
//! cut: a slow or trickling peer can delay the relay, never fill the disk.

pub mod client;
pub mod spool;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::config::UpstreamConfig;
use crate::logs::Throttled;
use crate::metrics::{Metrics, RelayMetrics};
use client::{Endpoint, Outcome};
use spool::{Backlog, COMPRESSED, SpoolHandle, Spooled, Spooler, URL_FILE, UrlFolder, Wake};

/// The first wait after a failed attempt; it doubles up to `upstream.retry_max_ms`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// A URL that keeps failing is logged at most this often (and when it recovers); so is a
/// spool that cannot take snapshots.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

/// The running relay: the spooler thread and one sender task per URL.
pub struct Relay {
    spool: SpoolHandle,
    wake: mpsc::Sender<Wake>,
    stopping: Arc<AtomicBool>,
    spooler: Option<JoinHandle<()>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

/// What the relay needs from `[upstream]`, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoints: Vec<Endpoint>,
    pub table: String,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub retry_max: Duration,
}

impl Settings {
    /// Checks `[upstream]`'s relay keys; `Ok(None)` when no URL is configured. The errors
    /// name a URL by its position, never by its text (it may hold a password).
    pub fn from_config(config: &UpstreamConfig) -> anyhow::Result<Option<Settings>> {
        if config.clickhouse_urls.is_empty() {
            return Ok(None);
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut tls: Option<client::Tls> = None;
        for (i, url) in config.clickhouse_urls.iter().enumerate() {
            let mut endpoint = Endpoint::parse(url, &config.user, &config.password)
                .with_context(|| format!("upstream.clickhouse_urls[{i}]"))?;
            if endpoint.is_https() {
                let tls = match &mut tls {
                    Some(tls) => tls,
                    None => tls.insert(client::Tls::load(&config.ca_file)?),
                };
                endpoint.use_tls(tls);
            }
            if endpoints.iter().any(|e| e.label == endpoint.label) {
                anyhow::bail!(
                    "upstream.clickhouse_urls[{i}]: {} is listed twice (URLs must differ \
                     in host, port or path)",
                    endpoint.label
                );
            }
            endpoints.push(endpoint);
        }
        if !is_table_name(&config.table) {
            anyhow::bail!(
                "upstream.table must be a table name, optionally with its database \
                 (letters, digits, _ and one .)"
            );
        }
        if config.spool_max_bytes == 0 || config.retry_max_ms == 0 {
            anyhow::bail!("upstream.spool_max_bytes and upstream.retry_max_ms must be above 0");
        }
        Ok(Some(Settings {
            endpoints,
            table: config.table.clone(),
            spool_dir: config.spool_dir.clone(),
            spool_max_bytes: config.spool_max_bytes,
            retry_max: Duration::from_millis(config.retry_max_ms),
        }))
    }
}

/// `name` or `database.name`, each an identifier ClickHouse takes unquoted.
fn is_table_name(text: &str) -> bool {
    let identifier = |s: &str| {
        s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    match text.split_once('.') {
        Some((database, table)) => identifier(database) && identifier(table),
        None => identifier(text),
    }
}

/// The folder of `endpoint` under the spool: a stable short hash of its label.
pub fn url_dir(spool_dir: &Path, endpoint: &Endpoint) -> PathBuf {
    let key = xxhash_rust::xxh3::xxh3_64(endpoint.label.as_bytes());
    spool_dir.join(format!("{key:016x}"))
}

impl Relay {
    /// Prepares the spool (what a crash left, see [`spool`]), then starts the spooler
    /// thread and, on the current tokio runtime, one sender per URL.
    pub fn start(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Relay> {
        let root = &settings.spool_dir;
        let dirs: Vec<PathBuf> = settings
            .endpoints
            .iter()
            .map(|e| url_dir(root, e))
            .collect();
        let first_seq = spool::prepare(root, &dirs)
            .with_context(|| format!("preparing the relay's spool {}", root.display()))?;
        warn_about_orphans(root, &dirs);
        let (wake, wake_rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut folders = Vec::new();
        let mut senders = Vec::new();
        let mut url_metrics = Vec::new();
        for (endpoint, dir) in settings.endpoints.iter().zip(dirs) {
            spool::write_url_file(&dir, &endpoint.label);
            let queue = scan(&dir).with_context(|| format!("reading {}", dir.display()))?;
            let url = metrics.relay(&endpoint.label);
            let (news_tx, news) = unbounded_channel();
            let mut sender = Sender {
                endpoint: endpoint.clone(),
                table: settings.table.clone(),
                dir: dir.clone(),
                max_bytes: settings.spool_max_bytes,
                retry_max: settings.retry_max,
                queue: VecDeque::new(),
                bytes: 0,
                news,
                metrics: url.clone(),
                drops: Throttled::every(LOG_EVERY),
            };
            for entry in queue {
                sender.add(entry);
            }
            if !sender.queue.is_empty() {
                tracing::info!(
                    url = %endpoint.label,
                    snapshots = sender.queue.len(),
                    bytes = sender.bytes,
                    "relay: resuming the spool"
                );
            }
            senders.push(tokio::spawn(sender.run()));
            folders.push(UrlFolder {
                dir,
                label: endpoint.label.clone(),
                news: news_tx,
                metrics: url.clone(),
            });
            url_metrics.push(url);
        }
        let backlog = Arc::new(Backlog::new(
            spool::pending_bytes(root),
            metrics.relay_pending_bytes(),
        ));
        let spooler = Spooler {
            pending: root.join(spool::PENDING),
            urls: folders,
            stopping: stopping.clone(),
            backlog: backlog.clone(),
            retry_max: settings.retry_max,
            errors: Throttled::every(LOG_EVERY),
        };
        let spooler = std::thread::Builder::new()
            .name("relay-spooler".into())
            .spawn(move || spooler.run(wake_rx))
            .context("starting the relay's spooler thread")?;
        tracing::info!(
            urls = ?settings.endpoints,
            table = %settings.table,
            spool = %root.display(),
            "relaying every applied snapshot to ClickHouse"
        );
        Ok(Relay {
            // The bound on raw bytes waiting for the spooler is the per-URL bound on
            // compressed ones: one key, and the spool then takes at most (URLs + 1) times
            // it, plus a snapshot.
            spool: SpoolHandle::new(
                root,
                first_seq,
                wake.clone(),
                url_metrics,
                backlog,
                settings.spool_max_bytes,
            ),
            wake,
            stopping,
            spooler: Some(spooler),
            senders,
        })
    }

    /// The writer's side: where snapshots are copied while they apply.
    pub fn spool(&self) -> SpoolHandle {
        self.spool.clone()
    }

    /// Stops at once without losing anything: an attempt in flight is cut (it is resent
    /// at the next start, with the same token), and a snapshot being compressed stays
    /// pending. Call it after the writer stopped, so that its last snapshot is pending.
    pub fn stop(&mut self) {
        for sender in self.senders.drain(..) {
            sender.abort();
        }
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.wake.send(Wake::Stop);
        if let Some(thread) = self.spooler.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A URL folder in the spool that no configured URL uses any more: left alone (it may come
/// back), but said once.
fn warn_about_orphans(root: &Path, dirs: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if dirs.contains(&path) || !path.join(URL_FILE).exists() {
            continue;
        }
        let snapshots = spool::list(&path, COMPRESSED).map_or(0, |n| n.len());
        if snapshots > 0 {
            let url = std::fs::read_to_string(path.join(URL_FILE)).unwrap_or_default();
            tracing::warn!(
                dir = %path.display(),
                url = url.trim(),
                snapshots,
                "relay: a spool folder of a URL no longer configured; its snapshots stay until it is again (or delete the folder)"
            );
        }
    }
}

/// A URL folder's snapshots, oldest first.
fn scan(dir: &Path) -> std::io::Result<Vec<Spooled>> {
    let mut found = Vec::new();
    for name in spool::list(dir, COMPRESSED)? {
        let meta = std::fs::metadata(dir.join(name.file_name(COMPRESSED)))?;
        found.push(Spooled {
            name,
            bytes: meta.len(),
            at: meta.modified().unwrap_or_else(|_| SystemTime::now()),
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// One URL's sender: its folder's snapshots in order, one attempt at a time.
struct Sender {
    endpoint: Endpoint,
    table: String,
    dir: PathBuf,
    max_bytes: u64,
    retry_max: Duration,
    /// The folder's snapshots, oldest first, and their total size.
    queue: VecDeque<Spooled>,
    bytes: u64,
    news: UnboundedReceiver<Spooled>,
    metrics: RelayMetrics,
    drops: Throttled,
}

impl Sender {
    async fn run(mut self) {
        let mut url = UrlState {
            backoff: Backoff::new(self.retry_max),
            failing: None,
            dedup_token: true,
        };
        while let Some((name, bytes, file)) = self.next_snapshot().await {
            let token = url.dedup_token.then_some(name.token.as_str());
            let Some(outcome) = self.attempt(&name, token, file, bytes).await else {
                continue; // dropped under the bound while it was being sent
            };
            let attempts = url.failing.as_ref().map_or(0, |f| f.attempts) + 1;
            // An answer that is not to be retried means the URL works again.
            if matches!(
                outcome,
                Outcome::Sent | Outcome::Refused { .. } | Outcome::NoDedupToken
            ) {
                self.answers_again(&mut url);
            }
            match outcome {
                Outcome::Sent => {
                    self.metrics.sent.inc();
                    tracing::info!(
                        url = %self.endpoint.label,
                        token = %name.token,
                        bytes,
                        attempts,
                        "snapshot relayed"
                    );
                    self.remove_front().await;
                }
                Outcome::Refused { status, message } => {
                    self.metrics.failed.inc();
                    tracing::warn!(
                        url = %self.endpoint.label,
                        token = %name.token,
                        status,
                        %message,
                        "relay: ClickHouse refused a snapshot for good; dropped, going on with the next"
                    );
                    self.remove_front().await;
                }
                Outcome::NoDedupToken => {
                    url.dedup_token = false;
                    self.metrics.dedup_token.set(0);
                    tracing::warn!(
                        url = %self.endpoint.label,
                        "relay: this ClickHouse does not know insert_deduplication_token \
                         (older than 22.2): snapshots go without it, so one resent after a \
                         crash may be stored twice"
                    );
                }
                Outcome::Retry(_) | Outcome::Blocked { .. } => {
                    let delay = self.failed(&outcome, &mut url);
                    self.wait(delay).await;
                }
            }
        }
    }

    /// The front snapshot, its size and its file, opened, once there is one; `None` when
    /// the relay stopped. One that cannot be opened is dropped (logged and counted), and
    /// the next one taken.
    async fn next_snapshot(&mut self) -> Option<(spool::SpoolName, u64, std::fs::File)> {
        loop {
            while let Ok(news) = self.news.try_recv() {
                self.add(news);
            }
            let Some(next) = self.queue.front() else {
                let news = self.news.recv().await?; // `None`: the relay stopped
                self.add(news);
                continue;
            };
            let (name, bytes) = (next.name.clone(), next.bytes);
            let path = self.dir.join(name.file_name(COMPRESSED));
            match blocking(move || std::fs::File::open(path)).await {
                Ok(file) => return Some((name, bytes, file)),
                Err(e) => {
                    tracing::error!(
                        url = %self.endpoint.label,
                        file = %name.file_name(COMPRESSED),
                        error = %e,
                        "relay: a spooled snapshot cannot be read; dropped"
                    );
                    self.metrics.dropped.inc();
                    self.remove_front().await;
                }
            }
        }
    }

    /// The URL answered in a way that is not to be retried: it works again.
    fn answers_again(&self, url: &mut UrlState) {
        self.metrics.blocked.set(0);
        url.backoff = Backoff::new(self.retry_max);
        if let Some(failing) = url.failing.take() {
            tracing::info!(
                url = %self.endpoint.label,
                failed_attempts = failing.attempts,
                down_s = failing.since.elapsed().as_secs(),
                "relay: the URL answers again"
            );
        }
    }

    /// An attempt that failed and will be retried (`Retry` or `Blocked`): counted, told
    /// (at most every [`LOG_EVERY`]), and how long to wait before the next.
    fn failed(&self, outcome: &Outcome, url: &mut UrlState) -> Duration {
        self.metrics.retried.inc();
        let delay = url.backoff.next();
        let state = url.failing.get_or_insert_with(|| Failing {
            since: Instant::now(),
            attempts: 0,
            logged: Throttled::every(LOG_EVERY),
        });
        state.attempts += 1;
        if let Outcome::Blocked { code, .. } = outcome {
            self.metrics.blocked.set(code.map_or(-1, i64::from));
        } else if !url.dedup_token {
            // Down: the server that answers next may be another version.
            url.dedup_token = true;
            self.metrics.dedup_token.set(1);
        }
        if state.logged.due() {
            self.log_failure(outcome, state.attempts, delay);
        }
        delay
    }

    fn log_failure(&self, outcome: &Outcome, attempts: u64, delay: Duration) {
        match outcome {
            Outcome::Blocked { code, message } => tracing::error!(
                url = %self.endpoint.label,
                code = code.map_or(-1, i64::from),
                %message,
                attempts,
                spooled = self.queue.len(),
                retry_in_ms = delay.as_millis() as u64,
                "relay blocked: ClickHouse refuses every snapshot for a cause of \
                 its own; they stay spooled and are retried until it is fixed"
            ),
            Outcome::Retry(error) => tracing::warn!(
                url = %self.endpoint.label,
                %error,
                attempts,
                spooled = self.queue.len(),
                retry_in_ms = delay.as_millis() as u64,
                "relay: sending failed; snapshots stay spooled and are retried"
            ),
            _ => {}
        }
    }

    /// One attempt to send the front snapshot, `name`, taking new snapshots meanwhile: the
    /// bound holds while an attempt lasts (up to minutes). `None` when the bound dropped
    /// the snapshot being sent (it was the oldest): the attempt is cut and not made again
    /// (though a server that had its whole body may have stored it).
    async fn attempt(
        &mut self,
        name: &spool::SpoolName,
        token: Option<&str>,
        file: std::fs::File,
        bytes: u64,
    ) -> Option<Outcome> {
        let endpoint = self.endpoint.clone();
        let table = self.table.clone();
        let limits = client::Limits::for_body(bytes);
        let attempt = client::attempt(&endpoint, &table, token, file, bytes, limits);
        tokio::pin!(attempt);
        let mut news_open = true;
        loop {
            tokio::select! {
                outcome = &mut attempt => return Some(outcome),
                news = self.news.recv(), if news_open => match news {
                    Some(news) => {
                        self.add(news);
                        if self.queue.front().is_none_or(|front| &front.name != name) {
                            return None;
                        }
                    }
                    // The spooler is gone (stopping): the attempt may still finish.
                    None => news_open = false,
                },
            }
        }
    }

    /// Waits `delay`, taking new snapshots (and enforcing the bound) meanwhile.
    async fn wait(&mut self, delay: Duration) {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                news = self.news.recv() => match news {
                    Some(news) => self.add(news),
                    // The spooler is gone; the folder still has snapshots to send.
                    None => {
                        tokio::time::sleep_until(until).await;
                        return;
                    }
                },
            }
        }
    }

    /// Queues a snapshot newly in the folder, in order, then drops the oldest while the
    /// folder is past its bound. The newest always stays: a snapshot larger than the bound
    /// on its own is still sent.
    fn add(&mut self, news: Spooled) {
        // After a crash the spooler may link again what the start already found.
        let at = self.queue.partition_point(|s| s.name < news.name);
        if self.queue.get(at).is_some_and(|s| s.name == news.name) {
            return;
        }
        self.bytes += news.bytes;
        self.queue.insert(at, news);
        let mut dropped = 0u64;
        while self.bytes > self.max_bytes && self.queue.len() > 1 {
            let Some(oldest) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= oldest.bytes;
            // Small and rare: not worth a trip to the blocking pool.
            let path = self.dir.join(oldest.name.file_name(COMPRESSED));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::error!(
                    file = %path.display(),
                    error = %e,
                    "relay: cannot delete a dropped snapshot"
                );
            }
            self.metrics.dropped.inc();
            dropped += 1;
        }
        if dropped > 0 {
            self.drops.pending += dropped;
            if self.drops.due() {
                tracing::warn!(
                    url = %self.endpoint.label,
                    dropped = self.drops.pending,
                    max_bytes = self.max_bytes,
                    "relay: spool full; oldest snapshots dropped"
                );
                self.drops.pending = 0;
            }
        }
        self.update_gauges();
    }

    /// Deletes the snapshot at the front of the queue (sent, refused, or unreadable).
    async fn remove_front(&mut self) {
        let Some(done) = self.queue.pop_front() else {
            return;
        };
        self.bytes -= done.bytes;
        self.update_gauges();
        let path = self.dir.join(done.name.file_name(COMPRESSED));
        let shown = path.display().to_string();
        // It would be sent again at the next start: harmless (same token), but said.
        if let Err(e) = blocking(move || spool::remove_if_exists(&path)).await {
            tracing::error!(file = shown, error = %e, "relay: cannot delete a finished snapshot");
        }
    }

    fn update_gauges(&self) {
        self.metrics.spool_bytes.set(self.bytes as i64);
        self.metrics.set_oldest(self.queue.front().map(|s| s.at));
    }
}

/// Runs file work on the blocking pool (a panic there is reported as an I/O error).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// What a sender knows of its URL from one attempt to the next.
struct UrlState {
    backoff: Backoff,
    /// Since when, and how often, the URL has failed; `None` while it answers.
    failing: Option<Failing>,
    /// Whether the server knows insert_deduplication_token: assumed until it says it
    /// does not, and assumed again once it has failed (it may come back upgraded).
    dedup_token: bool,
}

/// A URL failing since `since`.
struct Failing {
    since: Instant,
    attempts: u64,
    logged: Throttled,
}

/// Capped exponential backoff with ±20% jitter, never above its cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_BACKOFF.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        // Clamped after the jitter: `retry_max_ms` is the longest wait, as documented
        // (at the cap the jitter only shortens it, which still spreads the nodes).
        delay.mul_f64(0.8 + 0.4 * fastrand::f64()).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_never_waits_longer() {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let delays: Vec<u64> = (0..6).map(|_| backoff.next().as_millis() as u64).collect();
        for (delay, base) in delays.iter().zip([1000, 2000, 4000, 5000, 5000, 5000]) {
            assert!(
                (base * 8 / 10..=(base * 12 / 10).min(5000)).contains(delay),
                "{delays:?}"
            );
        }
        // At the cap, half the draws went above it before the clamp: 50 all below is luck
        // of 2^-50.
        let at_cap: Vec<Duration> = (0..50).map(|_| backoff.next()).collect();
        assert!(
            at_cap.iter().all(|d| *d <= Duration::from_secs(5)),
            "{at_cap:?}"
        );
        let mut short = Backoff::new(Duration::from_millis(50));
        assert!(short.next() <= Duration::from_millis(50));
    }

    #[test]
    fn table_names() {
        for good in ["active_calls", "yeti.active_calls", "_t1"] {
            assert!(is_table_name(good), "{good}");
        }
        for bad in ["", "1t", "a.b.c", "t; DROP", "`t`", "a."] {
            assert!(!is_table_name(bad), "{bad}");
        }
    }

    fn settings(urls: &[&str]) -> anyhow::Result<Option<Settings>> {
        Settings::from_config(&UpstreamConfig {
            clickhouse_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..UpstreamConfig::default()
        })
    }

    #[test]
    fn settings_refuse_what_cannot_work_without_quoting_a_password() {
        assert!(settings(&[]).unwrap().is_none());
        let err = format!(
            "{:#}",
            settings(&["http://u:secret@ch:8123/", "ftp://u:secret@ch2/"]).unwrap_err()
        );
        assert!(
            err.contains("clickhouse_urls[1]") && err.contains("https://"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        let twice = format!(
            "{:#}",
            settings(&[
                "http://ch:8123/?database=a",
                "http://u:secret@ch:8123/?database=b"
            ])
            .unwrap_err()
        );
        assert!(
            twice.contains("listed twice") && !twice.contains("secret"),
            "{twice}"
        );
    }

    /// `[upstream]` as the agent reads it: the configuration file, then the relay's check.
    fn upstream(text: &str) -> anyhow::Result<Option<Settings>> {
        let config = crate::config::Config::parse(text)?;
        Settings::from_config(&config.upstream)
    }

    #[test]
    fn relay_urls_are_checked_as_the_relay_reads_them() {
        let ok = upstream("[upstream]\nclickhouse_urls = [\"http://ch:8123/?database=yeti\"]\n");
        assert!(ok.is_ok(), "{ok:?}");
        // An https:// URL's CA certificates are read with the configuration.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = upstream(&format!(
            "[upstream]\nca_file = {missing:?}\nclickhouse_urls = [\"https://u:secret-password@ch:8443/\"]\n"
        ));
        let text = format!("{:#}", err.unwrap_err());
        // (A word no temporary folder's name holds.)
        assert!(
            text.contains("upstream.ca_file")
                && text.contains("missing.pem")
                && !text.contains("secret-password"),
            "{text}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let err = upstream(&format!(
            "[upstream]\nca_file = {junk:?}\nclickhouse_urls = [\"https://ch/\"]\n"
        ));
        assert!(format!("{:#}", err.unwrap_err()).contains("holds no PEM certificate"),);
        // The system's, on a machine that has them (Debian's ca-certificates).
        if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
            let ok = upstream("[upstream]\nclickhouse_urls = [\"https://ch/\"]\n");
            assert!(ok.is_ok_and(|s| s.is_some_and(|s| s.endpoints[0].is_https())));
        }
        assert!(
            upstream("[upstream]\ntable = \"x;y\"\nclickhouse_urls = [\"http://ch/\"]\n").is_err()
        );
        // A password that would never be sent is refused, without quoting it.
        let err = upstream(
            "[upstream]\nclickhouse_urls = [\"http://ch:8123/\"]\npassword = \"pw-never-sent\"\n",
        );
        let text = format!("{:#}", err.unwrap_err());
        assert!(
            text.contains("password without a user") && !text.contains("pw-never-sent"),
            "{text}"
        );
    }
}
