//! Configuration: one TOML file, every key defaulted (SPEC 4).
//!
//! The file is parsed into plain structs that mirror its sections, so the TOML an operator
//! reads in the README is exactly the shape of [`Config`]. Unknown keys are an error, not
//! a silent default: a typo such as `stale_afer` must not quietly keep calls forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::store::Staleness;

/// The longest `api.token_lifetime` (100 years): a cookie's `expires` must stay a date.
pub const MAX_TOKEN_LIFETIME: u64 = 100 * 365 * 24 * 3600;

/// The whole configuration of one agent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub api: ApiConfig,
    pub store: StoreConfig,
    pub feed: FeedConfig,
    pub directory: DirectoryConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub upstream: UpstreamConfig,
}

/// `[api]`: the customer endpoint's listener and its token settings.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: String,
    pub jwt_secret: Option<String>,
    pub jwt_secret_file: Option<PathBuf>,
    /// Seconds a refreshed cookie token lives; 0 = no `exp` claim, no `expires`.
    pub token_lifetime: u64,
    /// Connections the API listener holds at most; past it, a new one gets 503.
    pub max_connections: usize,
    /// Bytes the customer answers being built or sent may hold together (beyond 64 KB
    /// each); past it, a new large answer gets 503 with `Retry-After`.
    pub max_answer_bytes: usize,
    /// Live streams (SPEC 7) open at most; past it, a new one gets 503 with `Retry-After`.
    pub max_streams: usize,
}

/// `[store]`: where the SQLite database lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub path: PathBuf,
}

/// `[feed]`: where snapshots come from and when silence means "no calls".
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// The snapshot file; empty turns the file source off.
    pub watch: PathBuf,
    /// The ClickHouse-compatible socket source; empty turns it off.
    pub listen: String,
    /// When a silent node has no calls: "auto" (its learned period) or seconds.
    pub stale_after: StaleAfter,
    /// Credentials the socket source requires (both empty: none), as ClickHouse clients
    /// send them.
    pub user: String,
    pub password: String,
    /// The largest snapshot body the socket source takes, on the wire and unpacked.
    pub max_body_bytes: u64,
    /// Connections the socket source holds at most (a switch needs one or two).
    pub max_connections: usize,
    /// Call events that may wait for the writer; past it, `POST /events` answers 503.
    pub max_queued_events: usize,
}

/// `feed.stale_after` (SPEC 2.5): `"auto"`, or seconds of silence (0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StaleAfter {
    /// More than two of the node's learned periods plus 5 s (180 s until it is known).
    #[default]
    Auto,
    Seconds(u64),
}

impl std::fmt::Display for StaleAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleAfter::Auto => f.write_str("\"auto\""),
            StaleAfter::Seconds(seconds) => write!(f, "{seconds}"),
        }
    }
}

impl<'de> Deserialize<'de> for StaleAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StaleAfter, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StaleAfter;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"auto\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<StaleAfter, E> {
                Ok(StaleAfter::Seconds(seconds))
            }
            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<StaleAfter, E> {
                u64::try_from(seconds)
                    .map(StaleAfter::Seconds)
                    .map_err(|_| E::custom("feed.stale_after: seconds cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<StaleAfter, E> {
                match text {
                    "auto" => Ok(StaleAfter::Auto),
                    _ => Err(E::custom(
                        "feed.stale_after: \"auto\" or a number of seconds",
                    )),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[directory]`: the accounts and API accesses file (SPEC 3).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    pub path: PathBuf,
}

/// `[log]`: what the agent writes to stderr (the journal, under systemd).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `warn,active_calls_agent=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

/// `[metrics]`: where `GET /metrics` is served.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Empty: on the API listener. Otherwise a listener of its own (with the health
    /// answers too), and the API listener no longer shows the metrics to customers.
    pub listen: String,
}

/// `[upstream]`: what aggregators and the central ClickHouse get (SPEC 6). Its `Debug`
/// hides the password, in the key and in the URLs.
///
/// Its relay keys are checked by the relay (`relay::Settings::from_config`), at start and
/// by `check`, not when the file is read: the relay builds on the configuration, so the
/// configuration does not call the relay.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A file of bearer tokens that may scrape every call of the node, one per line;
    /// empty: nobody may.
    pub scrape_tokens_file: PathBuf,
    /// ClickHouse HTTP endpoints every applied snapshot is relayed to; empty: no relay.
    pub clickhouse_urls: Vec<String>,
    /// CA certificates (PEM) that `https://` URLs are verified against, instead of the
    /// system's; empty: the system's.
    pub ca_file: PathBuf,
    /// The table the relay inserts into.
    pub table: String,
    /// Credentials the relay sends (`X-ClickHouse-User`/`X-ClickHouse-Key`); empty: none.
    pub user: String,
    pub password: String,
    /// Where snapshots wait until each URL has taken them; survives restarts.
    pub spool_dir: PathBuf,
    /// The spool's bound per URL: past it, the oldest snapshots are dropped (and counted).
    /// Also the bound on raw snapshots waiting for the spooler (all URLs together): past
    /// it, new snapshots are applied but not relayed (and counted).
    pub spool_max_bytes: u64,
    /// The longest wait between two attempts at a failing URL (milliseconds); the wait
    /// starts at 1 s (or this, if shorter) and doubles.
    pub retry_max_ms: u64,
}

// Written by hand: a derived one would print the password into any debug line or panic
// message that shows the configuration.
/// What a debug print shows of a secret: whether there is one.
fn hidden(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "***" }
}

// The three sections holding secrets print without them, should a configuration ever be
// logged whole.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("jwt_secret", &self.jwt_secret.as_deref().map(hidden))
            .field("jwt_secret_file", &self.jwt_secret_file)
            .field("token_lifetime", &self.token_lifetime)
            .field("max_connections", &self.max_connections)
            .field("max_answer_bytes", &self.max_answer_bytes)
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

impl std::fmt::Debug for FeedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedConfig")
            .field("watch", &self.watch)
            .field("listen", &self.listen)
            .field("stale_after", &self.stale_after)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_queued_events", &self.max_queued_events)
            .finish()
    }
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.clickhouse_urls.iter().map(|u| redact_url(u)).collect();
        let password = hidden(&self.password);
        f.debug_struct("UpstreamConfig")
            .field("scrape_tokens_file", &self.scrape_tokens_file)
            .field("clickhouse_urls", &urls)
            .field("ca_file", &self.ca_file)
            .field("table", &self.table)
            .field("user", &self.user)
            .field("password", &password)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("retry_max_ms", &self.retry_max_ms)
            .finish()
    }
}

/// `url` without what may carry a secret: its userinfo, and a `password` parameter
/// (ClickHouse takes one in the URL too).
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<&str> = query
                .split('&')
                .map(|p| {
                    if p.split('=')
                        .next()
                        .is_some_and(|n| n.eq_ignore_ascii_case("password"))
                    {
                        "password=***"
                    } else {
                        p
                    }
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    let scheme = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    format!("{scheme}{host}{tail}")
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            scrape_tokens_file: PathBuf::new(),
            clickhouse_urls: Vec::new(),
            ca_file: PathBuf::new(),
            table: "active_calls".into(),
            user: String::new(),
            password: String::new(),
            spool_dir: "data/spool".into(),
            spool_max_bytes: 1 << 30,
            retry_max_ms: 60_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            jwt_secret: None,
            jwt_secret_file: None,
            token_lifetime: 0,
            max_connections: 1024,
            max_answer_bytes: crate::api::answers::BUDGET_BYTES,
            max_streams: 256,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: "data/active-calls.db".into(),
        }
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            watch: "data/snapshot.jsonl".into(),
            listen: "127.0.0.1:8124".into(),
            stale_after: StaleAfter::Auto,
            user: String::new(),
            password: String::new(),
            max_body_bytes: 1 << 30,
            max_connections: 64,
            max_queued_events: crate::feed::writer::MAX_QUEUED_EVENTS,
        }
    }
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            path: "data/directory.json".into(),
        }
    }
}

impl Config {
    /// Reads `path`, or returns the defaults when no file is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in configuration {}", path.display()))
    }

    /// Parses the TOML text of a configuration file.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| without_source(&e, text))?;
        if config.api.jwt_secret.is_some() && config.api.jwt_secret_file.is_some() {
            bail!("set api.jwt_secret or api.jwt_secret_file, not both");
        }
        if config.api.token_lifetime > MAX_TOKEN_LIFETIME {
            bail!(
                "api.token_lifetime = {} is more than {MAX_TOKEN_LIFETIME} seconds (100 years)",
                config.api.token_lifetime
            );
        }
        crate::logs::parse_filter(&config.log.level).context("in log.level")?;
        if config.api.max_connections == 0 || config.feed.max_connections == 0 {
            bail!("api.max_connections and feed.max_connections must be at least 1");
        }
        // 0 turns live streams off (every one gets 503); more than a semaphore can count
        // is a typo.
        if config.api.max_streams > 1_000_000 {
            bail!("api.max_streams must be at most 1000000 (0 turns live streams off)");
        }
        if config.feed.max_queued_events == 0 {
            bail!("feed.max_queued_events must be at least 1");
        }
        Ok(config)
    }

    /// The JWT secret: the inline key as written, or the secret file's content without its
    /// trailing line break. `Ok(None)` means no secret is configured: every token will be
    /// refused. An unreadable secret file is an error, for the caller to decide on.
    pub fn jwt_secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let secret = match (&self.api.jwt_secret, &self.api.jwt_secret_file) {
            (Some(inline), _) => inline.clone().into_bytes(),
            (None, Some(file)) => {
                let mut content = std::fs::read(file)
                    .with_context(|| format!("reading api.jwt_secret_file {}", file.display()))?;
                if content.ends_with(b"\n") {
                    content.pop();
                    if content.ends_with(b"\r") {
                        content.pop();
                    }
                }
                content
            }
            (None, None) => return Ok(None),
        };
        Ok((!secret.is_empty()).then_some(secret))
    }

    /// Why [`jwt_secret`](Self::jwt_secret) found no secret, in the configuration's own
    /// words: an empty file is not a missing key.
    pub fn missing_secret(&self) -> String {
        match (&self.api.jwt_secret, &self.api.jwt_secret_file) {
            (Some(_), _) => "api.jwt_secret is empty".into(),
            (None, Some(file)) => format!("api.jwt_secret_file {} is empty", file.display()),
            (None, None) => {
                "no JWT secret: neither api.jwt_secret nor api.jwt_secret_file is set".into()
            }
        }
    }

    /// What differs between `self` and `new` that only a restart applies (SIGHUP applies
    /// the secret, the token lifetime, the log level and the scrape tokens file, and
    /// re-reads the directory).
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.api.listen != new.api.listen {
            changed.push("api.listen");
        }
        if self.api.max_connections != new.api.max_connections {
            changed.push("api.max_connections");
        }
        if self.api.max_answer_bytes != new.api.max_answer_bytes {
            changed.push("api.max_answer_bytes");
        }
        if self.api.max_streams != new.api.max_streams {
            changed.push("api.max_streams");
        }
        if self.store != new.store {
            changed.push("[store]");
        }
        if self.feed != new.feed {
            changed.push("[feed]");
        }
        if self.directory != new.directory {
            changed.push("directory.path");
        }
        if self.metrics != new.metrics {
            changed.push("[metrics]");
        }
        let (old, up) = (&self.upstream, &new.upstream);
        let relay_keys = [
            (
                "upstream.clickhouse_urls",
                old.clickhouse_urls != up.clickhouse_urls,
            ),
            ("upstream.ca_file", old.ca_file != up.ca_file),
            ("upstream.table", old.table != up.table),
            (
                "upstream.user/password",
                old.user != up.user || old.password != up.password,
            ),
            ("upstream.spool_dir", old.spool_dir != up.spool_dir),
            (
                "upstream.spool_max_bytes",
                old.spool_max_bytes != up.spool_max_bytes,
            ),
            ("upstream.retry_max_ms", old.retry_max_ms != up.retry_max_ms),
        ];
        changed.extend(
            relay_keys
                .iter()
                .filter(|(_, differs)| *differs)
                .map(|(key, _)| *key),
        );
        changed
    }

    /// Takes from `new` what SIGHUP applies: the secret, the token lifetime, the log level,
    /// the scrape tokens file.
    pub fn apply_live(&mut self, new: &Config) {
        self.api.jwt_secret = new.api.jwt_secret.clone();
        self.api.jwt_secret_file = new.api.jwt_secret_file.clone();
        self.api.token_lifetime = new.api.token_lifetime;
        self.log = new.log.clone();
        self.upstream.scrape_tokens_file = new.upstream.scrape_tokens_file.clone();
    }

    /// `upstream.scrape_tokens_file`, `None` when it is unset (empty).
    pub fn scrape_tokens_file(&self) -> Option<&Path> {
        let path = &self.upstream.scrape_tokens_file;
        (!path.as_os_str().is_empty()).then_some(path.as_path())
    }

    /// `feed.stale_after` as the store applies it.
    pub fn staleness(&self) -> Staleness {
        match self.feed.stale_after {
            StaleAfter::Auto => Staleness::Auto,
            StaleAfter::Seconds(0) => Staleness::Never,
            StaleAfter::Seconds(seconds) => Staleness::After(Duration::from_secs(seconds)),
        }
    }

    /// Why the socket source is open to other hosts without credentials, when it is: then
    /// anyone who reaches its port can replace a node's calls. `check` calls it an error,
    /// `serve` warns at every start (a switch on another host is a real layout: the
    /// operator decides, but never without being told).
    pub fn feed_exposed(&self) -> Option<String> {
        use std::net::ToSocketAddrs;
        let feed = &self.feed;
        if feed.listen.is_empty() || !(feed.user.is_empty() && feed.password.is_empty()) {
            return None;
        }
        let beyond = feed
            .listen
            .to_socket_addrs()
            .ok()?
            .any(|addr| !addr.ip().is_loopback());
        beyond.then(|| {
            format!(
                "feed.listen = {} takes snapshots from other hosts without credentials: anyone \
                 who reaches it can replace a node's calls. Set feed.user and feed.password \
                 (the switch sends them as HTTP Basic), or listen on 127.0.0.1",
                feed.listen
            )
        })
    }
}

/// A parse error as its message and position, without the line of the file that toml
/// quotes nor the value it names: either may be the inline secret or the feed's password,
/// and the error goes to the journal.
fn without_source(error: &toml::de::Error, text: &str) -> anyhow::Error {
    let message = error.message();
    let message = match message.split_once(", expected ") {
        Some((found, expected)) if found.starts_with("invalid ") => {
            let kind = found.split(':').next().unwrap_or(found);
            format!("{kind}, expected {expected}")
        }
        _ => message.to_owned(),
    };
    let Some(span) = error.span() else {
        return anyhow::anyhow!("{message}");
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    anyhow::anyhow!("line {line}, column {column}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.api.listen, "127.0.0.1:8080");
        assert_eq!(config.feed.stale_after, StaleAfter::Auto);
        assert_eq!(config.staleness(), Staleness::Auto);
        assert_eq!(config.store.path, Path::new("data/active-calls.db"));
        assert!(config.jwt_secret().unwrap().is_none());
    }

    #[test]
    fn a_typo_is_an_error_not_a_default() {
        let err = Config::parse("[feed]\nstale_afer = 5\n").unwrap_err();
        assert!(format!("{err:#}").contains("stale_afer"), "{err:#}");
    }

    #[test]
    fn stale_after_is_auto_or_seconds() {
        let staleness = |text: &str| Config::parse(&format!("[feed]\nstale_after = {text}\n"));
        assert_eq!(staleness("\"auto\"").unwrap().staleness(), Staleness::Auto);
        assert_eq!(
            staleness("60").unwrap().staleness(),
            Staleness::After(Duration::from_secs(60))
        );
        assert_eq!(staleness("0").unwrap().staleness(), Staleness::Never);
        for bad in ["-1", "\"soon\"", "1.5", "\"60\""] {
            let err = format!("{:#}", staleness(bad).unwrap_err());
            assert!(
                err.contains("stale_after") || err.contains("auto"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn both_secret_forms_are_refused() {
        let err = Config::parse("[api]\njwt_secret = \"a\"\njwt_secret_file = \"/x\"\n");
        assert!(err.is_err());
    }

    #[test]
    fn a_lifetime_past_any_date_is_refused() {
        assert!(Config::parse("[api]\ntoken_lifetime = 300000000000\n").is_err());
        assert!(Config::parse("[api]\ntoken_lifetime = 86400\n").is_ok());
    }

    #[test]
    fn a_syntax_error_does_not_quote_the_secret() {
        let err = Config::parse("[feed]\nstale_after = 5\n[api]\njwt_secret = \"s3cr3t-value\n");
        let text = format!("{:#}", err.unwrap_err());
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.starts_with("line 4, column "), "{text}");
        // A value of the wrong type is not repeated either.
        for wrong in [
            "[feed]\npassword = 987654321\n",
            "[api]\ntoken_lifetime = \"my-secret\"\n",
        ] {
            let text = format!("{:#}", Config::parse(wrong).unwrap_err());
            assert!(
                !text.contains("987654321") && !text.contains("my-secret"),
                "{text}"
            );
            assert!(text.contains("invalid type, expected"), "{text}");
        }
    }

    #[test]
    fn a_bad_log_level_is_an_error() {
        let err = Config::parse("[log]\nlevel = \"loud\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("log.level"), "{err:#}");
        assert!(Config::parse("[log]\nlevel = \"warn,active_calls_agent=debug\"\n").is_ok());
    }

    #[test]
    fn only_some_changes_need_a_restart() {
        let old = Config::default();
        let mut new = old.clone();
        new.api.jwt_secret = Some("s".into());
        new.log.level = "debug".into();
        assert!(old.needs_restart(&new).is_empty());
        new.feed.stale_after = StaleAfter::Seconds(5);
        new.metrics.listen = "127.0.0.1:0".into();
        new.api.max_connections = 10;
        assert_eq!(
            old.needs_restart(&new),
            ["api.max_connections", "[feed]", "[metrics]"]
        );
        // Applying the live part leaves the rest as it runs: the next reload warns again.
        let mut running = old.clone();
        running.apply_live(&new);
        assert_eq!(running.api.jwt_secret.as_deref(), Some("s"));
        assert_eq!(running.needs_restart(&new).len(), 3);
        // The relay's keys are read at start only.
        let mut relay = old.clone();
        relay.upstream.clickhouse_urls = vec!["http://ch:8123/".into()];
        relay.upstream.password = "p".into();
        assert_eq!(
            old.needs_restart(&relay),
            ["upstream.clickhouse_urls", "upstream.user/password"]
        );
    }

    #[test]
    fn a_debug_print_of_the_configuration_hides_its_secrets() {
        let config = Config::parse(
            "[api]\njwt_secret = \"key-four\"\n[feed]\nuser = \"sw\"\npassword = \"key-five\"\n\
             [upstream]\nuser = \"relay\"\npassword = \"key-one\"\nclickhouse_urls = [\
             \"http://u:key-two@ch:8123/?database=yeti&password=key-three\", \"http://ch2/\"]\n",
        )
        .unwrap();
        let text = format!("{config:?}");
        assert!(text.contains("jwt_secret: Some(\"***\")"), "{text}");
        for secret in ["key-one", "key-two", "key-three", "key-four", "key-five"] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        assert!(
            text.contains("http://***@ch:8123/?database=yeti&password=***")
                && text.contains("\"http://ch2/\"")
                && text.contains("user: \"relay\""),
            "{text}"
        );
    }

    #[test]
    fn an_inline_secret_is_taken_as_written() {
        let config = Config::parse("[api]\njwt_secret = \" s \"\n").unwrap();
        assert_eq!(config.jwt_secret().unwrap().as_deref(), Some(&b" s "[..]));
    }

    #[test]
    fn secret_file_newline_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut config = Config::default();
        config.api.jwt_secret_file = Some(file);
        assert_eq!(
            config.jwt_secret().unwrap().as_deref(),
            Some(&b"s3cret"[..])
        );
    }
}
