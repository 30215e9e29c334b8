//! The store: the node's current calls in SQLite, written by one writer, read by many.
//!
//! SQLite in WAL mode gives exactly the isolation the feed needs: a snapshot is one write
//! transaction, and every query is one statement, so a reader sees the state before a
//! snapshot or after it, never a mix, and never waits for it. The schema (`schema.sql`)
//! is a public contract for local scripts, so it is applied verbatim from that file.
//!
//! Writes are the expensive part (ten secondary indexes), so the [`SnapshotTx`] writes only
//! what changed. The [`Writer`] keeps a picture of the stored calls in memory between
//! snapshots (their hashes, line keys and ids: loaded once from a covering index), so an
//! apply finds each incoming call, compares the hash of its row and rewrites it only when
//! it differs (and its index entries only when an indexed value did), without a query;
//! calls the snapshot no longer has are deleted at commit, in account order. Most lines of
//! a snapshot repeat the previous one but for the values a switch writes anew each time:
//! those are matched by a hash of the raw line ([`LineKey`], `feed::key`) and never parsed.
//! A snapshot that rewrites a large share of the table drops the secondary indexes and
//! sorts them anew at commit.
//!
//! Reads go through a small pool of read-only connections ([`Readers`]) whose prepared
//! statements stay cached. A query is built from a handful of fixed SQL fragments (one per
//! filter kind); every value is bound, and each string filter is an index range within the
//! account (SPEC 5).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, ToSql, params};

use crate::call::{CallRow, LineKey};
use crate::clock::{format_datetime, unix_millis};

/// The whole schema, applied to a new database.
pub const SCHEMA: &str = include_str!("../schema.sql");
/// The `user_version` that [`SCHEMA`] sets.
pub const SCHEMA_VERSION: i64 = 4;

/// How many idle read connections the pool keeps.
const MAX_IDLE_READERS: usize = 4;

/// Which feed sent a snapshot; a file's content replaces every node the file fed before.
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

/// Opens (creating it if needed) a database connection with the agent's settings.
fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

// ---------------------------------------------------------------------------------------
// Writing

/// Every stored call, with what the writer compares and looks up, from the covering
/// `calls_by_node` index.
const LOAD_STORED_CALLS: &str = "SELECT call_id, node_id, local_tag, customer_acc_id, row_hash,
    key_hash, line_key, snapshot_timestamp IS NOT NULL FROM calls INDEXED BY calls_by_node";
const INSERT_CALL: &str = "INSERT INTO calls (
    call_id, node_id, local_tag, customer_id, customer_acc_id, snapshot_timestamp, start_time, connect_time,
    destination_prefix, destination_initial_interval, destination_initial_rate,
    destination_next_interval, destination_next_rate, destination_fee,
    src_name_in, src_prefix_in, dst_prefix_in, src_prefix_routing, dst_prefix_routing,
    from_domain, to_domain, ruri_domain,
    diversion_in, pai_in, ppi_in, privacy_in, rpid_in, rpid_privacy_in,
    auth_orig_transport_protocol_id, auth_orig_ip, auth_orig_port,
    src_name_in_rev, src_prefix_in_rev, dst_prefix_in_rev, src_prefix_routing_rev, dst_prefix_routing_rev,
    row_hash, key_hash, line_key
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
    ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35, ?36, ?37, ?38, ?39)";
/// A changed call whose indexed values did not change: its index entries stay as they are.
/// It takes the parameters of [`INSERT_CALL`], and uses those it needs.
const UPDATE_CALL_VALUES: &str = "UPDATE calls SET
    customer_id = ?4, snapshot_timestamp = ?6, start_time = ?7, connect_time = ?8,
    destination_prefix = ?9, destination_initial_interval = ?10, destination_initial_rate = ?11,
    destination_next_interval = ?12, destination_next_rate = ?13, destination_fee = ?14,
    from_domain = ?20, to_domain = ?21, ruri_domain = ?22,
    diversion_in = ?23, pai_in = ?24, ppi_in = ?25, privacy_in = ?26, rpid_in = ?27, rpid_privacy_in = ?28,
    auth_orig_transport_protocol_id = ?29, auth_orig_ip = ?30, auth_orig_port = ?31,
    row_hash = ?37, key_hash = ?38, line_key = ?39
  WHERE call_id = ?1";
/// An unchanged call whose line did change (a key the agent ignores): the new line's key
/// is kept, so that the call's next line takes the fast path.
const UPDATE_LINE_KEY: &str = "UPDATE calls SET line_key = ?2 WHERE call_id = ?1";
const DELETE_CALL: &str = "DELETE FROM calls WHERE call_id = ?1";
/// A node the snapshot contains: ?5 is the snapshot's generation, which the node takes
/// when its calls changed (?6), or when their shared timestamp did and a call shows it
/// (a node without calls shows nothing, whatever its timestamp).
const PUT_NODE: &str =
    "INSERT INTO nodes (node_id, received_at_ms, snapshot_timestamp, source, changed_in)
    VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (node_id) DO UPDATE SET
      received_at_ms = excluded.received_at_ms,
      snapshot_timestamp = excluded.snapshot_timestamp,
      source = excluded.source,
      changed_in = CASE WHEN ?6 OR (snapshot_timestamp IS NOT excluded.snapshot_timestamp
                                   AND EXISTS (SELECT 1 FROM calls
                                               WHERE calls.node_id = ?1
                                                 AND calls.snapshot_timestamp IS NULL))
                        THEN excluded.changed_in ELSE changed_in END";
const NODE_TIMESTAMP: &str = "SELECT snapshot_timestamp FROM nodes WHERE node_id = ?1";
const NEXT_GENERATION: &str = "UPDATE generation SET last = last + 1 RETURNING last";
const NODES_OF_SOURCE: &str = "SELECT node_id FROM nodes WHERE source = ?1";
const DELETE_NODE_CALLS: &str = "DELETE FROM calls WHERE node_id = ?1";
const DELETE_NODE: &str = "DELETE FROM nodes WHERE node_id = ?1";
const STALE_NODES: &str = "SELECT node_id FROM nodes WHERE received_at_ms <= ?1";
/// The indexes a bulk write drops: all of them (the writer finds stored calls in its own
/// memory, never through an index).
const CALLS_INDEXES: &str = "SELECT name, sql FROM sqlite_schema
    WHERE type = 'index' AND tbl_name = 'calls' AND sql IS NOT NULL";
const CALLS_STATS: &str = "SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'calls'";
const PUT_CALLS_STAT: &str = "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('calls', ?1, ?2)";
const CLEAR_CALLS_STATS: &str = "DELETE FROM sqlite_stat1 WHERE tbl = 'calls'";

/// A call id is `account << CALL_SERIAL_BITS | serial` for accounts below
/// `1 << ACCOUNT_ID_BITS` (the ids stay below 2^62); the others take ids from 2^62 up.
const CALL_SERIAL_BITS: u32 = 20;
const ACCOUNT_ID_BITS: u32 = 42;
const OVERFLOW_IDS: i64 = 1 << 62;
/// The key of the overflow range in `next_ids` (no account in the ranges is negative).
const OVERFLOW_KEY: i64 = -1;

/// The range of call ids of `account`: its key in `next_ids`, first id and end.
fn id_range(account: i64) -> (i64, i64, i64) {
    if (0..1 << ACCOUNT_ID_BITS).contains(&account) {
        let first = account << CALL_SERIAL_BITS;
        (account, first, first + (1 << CALL_SERIAL_BITS))
    } else {
        (OVERFLOW_KEY, OVERFLOW_IDS, i64::MAX)
    }
}

/// The range key of a stored call id.
fn id_range_key(call_id: i64) -> i64 {
    if call_id >= OVERFLOW_IDS {
        OVERFLOW_KEY
    } else {
        call_id >> CALL_SERIAL_BITS
    }
}

/// A snapshot that writes at least this many calls, and at least [`BULK_SHARE`] of the
/// table, drops the secondary indexes and builds them again at commit: sorting once beats
/// that many random index updates (see PERF-NOTES).
const BULK_MIN_WRITES: u64 = 5_000;
const BULK_SHARE: f64 = 0.3;

/// The one connection that writes, and what it knows of the stored calls.
pub struct Writer {
    conn: Connection,
    /// The stored calls as the last committed snapshot left them, kept between snapshots
    /// so that an apply reads nothing it already knows. `None` until the first snapshot,
    /// after a failed one (its changes were rolled back, its picture is wrong), and after
    /// [`release_memory`](Self::release_memory).
    stored: Option<Stored>,
    /// Whether unchanged lines are recognised by their key (see [`set_fast_path`](Self::set_fast_path)).
    fast_path: bool,
}

impl Writer {
    /// Opens the database at `path`, creating it and its directory if needed, and brings
    /// the schema to [`SCHEMA_VERSION`] (an older or newer schema is rebuilt empty: the
    /// calls are a cache of what the switch resends every period).
    pub fn open(path: &Path) -> anyhow::Result<Writer> {
        use anyhow::Context;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the store directory {}", dir.display()))?;
        }
        let conn = open(path, OpenFlags::default())
            .with_context(|| format!("opening the store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The indexes of a 100k-call node must stay in cache during an apply.
        conn.pragma_update(None, "cache_size", -32 * 1024)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Index builds sort with a second thread.
        conn.pragma_update(None, "threads", 2)?;
        // The WAL is copied back into the database between snapshots (see `copy_back`),
        // not inside the commit that a waiting switch or reader is timing.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            if version != 0 {
                tracing::warn!(
                    found = version,
                    want = SCHEMA_VERSION,
                    "store schema differs; rebuilding it empty"
                );
            }
            conn.execute_batch(&format!(
                "BEGIN; DROP TABLE IF EXISTS calls; DROP TABLE IF EXISTS nodes;
                 DROP TABLE IF EXISTS generation; {SCHEMA} COMMIT;"
            ))
            .context("applying schema.sql")?;
        }
        Ok(Writer {
            conn,
            stored: None,
            fast_path: true,
        })
    }

    /// Starts applying one snapshot received at `received_at`.
    pub fn begin(
        &mut self,
        origin: Origin,
        received_at: SystemTime,
    ) -> rusqlite::Result<SnapshotTx<'_>> {
        let received_at_ms = unix_millis(received_at);
        let Writer {
            conn,
            stored,
            fast_path,
        } = self;
        let tx = conn.transaction()?;
        let mut calls = match stored.take() {
            Some(calls) => calls,
            None => Stored::load(&tx)?,
        };
        calls.epoch += 1;
        // Into an empty store every row is new: the indexes are built once, at commit, from
        // the first row on.
        let bulk_after = if calls.calls.is_empty() {
            1
        } else {
            BULK_MIN_WRITES.max((calls.calls.len() as f64 * BULK_SHARE) as u64)
        };
        Ok(SnapshotTx {
            tx,
            keep: stored,
            origin,
            received_at_ms,
            received_timestamp: format_datetime(received_at_ms.div_euclid(1000)),
            stored: calls,
            nodes: IntMap::default(),
            retired_lines: IntSet::default(),
            new_lines: Vec::new(),
            changed_nodes: IntSet::default(),
            written: 0,
            bulk_after,
            dropped_indexes: None,
            fast_path: *fast_path,
        })
    }

    /// With `false`, every line of a snapshot is parsed in full and no line key is kept:
    /// the reference the fast path is checked against (tests and fuzzing). On by default.
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    /// Removes the calls of every node whose latest snapshot was received at or before
    /// `cutoff` (SPEC 2.2: silence expires). Returns the nodes removed.
    pub fn expire(&mut self, cutoff: SystemTime) -> rusqlite::Result<Vec<i64>> {
        let tx = self.conn.transaction()?;
        let stale: Vec<i64> = tx
            .prepare_cached(STALE_NODES)?
            .query_map([unix_millis(cutoff)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if stale.is_empty() {
            return Ok(stale);
        }
        // Rare: the writer reads the calls anew with the next snapshot.
        self.stored = None;
        for node in &stale {
            tx.prepare_cached(DELETE_NODE_CALLS)?.execute([node])?;
            tx.prepare_cached(DELETE_NODE)?.execute([node])?;
        }
        tx.commit()?;
        Ok(stale)
    }

    /// Checkpoints the WAL into the database file and empties it (at shutdown).
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
    }

    /// Copies what the WAL holds back into the database file, without waiting for
    /// readers (they keep what they read): the writer's work between two snapshots.
    pub fn copy_back(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
    }

    /// Gives back what an apply holds between snapshots, the writer's picture of the
    /// stored calls and the page cache, to SQLite's allocator and from there to the
    /// system: an idle agent beside a busy switch stays small.
    pub fn release_memory(&mut self) -> rusqlite::Result<()> {
        self.stored = None;
        self.conn.execute_batch("PRAGMA shrink_memory")?;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions: it only returns free heap pages to the
        // kernel, under glibc's own arena locks, and is safe to call from any thread.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(())
    }
}

/// The maps the writer touches for every line of every snapshot, keyed by integers (the
/// agent's call ids and hashes, the switch's node ids): hashed by one multiplication
/// rather than std's SipHash, which was the largest cost of an unchanged line. A per-run
/// random seed keeps the bucket of a key unknown to whoever writes the snapshots.
type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;
type IntSet<K> = HashSet<K, BuildHasherDefault<IntHasher>>;

static INT_HASH_SEED: LazyLock<u64> = LazyLock::new(|| fastrand::u64(..));

struct IntHasher(u64);

impl Default for IntHasher {
    fn default() -> Self {
        IntHasher(*INT_HASH_SEED)
    }
}

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        // Fold the well-mixed high bits down: hashbrown picks buckets by the low ones.
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
}

/// A stored call, as the writer knows it.
#[derive(Clone, Copy)]
struct StoredCall {
    node_id: i64,
    tag: TagHash,
    account: i64,
    row_hash: i64,
    key_hash: i64,
    line_key: Option<i64>,
    /// The call keeps a snapshot timestamp of its own (rare): not for the fast path.
    own_timestamp: bool,
    /// The last snapshot (an [`Stored::epoch`]) that had this call.
    seen_in: u64,
}

/// A hash of a call's (node, local tag), keyed per process, so that no input can be made
/// to collide: the writer's name for a call, without holding its tag.
type TagHash = u64;

/// The writer's picture of the stored calls: loaded once from the covering
/// `calls_by_node` index, then kept up to date by each snapshot it applies, so that an
/// apply finds a call, compares it and tells what ended without a query.
struct Stored {
    calls: IntMap<i64, StoredCall>,
    by_tag: IntMap<TagHash, i64>,
    /// Line keys of the stored calls: shared with the snapshot's reader thread (which
    /// parses only the lines not found here) while a snapshot applies.
    by_line: Arc<IntMap<i64, i64>>,
    /// The next call id of each id range (see [`id_range`]).
    next_ids: IntMap<i64, i64>,
    /// Counts the snapshots applied: a call seen in this one has `seen_in == epoch`.
    epoch: u64,
    seed: u64,
}

impl Stored {
    fn load(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Stored> {
        let mut stored = Stored {
            calls: IntMap::default(),
            by_tag: IntMap::default(),
            by_line: Arc::default(),
            next_ids: IntMap::default(),
            epoch: 0,
            seed: fastrand::u64(..),
        };
        let mut by_line = IntMap::default();
        let mut stmt = tx.prepare_cached(LOAD_STORED_CALLS)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let call_id: i64 = r.get(0)?;
            let node_id = r.get(1)?;
            let tag = stored.tag_hash(node_id, r.get_ref(2)?.as_bytes()?);
            let call = StoredCall {
                node_id,
                tag,
                account: r.get(3)?,
                row_hash: r.get(4)?,
                key_hash: r.get(5)?,
                line_key: r.get(6)?,
                own_timestamp: r.get(7)?,
                seen_in: 0,
            };
            if let Some(line_key) = call.line_key {
                by_line.insert(line_key, call_id);
            }
            stored.by_tag.insert(tag, call_id);
            stored.calls.insert(call_id, call);
            let next = stored.next_ids.entry(id_range_key(call_id)).or_default();
            *next = (*next).max(call_id + 1);
        }
        stored.by_line = Arc::new(by_line);
        Ok(stored)
    }

    fn tag_hash(&self, node_id: i64, tag: &[u8]) -> TagHash {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(self.seed);
        h.update(&node_id.to_le_bytes());
        h.update(tag);
        h.digest()
    }

    /// A new call id for `account`: ids are handed out in one range per account, so an
    /// account's calls lie together in the table and its answer is a few page reads. A
    /// range used up starts again at its beginning (the calls there have long ended: ids
    /// still in use are skipped); an account outside the ranges, or one holding a whole
    /// range at once, takes its ids from the overflow range above all of them, so an id
    /// is never handed out twice.
    fn next_call_id(&mut self, account: i64) -> i64 {
        let (key, first, end) = id_range(account);
        let next = self.next_ids.entry(key).or_insert(first);
        for _ in 0..(end - first).min(1 << CALL_SERIAL_BITS) {
            if *next >= end {
                *next = first;
            }
            let id = *next;
            *next += 1;
            if !self.calls.contains_key(&id) {
                return id;
            }
        }
        self.next_call_id(-1)
    }

    fn insert(&mut self, call_id: i64, call: StoredCall) {
        self.by_tag.insert(call.tag, call_id);
        self.calls.insert(call_id, call);
    }

    fn remove(&mut self, call_id: i64) -> Option<StoredCall> {
        let call = self.calls.remove(&call_id)?;
        if self.by_tag.get(&call.tag) == Some(&call_id) {
            self.by_tag.remove(&call.tag);
        }
        Some(call)
    }
}

/// What a committed snapshot changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub nodes: Vec<i64>,
    pub written: u64,
    pub removed: u64,
    /// Whether the secondary indexes were rebuilt instead of updated.
    pub rebuilt_indexes: bool,
    /// Whether the store held this very snapshot already: every node of it had its
    /// snapshot timestamp, and no call changed (the snapshot file applied again at a
    /// start, a switch's resend of a POST). Its rows went to the relay the first time.
    pub repeat: bool,
}

/// The secondary indexes dropped for a bulk write, with their planner statistics.
struct DroppedIndexes {
    create: Vec<String>,
    stats: Vec<(Option<String>, String)>,
}

/// One snapshot being applied: lines go in with [`put_unchanged`](Self::put_unchanged) or
/// [`put`](Self::put), and nothing is visible until [`commit`](Self::commit). Dropping it
/// rolls everything back (and the writer forgets its picture of the stored calls, which
/// this snapshot changed).
pub struct SnapshotTx<'w> {
    tx: rusqlite::Transaction<'w>,
    /// Where the picture of the stored calls goes back once the snapshot committed.
    keep: &'w mut Option<Stored>,
    origin: Origin,
    received_at_ms: i64,
    received_timestamp: String,
    stored: Stored,
    /// The nodes this snapshot contains, with their snapshot timestamp (its first row's).
    nodes: IntMap<i64, Option<String>>,
    /// Line keys that no longer stand for their call (it was rewritten by this snapshot),
    /// and the new keys: `by_line` is shared with the reader, so it changes at commit.
    retired_lines: IntSet<i64>,
    new_lines: Vec<(i64, i64)>,
    /// The nodes some of whose calls this snapshot wrote or removed.
    changed_nodes: IntSet<i64>,
    written: u64,
    bulk_after: u64,
    dropped_indexes: Option<DroppedIndexes>,
    fast_path: bool,
}

impl SnapshotTx<'_> {
    /// The line keys of the stored calls, for the reader that decides what to parse.
    pub fn line_keys(&self) -> LineKeys {
        if self.fast_path {
            LineKeys(self.stored.by_line.clone())
        } else {
            LineKeys(Arc::default())
        }
    }

    /// Marks `node_id` as contained in this snapshot (also when all its rows were bad).
    pub fn touch_node(&mut self, node_id: i64) -> rusqlite::Result<()> {
        self.nodes.entry(node_id).or_default();
        Ok(())
    }

    /// Whether a row of `node_id` with snapshot timestamp `row` (`None`: the receive time)
    /// keeps a timestamp of its own: the first row of a node sets the node's.
    fn own_timestamp(&mut self, node_id: i64, row: Option<&str>) -> bool {
        let row = row.unwrap_or(&self.received_timestamp);
        let node = self.nodes.entry(node_id).or_default();
        match node {
            Some(node) => node != row,
            None => {
                *node = Some(row.to_owned());
                false
            }
        }
    }

    /// The fast path: a line whose key is that of a stored call, which would change
    /// nothing. Returns `false` when the line must be parsed and [`put`](Self::put) instead.
    pub fn put_unchanged(&mut self, key: &LineKey<'_>) -> rusqlite::Result<bool> {
        if self.retired_lines.contains(&key.hash) {
            return Ok(false);
        }
        let Some(&call_id) = self.stored.by_line.get(&key.hash) else {
            return Ok(false);
        };
        let epoch = self.stored.epoch;
        let Some(call) = self.stored.calls.get(&call_id) else {
            return Ok(false);
        };
        if call.own_timestamp || call.seen_in == epoch {
            return Ok(false);
        }
        let node_id = call.node_id;
        if self.own_timestamp(node_id, key.snapshot_timestamp) {
            return Ok(false);
        }
        if let Some(call) = self.stored.calls.get_mut(&call_id) {
            call.seen_in = epoch;
        }
        Ok(true)
    }

    /// Adds or updates one call; the last row of a repeated call wins. `line_key` is the
    /// key of the line it was read from, kept for the fast path of the next snapshot.
    pub fn put(&mut self, row: &CallRow<'_>, line_key: Option<i64>) -> rusqlite::Result<()> {
        let line_key = line_key.filter(|_| self.fast_path);
        let own = self.own_timestamp(row.node_id, row.snapshot_timestamp.as_deref());
        let row_timestamp = row
            .snapshot_timestamp
            .as_deref()
            .unwrap_or(&self.received_timestamp);
        let own_timestamp = own.then_some(row_timestamp);
        let (key_hash, row_hash) = row_hashes(row, own_timestamp);
        let tag = self.stored.tag_hash(row.node_id, row.local_tag.as_bytes());
        let epoch = self.stored.epoch;
        let known = self
            .stored
            .by_tag
            .get(&tag)
            .and_then(|id| Some((*id, *self.stored.calls.get(id)?)));
        let values = CallValues {
            row,
            own_timestamp,
            row_hash,
            key_hash,
            line_key,
        };
        let updated = StoredCall {
            node_id: row.node_id,
            tag,
            account: row.customer_acc_id,
            row_hash,
            key_hash,
            line_key,
            own_timestamp: own,
            seen_in: epoch,
        };
        if let Some((call_id, call)) = known {
            if let Some(old) = call.line_key.filter(|old| Some(*old) != line_key) {
                // The stored line no longer stands for this call: a repeat of it later in
                // this snapshot must not pass as unchanged.
                self.retired_lines.insert(old);
            }
            let same_account = call.account == row.customer_acc_id;
            if same_account && call.row_hash == row_hash {
                if call.line_key != line_key {
                    self.tx
                        .prepare_cached(UPDATE_LINE_KEY)?
                        .execute(params![call_id, line_key])?;
                    self.new_lines.extend(line_key.map(|line| (line, call_id)));
                }
                self.stored.calls.insert(call_id, updated);
                return Ok(());
            }
            self.changed_nodes.insert(row.node_id);
            self.written += 1;
            if same_account && call.key_hash == key_hash {
                // Only unindexed values changed (a call connecting, a rate): rewrite those.
                values.write(&self.tx, UPDATE_CALL_VALUES, Some(call_id))?;
                self.new_lines.extend(line_key.map(|line| (line, call_id)));
                self.stored.calls.insert(call_id, updated);
                return Ok(());
            }
            // An indexed value changed: the row goes and comes back, its entries with it.
            self.tx.prepare_cached(DELETE_CALL)?.execute([call_id])?;
            self.stored.remove(call_id);
        } else {
            self.changed_nodes.insert(row.node_id);
            self.written += 1;
        }
        let call_id = self.stored.next_call_id(row.customer_acc_id);
        values.write(&self.tx, INSERT_CALL, Some(call_id))?;
        self.stored.insert(call_id, updated);
        self.new_lines.extend(line_key.map(|line| (line, call_id)));
        if self.written >= self.bulk_after && self.dropped_indexes.is_none() {
            self.dropped_indexes = Some(drop_secondary_indexes(&self.tx)?);
        }
        Ok(())
    }

    /// Deletes the calls the snapshot no longer has, records its nodes, rebuilds dropped
    /// indexes, and makes it all visible at once.
    pub fn commit(mut self) -> rusqlite::Result<Changes> {
        let mut changes = Changes {
            written: self.written,
            rebuilt_indexes: self.dropped_indexes.is_some(),
            ..Changes::default()
        };
        // Calls of its nodes that the snapshot no longer has, in account order:
        // consecutive deletes then touch neighbouring entries of every (account, …) index.
        let epoch = self.stored.epoch;
        let mut gone: Vec<(i64, i64)> = self
            .stored
            .calls
            .iter()
            .filter(|(_, c)| c.seen_in != epoch && self.nodes.contains_key(&c.node_id))
            .map(|(&id, c)| (c.account, id))
            .collect();
        gone.sort_unstable();
        let mut delete = self.tx.prepare_cached(DELETE_CALL)?;
        for &(_, call_id) in &gone {
            changes.removed += delete.execute([call_id])? as u64;
            if let Some(call) = self.stored.remove(call_id) {
                self.changed_nodes.insert(call.node_id);
                if let Some(line) = call.line_key {
                    self.retired_lines.insert(line);
                }
            }
        }
        drop(delete);
        let mut forget = false;
        if self.origin == Origin::File {
            // The file is the whole state of the nodes it feeds: a node it fed before and
            // no longer names has no calls.
            let fed_before: Vec<i64> = self
                .tx
                .prepare_cached(NODES_OF_SOURCE)?
                .query_map([Origin::File.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for node in fed_before.iter().filter(|n| !self.nodes.contains_key(n)) {
                let removed = self.tx.prepare_cached(DELETE_NODE_CALLS)?.execute([node])?;
                changes.removed += removed as u64;
                self.tx.prepare_cached(DELETE_NODE)?.execute([node])?;
                // Rare: the writer reads the calls anew with the next snapshot.
                forget |= removed > 0;
            }
        }
        // After the deletes, which then had no index entries to remove.
        if let Some(dropped) = &self.dropped_indexes {
            rebuild_secondary_indexes(&self.tx, dropped)?;
        }
        let generation: i64 = self
            .tx
            .prepare_cached(NEXT_GENERATION)?
            .query_row([], |r| r.get(0))?;
        changes.repeat = changes.written == 0 && changes.removed == 0 && !self.nodes.is_empty();
        for (node_id, timestamp) in &self.nodes {
            let timestamp = timestamp.as_deref().unwrap_or(&self.received_timestamp);
            if changes.repeat {
                let before: Option<String> = self
                    .tx
                    .prepare_cached(NODE_TIMESTAMP)?
                    .query_row([node_id], |r| r.get(0))
                    .optional()?;
                changes.repeat = before.as_deref() == Some(timestamp);
            }
            self.tx.prepare_cached(PUT_NODE)?.execute(params![
                node_id,
                self.received_at_ms,
                timestamp,
                self.origin.as_str(),
                generation,
                self.changed_nodes.contains(node_id),
            ])?;
            changes.nodes.push(*node_id);
        }
        self.tx.commit()?;
        if !forget {
            // The reader thread has ended: the line keys are the writer's alone again.
            let by_line = Arc::make_mut(&mut self.stored.by_line);
            for line in &self.retired_lines {
                by_line.remove(line);
            }
            for &(line, call_id) in &self.new_lines {
                // Only a line its call still has (a call rewritten twice in one snapshot
                // left a line behind).
                if self
                    .stored
                    .calls
                    .get(&call_id)
                    .is_some_and(|c| c.line_key == Some(line))
                {
                    by_line.insert(line, call_id);
                }
            }
            *self.keep = Some(self.stored);
        }
        changes.nodes.sort_unstable();
        Ok(changes)
    }
}

/// The line keys of the stored calls as a snapshot began: what its reader needs not parse.
#[derive(Clone)]
pub struct LineKeys(Arc<IntMap<i64, i64>>);

impl LineKeys {
    pub fn contains(&self, hash: i64) -> bool {
        self.0.contains_key(&hash)
    }
}

/// What a call's row is written with, by [`INSERT_CALL`] and [`UPDATE_CALL_VALUES`] alike.
struct CallValues<'r, 'a> {
    row: &'r CallRow<'a>,
    own_timestamp: Option<&'r str>,
    row_hash: i64,
    key_hash: i64,
    line_key: Option<i64>,
}

impl CallValues<'_, '_> {
    fn write(
        &self,
        tx: &rusqlite::Transaction<'_>,
        sql: &str,
        call_id: Option<i64>,
    ) -> rusqlite::Result<()> {
        let row = self.row;
        let rev = |s: &str| Blob(s.bytes().rev().collect());
        tx.prepare_cached(sql)?.execute(params![
            call_id,
            row.node_id,
            row.local_tag,
            row.customer_id,
            row.customer_acc_id,
            self.own_timestamp,
            row.start_time,
            row.connect_time,
            row.destination_prefix,
            row.destination_initial_interval,
            row.destination_initial_rate,
            row.destination_next_interval,
            row.destination_next_rate,
            row.destination_fee,
            row.src_name_in,
            row.src_prefix_in,
            row.dst_prefix_in,
            row.src_prefix_routing,
            row.dst_prefix_routing,
            row.from_domain,
            row.to_domain,
            row.ruri_domain,
            row.diversion_in,
            row.pai_in,
            row.ppi_in,
            row.privacy_in,
            row.rpid_in,
            row.rpid_privacy_in,
            row.auth_orig_transport_protocol_id,
            row.auth_orig_ip,
            row.auth_orig_port,
            rev(&row.src_name_in),
            rev(&row.src_prefix_in),
            rev(&row.dst_prefix_in),
            rev(&row.src_prefix_routing),
            rev(&row.dst_prefix_routing),
            self.row_hash,
            self.key_hash,
            self.line_key,
        ])?;
        Ok(())
    }
}

/// Drops the indexes of `calls` (their definitions and statistics kept, from the database
/// itself: `schema.sql` stays their one source).
fn drop_secondary_indexes(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<DroppedIndexes> {
    let indexes: Vec<(String, String)> = tx
        .prepare(CALLS_INDEXES)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let stats = tx
        .prepare(CALLS_STATS)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, _) in &indexes {
        // The name comes from sqlite_schema, not from input.
        tx.execute_batch(&format!("DROP INDEX \"{}\"", name.replace('"', "\"\"")))?;
    }
    Ok(DroppedIndexes {
        create: indexes.into_iter().map(|(_, sql)| sql).collect(),
        stats,
    })
}

fn rebuild_secondary_indexes(
    tx: &rusqlite::Transaction<'_>,
    dropped: &DroppedIndexes,
) -> rusqlite::Result<()> {
    for sql in &dropped.create {
        tx.execute_batch(sql)?;
    }
    tx.execute(CLEAR_CALLS_STATS, [])?;
    for (idx, stat) in &dropped.stats {
        tx.execute(PUT_CALLS_STAT, params![idx, stat])?;
    }
    Ok(())
}

/// FNV-1a over the stored values of a call: stable across runs and releases (unlike
/// std's hasher), so hashes stored by one run compare with the next run's. The first hash
/// covers the indexed values, the second everything.
fn row_hashes(row: &CallRow<'_>, own_timestamp: Option<&str>) -> (i64, i64) {
    let mut h = Fnv::default();
    h.int(row.customer_acc_id);
    for s in [
        &row.src_name_in,
        &row.src_prefix_in,
        &row.dst_prefix_in,
        &row.src_prefix_routing,
        &row.dst_prefix_routing,
    ] {
        h.str(s);
    }
    let key_hash = h.0 as i64;
    h.int(row.customer_id);
    h.opt(own_timestamp);
    h.str(&row.start_time);
    h.opt(row.connect_time.as_deref());
    h.str(&row.destination_prefix);
    h.int(row.destination_initial_interval);
    h.str(&row.destination_initial_rate);
    h.int(row.destination_next_interval);
    h.str(&row.destination_next_rate);
    h.str(&row.destination_fee);
    for s in [&row.from_domain, &row.to_domain, &row.ruri_domain] {
        h.str(s);
    }
    for s in [
        &row.diversion_in,
        &row.pai_in,
        &row.ppi_in,
        &row.privacy_in,
        &row.rpid_in,
        &row.rpid_privacy_in,
    ] {
        h.opt(s.as_deref());
    }
    h.int(row.auth_orig_transport_protocol_id);
    h.str(&row.auth_orig_ip);
    h.int(row.auth_orig_port);
    (key_hash, h.0 as i64)
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.bytes(&[1]);
                self.str(s);
            }
            None => self.bytes(&[0]),
        }
    }
    fn int(&mut self, i: i64) {
        self.bytes(&i.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Reading

/// The five string columns a customer can filter on (SPEC 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextColumn {
    SrcNameIn,
    SrcPrefixIn,
    DstPrefixIn,
    SrcPrefixRouting,
    DstPrefixRouting,
}

impl TextColumn {
    pub const ALL: [TextColumn; 5] = [
        TextColumn::SrcNameIn,
        TextColumn::SrcPrefixIn,
        TextColumn::DstPrefixIn,
        TextColumn::SrcPrefixRouting,
        TextColumn::DstPrefixRouting,
    ];

    /// The column's name in `schema.sql` (its reversed twin adds `_rev`).
    pub fn name(self) -> &'static str {
        match self {
            TextColumn::SrcNameIn => "src_name_in",
            TextColumn::SrcPrefixIn => "src_prefix_in",
            TextColumn::DstPrefixIn => "dst_prefix_in",
            TextColumn::SrcPrefixRouting => "src_prefix_routing",
            TextColumn::DstPrefixRouting => "dst_prefix_routing",
        }
    }
}

/// How a string filter matches its needle (always bytes, never patterns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMatch {
    Equals,
    StartsWith,
    EndsWith,
    /// ASCII-case-insensitive substring.
    Contains,
}

/// One condition of a customer query; all are ANDed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Text {
        column: TextColumn,
        how: TextMatch,
        needle: Vec<u8>,
    },
    AuthOrigIp(Vec<u8>),
    AuthOrigPort(i32),
    AuthOrigTransportProtocolId(i8),
    /// `true`: only calls not yet connected.
    ConnectTimeNull(bool),
}

/// A customer's query: one account of one customer, and its filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallQuery {
    pub customer_id: i64,
    pub account_id: i64,
    pub filters: Vec<Filter>,
    /// Calls of nodes whose latest snapshot was received at or before this are stale.
    pub stale_cutoff_ms: i64,
}

/// The 26 output columns of SPEC 1.3, in its order (`c`: calls, `n`: its node).
macro_rules! answer_columns {
    () => {
        "COALESCE(c.snapshot_timestamp, n.snapshot_timestamp), c.start_time,
    c.connect_time, c.destination_prefix, c.destination_initial_interval, c.destination_initial_rate,
    c.destination_next_interval, c.destination_next_rate, c.destination_fee,
    c.src_name_in, c.src_prefix_in, c.dst_prefix_in, c.src_prefix_routing, c.dst_prefix_routing,
    c.from_domain, c.to_domain, c.ruri_domain,
    c.diversion_in, c.pai_in, c.ppi_in, c.privacy_in, c.rpid_in, c.rpid_privacy_in,
    c.auth_orig_transport_protocol_id, c.auth_orig_ip, c.auth_orig_port"
    };
}

const SELECT_CALLS: &str = concat!(
    "SELECT ",
    answer_columns!(),
    " FROM calls AS c CROSS JOIN nodes AS n ON n.node_id = c.node_id
  WHERE c.customer_acc_id = ? AND c.customer_id = ? AND n.received_at_ms > ?"
);
const ORDER_CALLS: &str = " ORDER BY c.start_time DESC, c.local_tag, c.node_id";
/// The JSON keys of [`answer_columns`], each with what precedes it in a row object.
const ROW_KEYS: [&str; 26] = [
    "{\"snapshot_timestamp\":",
    ",\"start_time\":",
    ",\"connect_time\":",
    ",\"destination_prefix\":",
    ",\"destination_initial_interval\":",
    ",\"destination_initial_rate\":",
    ",\"destination_next_interval\":",
    ",\"destination_next_rate\":",
    ",\"destination_fee\":",
    ",\"src_name_in\":",
    ",\"src_prefix_in\":",
    ",\"dst_prefix_in\":",
    ",\"src_prefix_routing\":",
    ",\"dst_prefix_routing\":",
    ",\"from_domain\":",
    ",\"to_domain\":",
    ",\"ruri_domain\":",
    ",\"diversion_in\":",
    ",\"pai_in\":",
    ",\"ppi_in\":",
    ",\"privacy_in\":",
    ",\"rpid_in\":",
    ",\"rpid_privacy_in\":",
    ",\"auth_orig_transport_protocol_id\":",
    ",\"auth_orig_ip\":",
    ",\"auth_orig_port\":",
];

/// The nodes a scrape shows (SPEC 6): every one not stale at ?1.
const SCRAPE_NODES: &str =
    "SELECT node_id, changed_in FROM nodes WHERE received_at_ms > ?1 ORDER BY node_id";
/// Their calls, in the scrape's order: the identity columns, then [`answer_columns`].
/// Ordered by `n.node_id` (the nodes' own rowid order), SQLite walks the nodes, then each
/// node's calls in `calls_by_node`, and never sorts: rows go out as they are read.
const SCRAPE_CALLS: &str = concat!(
    "SELECT c.node_id, c.local_tag, c.customer_id, c.customer_acc_id, ",
    answer_columns!(),
    " FROM nodes AS n CROSS JOIN calls AS c ON c.node_id = n.node_id
  WHERE n.received_at_ms > ?1 ORDER BY n.node_id, c.local_tag"
);
/// The JSON keys of [`SCRAPE_CALLS`] up to its first answer column; the rest of
/// [`ROW_KEYS`] follow.
const SCRAPE_KEYS: [&str; 5] = [
    "{\"node_id\":",
    ",\"local_tag\":",
    ",\"customer_id\":",
    ",\"customer_acc_id\":",
    ",\"snapshot_timestamp\":",
];

/// Which calls a local listing (`active-calls-agent calls`) shows: every node, customer
/// and account unless one is given, and a customer query's filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallListing {
    pub node_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub account_id: Option<i64>,
    pub filters: Vec<Filter>,
    /// As in [`CallQuery`]; `i64::MIN` shows stale nodes' calls too.
    pub stale_cutoff_ms: i64,
}

/// What a listing's counts are per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountBy {
    Node,
    Customer,
    Account,
}

impl CountBy {
    /// The identity column counted per, as a scrape row names it.
    pub fn column(self) -> &'static str {
        match self {
            CountBy::Node => "node_id",
            CountBy::Customer => "customer_id",
            CountBy::Account => "customer_acc_id",
        }
    }

    fn select(self) -> &'static str {
        match self {
            CountBy::Node => COUNT_BY_NODE,
            CountBy::Customer => COUNT_BY_CUSTOMER,
            CountBy::Account => COUNT_BY_ACCOUNT,
        }
    }
}

/// What a listing reads: every call of a node not stale at ?1; [`build_listing`] adds
/// its conditions, and [`ORDER_CALLS`] or its grouping.
macro_rules! listed_from {
    () => {
        " FROM calls AS c CROSS JOIN nodes AS n ON n.node_id = c.node_id
  WHERE n.received_at_ms > ?"
    };
}
/// A listing's calls: a scrape's row (identity columns, then [`answer_columns`]).
const LISTED_CALLS: &str = concat!(
    "SELECT c.node_id, c.local_tag, c.customer_id, c.customer_acc_id, ",
    answer_columns!(),
    listed_from!()
);
/// A listing's counts, per identity column.
const COUNT_BY_NODE: &str = concat!("SELECT c.node_id, count(*)", listed_from!());
const COUNT_BY_CUSTOMER: &str = concat!("SELECT c.customer_id, count(*)", listed_from!());
const COUNT_BY_ACCOUNT: &str = concat!("SELECT c.customer_acc_id, count(*)", listed_from!());

/// A value bound to a statement: bytes as TEXT (which may be invalid UTF-8, as a
/// `%FF` in a query string is) or as BLOB, or an integer.
enum Bound {
    Int(i64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl ToSql for Bound {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Bound::Int(i) => ValueRef::Integer(*i),
            Bound::Text(t) => ValueRef::Text(t),
            Bound::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

struct Blob(Vec<u8>);

impl ToSql for Blob {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Blob(&self.0)))
    }
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None`
/// when there is none (the prefix is empty or all `0xFF`).
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// The SQL text and bound values of a query.
fn build(query: &CallQuery) -> (String, Vec<Bound>) {
    let mut sql = String::from(SELECT_CALLS);
    let mut values = vec![
        Bound::Int(query.account_id),
        Bound::Int(query.customer_id),
        Bound::Int(query.stale_cutoff_ms),
    ];
    add_filters(&query.filters, &mut sql, &mut values);
    sql += ORDER_CALLS;
    (sql, values)
}

/// The statement of a [`CallListing`]: [`LISTED_CALLS`] (or its counts, with `by`) with
/// the same conditions, in the same words, as a customer query's.
fn build_listing(listing: &CallListing, by: Option<CountBy>) -> (String, Vec<Bound>) {
    let mut sql = String::from(match by {
        None => LISTED_CALLS,
        Some(by) => by.select(),
    });
    let mut values = vec![Bound::Int(listing.stale_cutoff_ms)];
    for (condition, value) in [
        (" AND c.node_id = ?", listing.node_id),
        (" AND c.customer_id = ?", listing.customer_id),
        (" AND c.customer_acc_id = ?", listing.account_id),
    ] {
        if let Some(value) = value {
            sql += condition;
            values.push(Bound::Int(value));
        }
    }
    add_filters(&listing.filters, &mut sql, &mut values);
    sql += match by {
        None => ORDER_CALLS,
        // The busiest first.
        Some(_) => " GROUP BY 1 ORDER BY 2 DESC, 1",
    };
    (sql, values)
}

/// Appends the conditions of `filters` (SPEC 1.2), each value bound.
fn add_filters(filters: &[Filter], sql: &mut String, values: &mut Vec<Bound>) {
    for filter in filters {
        match filter {
            Filter::Text {
                column,
                how,
                needle,
            } => {
                let name = column.name();
                match how {
                    TextMatch::Equals => {
                        *sql += &format!(" AND c.{name} = ?");
                        values.push(Bound::Text(needle.clone()));
                    }
                    TextMatch::StartsWith => {
                        *sql += &format!(" AND c.{name} >= ?");
                        values.push(Bound::Text(needle.clone()));
                        if let Some(upper) = prefix_upper_bound(needle) {
                            *sql += &format!(" AND c.{name} < ?");
                            values.push(Bound::Text(upper));
                        }
                    }
                    TextMatch::EndsWith => {
                        let reversed: Vec<u8> = needle.iter().rev().copied().collect();
                        *sql += &format!(" AND c.{name}_rev >= ?");
                        if let Some(upper) = prefix_upper_bound(&reversed) {
                            *sql += &format!(" AND c.{name}_rev < ?");
                            values.push(Bound::Blob(reversed));
                            values.push(Bound::Blob(upper));
                        } else {
                            values.push(Bound::Blob(reversed));
                        }
                    }
                    TextMatch::Contains => {
                        // SQLite's own lower() folds ASCII only, exactly the rule wanted;
                        // as BLOBs, instr() compares bytes, not characters.
                        *sql += &format!(" AND instr(CAST(lower(c.{name}) AS BLOB), ?) > 0");
                        values.push(Bound::Blob(needle.to_ascii_lowercase()));
                    }
                }
            }
            Filter::AuthOrigIp(ip) => {
                *sql += " AND c.auth_orig_ip = ?";
                values.push(Bound::Text(ip.clone()));
            }
            Filter::AuthOrigPort(port) => {
                *sql += " AND c.auth_orig_port = ?";
                values.push(Bound::Int(i64::from(*port)));
            }
            Filter::AuthOrigTransportProtocolId(id) => {
                *sql += " AND c.auth_orig_transport_protocol_id = ?";
                values.push(Bound::Int(i64::from(*id)));
            }
            Filter::ConnectTimeNull(true) => *sql += " AND c.connect_time IS NULL",
            Filter::ConnectTimeNull(false) => *sql += " AND c.connect_time IS NOT NULL",
        }
    }
}

/// Each node's calls and when its last snapshot came: what `/metrics` and `/readyz` show.
const NODE_STATS: &str = "SELECT node_id, received_at_ms,
    (SELECT count(*) FROM calls WHERE calls.node_id = nodes.node_id) FROM nodes ORDER BY node_id";

/// One node as [`Readers::node_stats`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node_id: i64,
    /// When its last snapshot was received (ms since the Unix epoch).
    pub received_at_ms: i64,
    pub calls: i64,
}

/// A current node and the generation in which what its calls show last changed: what a
/// scrape's `ETag` is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeGeneration {
    pub node_id: i64,
    pub changed_in: i64,
}

/// A pool of read-only connections, at most [`MAX_OPEN_READERS`] of them at once.
///
/// Each connection has a page cache of its own (up to 8 MB): fifty requests at once (a
/// burst of slow clients) would otherwise open fifty, and the agent's memory would follow
/// the number of clients. Past the cap a request waits for a connection; reads take
/// microseconds to milliseconds, a scrape (two at most) longer.
pub struct Readers {
    path: PathBuf,
    /// What a connection opens: `path`, or (for [`at_rest`](Self::at_rest)) its
    /// `immutable` URI.
    target: PathBuf,
    flags: OpenFlags,
    idle: Mutex<Vec<Connection>>,
    /// Connections open (idle or in use), and a wake-up when one is given back.
    open: Mutex<usize>,
    returned: std::sync::Condvar,
}

/// Read connections open at most.
pub const MAX_OPEN_READERS: usize = 8;

impl Readers {
    /// Readers of the database a [`Writer`] has opened (and so created) at `path`.
    pub fn new(path: &Path) -> Readers {
        Readers {
            path: path.to_path_buf(),
            target: path.to_path_buf(),
            flags: OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            returned: std::sync::Condvar::new(),
        }
    }

    /// Readers of a store that no agent is writing, which a reader opens even where it
    /// may not create the `-shm` file beside it (a group member, in the packaged state
    /// folder, while the agent is stopped): opened `immutable`, which SQLite allows only
    /// while nobody writes. The agent keeps its WAL file while it runs, so a store
    /// without one is at rest.
    pub fn at_rest(path: &Path) -> Readers {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        // `file://` and an empty authority before an absolute path: else a path that
        // starts with `//` would be read as an authority.
        let mut uri = if path.is_absolute() {
            b"file://".to_vec()
        } else {
            b"file:".to_vec()
        };
        for &b in path.as_os_str().as_bytes() {
            match b {
                b'%' | b'?' | b'#' => uri.extend_from_slice(format!("%{b:02X}").as_bytes()),
                _ => uri.push(b),
            }
        }
        uri.extend_from_slice(b"?immutable=1");
        Readers {
            target: PathBuf::from(std::ffi::OsString::from_vec(uri)),
            flags: OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
            ..Readers::new(path)
        }
    }

    /// Whether an agent may be writing the store at `path`: its WAL file is there.
    pub fn may_be_written(path: &Path) -> bool {
        wal_of(path).exists()
    }

    fn with_connection<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let conn = self.take()?;
        let result = f(&conn);
        // Given back under the count's lock, which a waiter holds from its look at the
        // idle ones until it waits: the wake-up cannot fall between the two.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        } else {
            drop(conn);
            *open -= 1;
        }
        drop(idle);
        drop(open);
        self.returned.notify_one();
        result
    }

    /// The store's size on disk: its database file and its WAL.
    pub fn file_bytes(&self) -> u64 {
        [self.path.clone(), wal_of(&self.path)]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// An idle connection, a new one below the cap, or (at the cap) the next given back.
    fn take(&self) -> rusqlite::Result<Connection> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Ok(conn);
            }
            if *open < MAX_OPEN_READERS {
                *open += 1;
                break;
            }
            open = self.returned.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        drop(open);
        let opened = open_reader(&self.target, self.flags);
        if opened.is_err() {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            *open -= 1;
            drop(open);
            self.returned.notify_one();
        }
        opened
    }

    /// Runs a customer query and writes the SPEC 1.3 body into `out`.
    /// Returns the number of rows.
    pub fn outgoing_calls(&self, query: &CallQuery, out: &mut Vec<u8>) -> rusqlite::Result<usize> {
        self.outgoing_calls_within(query, out, |_| true)
            .map(|rows| rows.unwrap_or_default())
    }

    /// [`outgoing_calls`](Self::outgoing_calls), asking `admit` after each row whether the
    /// body may hold the memory it now holds (its capacity); `None` (and a body cut
    /// short) when it said no.
    pub fn outgoing_calls_within(
        &self,
        query: &CallQuery,
        out: &mut Vec<u8>,
        mut admit: impl FnMut(usize) -> bool,
    ) -> rusqlite::Result<Option<usize>> {
        let (sql, values) = build(query);
        self.with_connection(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
            out.extend_from_slice(b"{\"data\":[");
            let mut count = 0usize;
            while let Some(row) = rows.next()? {
                if count > 0 {
                    out.push(b',');
                }
                write_row(out, row, &ROW_KEYS, 0)?;
                out.push(b'}');
                count += 1;
                if !admit(out.capacity()) {
                    return Ok(None);
                }
            }
            out.extend_from_slice(b"],\"rows\":");
            let _ = write!(out, "{count}");
            out.push(b'}');
            Ok(Some(count))
        })
    }

    /// Every call of every node not stale at `stale_cutoff_ms`, read in one transaction (so
    /// from one state of the store, however long the reading takes). `nodes` first gets the
    /// nodes with the generation their calls last changed in, and says whether to go on;
    /// then `row` gets each call as a JSON object (SPEC 6), until it says to stop.
    pub fn scrape(
        &self,
        stale_cutoff_ms: i64,
        nodes: impl FnOnce(&[NodeGeneration]) -> bool,
        mut row: impl FnMut(&[u8]) -> bool,
    ) -> rusqlite::Result<()> {
        self.with_connection(|conn| {
            let tx = conn.unchecked_transaction()?;
            if !nodes(&current_nodes(&tx, stale_cutoff_ms)?) {
                return Ok(());
            }
            let mut stmt = tx.prepare_cached(SCRAPE_CALLS)?;
            let mut rows = stmt.query([stale_cutoff_ms])?;
            let mut out = Vec::with_capacity(2048);
            while let Some(r) = rows.next()? {
                out.clear();
                write_scrape_row(&mut out, r)?;
                if !row(&out) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// The calls of `listing`, in a customer answer's order, each as a scrape's JSON
    /// object (SPEC 6). All are read before any is returned, so that no read of the
    /// store waits on whoever prints them.
    pub fn list_calls(&self, listing: &CallListing) -> rusqlite::Result<Vec<Vec<u8>>> {
        let (sql, values) = build_listing(listing, None);
        self.with_connection(|conn| {
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
            let mut calls = Vec::new();
            while let Some(r) = rows.next()? {
                let mut call = Vec::with_capacity(1024);
                write_scrape_row(&mut call, r)?;
                calls.push(call);
            }
            Ok(calls)
        })
    }

    /// How many calls of `listing` each node, customer or account has: (its id, calls),
    /// the most calls first.
    pub fn count_calls(
        &self,
        listing: &CallListing,
        by: CountBy,
    ) -> rusqlite::Result<Vec<(i64, i64)>> {
        let (sql, values) = build_listing(listing, Some(by));
        self.with_connection(|conn| {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect()
        })
    }

    /// The nodes a scrape at `stale_cutoff_ms` would show: enough for its `ETag`.
    pub fn node_generations(&self, stale_cutoff_ms: i64) -> rusqlite::Result<Vec<NodeGeneration>> {
        self.with_connection(|conn| current_nodes(conn, stale_cutoff_ms))
    }

    /// Every node with a snapshot, with its call count (an index range per node).
    pub fn node_stats(&self) -> rusqlite::Result<Vec<NodeStats>> {
        self.with_connection(|conn| {
            let mut stmt = conn.prepare_cached(NODE_STATS)?;
            let rows = stmt.query_map([], |r| {
                Ok(NodeStats {
                    node_id: r.get(0)?,
                    received_at_ms: r.get(1)?,
                    calls: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// `EXPLAIN QUERY PLAN` of a customer query, one line per step: how the tests (and an
    /// operator) check that a filter is an index search.
    pub fn explain(&self, query: &CallQuery) -> rusqlite::Result<Vec<String>> {
        let (sql, values) = build(query);
        self.with_connection(|conn| {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |r| {
                r.get::<_, String>(3)
            })?;
            rows.collect()
        })
    }
}

/// The WAL file beside the database at `path`.
fn wal_of(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The nodes not stale at `stale_cutoff_ms`, by node id.
fn current_nodes(conn: &Connection, stale_cutoff_ms: i64) -> rusqlite::Result<Vec<NodeGeneration>> {
    conn.prepare_cached(SCRAPE_NODES)?
        .query_map([stale_cutoff_ms], |r| {
            Ok(NodeGeneration {
                node_id: r.get(0)?,
                changed_in: r.get(1)?,
            })
        })?
        .collect()
}

/// Writes a row of [`SCRAPE_CALLS`] or [`LISTED_CALLS`] as a JSON object.
fn write_scrape_row(out: &mut Vec<u8>, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
    write_row(out, row, &SCRAPE_KEYS, 0)?;
    write_row(out, row, &ROW_KEYS[1..], SCRAPE_KEYS.len())?;
    out.push(b'}');
    Ok(())
}

/// Writes columns `first..` of `row`, each after its key from `keys`.
fn write_row(
    out: &mut Vec<u8>,
    row: &rusqlite::Row<'_>,
    keys: &[&str],
    first: usize,
) -> rusqlite::Result<()> {
    for (i, key) in keys.iter().enumerate() {
        out.extend_from_slice(key.as_bytes());
        write_json_value(out, row.get_ref(first + i)?);
    }
    Ok(())
}

fn write_json_value(out: &mut Vec<u8>, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.extend_from_slice(b"null"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(f) => {
            let _ = write!(out, "{f}");
        }
        ValueRef::Text(t) | ValueRef::Blob(t) => write_json_string(out, t),
    }
}

/// Writes a JSON string the way the central API (Rails) does: besides the mandatory
/// escapes, `<`, `>`, `&`, U+2028 and U+2029 are escaped as `\uXXXX`.
pub fn write_json_string(out: &mut Vec<u8>, text: &[u8]) {
    /// Bytes that may need an escape: the ASCII ones to escape, and 0xE2, which starts
    /// U+2028 and U+2029. Every other byte is copied as it is, in runs.
    fn special(b: u8) -> bool {
        b < 0x20 || matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&' | 0xE2)
    }
    out.push(b'"');
    let mut copied = 0;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if !special(b) {
            i += 1;
            continue;
        }
        out.extend_from_slice(&text[copied..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0xE2 if text.get(i + 1) == Some(&0x80)
                && matches!(text.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                let last = if text[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                };
                out.extend_from_slice(last);
                i += 2;
            }
            0xE2 => out.push(b),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            }
        }
        i += 1;
        copied = i;
    }
    out.extend_from_slice(&text[copied..]);
    out.push(b'"');
}

/// A read connection, with its page cache bounded.
fn open_reader(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = open(path, flags)?;
    conn.pragma_update(None, "cache_size", -8 * 1024)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_at_rest_is_read_whatever_its_path_holds() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("a b?c%41#d;e");
        std::fs::create_dir(&folder).unwrap();
        let relative_dir = tempfile::tempdir_in(".").unwrap();
        let relative = relative_dir
            .path()
            .strip_prefix(std::env::current_dir().unwrap())
            .unwrap()
            .join("calls?.db");
        let doubled = PathBuf::from(format!("/{}", folder.join("calls.db").display()));
        for path in [folder.join("calls#1.db"), doubled, relative] {
            drop(Writer::open(&path).unwrap());
            assert!(
                !Readers::may_be_written(&path),
                "{}: a WAL left",
                path.display()
            );
            let readers = Readers::at_rest(&path);
            assert_eq!(readers.node_stats().unwrap(), [], "{}", path.display());
            assert!(!Readers::may_be_written(&path), "{}", path.display());
        }
    }

    #[test]
    fn readers_open_at_most_their_cap_whatever_the_demand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.db");
        let _writer = Writer::open(&path).unwrap();
        let readers = Readers::new(&path);
        let (busy, most) = (
            std::sync::atomic::AtomicUsize::new(0),
            std::sync::atomic::AtomicUsize::new(0),
        );
        std::thread::scope(|scope| {
            for _ in 0..(MAX_OPEN_READERS * 3) {
                scope.spawn(|| {
                    readers
                        .with_connection(|conn| {
                            let now = busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(30));
                            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                        })
                        .unwrap();
                });
            }
        });
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most <= MAX_OPEN_READERS && most > 1, "{most} at once");
        assert!(*readers.open.lock().unwrap() <= MAX_IDLE_READERS);
    }

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
    fn a_scrape_reads_in_index_order_without_sorting() {
        // A sort would hold every call in memory before the first row goes out.
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {SCRAPE_CALLS}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map([0], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        assert!(
            plan.iter().any(|step| step.contains("calls_by_node")),
            "{plan:?}"
        );
    }

    #[test]
    fn upper_bounds_cover_exactly_the_prefix() {
        assert_eq!(prefix_upper_bound(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
        assert_eq!(prefix_upper_bound(b""), None);
    }

    #[test]
    fn json_strings_escape_like_rails() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"b\\c\n<sip:1@x>&\u{1}\u{2028}Zoë".as_bytes());
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#""a\"b\\c\n\u003csip:1@x\u003e\u0026\u0001\u2028Zoë""#
        );
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\n<sip:1@x>&\u{1}\u{2028}Zoë");
    }
}
