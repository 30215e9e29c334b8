//! `active-calls-agent`: answers yeti-web's customer endpoint
//! `GET /api/rest/customer/v1/outgoing-active-calls` from the switch node itself.
//!
//! ```text
//! switch ──snapshot file (inotify)──────┐
//! switch ──HTTP POST (ClickHouse-ish)────┤→ feed ──one write txn──→ store (SQLite, WAL)
//! switch ──HTTP POST /events (per call)──┘                              │ read pool
//! customer ──GET …/outgoing-active-calls──→ api ──auth, params──────────┘ → JSON
//! customer ──same, Accept: text/event-stream──→ snapshot, then live's changes it selects
//!                            feed ──each committed snapshot──→ relay ──spool──→ ClickHouse
//! ```
//!
//! The major components, one module each:
//!
//! * [`feed`]: reads a snapshot (newline-delimited JSON rows, as the switch writes them)
//!   as a stream and applies it through the store's writer; [`feed::writer`] is the one
//!   thread that writes, [`feed::socket`] the ClickHouse-compatible HTTP receiver, which
//!   also takes the switch's call events ([`feed::event`]) between snapshots.
//! * [`store`]: the SQLite database of `schema.sql`; one [`store::Writer`] that applies a
//!   snapshot (or a run of call events) as one transaction writing only what changed,
//!   reconciling the two call by call, and [`store::Readers`] that answer customer
//!   queries through prefix indexes.
//! * [`call`]: one call, as the feed reads it and the store keeps it, and a call event.
//! * [`clock`]: the UTC date-time text and the unix milliseconds the others share.
//! * [`api`]: the HTTP endpoint on hyper, with the exact answers of the central API, and
//!   [`api::scrape`], every call of the node streamed to an aggregator; [`api::stream`]
//!   answers both as live streams (Server-Sent Events) when asked.
//! * [`live`]: the change feed the writer publishes after each commit, routed to the
//!   streams it may concern, and what each stream keeps to send only what changed.
//! * [`auth`]: customer JWTs (header or session cookie) resolved into a customer context.
//! * [`directory`]: the accounts and API accesses file, reloaded when it changes.
//! * [`config`]: the TOML configuration, and [`check`], which validates it for an operator.
//! * [`calls`]: the node's calls from a shell, read-only from the store through the
//!   endpoint's own filters and statements.
//! * [`metrics`]: the Prometheus metrics; [`api::ops`] serves them with `/healthz` and
//!   `/readyz`.
//! * [`logs`]: tracing to stderr (the journal), its level reloadable.
//! * [`watch`]: following the snapshot and directory files with inotify.
//! * [`http`]: the accept loop and small answers both HTTP listeners share.
//! * [`relay`]: every applied snapshot forwarded to the central ClickHouse, through an
//!   on-disk spool that outlives outages and restarts.
//!
//! Apart from the product, [`lab`] is the workshop: a simulated switch ([`lab::sems`]),
//! the `demo` it feeds, the `bench` and `soak` that drive the real agent as a child
//! process ([`lab::agent`], which the integration tests drive it with too). The product
//! never imports it (`tests/house.rs` says so).
//!
//! [`Agent`] wires them together: one writer thread owns the write connection and applies
//! snapshot files, posted snapshots, call events and expiry in turn; the file watcher and the socket
//! source feed it, and the API serves from the read pool. Readers never wait for the
//! writer (WAL), and never see half a snapshot. [`serve`] runs an [`Agent`] as a systemd
//! service: readiness and watchdog notifications, SIGHUP reloads, a graceful SIGTERM.

#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod call;
pub mod calls;
pub mod check;
pub mod clock;
pub mod config;
pub mod directory;
pub mod feed;
pub mod http;
pub mod lab;
pub mod live;
pub mod logs;
pub mod metrics;
pub mod relay;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use sd_notify::NotifyState;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use crate::api::ops::Health;
use crate::api::{ApiState, Routes};
use crate::auth::{Authenticator, ScrapeTokens};
use crate::config::Config;
use crate::directory::{Directory, SwapCell};
use crate::feed::Forward;
use crate::feed::socket::SocketSettings;
use crate::feed::writer::{Committed, Job, WriterThread};
use crate::http::ListenerSettings;
use crate::logs::LogControl;
use crate::metrics::Metrics;
use crate::store::{Readers, Writer};

pub use crate::feed::writer::FeedStatus;

/// The longest a stop may take: the listeners' grace for requests already begun, then the
/// snapshot being applied and the checkpoint. systemd's `TimeoutStopSec` is above it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections the metrics listener holds at most: Prometheus and a health check or two.
const METRICS_MAX_CONNECTIONS: usize = 64;

/// The paths every listener counts under their own name in the request metrics: the API's
/// and the socket feed's, on each of the three listeners alike, so that a path asked of
/// the other listener (`/healthz` of the feed, `/` of the API) is counted as that path
/// there too, not as `other`.
static ROUTES: [&str; api::ROUTES.len() + feed::socket::ROUTES.len()] = {
    let (api, feed) = (api::ROUTES, feed::socket::ROUTES);
    let mut all = [""; api::ROUTES.len() + feed::socket::ROUTES.len()];
    let mut i = 0;
    while i < all.len() {
        all[i] = if i < api.len() {
            api[i]
        } else {
            feed[i - api.len()]
        };
        i += 1;
    }
    all
};

/// A running agent. Dropping it stops it.
pub struct Agent {
    api_addr: SocketAddr,
    feed_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    directory_reloads: signal::Receiver<u64>,
    reread_directory: Box<dyn Fn() + Send + Sync>,
    state: Arc<ApiState>,
    shutdown: signal::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    writer: WriterThread,
    relay: Option<relay::Relay>,
    _watcher: watch::FileWatcher,
}

impl Agent {
    /// Opens the store, starts the writer, watches and reads the directory and snapshot
    /// files, and binds the listeners. Returns once the directory has been read and the
    /// listeners are bound (the snapshot file may still be applying).
    pub async fn start(config: &Config) -> anyhow::Result<Agent> {
        // A wrong `[upstream]` stops the start, before anything is opened or created: that
        // is a configuration to fix, and `check` names it. (The configuration does not
        // check it when read: the relay builds on the configuration, not the other way.)
        let relay_settings = relay::Settings::from_config(&config.upstream)?;
        // Without a secret the agent still serves (every token gets 401, /readyz says why),
        // so that the operator sees it running and its logs say why.
        let auth = match authenticator(config) {
            Ok(auth) => {
                if !auth.has_secret() {
                    tracing::warn!("{}: every request will get 401", config.missing_secret());
                }
                auth
            }
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "no usable JWT secret: every request will get 401"
                );
                Authenticator::new(None, Duration::ZERO)
            }
        };

        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        // A store SQLite cannot read does not keep the node down: it holds nothing the
        // switch does not send again, so it is set aside and the agent starts on a new one.
        let (mut store, replaced) = Writer::open_or_replace(&config.store.path)?;
        store
            .set_staleness(config.staleness())
            .context("setting the nodes' expiry from feed.stale_after")?;
        let readers = Arc::new(Readers::new(&config.store.path));
        if let Some(aside) = replaced {
            tracing::error!(
                store = %config.store.path.display(),
                error = %aside.why,
                set_aside = %aside.to.display(),
                "the store could not be read: it was set aside and a new one created; not ready until the next snapshot"
            );
            metrics.store_replaced();
            (readers.health()).replaced(feed::writer::replaced_line(&config.store.path, &aside));
        }
        let watch_path =
            (!config.feed.watch.as_os_str().is_empty()).then(|| config.feed.watch.clone());
        // Before the writer: the snapshot file it applies first is relayed too. A relay
        // that cannot start (its spool cannot be made: a full disk, permissions) must not
        // keep the customer API down: the agent runs without it, and says so (an error
        // line, `relay_running 0`).
        let relay = match relay_settings {
            Some(settings) => match relay::Relay::start(&settings, &metrics) {
                Ok(relay) => Some(relay),
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "the relay could not start: snapshots are applied and served, but not relayed to ClickHouse until a restart"
                    );
                    None
                }
            },
            None => None,
        };
        metrics.relay_running(relay.is_some());
        let live = live::Feed::default();
        let writer = WriterThread::spawn(
            store,
            watch_path.clone(),
            config.feed.max_queued_events,
            metrics.clone(),
            health.writer_running.clone(),
            readers.health().clone(),
            Committed {
                relay: relay
                    .as_ref()
                    .map(|relay| Box::new(relay.spool()) as Box<dyn Forward>),
                live: live.clone(),
            },
        )?;

        // A reader that finds the store damaged tells the writer, which replaces it.
        readers.health().on_damage({
            let handle = writer.handle.clone();
            move |generation| {
                handle.send(Job::Damage(generation));
            }
        });

        // The watcher also does the first read of both files.
        let directory = Arc::new(SwapCell::new(Directory::default()));
        let (reloads_tx, mut directory_reloads) = signal::channel(0u64);
        let reread_directory: Arc<dyn Fn() + Send + Sync> = Arc::new({
            let directory = directory.clone();
            let path = config.directory.path.clone();
            let (metrics, health) = (metrics.clone(), health.clone());
            // The watcher and SIGHUP may both re-read: one at a time, so that a slow read
            // of the old file cannot land after a fast read of the new one.
            let one_at_a_time = std::sync::Mutex::new(());
            move || {
                let _turn = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
                let loaded = reload_directory(&directory, &path);
                metrics.directory_load(loaded);
                if loaded {
                    health.directory_loaded.store(true, Ordering::Release);
                }
                // Last: whoever waits on the count sees the health and metrics of this read.
                reloads_tx.send_modify(|n| *n += 1);
            }
        });
        let mut targets = vec![watch::Target {
            path: config.directory.path.clone(),
            on_change: Box::new({
                let reread = reread_directory.clone();
                move || reread()
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
        let mut servers = Vec::new();
        if let Some(why) = config.feed_exposed() {
            tracing::warn!("{why}");
        }
        let feed_addr = if config.feed.listen.is_empty() {
            None
        } else {
            let (listener, addr) = http::bind(&config.feed.listen, "feed").await?;
            let settings = Arc::new(SocketSettings {
                user: config.feed.user.clone(),
                password: config.feed.password.clone(),
                max_body_bytes: config.feed.max_body_bytes,
                // Beside the store: a folder the agent may write, under systemd too.
                spill_dir: match config.store.path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                    _ => ".".into(),
                },
                store: readers.health().clone(),
            });
            let counted = ListenerSettings {
                name: "feed",
                metrics: metrics.clone(),
                max_connections: config.feed.max_connections,
                routes: &ROUTES,
            };
            servers.push(tokio::spawn(feed::socket::serve(
                listener,
                writer.handle.clone(),
                settings,
                counted,
                shutdown_rx.clone(),
            )));
            tracing::info!(%addr, "taking snapshots over HTTP (ClickHouse-compatible)");
            Some(addr)
        };

        let state = Arc::new(ApiState {
            readers,
            directory,
            auth: SwapCell::new(auth),
            metrics,
            health,
            scrape_tokens: SwapCell::new(scrape_tokens(config)),
            scrapes: Arc::new(tokio::sync::Semaphore::new(api::scrape::MAX_SCRAPES)),
            answers: api::answers::Answers::new(config.api.max_answer_bytes),
            live,
            streams: Arc::new(tokio::sync::Semaphore::new(config.api.max_streams)),
            reloads: directory_reloads.clone(),
            stopping: shutdown_rx.clone(),
        });
        let separate_metrics = !config.metrics.listen.is_empty();
        let metrics_addr = if separate_metrics {
            let (listener, addr) = http::bind(&config.metrics.listen, "metrics").await?;
            let routes = Routes {
                customer: false,
                metrics: true,
            };
            servers.push(tokio::spawn(api::serve(
                listener,
                state.clone(),
                routes,
                ListenerSettings {
                    name: "metrics",
                    metrics: state.metrics.clone(),
                    max_connections: METRICS_MAX_CONNECTIONS,
                    routes: &ROUTES,
                },
                shutdown_rx.clone(),
            )));
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            Some(addr)
        } else {
            None
        };
        let (listener, api_addr) = http::bind(&config.api.listen, "API").await?;
        let routes = Routes {
            customer: true,
            metrics: !separate_metrics,
        };
        servers.push(tokio::spawn(api::serve(
            listener,
            state.clone(),
            routes,
            ListenerSettings {
                name: "api",
                metrics: state.metrics.clone(),
                max_connections: config.api.max_connections,
                routes: &ROUTES,
            },
            shutdown_rx,
        )));
        tracing::info!(%api_addr, "serving {}", api::OUTGOING_ACTIVE_CALLS);

        Ok(Agent {
            api_addr,
            feed_addr,
            metrics_addr,
            directory_reloads,
            reread_directory: Box::new(move || reread_directory()),
            state,
            shutdown,
            servers,
            writer,
            relay,
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

    /// The address of the metrics listener, when `metrics.listen` asks for one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The feed's progress, updated after every snapshot applied or rejected.
    pub fn feed_status(&self) -> signal::Receiver<FeedStatus> {
        self.writer.status.clone()
    }

    /// Counts directory reads (successful or not), for waiting on one.
    pub fn directory_reloads(&self) -> signal::Receiver<u64> {
        self.directory_reloads.clone()
    }

    /// Applies what of `config` can change live (the secret and the token lifetime, where
    /// an unreadable secret file keeps the previous secret; the scrape tokens, where an
    /// unreadable file admits nobody), and re-reads the directory.
    pub fn reload(&self, config: &Config) {
        match authenticator(config) {
            Ok(auth) => {
                if !auth.has_secret() {
                    tracing::warn!("{}: every request will get 401", config.missing_secret());
                }
                self.state.auth.store(auth);
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "JWT secret not reloaded; keeping the previous one"
            ),
        }
        self.state.scrape_tokens.store(scrape_tokens(config));
        (self.reread_directory)();
    }

    /// Stops gracefully: the listeners close, requests already begun are answered (up to
    /// [`http::SHUTDOWN_GRACE`]), then the writer finishes its snapshot and checkpoints
    /// the store, and the relay stops (what it has not sent stays spooled).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for server in std::mem::take(&mut self.servers) {
            let _ = server.await;
        }
        let _ = tokio::task::spawn_blocking(move || self.stop()).await;
    }

    /// Stops serving at once, lets the writer finish its snapshot, and checkpoints the
    /// store.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.send(true);
        self.writer.stop();
        // After the writer: its last snapshot is pending in the spool by then.
        if let Some(relay) = &mut self.relay {
            relay.stop();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The scrape tokens `config` names; none (logged) when its file cannot be read, so that a
/// broken file locks aggregators out rather than stopping the node's customer API.
fn scrape_tokens(config: &Config) -> ScrapeTokens {
    let path = config.scrape_tokens_file();
    match ScrapeTokens::load(path) {
        Ok(tokens) => {
            if path.is_some() && tokens.is_empty() {
                tracing::warn!("upstream.scrape_tokens_file lists no token: nobody may scrape");
            }
            tokens
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "no scrape token can be used");
            ScrapeTokens::default()
        }
    }
}

/// The authenticator `config` asks for; an error when its secret file cannot be read.
fn authenticator(config: &Config) -> anyhow::Result<Authenticator> {
    let secret = config.jwt_secret()?;
    Ok(Authenticator::new(
        secret.as_deref(),
        Duration::from_secs(config.api.token_lifetime),
    ))
}

/// Runs the agent until SIGTERM or Ctrl-C, as a systemd `Type=notify` service: it reports
/// ready once serving, feeds the watchdog while the writer runs, and on SIGHUP reloads the
/// directory and what of the configuration at `config_path` can change live.
pub async fn serve(
    config_path: Option<PathBuf>,
    config: Config,
    logs: &LogControl,
) -> anyhow::Result<()> {
    // Signals are ours from the first moment: a SIGTERM while the store opens stops
    // cleanly, and a SIGHUP then is not the default action (the end of the process) but
    // a reload once started.
    let mut signals = Signals::new()?;
    let mut reload_pending = false;
    let start = Agent::start(&config);
    tokio::pin!(start);
    let agent = loop {
        tokio::select! {
            agent = &mut start => break agent?,
            signal = signals.next() => match signal {
                Signal::Stop => {
                    tracing::info!("stopped while starting");
                    return Ok(());
                }
                Signal::Reload => reload_pending = true,
            },
        }
    };
    notify(&[NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        let writer_running = agent.state.health.writer_running.clone();
        tokio::spawn(feed_watchdog(writer_running, period))
    });
    // The configuration in force: what SIGHUP changes in it, and nothing else.
    let mut running = config.clone();
    loop {
        if !reload_pending && signals.next().await == Signal::Stop {
            break;
        }
        reload_pending = false;
        notify(&[NotifyState::Reloading]);
        tracing::info!("SIGHUP: reloading");
        // A wrong `[upstream]` would stop the next start: refused here as at the start.
        let loaded = Config::load(config_path.as_deref())
            .and_then(|new| relay::Settings::from_config(&new.upstream).map(|_| new));
        match loaded {
            Ok(new) => {
                let restart = running.needs_restart(&new);
                if !restart.is_empty() {
                    tracing::warn!(changed = ?restart, "these settings change only at a restart");
                }
                running.apply_live(&new);
                logs.set_level(&running.log.level);
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "configuration not reloaded; keeping the running one"
            ),
        }
        agent.reload(&running);
        notify(&[NotifyState::Ready]);
    }
    tracing::info!("stopping");
    notify(&[NotifyState::Stopping]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    if tokio::time::timeout(STOP_TIMEOUT, agent.shutdown())
        .await
        .is_err()
    {
        anyhow::bail!("the agent did not stop within {STOP_TIMEOUT:?}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the service is doing.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Pings the systemd watchdog at half its period while the writer thread runs: a writer
/// that died (snapshots no longer applied) gets the service restarted.
async fn feed_watchdog(writer_running: Arc<AtomicBool>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        if writer_running.load(Ordering::Acquire) {
            notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("the store writer has stopped; no longer feeding the watchdog");
            return;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

/// SIGTERM and Ctrl-C (stop), and SIGHUP (reload).
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("listening for SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Reads the directory file into `cell`; a bad file keeps the previous directory.
/// Returns whether it loaded.
fn reload_directory(cell: &SwapCell<Directory>, path: &std::path::Path) -> bool {
    match Directory::load(path) {
        Ok(directory) => {
            tracing::info!(path = %path.display(), accounts = directory.account_count(), "directory loaded");
            if directory.drops_every_account_of(&cell.load()) {
                tracing::warn!(
                    path = %path.display(),
                    "the directory just loaded has none of the accounts the previous one had: \
                     applied, but if the export went wrong every customer now gets 401"
                );
            } else if directory.account_count() == 0 {
                tracing::warn!(path = %path.display(), "the directory lists no account: every customer request gets 401");
            }
            cell.store(directory);
            true
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "directory not loaded; keeping the previous one (none at start: no account is known)"
            );
            false
        }
    }
}
