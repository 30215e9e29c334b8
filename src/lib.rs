//! `active-calls-agent`: answers yeti-web's customer endpoint
//! `GET /api/rest/customer/v1/outgoing-active-calls` from the switch node itself.
//!
//! ```text
//! switch ──snapshot file (notify)──→ feed ──one write txn──→ store (SQLite, WAL)
//!                                                                 │ read pool
//! customer ──GET …/outgoing-active-calls──→ api ──auth, params──┘ → JSON
//! ```
//!
//! The major components, one module each:
//!
//! * [`feed`]: reads a snapshot (newline-delimited JSON rows, as the switch writes them)
//!   as a stream and applies it through the store's writer.
//! * [`store`]: the SQLite database of `schema.sql`; one [`store::Writer`] that applies a
//!   snapshot as one transaction writing only what changed, and [`store::Readers`] that
//!   answer customer queries through prefix indexes.
//! * [`api`]: the HTTP endpoint on hyper, with the exact answers of the central API.
//! * [`auth`]: customer JWTs (header or session cookie) resolved into a customer context.
//! * [`directory`]: the accounts and API accesses file, reloaded when it changes.
//! * [`config`]: the TOML configuration.
//! * [`watch`]: following the snapshot and directory files with notify.
//! * [`demo`]: a newcomer's first run, with a simulated switch.
//!
//! [`Agent`] wires them together: one writer thread owns the write connection and applies
//! snapshot files and expiry in turn, the file watcher feeds it, and the API serves from
//! the read pool. Readers never wait for the writer (WAL), and never see half a snapshot.

#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod directory;
pub mod feed;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::watch as signal;

use crate::api::ApiState;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::directory::{Directory, SwapCell};
use crate::feed::{ApplyReport, apply_file};
use crate::store::{Readers, Writer};

/// What the feed has done so far: tests and the demo wait on it instead of sleeping.
#[derive(Debug, Clone, Default)]
pub struct FeedStatus {
    /// How many times the writer looked at the snapshot file (at start, and per change).
    pub file_checks: u64,
    pub applied: u64,
    pub rejected: u64,
    pub last_report: Option<ApplyReport>,
    pub last_error: Option<String>,
}

/// Work for the writer thread, the only owner of the write connection.
enum WriterJob {
    ApplyFile,
    Stop,
}

/// How often the writer looks for nodes gone silent.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// A running agent. Dropping it stops it.
pub struct Agent {
    api_addr: SocketAddr,
    feed_status: signal::Receiver<FeedStatus>,
    directory_reloads: signal::Receiver<u64>,
    shutdown: signal::Sender<bool>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    jobs: Option<mpsc::Sender<WriterJob>>,
    _watcher: watch::FileWatcher,
}

impl Agent {
    /// Opens the store, loads the directory, applies the snapshot file, starts watching and
    /// serving. Returns once the API listener is bound.
    pub async fn start(config: &Config) -> anyhow::Result<Agent> {
        // Without a secret the agent still serves (every token gets 401), so that the
        // operator sees it running and its logs say why.
        let secret = config.jwt_secret().unwrap_or_else(|e| {
            tracing::error!(error = format!("{e:#}"), "no usable JWT secret");
            None
        });
        if secret.is_none() {
            tracing::warn!("no api.jwt_secret configured: every request will get 401");
        }
        let auth = Authenticator::new(
            secret.as_deref(),
            Duration::from_secs(config.api.token_lifetime),
        );

        let writer = Writer::open(&config.store.path)?;
        let readers = Arc::new(Readers::new(&config.store.path));

        let directory = Arc::new(SwapCell::new(Directory::default()));
        let (reloads_tx, mut directory_reloads) = signal::channel(0u64);

        let (status_tx, feed_status) = signal::channel(FeedStatus::default());
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let watch_path =
            (!config.feed.watch.as_os_str().is_empty()).then(|| config.feed.watch.clone());
        let stale_after = config.stale_after();
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let watch_path = watch_path.clone();
                move || run_writer(writer, jobs_rx, watch_path, stale_after, status_tx)
            })?;

        // The watcher also does the first read of both files.
        let mut targets = vec![watch::Target {
            path: config.directory.path.clone(),
            on_change: Box::new({
                let directory = directory.clone();
                let path = config.directory.path.clone();
                move || reload_directory(&directory, &path, &reloads_tx)
            }),
        }];
        if let Some(path) = watch_path {
            let jobs = jobs_tx.clone();
            targets.push(watch::Target {
                path,
                on_change: Box::new(move || {
                    let _ = jobs.send(WriterJob::ApplyFile);
                }),
            });
        }
        let watcher = watch::watch(targets).context("starting the file watch")?;
        // Serve only once the directory has been read: before it, every account is unknown.
        directory_reloads
            .wait_for(|n| *n > 0)
            .await
            .context("the file watch stopped before reading the directory")?;

        let (listener, api_addr) = api::bind(&config.api.listen).await?;
        let (shutdown, shutdown_rx) = signal::channel(false);
        let state = Arc::new(ApiState {
            readers,
            directory,
            auth,
            stale_after,
        });
        tokio::spawn(api::serve(listener, state, shutdown_rx));
        tracing::info!(%api_addr, "serving {}", api::OUTGOING_ACTIVE_CALLS);

        Ok(Agent {
            api_addr,
            feed_status,
            directory_reloads,
            shutdown,
            writer_thread: Some(writer_thread),
            jobs: Some(jobs_tx),
            _watcher: watcher,
        })
    }

    /// The address the API listens on (useful with port 0).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The feed's progress, updated after every snapshot applied or rejected.
    pub fn feed_status(&self) -> signal::Receiver<FeedStatus> {
        self.feed_status.clone()
    }

    /// Counts directory reloads (successful or not), for waiting on one.
    pub fn directory_reloads(&self) -> signal::Receiver<u64> {
        self.directory_reloads.clone()
    }

    /// Stops serving, lets the writer finish its snapshot, and checkpoints the store.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(jobs) = self.jobs.take() {
            let _ = jobs.send(WriterJob::Stop);
        }
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Runs the agent from `config` until Ctrl-C or SIGTERM.
pub async fn serve(config: &Config) -> anyhow::Result<()> {
    let agent = Agent::start(config).await?;
    wait_for_signal().await;
    tracing::info!("stopping");
    tokio::task::spawn_blocking(move || agent.stop()).await?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn reload_directory(
    cell: &SwapCell<Directory>,
    path: &std::path::Path,
    reloads: &signal::Sender<u64>,
) {
    match Directory::load(path) {
        Ok(directory) => {
            tracing::info!(path = %path.display(), accounts = directory.account_count(), "directory loaded");
            cell.store(directory);
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "directory rejected; keeping the previous one"
        ),
    }
    reloads.send_modify(|n| *n += 1);
}

/// The writer thread: applies the snapshot file when told, expires silent nodes, and
/// checkpoints when the agent stops.
fn run_writer(
    mut writer: Writer,
    jobs: mpsc::Receiver<WriterJob>,
    watch_path: Option<PathBuf>,
    stale_after: Option<Duration>,
    status: signal::Sender<FeedStatus>,
) {
    let mut stopping = false;
    // The identity (inode, mtime, length) of the file content applied last: a late
    // duplicate event for the same content is not worth a second pass over it.
    let mut applied_stamp = None;
    while !stopping {
        match jobs.recv_timeout(EXPIRY_INTERVAL) {
            Ok(WriterJob::ApplyFile) => {
                // More ApplyFile jobs queued behind this one would apply the same file again.
                while let Ok(job) = jobs.try_recv() {
                    stopping |= matches!(job, WriterJob::Stop);
                }
                if let Some(path) = &watch_path {
                    let stamp =
                        std::fs::metadata(path).and_then(|m| Ok((m.ino(), m.modified()?, m.len())));
                    match stamp {
                        Ok(stamp) if Some(stamp) == applied_stamp => {}
                        Ok(stamp) => {
                            apply_snapshot_file(&mut writer, path, &status);
                            applied_stamp = Some(stamp);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            tracing::info!(path = %path.display(), "no snapshot file (yet)");
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "cannot read the snapshot file");
                        }
                    }
                    status.send_modify(|s| s.file_checks += 1);
                }
            }
            Ok(WriterJob::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(stale_after) = stale_after {
            match writer.expire(SystemTime::now() - stale_after) {
                Ok(nodes) if !nodes.is_empty() => {
                    tracing::info!(?nodes, "silent nodes expired: their calls are gone")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "expiring silent nodes failed"),
            }
        }
    }
    if let Err(e) = writer.checkpoint() {
        tracing::warn!(error = %e, "checkpointing the store at shutdown failed");
    }
}

fn apply_snapshot_file(
    writer: &mut Writer,
    path: &std::path::Path,
    status: &signal::Sender<FeedStatus>,
) {
    match apply_file(writer, path) {
        Ok(report) => {
            tracing::info!(
                source = "file",
                nodes = ?report.nodes,
                rows = report.rows,
                skipped = report.skipped,
                written = report.written,
                removed = report.removed,
                duration_ms = %format_args!("{:.1}", report.duration.as_secs_f64() * 1000.0),
                "snapshot applied"
            );
            status.send_modify(|s| {
                s.applied += 1;
                s.last_report = Some(report);
            });
        }
        Err(e) => {
            tracing::error!(source = "file", path = %path.display(), error = %e, "snapshot rejected; previous state kept");
            status.send_modify(|s| {
                s.rejected += 1;
                s.last_error = Some(e.to_string());
            });
        }
    }
}
