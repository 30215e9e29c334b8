//! The store: the node's current calls in SQLite, written by one writer, read by many.
//!
//! SQLite in WAL mode gives exactly the isolation the feed needs: a snapshot is one write
//! transaction, and every query is one statement, so a reader sees the state before a
//! snapshot or after it, never a mix, and never waits for it. The schema (`schema.sql`)
//! is a public contract for local scripts, so it is applied verbatim from that file.
//!
//! Writes are the expensive part (ten secondary indexes), so the [`SnapshotTx`] writes only
//! what changed. The [`Writer`] keeps a picture of the stored calls in memory between
//! snapshots (their hashes, line keys and ids: read once from the table), so an
//! apply finds each incoming call, compares the hash of its row and rewrites it only when
//! it differs (and its index entries only when an indexed value did), without a query;
//! calls the snapshot no longer has are deleted at commit, in account order. Most lines of
//! a snapshot repeat the previous one but for the values a switch writes anew each time:
//! those are matched by a hash of the raw line ([`LineKey`], `feed::key`) and never parsed.
//! A snapshot that rewrites a large share of the table drops the secondary indexes and
//! sorts them anew at commit.
//!
//! Call events (SPEC 2.4) go through the same writer, in batches, each one transaction
//! ([`events`]). A call carries what it needs to reconcile the two: the switch's time of
//! the newest event that changed it (`event_ms`); the calls an event ended are remembered
//! apart (`ended_calls`), within bounds. A snapshot dated before that knowledge does not
//! overrule it (`write`). Each node's silence limit is kept as the instant it expires
//! (`nodes.expires_at_ms`), from its learned period ([`Staleness`]), so a reader asks
//! only "is it past that?".
//!
//! Reads go through a small pool of read-only connections ([`Readers`]) whose prepared
//! statements stay cached. A query is built from a handful of fixed SQL fragments (one per
//! filter kind); every value is bound, and each string filter is an index range within the
//! account (SPEC 5).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

#[macro_use]
mod answer;
mod checkpoint;
mod damage;
mod events;
mod nodes;
#[macro_use]
mod query;
mod read;
mod stored;
mod stream;
mod values;
mod write;

pub use answer::write_json_string;
pub use checkpoint::Checkpointer;
pub use damage::{KEEP_SET_ASIDE, SetAside, StoreHealth, is_damage, is_damage_in};
pub use events::{ChangedCall, EventChanges};
pub use query::{CallListing, CallQuery, CountBy, Filter, TextColumn, TextMatch};
pub use read::{MAX_OPEN_READERS, NodeGeneration, NodeStats, Readers, StoreSize};
pub use stream::{Selection, StreamRow, Within};
pub use write::{Changes, LineKeys, SnapshotTx, Writer};

/// The whole schema, applied to a new database.
pub const SCHEMA: &str = include_str!("../../schema.sql");
/// The `user_version` that [`SCHEMA`] sets.
pub const SCHEMA_VERSION: i64 = 7;

/// Which feed sent a snapshot; a file's content replaces every node the file fed before.
/// (A node heard from only by its call events has `events` as its source.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    Socket,
}

impl Origin {
    pub const ALL: [Origin; 2] = [Origin::File, Origin::Socket];

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Socket => "socket",
        }
    }
}

/// How closely [`damage_of`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Every page and every row's format (`quick_check`): under a second for a
    /// 100k-call store, done at every start.
    Quick,
    /// Also that every index agrees with its table (`integrity_check`): a few times
    /// longer, done when a reader met damage that the quick look may not see.
    Thorough,
}

/// SQLite's first complaint about the database `conn` reads (`None`: it has none).
/// Damage that stops the check itself is a complaint too; any other error is returned.
pub fn damage_of(conn: &Connection, check: Check) -> rusqlite::Result<Option<String>> {
    let sql = match check {
        Check::Quick => "PRAGMA quick_check(1)",
        Check::Thorough => "PRAGMA integrity_check(1)",
    };
    match conn.query_row(sql, [], |r| r.get::<_, String>(0)) {
        Ok(words) if words == "ok" => Ok(None),
        // The report's heading names the schema, not the problem: the lines after it do.
        Ok(words) => Ok(Some(
            words
                .lines()
                .filter(|line| !line.starts_with("*** in database"))
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Err(e) if is_damage(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(e),
    }
}

/// How long a connection waits for a lock another holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL beside the database at `path`.
fn wal_of(path: &Path) -> std::path::PathBuf {
    with_suffix(path, "-wal")
}

/// `path` with `suffix` after its name (SQLite's `-wal` and `-shm`).
fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut text = path.as_os_str().to_owned();
    text.push(suffix);
    text.into()
}

/// Opens (creating it if needed) a database connection with the agent's settings.
fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// When a silent node's calls stop being current (`feed.stale_after`, SPEC 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Never: a node's calls stay until its next snapshot replaces them.
    Never,
    /// After this much silence, whatever the node's period.
    After(Duration),
    /// After more than two of the node's periods plus [`AUTO_MARGIN`] of silence;
    /// [`AUTO_UNKNOWN`] until its period is known.
    Auto,
}

/// What [`Staleness::Auto`] adds to two periods: a snapshot's own delay on the way.
pub const AUTO_MARGIN: Duration = Duration::from_secs(5);
/// The silence [`Staleness::Auto`] allows a node whose period is not known yet.
pub const AUTO_UNKNOWN: Duration = Duration::from_secs(180);
/// A limit past any real date: what "never" adds (far from overflowing i64 with a unix
/// time in milliseconds, which SQLite would turn into a float).
const NEVER_MS: i64 = 1 << 60;

impl Staleness {
    /// How long a node with period `period_ms` (`None`: not known) may stay silent.
    pub fn limit_ms(self, period_ms: Option<i64>) -> i64 {
        let ms = |d: Duration| {
            i64::try_from(d.as_millis())
                .unwrap_or(NEVER_MS)
                .min(NEVER_MS)
        };
        match self {
            Staleness::Never => NEVER_MS,
            Staleness::After(silence) => ms(silence),
            Staleness::Auto => match period_ms {
                Some(period) => period.saturating_mul(2).saturating_add(ms(AUTO_MARGIN)),
                None => ms(AUTO_UNKNOWN),
            }
            .min(NEVER_MS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_sets_the_version_the_code_expects() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_node_may_be_silent_for_two_periods_and_five_seconds() {
        assert_eq!(Staleness::Auto.limit_ms(Some(2_000)), 9_000);
        assert_eq!(Staleness::Auto.limit_ms(Some(60_000)), 125_000);
        assert_eq!(Staleness::Auto.limit_ms(None), 180_000);
        let fixed = Staleness::After(Duration::from_secs(60));
        assert_eq!(fixed.limit_ms(Some(2_000)), 60_000);
        assert_eq!(Staleness::Never.limit_ms(None), NEVER_MS);
        assert_eq!(Staleness::Auto.limit_ms(Some(i64::MAX)), NEVER_MS);
    }
}
