//! `active-calls-agent check --config FILE`: what an operator runs after editing the
//! configuration, before a restart.
//!
//! It looks at everything the agent would read at start (the configuration, the JWT
//! secret, the directory, the store, the listen addresses and the relay's spool folder)
//! without starting anything
//! and without writing, and says for each what it found. An *error* is something that
//! stops the agent from starting or from serving customers (`/readyz` would say not
//! ready); a *warning* is legal but probably not meant.

use std::collections::HashMap;
use std::fmt;
use std::net::ToSocketAddrs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rusqlite::OpenFlags;

use crate::config::Config;
use crate::directory::Directory;
use crate::store::{AUTO_MARGIN, AUTO_UNKNOWN, SCHEMA_VERSION, Staleness};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warning,
    Error,
}

/// What `check` found, one line per finding.
#[derive(Debug, Default)]
pub struct Report {
    findings: Vec<(Level, String)>,
}

impl Report {
    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }

    fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|(l, _)| *l == level).count()
    }

    fn ok(&mut self, text: impl Into<String>) {
        self.findings.push((Level::Ok, text.into()));
    }

    fn warning(&mut self, text: impl Into<String>) {
        self.findings.push((Level::Warning, text.into()));
    }

    fn error(&mut self, text: impl Into<String>) {
        self.findings.push((Level::Error, text.into()));
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (level, text) in &self.findings {
            let tag = match level {
                Level::Ok => "ok",
                Level::Warning => "warning",
                Level::Error => "error",
            };
            writeln!(f, "{tag}: {text}")?;
        }
        let (errors, warnings) = (self.count(Level::Error), self.count(Level::Warning));
        writeln!(f, "{errors} error(s), {warnings} warning(s)")
    }
}

/// Checks the configuration file at `path` and what it names.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match Config::load(Some(path)) {
        Ok(config) => {
            report.ok(format!("configuration {} parses", path.display()));
            config
        }
        Err(e) => {
            report.error(format!("{e:#}"));
            return report;
        }
    };
    secret(&config, &mut report);
    listeners(&config, &mut report);
    directory(&config, &mut report);
    store(&config, &mut report);
    feed(&config, &mut report);
    relay(&config, &mut report);
    scrape_tokens(&config, &mut report);
    paths(path, &config, &mut report);
    report
}

/// Where the packaged unit's sandbox lets the agent write, and what it hides.
const STATE_DIR: &str = "/var/lib/active-calls-agent";
const HIDDEN_BY_SANDBOX: [&str; 5] = ["/tmp", "/var/tmp", "/home", "/root", "/run/user"];

/// Relative paths, and (for the packaged configuration, which the systemd unit runs) the
/// paths its sandbox would keep the agent from: said before a start fails on them.
fn paths(config_path: &Path, config: &Config, report: &mut Report) {
    let written = [
        ("store.path", &config.store.path),
        ("upstream.spool_dir", &config.upstream.spool_dir),
    ];
    let read = [
        ("feed.watch", &config.feed.watch),
        ("directory.path", &config.directory.path),
    ];
    let relay_on = !config.upstream.clickhouse_urls.is_empty();
    let in_use = |key: &str| key != "upstream.spool_dir" || relay_on;
    let relative: Vec<&str> = written
        .iter()
        .chain(&read)
        .filter(|(key, p)| in_use(key) && !p.as_os_str().is_empty() && p.is_relative())
        .map(|(key, _)| *key)
        .collect();
    if !relative.is_empty() {
        let here = std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string());
        report.warning(format!(
            "{} relative: resolved against the working directory ({here} for this check; \
             / under systemd), not the configuration file's folder",
            relative.join(", ")
        ));
    }
    if !config_path.starts_with("/etc/active-calls-agent") {
        return;
    }
    for (key, path) in written {
        if in_use(key) && !path.starts_with(STATE_DIR) {
            report.warning(format!(
                "{key} {}: under the packaged systemd unit only {STATE_DIR} is writable \
                 (ProtectSystem=strict): the agent would fail to write there",
                path.display()
            ));
        }
    }
    for (key, path) in read {
        if let Some(hidden) = HIDDEN_BY_SANDBOX.iter().find(|h| path.starts_with(h)) {
            report.warning(format!(
                "{key} {}: the packaged systemd unit hides {hidden} from the agent \
                 (PrivateTmp/ProtectHome): it would not see the file",
                path.display()
            ));
        }
    }
}

fn scrape_tokens(config: &Config, report: &mut Report) {
    let Some(path) = config.scrape_tokens_file() else {
        return;
    };
    match crate::auth::ScrapeTokens::load(Some(path)) {
        Err(e) => report.error(format!("{e:#}")),
        Ok(tokens) if tokens.is_empty() => report.warning(format!(
            "upstream.scrape_tokens_file {} lists no token: nobody may scrape",
            path.display()
        )),
        Ok(tokens) => {
            report.ok(format!(
                "upstream.scrape_tokens_file {}: {} token(s)",
                path.display(),
                tokens.len()
            ));
            if tokens.shortest() < 16 {
                report.warning("a scrape token is shorter than 16 bytes: easy to guess");
            }
            world_readable(path, report);
        }
    }
}

/// Warns when a file of secrets can be read by every user.
fn world_readable(file: &Path, report: &mut Report) {
    if let Ok(meta) = std::fs::metadata(file)
        && meta.permissions().mode() & 0o004 != 0
    {
        report.warning(format!(
            "{} is readable by every user (mode {:o}); make it 0640",
            file.display(),
            meta.permissions().mode() & 0o777
        ));
    }
}

fn secret(config: &Config, report: &mut Report) {
    match config.jwt_secret() {
        Err(e) => report.error(format!("{e:#}")),
        Ok(None) => report.error(format!(
            "{}: every token would get 401",
            config.missing_secret()
        )),
        Ok(Some(secret)) => {
            report.ok(format!("JWT secret: {} bytes", secret.len()));
            if secret.len() < 16 {
                report.warning("the JWT secret is shorter than 16 bytes: easy to guess");
            }
        }
    }
    if let Some(file) = &config.api.jwt_secret_file {
        world_readable(file, report);
    }
    if config.api.jwt_secret.is_some() {
        report.warning(
            "api.jwt_secret is inline: prefer api.jwt_secret_file, readable by the agent only",
        );
    }
}

fn listeners(config: &Config, report: &mut Report) {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    let listeners = [
        ("api.listen", config.api.listen.as_str()),
        ("feed.listen", config.feed.listen.as_str()),
        ("metrics.listen", config.metrics.listen.as_str()),
    ];
    for (key, address) in listeners {
        if address.is_empty() {
            if key == "api.listen" {
                report.error("api.listen is empty");
            }
            continue;
        }
        let any_port = match address.to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                // Bound and let go at once, as serve would bind it: an address in use,
                // or one this host does not have, is said now rather than at the start.
                match std::net::TcpListener::bind(&addrs[..]) {
                    Ok(_) => report.ok(format!("{key} = {address}")),
                    // A warning: on a node whose agent runs, check comes before a restart.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.warning(format!(
                        "{key} = {address} is in use now: fine if it is this agent, running; \
                             if another program holds it, serve would exit on it"
                    )),
                    Err(e) => report.error(format!("{key} = {address}: cannot listen: {e}")),
                }
                addrs.iter().any(|a| a.port() == 0)
            }
            Err(e) => {
                report.error(format!("{key} = {address:?} is not an address: {e}"));
                false
            }
        };
        if key == "feed.listen"
            && let Some(why) = config.feed_exposed()
        {
            report.error(why);
        }
        // Port 0 picks a free port for each listener: no clash.
        if !any_port && let Some(other) = seen.insert(address, key) {
            report.error(format!("{key} and {other} are the same address {address}"));
        }
    }
}

fn directory(config: &Config, report: &mut Report) {
    let path = &config.directory.path;
    match Directory::load(path) {
        Ok(directory) if directory.account_count() == 0 => report.warning(format!(
            "directory {}: no account (and {} API accesses): every customer request gets 401; \
             if the agent runs with accounts now, loading this file drops them all",
            path.display(),
            directory.api_access_count()
        )),
        Ok(directory) => report.ok(format!(
            "directory {}: {} accounts, {} API accesses",
            path.display(),
            directory.account_count(),
            directory.api_access_count()
        )),
        Err(e) => report.error(format!(
            "{e:#} (the agent would know no account until the file is right)"
        )),
    }
}

fn store(config: &Config, report: &mut Report) {
    let path = &config.store.path;
    if !path.exists() {
        report.ok(format!(
            "store {} does not exist yet; the agent will create it",
            path.display()
        ));
        return;
    }
    let opened = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|conn| {
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            Ok((
                version,
                crate::store::damage_of(&conn, crate::store::Check::Quick)?,
            ))
        });
    let damaged = |words: &dyn std::fmt::Display| {
        format!(
            "store {}: SQLite cannot read it ({words}). Nothing is lost: the agent sets it \
             aside as {}.corrupt-<time> (with its -wal and -shm, the last {} kept) and starts \
             a new one, which the switch's next snapshot fills; it does so when it starts or \
             first meets the damage, so `systemctl restart active-calls-agent` does it now",
            path.display(),
            path.file_name().unwrap_or_default().to_string_lossy(),
            crate::store::KEEP_SET_ASIDE,
        )
    };
    match opened {
        Ok((_, Some(words))) => report.error(damaged(&words)),
        Ok((version, None)) if version == SCHEMA_VERSION => report.ok(format!(
            "store {}: schema version {version}",
            path.display()
        )),
        Ok((version, None)) => report.warning(format!(
            "store {}: schema version {version}; the agent will rebuild it empty as version \
             {SCHEMA_VERSION} (the switch's next snapshots fill it)",
            path.display()
        )),
        Err(e) if crate::store::is_damage(&e) => report.error(damaged(&e)),
        Err(e) => report.error(format!("store {}: {e}", path.display())),
    }
}

fn feed(config: &Config, report: &mut Report) {
    let watch = &config.feed.watch;
    if !watch.as_os_str().is_empty() {
        let parent = watch
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            // The verdict serve gives: it starts, and watches the folder once it appears.
            report.warning(format!(
                "feed.watch {}: its folder does not exist yet; the agent starts, and watches \
                 and applies the file once the folder appears",
                watch.display()
            ));
        } else if watch.exists() {
            report.ok(format!("feed.watch {}", watch.display()));
        } else {
            report.ok(format!(
                "feed.watch {}: no file yet (it is applied when written)",
                watch.display()
            ));
        }
    }
    if watch.as_os_str().is_empty() && config.feed.listen.is_empty() {
        report.warning("feed.watch and feed.listen are both off: no snapshot can arrive");
    }
    let stale_after = config.feed.stale_after;
    match config.staleness() {
        Staleness::Never => report.warning(format!(
            "feed.stale_after = {stale_after}: calls of a silent node never expire"
        )),
        Staleness::After(silence) => report.ok(format!(
            "feed.stale_after = {stale_after}: a node silent for {} s has no calls, whatever its \
             period (\"auto\" follows each node's own)",
            silence.as_secs()
        )),
        Staleness::Auto => report.ok(format!(
            "feed.stale_after = {stale_after}: a node silent for more than two of its snapshot \
             periods plus {} s has no calls (the switch sends nothing when it has none); {} s \
             until its period is learned from two snapshots",
            AUTO_MARGIN.as_secs(),
            AUTO_UNKNOWN.as_secs()
        )),
    }
}

/// The relay's keys as the relay reads them at start (a wrong one stops the agent), and
/// whether its spool folder can be created or written, without writing.
fn relay(config: &Config, report: &mut Report) {
    let settings = match crate::relay::Settings::from_config(&config.upstream) {
        Ok(Some(settings)) => settings,
        Ok(None) => return,
        Err(e) => {
            report.error(format!("{e:#}"));
            return;
        }
    };
    let ca_file = &config.upstream.ca_file;
    let roots = if ca_file.as_os_str().is_empty() {
        "the system's CA certificates".to_owned()
    } else {
        format!("the CA certificates of {}", ca_file.display())
    };
    for endpoint in &settings.endpoints {
        let verified = if endpoint.is_https() {
            format!(", its certificate verified against {roots}")
        } else {
            String::new()
        };
        report.ok(format!(
            "relay to {} (table {}{verified})",
            endpoint.label, settings.table
        ));
    }
    if !ca_file.as_os_str().is_empty() && !settings.endpoints.iter().any(|e| e.is_https()) {
        report.warning(format!(
            "upstream.ca_file {} is set, but no URL is https://: it is not used",
            ca_file.display()
        ));
    }
    let spool = &settings.spool_dir;
    // The folder, or the nearest ancestor that exists: the agent creates the rest. (A
    // relative path's last ancestor is "", which never exists: then the current folder.)
    let existing = spool
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        report.error(format!(
            "upstream.spool_dir {}: {} is not a folder",
            spool.display(),
            existing.display()
        ));
    } else if !writable(existing) {
        report.error(format!(
            "upstream.spool_dir {}: {} is not writable by this user (the agent would start without its relay)",
            spool.display(),
            existing.display()
        ));
    } else if existing == spool {
        report.ok(format!("upstream.spool_dir {}", spool.display()));
    } else {
        // Made and taken away again: access(2) says yes to root for /proc and friends,
        // where nothing can be made.
        match std::fs::create_dir_all(spool) {
            Ok(()) => {
                for made in spool.ancestors().take_while(|p| *p != existing) {
                    let _ = std::fs::remove_dir(made);
                }
                report.ok(format!(
                    "upstream.spool_dir {}: does not exist yet; the agent will create it",
                    spool.display()
                ));
            }
            Err(e) => report.error(format!(
                "upstream.spool_dir {}: cannot be created ({e}): the agent would start \
                 without its relay",
                spool.display()
            )),
        }
    }
}

/// Whether this user may create files in `dir` (access(2): no file is written).
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access() reads the NUL-terminated path it is given and nothing else.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_of(config_path: &str, text: &str) -> String {
        let config = Config::parse(text).unwrap();
        let mut report = Report::default();
        paths(Path::new(config_path), &config, &mut report);
        report.to_string()
    }

    #[test]
    fn paths_the_packaged_sandbox_cannot_reach_are_said() {
        let packaged = "/etc/active-calls-agent/config.toml";
        let text = report_of(
            packaged,
            "[store]\npath = \"/opt/calls.db\"\n[feed]\nwatch = \"/tmp/snapshot.jsonl\"\n\
             [directory]\npath = \"/var/lib/active-calls-agent/directory.json\"\n",
        );
        assert!(text.contains("warning: store.path /opt/calls.db: under the packaged systemd unit only /var/lib/active-calls-agent is writable"), "{text}");
        assert!(
            text.contains(
                "warning: feed.watch /tmp/snapshot.jsonl: the packaged systemd unit hides /tmp"
            ),
            "{text}"
        );
        assert!(!text.contains("directory.path /var"), "{text}");
        // The relay's spool counts only with the relay on.
        assert!(!text.contains("spool_dir"), "{text}");
        // Not the packaged configuration: no sandbox to speak of.
        let own = report_of(
            "/srv/agent/config.toml",
            "[store]\npath = \"/opt/calls.db\"\n",
        );
        assert!(
            !own.contains("sandbox") && !own.contains("systemd unit"),
            "{own}"
        );
    }

    #[test]
    fn relative_paths_say_what_they_are_relative_to() {
        let text = report_of("/srv/agent/config.toml", "[store]\npath = \"calls.db\"\n");
        assert!(
            text.contains("store.path")
                && text.contains("relative: resolved against the working directory"),
            "{text}"
        );
        let absolute = report_of(
            "/srv/a/config.toml",
            "[store]\npath = \"/srv/a/calls.db\"\n[feed]\nwatch = \"/srv/a/s.jsonl\"\n\
             [directory]\npath = \"/srv/a/d.json\"\n[upstream]\nspool_dir = \"/srv/a/spool\"\n",
        );
        assert!(!absolute.contains("relative"), "{absolute}");
    }
}
