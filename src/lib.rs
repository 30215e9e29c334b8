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
    ///
    /// Each step is one function below, in the order they must happen: what one starts, the
    /// next is handed.
    pub async fn start(config: &Config) -> anyhow::Result<Agent> {
        // A wrong `[upstream]` stops the start, before anything is opened or created: that
        // is a configuration to fix, and `check` names it. (The configuration does not
        // check it when read: the relay builds on the configuration, not the other way.)
        let relay_settings = relay::Settings::from_config(&config.upstream)?;
        let auth = authenticator_or_refusing(config);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let (store, readers) = open_store(config, &metrics)?;
        // Before the writer: the snapshot file it applies first is relayed too.
        let relay = relay_settings.and_then(|settings| start_relay(&settings, &metrics));
        metrics.relay_running(relay.is_some());
        let live = live::Feed::default();
        let committed = Committed {
            relay: (relay.as_ref()).map(|relay| Box::new(relay.spool()) as Box<dyn Forward>),
            live: live.clone(),
        };
        let writer = start_writer(config, store, &readers, &metrics, &health, committed)?;
        let directory = DirectoryReader::new(config, &metrics, &health);
        let watcher = watch_files(config, &directory, &writer)?;
        let DirectoryReader {
            directory,
            reloads: mut directory_reloads,
            reread: reread_directory,
        } = directory;
        // Serve only once the directory has been read: before it, every account is unknown.
        directory_reloads
            .wait_for(|n| *n > 0)
            .await
            .context("the file watch stopped before reading the directory")?;

        let (shutdown, stopping) = signal::channel(false);
        let mut servers = Vec::new();
        let feed_addr =
            serve_feed(config, &writer, &readers, &metrics, &stopping, &mut servers).await?;
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
            stopping: stopping.clone(),
        });
        let (api_addr, metrics_addr) = serve_api(config, &state, &stopping, &mut servers).await?;
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

/// The configured authenticator; without a usable secret, one that refuses every token
/// (401): the agent still serves, so that the operator sees it running, and `/readyz` and
/// its log say why.
fn authenticator_or_refusing(config: &Config) -> Authenticator {
    match authenticator(config) {
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
    }
}

/// The store's writer and its read pool. A store SQLite cannot read does not keep the node
/// down: it holds nothing the switch does not send again, so it is set aside and the agent
/// starts on a new one.
fn open_store(config: &Config, metrics: &Metrics) -> anyhow::Result<(Writer, Arc<Readers>)> {
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
    Ok((store, readers))
}

/// The relay, if it starts. One that cannot (its spool cannot be made: a full disk,
/// permissions) must not keep the customer API down: the agent runs without it, and says
/// so (an error line, `relay_running 0`).
fn start_relay(settings: &relay::Settings, metrics: &Arc<Metrics>) -> Option<relay::Relay> {
    relay::Relay::start(settings, metrics)
        .inspect_err(|e| {
            tracing::error!(
                error = format!("{e:#}"),
                "the relay could not start: snapshots are applied and served, but not relayed to ClickHouse until a restart"
            );
        })
        .ok()
}

/// The writer thread, which owns `store` and hands each commit to `committed`; a reader
/// that finds the store damaged tells it, and it replaces the store.
fn start_writer(
    config: &Config,
    store: Writer,
    readers: &Readers,
    metrics: &Arc<Metrics>,
    health: &Health,
    committed: Committed,
) -> anyhow::Result<WriterThread> {
    let writer = WriterThread::spawn(
        store,
        watched_snapshot(config),
        config.feed.max_queued_events,
        metrics.clone(),
        health.writer_running.clone(),
        readers.health().clone(),
        committed,
    )?;
    readers.health().on_damage({
        let handle = writer.handle.clone();
        move |generation| {
            handle.send(Job::Damage(generation));
        }
    });
    Ok(writer)
}

/// The snapshot file the feed watches, unless `feed.watch` is empty.
fn watched_snapshot(config: &Config) -> Option<PathBuf> {
    (!config.feed.watch.as_os_str().is_empty()).then(|| config.feed.watch.clone())
}

/// The directory as the API reads it, and what re-reads it (the watcher and SIGHUP), with
/// a count of the reads done, which the start and the tests wait on.
struct DirectoryReader {
    directory: Arc<SwapCell<Directory>>,
    reloads: signal::Receiver<u64>,
    reread: Arc<dyn Fn() + Send + Sync>,
}

impl DirectoryReader {
    fn new(config: &Config, metrics: &Arc<Metrics>, health: &Arc<Health>) -> DirectoryReader {
        let directory = Arc::new(SwapCell::new(Directory::default()));
        let (reloads_tx, reloads) = signal::channel(0u64);
        let reread: Arc<dyn Fn() + Send + Sync> = Arc::new({
            let directory = directory.clone();
            let path = config.directory.path.clone();
            let (metrics, health) = (metrics.clone(), health.clone());
            // The watcher and SIGHUP may both re-read: one at a time, so that a slow read
            // of the old file cannot land after a fast read of the new one.
            let one_at_a_time = std::sync::Mutex::new(());
            move || {
                let _turn = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
                reload_directory(&directory, &path, &metrics, &health);
                // Last: whoever waits on the count sees the health and metrics of this read.
                reloads_tx.send_modify(|n| *n += 1);
            }
        });
        DirectoryReader {
            directory,
            reloads,
            reread,
        }
    }
}

/// Watches the directory (re-read on change) and the snapshot file (applied on change by
/// the writer); the watcher also does the first read of both.
fn watch_files(
    config: &Config,
    directory: &DirectoryReader,
    writer: &WriterThread,
) -> anyhow::Result<watch::FileWatcher> {
    let reread = directory.reread.clone();
    let mut targets = vec![watch::Target {
        path: config.directory.path.clone(),
        on_change: Box::new(move || reread()),
    }];
    if let Some(path) = watched_snapshot(config) {
        let handle = writer.handle.clone();
        targets.push(watch::Target {
            path,
            on_change: Box::new(move || {
                handle.send(Job::ApplyFile);
            }),
        });
    }
    watch::watch(targets).context("starting the file watch")
}

/// The socket feed (posted snapshots and call events), unless `feed.listen` is empty: its
/// address, its server pushed on `servers`.
async fn serve_feed(
    config: &Config,
    writer: &WriterThread,
    readers: &Readers,
    metrics: &Arc<Metrics>,
    stopping: &signal::Receiver<bool>,
    servers: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Option<SocketAddr>> {
    if let Some(why) = config.feed_exposed() {
        tracing::warn!("{why}");
    }
    if config.feed.listen.is_empty() {
        return Ok(None);
    }
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
        direct: Default::default(),
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
        stopping.clone(),
    )));
    tracing::info!(%addr, "taking snapshots over HTTP (ClickHouse-compatible)");
    Ok(Some(addr))
}

/// The customer API's listener, and the metrics listener when `metrics.listen` asks for
/// one apart (else the API's serves `/metrics` too): their addresses, their servers pushed
/// on `servers`.
async fn serve_api(
    config: &Config,
    state: &Arc<ApiState>,
    stopping: &signal::Receiver<bool>,
    servers: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    let apart = !config.metrics.listen.is_empty();
    let mut listen = |listener, name, routes, max_connections| {
        let counted = ListenerSettings {
            name,
            metrics: state.metrics.clone(),
            max_connections,
            routes: &ROUTES,
        };
        let server = api::serve(listener, state.clone(), routes, counted, stopping.clone());
        servers.push(tokio::spawn(server));
    };
    let metrics_addr = if apart {
        let (listener, addr) = http::bind(&config.metrics.listen, "metrics").await?;
        let routes = Routes {
            customer: false,
            metrics: true,
        };
        listen(listener, "metrics", routes, METRICS_MAX_CONNECTIONS);
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        Some(addr)
    } else {
        None
    };
    let (listener, api_addr) = http::bind(&config.api.listen, "API").await?;
    let routes = Routes {
        customer: true,
        metrics: !apart,
    };
    listen(listener, "api", routes, config.api.max_connections);
    tracing::info!(%api_addr, "serving {}", api::OUTGOING_ACTIVE_CALLS);
    Ok((api_addr, metrics_addr))
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

/// Reads the directory file into `cell`, counted in `metrics` and, once one has loaded,
/// ready in `health`; a bad file keeps the previous directory.
fn reload_directory(
    cell: &SwapCell<Directory>,
    path: &std::path::Path,
    metrics: &Metrics,
    health: &Health,
) {
    // Each outcome is said last, once the directory, the metrics and the health show it:
    // whoever reads the line finds them so.
    match Directory::load(path) {
        Ok(directory) => {
            let accounts = directory.account_count();
            let drops_every_account = directory.drops_every_account_of(&cell.load());
            cell.store(directory);
            metrics.directory_load(true);
            health.directory_loaded.store(true, Ordering::Release);
            tracing::info!(path = %path.display(), accounts, "directory loaded");
            if drops_every_account {
                tracing::warn!(
                    path = %path.display(),
                    "the directory just loaded has none of the accounts the previous one had: \
                     applied, but if the export went wrong every customer now gets 401"
                );
            } else if accounts == 0 {
                tracing::warn!(path = %path.display(), "the directory lists no account: every customer request gets 401");
            }
        }
        Err(e) => {
            metrics.directory_load(false);
            tracing::error!(
                error = format!("{e:#}"),
                "directory not loaded; keeping the previous one (none at start: no account is known)"
            );
        }
    }
}
