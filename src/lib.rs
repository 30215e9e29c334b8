//! `active-calls-agent`: answers yeti-web's customer endpoint
//! `GET /api/rest/customer/v1/outgoing-active-calls` from the switch node itself.
//!
//! ```text
//! switch ──snapshot file (notify)───┐
//! switch ──HTTP POST (ClickHouse-ish)┴→ feed ──one write txn──→ store (SQLite, WAL)
//!                                                                    │ read pool
//! customer ──GET …/outgoing-active-calls──→ api ──auth, params─────┘ → JSON
//! ```
//!
//! The major components, one module each:
//!
//! * [`feed`]: reads a snapshot (newline-delimited JSON rows, as the switch writes them)
//!   as a stream and applies it through the store's writer; [`feed::writer`] is the one
//!   thread that writes, [`feed::socket`] the ClickHouse-compatible HTTP receiver.
//! * [`store`]: the SQLite database of `schema.sql`; one [`store::Writer`] that applies a
//!   snapshot as one transaction writing only what changed, and [`store::Readers`] that
//!   answer customer queries through prefix indexes.
//! * [`api`]: the HTTP endpoint on hyper, with the exact answers of the central API.
//! * [`auth`]: customer JWTs (header or session cookie) resolved into a customer context.
//! * [`directory`]: the accounts and API accesses file, reloaded when it changes.
//! * [`config`]: the TOML configuration.
//! * [`watch`]: following the snapshot and directory files with notify.
//! * [`http`]: the accept loop and small answers both HTTP listeners share.
//! * [`demo`]: a newcomer's first run, with a simulated switch.
//! * [`bench`]: the performance benchmark, driving the real agent as a child process.
//!
//! [`Agent`] wires them together: one writer thread owns the write connection and applies
//! snapshot files, posted snapshots and expiry in turn; the file watcher and the socket
//! source feed it, and the API serves from the read pool. Readers never wait for the
//! writer (WAL), and never see half a snapshot.

#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod demo;
pub mod directory;
pub mod feed;
pub mod http;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch as signal;

use crate::api::ApiState;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::directory::{Directory, SwapCell};
use crate::feed::socket::SocketSettings;
use crate::feed::writer::{Job, WriterThread};
use crate::store::{Readers, Writer};

pub use crate::feed::writer::FeedStatus;

/// A running agent. Dropping it stops it.
pub struct Agent {
    api_addr: SocketAddr,
    feed_addr: Option<SocketAddr>,
    directory_reloads: signal::Receiver<u64>,
    shutdown: signal::Sender<bool>,
    writer: WriterThread,
    _watcher: watch::FileWatcher,
}

impl Agent {
    /// Opens the store, starts the writer, watches and reads the directory and snapshot
    /// files, and binds both listeners. Returns once the directory has been read and the
    /// listeners are bound (the snapshot file may still be applying).
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

        let store = Writer::open(&config.store.path)?;
        let readers = Arc::new(Readers::new(&config.store.path));
        let watch_path =
            (!config.feed.watch.as_os_str().is_empty()).then(|| config.feed.watch.clone());
        let stale_after = config.stale_after();
        let writer = WriterThread::spawn(store, watch_path.clone(), stale_after)?;

        // The watcher also does the first read of both files.
        let directory = Arc::new(SwapCell::new(Directory::default()));
        let (reloads_tx, mut directory_reloads) = signal::channel(0u64);
        let mut targets = vec![watch::Target {
            path: config.directory.path.clone(),
            on_change: Box::new({
                let directory = directory.clone();
                let path = config.directory.path.clone();
                move || reload_directory(&directory, &path, &reloads_tx)
            }),
        }];
        if let Some(path) = watch_path {
            let handle = writer.handle.clone();
            targets.push(watch::Target {
                path,
                on_change: Box::new(move || {
                    handle.send(Job::ApplyFile);
                }),
            });
        }
        let watcher = watch::watch(targets).context("starting the file watch")?;
        // Serve only once the directory has been read: before it, every account is unknown.
        directory_reloads
            .wait_for(|n| *n > 0)
            .await
            .context("the file watch stopped before reading the directory")?;

        let (shutdown, shutdown_rx) = signal::channel(false);
        let feed_addr = if config.feed.listen.is_empty() {
            None
        } else {
            let (listener, addr) = http::bind(&config.feed.listen, "feed").await?;
            let settings = Arc::new(SocketSettings {
                user: config.feed.user.clone(),
                password: config.feed.password.clone(),
                max_body_bytes: config.feed.max_body_bytes,
            });
            let handle = writer.handle.clone();
            tokio::spawn(feed::socket::serve(
                listener,
                handle,
                settings,
                shutdown_rx.clone(),
            ));
            tracing::info!(%addr, "taking snapshots over HTTP (ClickHouse-compatible)");
            Some(addr)
        };

        let (listener, api_addr) = http::bind(&config.api.listen, "API").await?;
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
            feed_addr,
            directory_reloads,
            shutdown,
            writer,
            _watcher: watcher,
        })
    }

    /// The address the API listens on (useful with port 0).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The address of the socket source, when it is on.
    pub fn feed_addr(&self) -> Option<SocketAddr> {
        self.feed_addr
    }

    /// The feed's progress, updated after every snapshot applied or rejected.
    pub fn feed_status(&self) -> signal::Receiver<FeedStatus> {
        self.writer.status.clone()
    }

    /// Counts directory reads (successful or not), for waiting on one.
    pub fn directory_reloads(&self) -> signal::Receiver<u64> {
        self.directory_reloads.clone()
    }

    /// Stops serving, lets the writer finish its snapshot, and checkpoints the store.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.send(true);
        self.writer.stop();
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
            "directory not loaded; keeping the previous one (none at start: no account is known)"
        ),
    }
    reloads.send_modify(|n| *n += 1);
}
