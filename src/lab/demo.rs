//! `active-calls-agent demo`: a newcomer's first run.
//!
//! The demo writes a directory and a configuration into a folder, starts a simulated
//! switch ([`crate::lab::sems::Switch`], SEMS's own bytes) that rewrites the snapshot file every
//! period (temporary file, then rename, as a real writer should) and, between snapshots,
//! posts each call's events to the feed listener as a node with `http_events_destination`
//! does (so a call can be seen to start and end between two snapshots), serves, and prints
//! a `curl` line with a valid token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::Agent;
use crate::auth::Authenticator;
use crate::clock::unix_now;
use crate::config::Config;
use crate::lab::client::EventPoster;
use crate::lab::sems::{BIG_ACCOUNT, Switch, customer_of, directory_json, uuid_of};

/// Writes `content` to `path` atomically: a temporary file in the same directory, then a
/// rename over the target, so a reader never sees it half-written.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The demo's options (the `demo` command's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub calls: usize,
    pub period: Duration,
}

/// Runs the demo until Ctrl-C.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let dir = &options.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut switch = Switch::new(unix_now() as u64);
    // Kept across runs, so that an earlier run's curl line still works.
    let secret = kept_or_new(&dir.join("jwt_secret"), "demo")?;
    let scrape_token = kept_or_new(&dir.join("scrape-tokens"), "scrape")?;
    let config = configure(&options, &secret)?;

    let now = unix_now();
    switch.fill(options.calls, now);
    write_atomically(&config.feed.watch, &switch.render(now))?;

    let agent = Agent::start(&config).await?;
    let mut status = agent.feed_status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.applied > 0))
        .await
        .context("the first snapshot was not applied within 30 s")??;

    let auth = Authenticator::new(Some(secret.as_bytes()), Duration::ZERO);
    let token = auth
        .issue_for_access(customer_of(BIG_ACCOUNT), SystemTime::now())
        .context("signing the demo token")?;
    print_try_it(&agent, &options, &token, &scrape_token);

    let events = agent.feed_addr().map(EventPoster::new);
    let snapshot_path = config.feed.watch.clone();
    let period = options.period;
    std::thread::Builder::new()
        .name("demo-switch".into())
        .spawn(move || be_the_switch(switch, period, &snapshot_path, events))?;

    let _ = tokio::signal::ctrl_c().await;
    tokio::task::spawn_blocking(move || agent.stop()).await?;
    println!();
    println!(
        "demo stopped. Its files stay in {} (the next run keeps the same tokens).",
        dir.display()
    );
    Ok(())
}

/// The demo agent's configuration, in its folder, and written there as `config.toml` so
/// that `serve --config` reruns it.
fn configure(options: &DemoOptions, secret: &str) -> anyhow::Result<Config> {
    let dir = &options.dir;
    let mut config = Config::default();
    config.api.listen = options.listen.clone();
    if std::net::TcpListener::bind(&config.api.listen).is_err() {
        // Something else has the port: any free one will do for a demo.
        eprintln!(
            "{} is taken; the demo takes a free port instead",
            config.api.listen
        );
        config.api.listen = "127.0.0.1:0".into();
    }
    config.api.jwt_secret = Some(secret.to_owned());
    config.store.path = dir.join("active-calls.db");
    config.feed.watch = dir.join("snapshot.jsonl");
    // The socket source too, on any free port: the demo's switch writes the file, and a
    // curl can post a snapshot the way a real switch does.
    config.feed.listen = "127.0.0.1:0".into();
    config.directory.path = dir.join("directory.json");
    std::fs::write(&config.directory.path, directory_json())?;
    // An aggregator's token too, for the node-wide scrape.
    config.upstream.scrape_tokens_file = dir.join("scrape-tokens");
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "# What `demo` runs with; `active-calls-agent serve --config {0}` reruns it.\n\
             [api]\nlisten = {1:?}\njwt_secret = {2:?}\n\n[store]\npath = {3:?}\n\n\
             [feed]\nwatch = {4:?}\nlisten = \"127.0.0.1:0\"\n\n[directory]\npath = {5:?}\n\n\
             [upstream]\nscrape_tokens_file = {6:?}\n",
            dir.join("config.toml").display(),
            config.api.listen,
            secret,
            config.store.path.display().to_string(),
            config.feed.watch.display().to_string(),
            config.directory.path.display().to_string(),
            config.upstream.scrape_tokens_file.display().to_string(),
        ),
    )?;

    Ok(config)
}

/// What the demo runs, and the lines to try it with.
fn print_try_it(agent: &Agent, options: &DemoOptions, token: &str, scrape_token: &str) {
    let dir = &options.dir;
    let account_uuid = uuid_of(BIG_ACCOUNT);
    println!();
    println!(
        "active-calls-agent demo: {} calls on node 1, a new snapshot every {:?}, and each call's \
         events as they happen",
        options.calls, options.period
    );
    println!("  files:    {}", dir.display());
    println!(
        "  endpoint: http://{}{}",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS
    );
    if let Some(feed) = agent.feed_addr() {
        println!("  feed:     http://{feed}/ (ClickHouse-compatible: POST a snapshot, GET /ping)");
        println!(
            "            http://{feed}/events (POST a call event, as http_events_destination)"
        );
    }
    println!();
    println!(
        "Try it (customer {}, its busiest account):",
        customer_of(BIG_ACCOUNT)
    );
    println!();
    println!(
        "  curl -s -H 'Authorization: Bearer {token}' 'http://{}{}?account-id={}&connect-time-null=false'",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS,
        account_uuid
    );
    println!();
    println!("Add filters such as &dst-prefix-in-starts-with=44 or &src-name-in-contains=ali.");
    println!();
    println!("The same account live: its calls, then each change as it happens (Ctrl-C ends it):");
    println!();
    println!(
        "  curl -sN -H 'Accept: text/event-stream' -H 'Authorization: Bearer {token}' 'http://{}{}?account-id={}'",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS,
        account_uuid
    );
    println!();
    println!("Every call of the node, as an aggregator scrapes it (one JSON object a line):");
    println!();
    println!(
        "  curl -s --compressed -H 'Authorization: Bearer {scrape_token}' 'http://{}{}'",
        agent.api_addr(),
        crate::api::scrape::ACTIVE_CALLS
    );
    println!();
    println!("The same calls from a shell, no token (the store read-only):");
    println!();
    println!(
        "  active-calls-agent calls --config {} --account {account_uuid} --connect-time-null false",
        dir.join("config.toml").display()
    );
    println!();
    println!("Ctrl-C stops. Only warnings are logged here; `active-calls-agent serve --config");
    println!(
        "{}` runs the same agent with every log line.",
        dir.join("config.toml").display()
    );
}

/// The simulated switch, forever: each call's events posted as they happen (when the feed
/// listens), and a snapshot written at each period's end.
fn be_the_switch(
    mut switch: Switch,
    period: Duration,
    snapshot_path: &Path,
    mut events: Option<EventPoster>,
) {
    let seconds = period.as_secs().max(1) as i64;
    loop {
        // A switch stamps its snapshot with the period-aligned time; until then it
        // posts each call's changes as they happen.
        let next = (unix_now() / seconds + 1) * seconds;
        let changes = switch.period_with_events(next, seconds);
        if let Some(poster) = &mut events {
            for event in changes {
                sleep_until_ms(event.at_ms);
                match poster.post(&event.body) {
                    Ok(200) => {}
                    Ok(status) => tracing::warn!(status, "the demo switch's event was refused"),
                    Err(e) => tracing::warn!(error = %e, "the demo switch could not post an event"),
                }
            }
        }
        sleep_until_ms(next * 1000);
        if let Err(e) = write_atomically(snapshot_path, &switch.render(next)) {
            tracing::error!(error = %e, "the demo switch could not write its snapshot");
        }
    }
}

/// Sleeps until unix time `ms` (at once if it has passed).
fn sleep_until_ms(ms: i64) {
    let now = crate::clock::unix_millis(SystemTime::now());
    std::thread::sleep(Duration::from_millis(ms.saturating_sub(now).max(0) as u64));
}

/// The first line of `path`, or a new random `<prefix>-…` value written there.
fn kept_or_new(path: &Path, prefix: &str) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path)
        && let Some(kept) = text.lines().next().map(str::trim).filter(|l| !l.is_empty())
    {
        return Ok(kept.to_owned());
    }
    let value = format!(
        "{prefix}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    std::fs::write(path, format!("{value}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(value)
}
