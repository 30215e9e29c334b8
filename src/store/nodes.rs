//! The nodes table: when each node was last heard, its learned period, and so when its
//! calls stop being current (SPEC 2.2, 2.5).
//!
//! A node sends nothing when it has no calls, so its silence is the only sign that its
//! last calls ended. How long a silence means that depends on the node: a switch posting
//! every 5 s and one posting every 60 s cannot share one limit that is both quick and
//! safe. So the writer learns each node's period from the `snapshot_timestamp`s of its
//! consecutive snapshots (the smallest of the last few gaps: a gap of several periods is a
//! period in which the node had no calls, or a snapshot lost), and stores the instant the
//! node expires. Every reader then asks one question, `expires_at_ms > now`, and the
//! writer's expiry removes what passed it.

use std::collections::VecDeque;

use rusqlite::{OptionalExtension, params};

use super::Staleness;
use super::stored::IntMap;
use crate::clock::parse_datetime;

/// A node a snapshot contains. ?7 is its silence limit (from its period, ?6); ?5 the
/// snapshot's generation, which the node takes when its calls changed (?8), or when their
/// shared timestamp did and a call shows it (a node without calls shows nothing, whatever
/// its timestamp). A file read at start is dated by its modification time, which may be
/// older than an event heard since: the node was heard at the later of the two.
const PUT_NODE: &str = "INSERT INTO nodes (node_id, received_at_ms, heard_at_ms, expires_at_ms,
        snapshot_timestamp, period_ms, source, changed_in)
    VALUES (?1, ?2, ?2, ?2 + ?7, ?3, ?6, ?4, ?5)
    ON CONFLICT (node_id) DO UPDATE SET
      received_at_ms = excluded.received_at_ms,
      heard_at_ms = max(heard_at_ms, excluded.heard_at_ms),
      expires_at_ms = max(heard_at_ms, excluded.heard_at_ms) + ?7,
      snapshot_timestamp = excluded.snapshot_timestamp,
      period_ms = excluded.period_ms,
      source = excluded.source,
      changed_in = CASE WHEN ?8 OR (snapshot_timestamp IS NOT excluded.snapshot_timestamp
                                   AND EXISTS (SELECT 1 FROM calls
                                               WHERE calls.node_id = ?1
                                                 AND calls.snapshot_timestamp IS NULL))
                        THEN excluded.changed_in ELSE changed_in END";
/// A node heard from by a call event at ?2: its silence limit ?3 counts from then; ?4 is
/// the generation it takes when the events changed its calls (?5). A node new to the agent
/// has no snapshot yet.
const TOUCH_NODE: &str = "INSERT INTO nodes (node_id, received_at_ms, heard_at_ms, expires_at_ms,
        snapshot_timestamp, period_ms, source, changed_in)
    VALUES (?1, NULL, ?2, ?2 + ?3, NULL, NULL, 'events', ?4)
    ON CONFLICT (node_id) DO UPDATE SET
      heard_at_ms = max(heard_at_ms, excluded.heard_at_ms),
      expires_at_ms = max(expires_at_ms, excluded.expires_at_ms),
      changed_in = CASE WHEN ?5 THEN excluded.changed_in ELSE changed_in END";
/// What a node's update starts from: its latest snapshot's timestamp and its period.
const NODE_ROW: &str = "SELECT snapshot_timestamp, period_ms FROM nodes WHERE node_id = ?1";
const NODE_PERIOD: &str = "SELECT period_ms FROM nodes WHERE node_id = ?1";
const ALL_NODES: &str = "SELECT node_id, heard_at_ms, period_ms FROM nodes";
const SET_EXPIRY: &str = "UPDATE nodes SET expires_at_ms = ?2 WHERE node_id = ?1";
pub(super) const STALE_NODES: &str = "SELECT node_id FROM nodes WHERE expires_at_ms <= ?1";
const EXPIRED_NODE: &str = "SELECT 1 FROM nodes WHERE node_id = ?1 AND expires_at_ms <= ?2";
/// A node's calls, but those a call event made or changed after ?2 (a file's time).
const DELETE_NODE_CALLS: &str =
    "DELETE FROM calls WHERE node_id = ?1 AND (event_ms IS NULL OR event_ms <= ?2)";
const NODE_HAS_CALLS: &str = "SELECT EXISTS (SELECT 1 FROM calls WHERE node_id = ?1)";
const DELETE_NODE: &str = "DELETE FROM nodes WHERE node_id = ?1";
const SET_CHANGED: &str = "UPDATE nodes SET changed_in = ?2 WHERE node_id = ?1";

/// The node's stored period, if it has one.
pub(super) fn period_ms(
    conn: &rusqlite::Connection,
    node_id: i64,
) -> rusqlite::Result<Option<i64>> {
    Ok(conn
        .prepare_cached(NODE_PERIOD)?
        .query_row([node_id], |r| r.get(0))
        .optional()?
        .flatten())
}

/// Gaps a period is learned from: the smallest of the last this many.
const RECENT_GAPS: usize = 4;
/// The longest gap that can be a period: SEMS's periods are 5–60 s, and a longer gap is
/// time the node had no calls to send (or the agent was down), not its rhythm.
const MAX_PERIOD_MS: i64 = 180_000;

/// The last few gaps between each node's snapshots, in memory (a restart starts again
/// from the stored period alone).
#[derive(Default)]
pub(super) struct Periods {
    gaps: IntMap<i64, VecDeque<i64>>,
}

impl Periods {
    /// The node's period after a snapshot dated `timestamp` follows one dated `before`
    /// (`stored`: the period known before it).
    fn learn(
        &mut self,
        node_id: i64,
        before: Option<&str>,
        timestamp: &str,
        stored: Option<i64>,
    ) -> Option<i64> {
        let gaps = self
            .gaps
            .entry(node_id)
            .or_insert_with(|| stored.into_iter().collect());
        let seconds = |text: Option<&str>| text.and_then(parse_datetime);
        if let (Some(before), Some(now)) = (seconds(before), seconds(Some(timestamp))) {
            let gap = now.saturating_sub(before).saturating_mul(1000);
            // A resend (the same date) or a late one says nothing of the rhythm.
            if (1..=MAX_PERIOD_MS).contains(&gap) {
                if gaps.len() == RECENT_GAPS {
                    gaps.pop_front();
                }
                gaps.push_back(gap);
            }
        }
        gaps.iter().copied().min().or(stored)
    }

    pub fn forget(&mut self, node_id: i64) {
        self.gaps.remove(&node_id);
    }
}

/// Records a snapshot of `node_id` received at `received_ms`, dated `timestamp`: its
/// period learned, its expiry moved. Returns the timestamp it had before (to tell a repeat).
#[allow(clippy::too_many_arguments)]
pub(super) fn put(
    tx: &rusqlite::Transaction<'_>,
    periods: &mut Periods,
    staleness: Staleness,
    node_id: i64,
    received_ms: i64,
    timestamp: &str,
    source: &str,
    generation: i64,
    changed: bool,
) -> rusqlite::Result<Option<String>> {
    let (before, stored): (Option<String>, Option<i64>) = tx
        .prepare_cached(NODE_ROW)?
        .query_row([node_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or_default();
    let period = periods.learn(node_id, before.as_deref(), timestamp, stored);
    tx.prepare_cached(PUT_NODE)?.execute(params![
        node_id,
        received_ms,
        timestamp,
        source,
        generation,
        period,
        staleness.limit_ms(period),
        changed,
    ])?;
    Ok(before)
}

/// Records call events of `node_id` received up to `heard_ms`; `changed`: they changed
/// what its calls show, as of `generation`.
pub(super) fn touch(
    tx: &rusqlite::Transaction<'_>,
    staleness: Staleness,
    node_id: i64,
    heard_ms: i64,
    generation: i64,
    changed: bool,
) -> rusqlite::Result<()> {
    let period = period_ms(tx, node_id)?;
    tx.prepare_cached(TOUCH_NODE)?.execute(params![
        node_id,
        heard_ms,
        staleness.limit_ms(period),
        generation,
        changed
    ])?;
    Ok(())
}

/// Whether `node_id` had expired by `at_ms` (its calls not shown, though maybe not yet
/// removed): what an event from it finds must not bring those calls back.
pub(super) fn expired(
    conn: &rusqlite::Connection,
    node_id: i64,
    at_ms: i64,
) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached(EXPIRED_NODE)?
        .query_row(params![node_id, at_ms], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Removes the calls of `node_id` but those a call event made or changed after `after_ms`
/// (`i64::MAX`: all), and the node itself once it has none. How many calls went.
pub(super) fn remove(
    tx: &rusqlite::Transaction<'_>,
    periods: &mut Periods,
    node_id: i64,
    after_ms: i64,
) -> rusqlite::Result<usize> {
    let removed = tx
        .prepare_cached(DELETE_NODE_CALLS)?
        .execute(params![node_id, after_ms])?;
    let left: bool = tx
        .prepare_cached(NODE_HAS_CALLS)?
        .query_row([node_id], |r| r.get(0))?;
    if !left {
        tx.prepare_cached(DELETE_NODE)?.execute([node_id])?;
        periods.forget(node_id);
    }
    Ok(removed)
}

/// Records that what the calls of `node_id` show changed in `generation` (when it is still
/// a node: [`remove`] may have removed it).
pub(super) fn changed(
    tx: &rusqlite::Transaction<'_>,
    node_id: i64,
    generation: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(SET_CHANGED)?
        .execute(params![node_id, generation])?;
    Ok(())
}

/// Sets every node's expiry by `staleness`: at start, from a configuration that may have
/// changed since the nodes were stored.
pub(super) fn set_expiries(
    conn: &rusqlite::Connection,
    staleness: Staleness,
) -> rusqlite::Result<()> {
    let nodes: Vec<(i64, i64, Option<i64>)> = conn
        .prepare(ALL_NODES)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut set = conn.prepare(SET_EXPIRY)?;
    for (node_id, heard_ms, period) in nodes {
        set.execute(params![
            node_id,
            heard_ms.saturating_add(staleness.limit_ms(period))
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_is_the_smallest_recent_gap() {
        let mut periods = Periods::default();
        let at = |s: i64| crate::clock::format_datetime(1_764_081_000 + s);
        let mut learn = |before: i64, now: i64| periods.learn(7, Some(&at(before)), &at(now), None);
        assert_eq!(learn(0, 5), Some(5_000));
        // A period with no calls (nothing sent) is a gap of two: the period stays.
        assert_eq!(learn(5, 15), Some(5_000));
        // Resent, or hours apart: no period.
        assert_eq!(learn(15, 15), Some(5_000));
        assert_eq!(learn(15, 4000), Some(5_000));
        // A longer period replaces it once the shorter gaps are old.
        assert_eq!(learn(0, 60), Some(5_000));
        assert_eq!(learn(60, 120), Some(5_000));
        assert_eq!(learn(120, 180), Some(10_000));
        assert_eq!(learn(180, 240), Some(60_000));
        // Unknown until a gap is seen; a stored one stands until then.
        assert_eq!(periods.learn(8, None, &at(0), None), None);
        assert_eq!(periods.learn(9, None, &at(0), Some(2_000)), Some(2_000));
    }
}
