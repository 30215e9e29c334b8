//! Writing the store: one connection, one snapshot at a time, writing only what changed.
//!
//! The [`SnapshotTx`] finds each incoming call in the writer's picture of the stored calls
//! ([`Stored`]), compares the hash of its row and rewrites it only when it differs (and its
//! index entries only when an indexed value did); calls the snapshot no longer has are
//! deleted at commit, in account order. A snapshot that rewrites a large share of the
//! table drops the secondary indexes and sorts them anew at commit.
//!
//! A snapshot is the authority, call by call, except where a call event knows better
//! (SPEC 2.4): a call an event ended stays ended against a snapshot dated before the end
//! (and against a buffered row); a call an event started or answered after the snapshot's
//! date keeps what the event made of it, and is not removed for being absent.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags, params};

use super::events::{self, EventChanges, Heard};
use super::nodes::{self, Periods, STALE_NODES};
use super::stored::{IntMap, IntSet, Stored, StoredCall};
use super::values::CallValues;
use super::{Origin, SCHEMA, SCHEMA_VERSION, Staleness, open};
use crate::call::{CallRow, Event, LineKey};
use crate::clock::{format_datetime, parse_datetime, unix_millis};

pub(super) const INSERT_CALL: &str = "INSERT INTO calls (
    call_id, node_id, local_tag, customer_id, customer_acc_id, snapshot_timestamp, start_time, connect_time,
    destination_prefix, destination_initial_interval, destination_initial_rate,
    destination_next_interval, destination_next_rate, destination_fee,
    src_name_in, src_prefix_in, dst_prefix_in, src_prefix_routing, dst_prefix_routing,
    from_domain, to_domain, ruri_domain,
    diversion_in, pai_in, ppi_in, privacy_in, rpid_in, rpid_privacy_in,
    auth_orig_transport_protocol_id, auth_orig_ip, auth_orig_port,
    src_name_in_rev, src_prefix_in_rev, dst_prefix_in_rev, src_prefix_routing_rev, dst_prefix_routing_rev,
    row_hash, key_hash, line_key, event_ms
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
    ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35, ?36, ?37, ?38, ?39, ?40)";
/// A changed call whose indexed values did not change: its index entries stay as they are.
/// It takes the parameters of [`INSERT_CALL`], and uses those it needs.
pub(super) const UPDATE_CALL_VALUES: &str = "UPDATE calls SET
    customer_id = ?4, snapshot_timestamp = ?6, start_time = ?7, connect_time = ?8,
    destination_prefix = ?9, destination_initial_interval = ?10, destination_initial_rate = ?11,
    destination_next_interval = ?12, destination_next_rate = ?13, destination_fee = ?14,
    from_domain = ?20, to_domain = ?21, ruri_domain = ?22,
    diversion_in = ?23, pai_in = ?24, ppi_in = ?25, privacy_in = ?26, rpid_in = ?27, rpid_privacy_in = ?28,
    auth_orig_transport_protocol_id = ?29, auth_orig_ip = ?30, auth_orig_port = ?31,
    row_hash = ?37, key_hash = ?38, line_key = ?39, event_ms = ?40
  WHERE call_id = ?1";
/// An unchanged call whose line did change (a key the agent ignores): the new line's key
/// is kept, so that the call's next line takes the fast path.
const UPDATE_LINE_KEY: &str = "UPDATE calls SET line_key = ?2 WHERE call_id = ?1";
pub(super) const DELETE_CALL: &str = "DELETE FROM calls WHERE call_id = ?1";
const CHECKPOINT_PASSIVE: &str = "PRAGMA wal_checkpoint(PASSIVE)";
const CHECKPOINT_TRUNCATE: &str = "PRAGMA wal_checkpoint(TRUNCATE)";
/// The WAL's size on disk once no reader holds it: what one large apply writes, far
/// less than a 100k-call snapshot rewritten whole (it grows past this while it applies).
pub const WAL_KEEP_BYTES: u64 = 64 << 20;
pub(super) const NEXT_GENERATION: &str = "UPDATE generation SET last = last + 1 RETURNING last";
/// A call an event ended, brought back by a snapshot dated after the end: no longer
/// remembered as ended.
pub(super) const FORGET_ENDED: &str =
    "DELETE FROM ended_calls WHERE node_id = ?1 AND local_tag = ?2";
const NODES_OF_SOURCE: &str = "SELECT node_id FROM nodes WHERE source = ?1";
/// The indexes a bulk write drops: all of them (the writer finds stored calls in its own
/// memory, never through an index).
const CALLS_INDEXES: &str = "SELECT name, sql FROM sqlite_schema
    WHERE type = 'index' AND tbl_name = 'calls' AND sql IS NOT NULL";
const CALLS_STATS: &str = "SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'calls'";
const PUT_CALLS_STAT: &str = "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('calls', ?1, ?2)";
const CLEAR_CALLS_STATS: &str = "DELETE FROM sqlite_stat1 WHERE tbl = 'calls'";

/// A snapshot that writes at least this many calls, and at least [`BULK_SHARE`] of the
/// table, drops the secondary indexes and builds them again at commit: sorting once beats
/// that many random index updates (see PERF-NOTES).
const BULK_MIN_WRITES: u64 = 5_000;
const BULK_SHARE: f64 = 0.3;

/// The one connection that writes, and what it knows of the stored calls.
pub struct Writer {
    pub(super) conn: Connection,
    /// The database file, to set it aside if SQLite finds it damaged.
    pub(super) path: std::path::PathBuf,
    /// The stored calls as the last committed snapshot left them, kept between snapshots
    /// so that an apply reads nothing it already knows. `None` until the first snapshot,
    /// after a failed one (its changes were rolled back, its picture is wrong), and after
    /// [`release_memory`](Self::release_memory).
    pub(super) stored: Option<Stored>,
    /// Whether unchanged lines are recognised by their key (see [`set_fast_path`](Self::set_fast_path)).
    fast_path: bool,
    /// When a silent node's calls stop being current.
    pub(super) staleness: Staleness,
    /// The recent gaps between each node's snapshots, its period learned from them.
    pub(super) periods: Periods,
    /// How long, and how many, calls ended by an event are remembered.
    pub(super) ended_limits: (std::time::Duration, usize),
    /// The secondary indexes a first snapshot into an empty store committed without: built
    /// by [`build_pending_indexes`](Self::build_pending_indexes) right after its answer.
    pub(super) pending_indexes: Option<DroppedIndexes>,
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
        // The pages an apply touches, read again and written, cost system calls each time
        // they fall out of the cache: a 100k-call period reads 148 MB and writes 128 MB with
        // 32 MB, 119 and 107 with 40, 109 and 100 with 48. 40 MB keeps the peak RSS of an
        // apply near 85 MB, under the 96 MB the agent is held to; 48 took it to 95.
        conn.pragma_update(None, "cache_size", -40 * 1024)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Index builds sort with a second thread.
        conn.pragma_update(None, "threads", 2)?;
        // The WAL is copied back into the database between snapshots (see `copy_back`),
        // not inside the commit that a waiting switch or reader is timing.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A WAL started again from its beginning is cut back to this size.
        conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES as i64)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let lacks_indexes = version == SCHEMA_VERSION && lacks_calls_indexes(&conn)?;
        if lacks_indexes {
            tracing::warn!(
                "the store lacks indexes (the agent stopped before a first snapshot's were \
                 built); rebuilding it empty: the next snapshot fills it"
            );
        }
        if version != SCHEMA_VERSION || lacks_indexes {
            if version != 0 && !lacks_indexes {
                tracing::warn!(
                    found = version,
                    want = SCHEMA_VERSION,
                    "store schema differs; rebuilding it empty"
                );
            }
            conn.execute_batch(&format!(
                "BEGIN; DROP TABLE IF EXISTS calls; DROP TABLE IF EXISTS nodes;
                 DROP TABLE IF EXISTS generation; DROP TABLE IF EXISTS ended_calls;
                 DROP TABLE IF EXISTS stream_key;
                 {SCHEMA} COMMIT;"
            ))
            .context("applying schema.sql")?;
        }
        Ok(Writer {
            conn,
            path: path.to_path_buf(),
            stored: None,
            fast_path: true,
            staleness: Staleness::Auto,
            periods: Periods::default(),
            ended_limits: (super::events::ENDED_FOR, super::events::ENDED_MAX),
            pending_indexes: None,
        })
    }

    /// Builds the indexes a snapshot into an empty store committed without, in a
    /// transaction of their own; whether there were any. Until then its calls are answered
    /// by reading the table, not the indexes: correct, slower, for about a second once
    /// after a start. The writer calls it before its next job, so every write meets its
    /// indexes. Failed (a full disk): kept, and tried again then.
    pub fn build_pending_indexes(&mut self) -> rusqlite::Result<bool> {
        let Some(dropped) = self.pending_indexes.take() else {
            return Ok(false);
        };
        let built = (|| {
            let tx = self.conn.transaction()?;
            rebuild_secondary_indexes(&tx, &dropped)?;
            tx.commit()
        })();
        if let Err(e) = built {
            self.pending_indexes = Some(dropped);
            return Err(e);
        }
        Ok(true)
    }

    /// Sets when a silent node's calls stop being current (the default: [`Staleness::Auto`]),
    /// for the nodes stored already too.
    pub fn set_staleness(&mut self, staleness: Staleness) -> rusqlite::Result<()> {
        self.staleness = staleness;
        nodes::set_expiries(&self.conn, staleness)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long `node_id` may stay silent before its calls stop being current (ms).
    pub fn silence_limit_ms(&self, node_id: i64) -> rusqlite::Result<i64> {
        Ok(self
            .staleness
            .limit_ms(nodes::period_ms(&self.conn, node_id)?))
    }

    /// Whether `node_id`'s calls are no longer current at `at_ms` (unix ms).
    pub fn expired_by(&self, node_id: i64, at_ms: i64) -> rusqlite::Result<bool> {
        nodes::expired(&self.conn, node_id, at_ms)
    }

    /// Starts applying one snapshot received at `received_at`.
    pub fn begin(
        &mut self,
        origin: Origin,
        received_at: SystemTime,
    ) -> rusqlite::Result<SnapshotTx<'_>> {
        // Every write meets the indexes: those owed to a first snapshot come first.
        self.build_pending_indexes()?;
        let received_at_ms = unix_millis(received_at);
        let Writer {
            conn,
            stored,
            fast_path,
            staleness,
            periods,
            ended_limits,
            pending_indexes,
            ..
        } = self;
        let tx = conn.transaction()?;
        let mut calls = match stored.take() {
            Some(calls) => calls,
            None => Stored::load(&tx)?,
        };
        calls.epoch += 1;
        // Into an empty store every row is new: the indexes are built once, from the first
        // row on, and after the commit (no reader needs them yet as much as the switch
        // needs its answer and the customers the calls).
        let empty = calls.calls.is_empty();
        let bulk_after = if empty {
            1
        } else {
            BULK_MIN_WRITES.max((calls.calls.len() as f64 * BULK_SHARE) as u64)
        };
        Ok(SnapshotTx {
            tx,
            keep: stored,
            defer_indexes: empty.then_some(pending_indexes),
            origin,
            received_at_ms,
            received_timestamp: format_datetime(received_at_ms.div_euclid(1000)),
            stored: calls,
            nodes: IntMap::default(),
            staleness: *staleness,
            periods,
            suppressed: 0,
            events: EventChanges::default(),
            heard: Heard::default(),
            ended_most: ended_limits.1,
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

    /// Removes the calls of every node that has expired by `now` (SPEC 2.2, 2.5: silence
    /// expires), and forgets the ended calls past their bound. Returns the nodes removed.
    pub fn expire(&mut self, now: SystemTime) -> rusqlite::Result<Vec<i64>> {
        let now_ms = unix_millis(now);
        self.forget_old_ended(now_ms)?;
        let tx = self.conn.transaction()?;
        let stale: Vec<i64> = tx
            .prepare_cached(STALE_NODES)?
            .query_map([now_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if stale.is_empty() {
            return Ok(stale);
        }
        // Rare: the writer reads the calls anew with the next snapshot.
        self.stored = None;
        for &node in &stale {
            nodes::remove(&tx, &mut self.periods, node, i64::MAX)?;
        }
        tx.commit()?;
        Ok(stale)
    }

    /// Checkpoints the WAL into the database file and empties it (at shutdown).
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch(CHECKPOINT_TRUNCATE)
    }

    /// Copies the WAL back into the database file on the writer's own connection (the
    /// agent does it on the [`Checkpointer`](super::Checkpointer)'s thread instead).
    pub fn copy_back(&self) -> rusqlite::Result<()> {
        copy_back(&self.conn, &self.path)
    }

    /// Copies the WAL back and cuts it to nothing, unless a reader is still in it: then it
    /// is left for the next try, without waiting for the reader.
    fn empty_wal(&self) -> rusqlite::Result<()> {
        empty_wal(&self.conn)
    }

    /// Whether the WAL is larger than it is kept (a reader held it): worth a copy back.
    pub fn wal_oversized(&self) -> bool {
        std::fs::metadata(super::wal_of(&self.path)).is_ok_and(|m| m.len() > WAL_KEEP_BYTES)
    }

    /// Gives back what an apply holds between snapshots, the writer's picture of the
    /// stored calls and the page cache, to SQLite's allocator and from there to the
    /// system, and the WAL's disk: an idle agent beside a busy switch stays small.
    pub fn release_memory(&mut self) -> rusqlite::Result<()> {
        self.stored = None;
        // The disk too: an idle agent's WAL is of no use until the next write.
        self.empty_wal()?;
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

/// Copies what the WAL holds back into the database file at `path` through `conn`,
/// without waiting for readers (they keep what they read) or the writer. A WAL grown past
/// [`WAL_KEEP_BYTES`] (a read held open while snapshots applied) is emptied once no
/// reader is in it, so its disk is given back.
pub(super) fn copy_back(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    let (busy, frames, copied): (i64, i64, i64) = conn.query_row(CHECKPOINT_PASSIVE, [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    let wal = std::fs::metadata(super::wal_of(path)).map_or(0, |m| m.len());
    if busy == 0 && frames == copied && wal > WAL_KEEP_BYTES {
        empty_wal(conn)?;
    }
    Ok(())
}

/// Copies the WAL back and cuts it to nothing, unless a reader (or the writer) is in it:
/// then it is left for the next try, without waiting.
fn empty_wal(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let truncated = conn.query_row(CHECKPOINT_TRUNCATE, [], |r| r.get::<_, i64>(0));
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    truncated.map(drop)
}

/// What a committed snapshot changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub nodes: Vec<i64>,
    /// Nodes the snapshot file fed before and no longer names, whose calls it removed.
    pub dropped: Vec<i64>,
    pub written: u64,
    pub removed: u64,
    /// Rows of calls an event ended that the snapshot would have brought back (SPEC 2.4).
    pub suppressed: u64,
    /// The call events applied in the snapshot's transaction.
    pub events: EventChanges,
    /// Whether the secondary indexes were rebuilt instead of updated.
    pub rebuilt_indexes: bool,
    /// Whether the store held this very snapshot already: every node of it had its
    /// snapshot timestamp, and no call changed (the snapshot file applied again at a
    /// start, a switch's resend of a POST). Its rows went to the relay the first time.
    pub repeat: bool,
}

/// The secondary indexes dropped for a bulk write, with their planner statistics.
pub(super) struct DroppedIndexes {
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
    /// Where indexes not rebuilt at the commit go (into an empty store: see
    /// [`Writer::build_pending_indexes`]); `None` when they are rebuilt in the snapshot.
    defer_indexes: Option<&'w mut Option<DroppedIndexes>>,
    origin: Origin,
    received_at_ms: i64,
    received_timestamp: String,
    stored: Stored,
    /// The nodes this snapshot contains, with their snapshot timestamp (its first row's).
    nodes: IntMap<i64, Option<String>>,
    staleness: Staleness,
    periods: &'w mut Periods,
    /// Rows not applied because an event ended their call.
    suppressed: u64,
    /// Call events applied in this snapshot's transaction, and their nodes.
    events: EventChanges,
    heard: Heard,
    /// How many ended calls are remembered at most.
    ended_most: usize,
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
        let Some(call) = self.stored.calls.get_mut(&call_id) else {
            return Ok(false);
        };
        if call.own_timestamp || call.seen_in == epoch {
            return Ok(false);
        }
        let (nodes, received) = (&mut self.nodes, &self.received_timestamp);
        if own_timestamp(nodes, received, call.node_id, key.snapshot_timestamp) {
            return Ok(false);
        }
        call.seen_in = epoch;
        Ok(true)
    }

    /// Adds or updates one call; the last row of a repeated call wins. `line_key` is the
    /// key of the line it was read from, kept for the fast path of the next snapshot.
    /// Where an event knows the call better (SPEC 2.4), the row changes nothing.
    pub fn put(&mut self, row: &CallRow<'_>, line_key: Option<i64>) -> rusqlite::Result<()> {
        let line_key = line_key.filter(|_| self.fast_path);
        let own = own_timestamp(
            &mut self.nodes,
            &self.received_timestamp,
            row.node_id,
            row.snapshot_timestamp.as_deref(),
        );
        let row_timestamp = row
            .snapshot_timestamp
            .as_deref()
            .unwrap_or(&self.received_timestamp);
        let dated_ms = timestamp_ms(row_timestamp);
        let tag = self.stored.tag_hash(row.node_id, row.local_tag.as_bytes());
        if let Some(&ended_at) = self.stored.ended.get(&tag) {
            if row.buffered || dated_ms < ended_at {
                self.suppressed += 1;
                return Ok(());
            }
            // A snapshot after the end still has it: the snapshot is the newer word.
            self.tx
                .prepare_cached(FORGET_ENDED)?
                .execute(params![row.node_id, row.local_tag])?;
            self.stored.ended.remove(&tag);
        }
        let epoch = self.stored.epoch;
        let known = self.stored.find(tag);
        if let Some((call_id, call)) = known
            && call.event_ms.is_some_and(|event| dated_ms < event)
        {
            // An event answered or started it after this snapshot was taken.
            if let Some(call) = self.stored.calls.get_mut(&call_id) {
                call.seen_in = epoch;
            }
            return Ok(());
        }
        let values = CallValues::of(row, own.then_some(row_timestamp), line_key, None);
        let (key_hash, row_hash) = (values.key_hash, values.row_hash);
        let updated = StoredCall {
            node_id: row.node_id,
            tag,
            account: row.customer_acc_id,
            row_hash,
            key_hash,
            line_key,
            own_timestamp: own,
            seen_in: epoch,
            event_ms: None,
        };
        if let Some((call_id, call)) = known {
            if let Some(old) = call.line_key.filter(|old| Some(*old) != line_key) {
                // The stored line no longer stands for this call: a repeat of it later in
                // this snapshot must not pass as unchanged.
                self.retired_lines.insert(old);
            }
            let same_account = call.account == row.customer_acc_id;
            if same_account && call.row_hash == row_hash && call.event_ms.is_none() {
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
                values.write(&self.tx, UPDATE_CALL_VALUES, call_id)?;
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
        values.write(&self.tx, INSERT_CALL, call_id)?;
        self.stored.insert(call_id, updated);
        self.new_lines.extend(line_key.map(|line| (line, call_id)));
        if self.written >= self.bulk_after && self.dropped_indexes.is_none() {
            self.dropped_indexes = Some(drop_secondary_indexes(&self.tx)?);
        }
        Ok(())
    }

    /// Applies call events that came while this snapshot applies, in its transaction: they
    /// show when it commits, instead of waiting behind it. The rules that reconcile a
    /// snapshot with events hold whichever comes first within it.
    pub fn apply_events(&mut self, events: &[Event]) -> rusqlite::Result<()> {
        let snapshot_nodes = &self.nodes;
        for event in events {
            let changed = events::apply(
                &self.tx,
                &mut self.stored,
                event,
                &mut self.retired_lines,
                self.periods,
                &|node| snapshot_nodes.contains_key(&node),
                &mut self.events,
            )?;
            self.heard.note(event, changed);
            if changed {
                self.changed_nodes.insert(event.node_id);
            }
        }
        Ok(())
    }

    /// Deletes the calls the snapshot no longer has, records its nodes, rebuilds dropped
    /// indexes, and makes it all visible at once.
    pub fn commit(mut self) -> rusqlite::Result<Changes> {
        let mut changes = Changes {
            written: self.written,
            suppressed: self.suppressed,
            rebuilt_indexes: self.dropped_indexes.is_some(),
            ..Changes::default()
        };
        changes.removed += self.delete_gone()?;
        let dropped = self.drop_unnamed_nodes(&mut changes)?;
        // Rare: the writer reads the calls anew with the next snapshot.
        let forget = !dropped.is_empty();
        // After the deletes, which then had no index entries to remove.
        if let Some(dropped) = &self.dropped_indexes
            && self.defer_indexes.is_none()
        {
            rebuild_secondary_indexes(&self.tx, dropped)?;
        }
        let generation: i64 = self
            .tx
            .prepare_cached(NEXT_GENERATION)?
            .query_row([], |r| r.get(0))?;
        self.record_nodes(&mut changes, &dropped, generation)?;
        // After the snapshot's own: a node both sent is heard at the later of the two.
        self.events.nodes = self.heard.touch(&self.tx, self.staleness, generation)?;
        events::trim_ended(&self.tx, &mut self.stored, self.ended_most)?;
        changes.events = std::mem::take(&mut self.events);
        changes.dropped = dropped;
        self.tx.commit()?;
        if let (Some(pending), Some(dropped)) = (self.defer_indexes, self.dropped_indexes) {
            *pending = Some(dropped);
        }
        if !forget {
            // The reader thread has ended: the line keys are the writer's alone again.
            renew_line_keys(&mut self.stored, &self.retired_lines, &self.new_lines);
            *self.keep = Some(self.stored);
        }
        changes.nodes.sort_unstable();
        Ok(changes)
    }

    /// Deletes the calls of its nodes that the snapshot no longer has (but those an event
    /// started or answered after it was taken); how many.
    fn delete_gone(&mut self) -> rusqlite::Result<u64> {
        let mut removed = 0;
        let mut delete = self.tx.prepare_cached(DELETE_CALL)?;
        for (_, call_id) in self.gone() {
            removed += delete.execute([call_id])? as u64;
            if let Some(call) = self.stored.remove(call_id) {
                self.changed_nodes.insert(call.node_id);
                if let Some(line) = call.line_key {
                    self.retired_lines.insert(line);
                }
            }
        }
        Ok(removed)
    }

    /// The calls [`delete_gone`](Self::delete_gone) deletes, as (account, id), in account
    /// order: consecutive deletes then touch neighbouring entries of every (account, …)
    /// index.
    fn gone(&self) -> Vec<(i64, i64)> {
        // Each node's date, against which an event's knowledge of a call is newer or not.
        let dated: IntMap<i64, i64> = self
            .nodes
            .iter()
            .map(|(&node, timestamp)| {
                let timestamp = timestamp.as_deref().unwrap_or(&self.received_timestamp);
                (node, timestamp_ms(timestamp))
            })
            .collect();
        let epoch = self.stored.epoch;
        let mut gone: Vec<(i64, i64)> = self
            .stored
            .calls
            .iter()
            .filter(|(_, c)| {
                c.seen_in != epoch
                    && dated
                        .get(&c.node_id)
                        .is_some_and(|&dated| c.event_ms.is_none_or(|event| event <= dated))
            })
            .map(|(&id, c)| (c.account, id))
            .collect();
        gone.sort_unstable();
        gone
    }

    /// The snapshot file is the whole state of the nodes it feeds: a node it fed before and
    /// no longer names has no calls, but those call events started or answered after the
    /// file was written. Removes them (counted in `changes`); the nodes that had some.
    fn drop_unnamed_nodes(&mut self, changes: &mut Changes) -> rusqlite::Result<Vec<i64>> {
        let mut dropped = Vec::new();
        if self.origin != Origin::File {
            return Ok(dropped);
        }
        let fed_before: Vec<i64> = self
            .tx
            .prepare_cached(NODES_OF_SOURCE)?
            .query_map([Origin::File.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for &node in fed_before.iter().filter(|n| !self.nodes.contains_key(n)) {
            let removed = nodes::remove(&self.tx, self.periods, node, self.received_at_ms)?;
            changes.removed += removed as u64;
            if removed > 0 {
                dropped.push(node);
            }
        }
        Ok(dropped)
    }

    /// Records the snapshot's nodes at `generation` (and the `dropped` ones as changed),
    /// and whether it was a repeat of what the store held.
    fn record_nodes(
        &mut self,
        changes: &mut Changes,
        dropped: &[i64],
        generation: i64,
    ) -> rusqlite::Result<()> {
        changes.repeat = changes.written == 0 && changes.removed == 0 && !self.nodes.is_empty();
        for (node_id, timestamp) in &self.nodes {
            let timestamp = timestamp.as_deref().unwrap_or(&self.received_timestamp);
            let before = nodes::put(
                &self.tx,
                self.periods,
                self.staleness,
                *node_id,
                self.received_at_ms,
                timestamp,
                self.origin.as_str(),
                generation,
                self.changed_nodes.contains(node_id),
            )?;
            changes.repeat &= before.as_deref() == Some(timestamp);
            changes.nodes.push(*node_id);
        }
        for &node in dropped {
            nodes::changed(&self.tx, node, generation)?;
        }
        Ok(())
    }
}

/// Whether a row of `node_id` with snapshot timestamp `row` (`None`: the receive time,
/// `received`) keeps a timestamp of its own: the first row of a node sets the node's in
/// `nodes` (the snapshot's nodes).
fn own_timestamp(
    nodes: &mut IntMap<i64, Option<String>>,
    received: &str,
    node_id: i64,
    row: Option<&str>,
) -> bool {
    let row = row.unwrap_or(received);
    match nodes.entry(node_id).or_default() {
        Some(node) => node != row,
        node => {
            *node = Some(row.to_owned());
            false
        }
    }
}

/// Once a snapshot committed, its line keys in `stored`: the lines of the calls it rewrote
/// or removed (`retired`) go, and its new ones come.
fn renew_line_keys(stored: &mut Stored, retired: &IntSet<i64>, new_lines: &[(i64, i64)]) {
    let by_line = Arc::make_mut(&mut stored.by_line);
    for line in retired {
        by_line.remove(line);
    }
    for &(line, call_id) in new_lines {
        // Only a line its call still has (a call rewritten twice in one snapshot left a
        // line behind).
        if stored
            .calls
            .get(&call_id)
            .is_some_and(|c| c.line_key == Some(line))
        {
            by_line.insert(line, call_id);
        }
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

/// Whether the store has fewer indexes on `calls` than [`SCHEMA`] makes.
fn lacks_calls_indexes(conn: &Connection) -> rusqlite::Result<bool> {
    let count = |conn: &Connection| -> rusqlite::Result<usize> {
        Ok(conn
            .prepare(CALLS_INDEXES)?
            .query_map([], |_| Ok(()))?
            .count())
    };
    let reference = Connection::open_in_memory()?;
    reference.execute_batch(SCHEMA)?;
    Ok(count(conn)? < count(&reference)?)
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

/// The unix milliseconds of a stored `YYYY-MM-DD hh:mm:ss` (the feed checked its form; a
/// text that is not one would be older than any event).
pub(super) fn timestamp_ms(text: &str) -> i64 {
    parse_datetime(text).map_or(i64::MIN, |seconds| seconds.saturating_mul(1000))
}
