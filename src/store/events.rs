//! Applying call events (SPEC 2.4): a batch of them in one transaction.
//!
//! Events arrive one per request, hundreds a second on a busy node, and must be visible
//! within milliseconds: the writer takes whatever has queued since its last commit and
//! applies it as one transaction, so a burst costs one commit, not one each. Each event
//! touches one call through the writer's picture of the stored calls ([`Stored`]), which it
//! keeps up to date, so the next snapshot still finds every call without a query.
//!
//! What an event changes is marked on the call (`event_ms`, the switch's time of it) and,
//! for an end, remembered apart (`ended_calls`), so that a snapshot taken before it cannot
//! undo it (`write`). That memory is bounded in time and count: a snapshot dated before an
//! end arrives within a period or two, and a lost one is healed by the next snapshot anyway.

use std::borrow::Cow;
use std::time::Duration;

use rusqlite::params;

use super::Staleness;
use super::nodes;
use super::nodes::Periods;
use super::stored::{IntMap, IntSet, Stored, StoredCall, TagHash};
use super::values::CallValues;
use super::write::{DELETE_CALL, INSERT_CALL, NEXT_GENERATION, UPDATE_CALL_VALUES, Writer};
use crate::call::{CallRow, Event, EventKind};
use crate::clock::{format_datetime, unix_millis};

/// How long a call an event ended is remembered: far longer than the periods (5–60 s)
/// within which a snapshot taken before the end can still arrive.
pub const ENDED_FOR: Duration = Duration::from_secs(600);
/// How many ended calls are remembered at most (the oldest go first): ten minutes of a
/// node ending ~170 calls a second, a few megabytes.
pub const ENDED_MAX: usize = 100_000;

const REMEMBER_ENDED: &str =
    "INSERT INTO ended_calls (node_id, local_tag, ended_at_ms, heard_at_ms) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (node_id, local_tag) DO UPDATE SET
      ended_at_ms = max(ended_at_ms, excluded.ended_at_ms), heard_at_ms = excluded.heard_at_ms";
const FORGET_ENDED_BEFORE: &str =
    "DELETE FROM ended_calls WHERE heard_at_ms <= ?1 RETURNING node_id, local_tag";
/// All but the ?1 most recently heard (ties at the boundary go too).
const FORGET_OLDEST_ENDED: &str = "DELETE FROM ended_calls WHERE heard_at_ms <=
    (SELECT heard_at_ms FROM ended_calls ORDER BY heard_at_ms DESC LIMIT 1 OFFSET ?1)
    RETURNING node_id, local_tag";
/// A stored call in full, as a row of the feed would carry it.
const SELECT_CALL: &str = "SELECT node_id, local_tag, customer_id, customer_acc_id,
    snapshot_timestamp, start_time, connect_time, destination_prefix,
    destination_initial_interval, destination_initial_rate, destination_next_interval,
    destination_next_rate, destination_fee, src_name_in, src_prefix_in, dst_prefix_in,
    src_prefix_routing, dst_prefix_routing, from_domain, to_domain, ruri_domain,
    diversion_in, pai_in, ppi_in, privacy_in, rpid_in, rpid_privacy_in,
    auth_orig_transport_protocol_id, auth_orig_ip, auth_orig_port
  FROM calls WHERE call_id = ?1";

/// What a committed batch of events did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventChanges {
    /// Events that changed a call (made, answered or ended it).
    pub changed: u64,
    /// Events that changed nothing: the call was known already, ended already, or not
    /// known to end; or a snapshot had said more already.
    pub unchanged: u64,
    /// The nodes the events came from.
    pub nodes: Vec<i64>,
    /// The calls the events changed, in their order: what live streams look at again.
    pub calls: Vec<ChangedCall>,
    /// Nodes an event found expired, whose old calls it removed before applying itself.
    pub cleared: Vec<i64>,
}

/// A call an event made, answered or ended, and the account it was on (live streams of
/// other accounts need not look at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedCall {
    pub node_id: i64,
    pub local_tag: String,
    pub account: i64,
}

impl Writer {
    /// Applies `events`, in their order, in one transaction.
    pub fn apply_events(&mut self, events: &[Event]) -> rusqlite::Result<EventChanges> {
        // Every write meets the indexes: those owed to a first snapshot come first.
        self.build_pending_indexes()?;
        let staleness = self.staleness;
        let tx = self.conn.transaction()?;
        let mut calls = match self.stored.take() {
            Some(calls) => calls,
            None => Stored::load(&tx)?,
        };
        let mut changes = EventChanges::default();
        let mut heard = Heard::default();
        let mut retired = IntSet::default();
        for event in events {
            let changed = apply(
                &tx,
                &mut calls,
                event,
                &mut retired,
                &mut self.periods,
                &|_| false,
                &mut changes,
            )?;
            heard.note(event, changed);
        }
        let generation: i64 = tx
            .prepare_cached(NEXT_GENERATION)?
            .query_row([], |r| r.get(0))?;
        changes.nodes = heard.touch(&tx, staleness, generation)?;
        trim_ended(&tx, &mut calls, self.ended_limits.1)?;
        tx.commit()?;
        if !retired.is_empty() {
            let by_line = std::sync::Arc::make_mut(&mut calls.by_line);
            for line in &retired {
                by_line.remove(line);
            }
        }
        self.stored = Some(calls);
        Ok(changes)
    }

    /// Forgets the calls events ended that were heard more than [`ENDED_FOR`] before `now_ms`.
    pub(super) fn forget_old_ended(&mut self, now_ms: i64) -> rusqlite::Result<()> {
        let cutoff = now_ms.saturating_sub(self.ended_limits.0.as_millis() as i64);
        let tx = self.conn.transaction()?;
        let forgotten = forget_ended(&tx, FORGET_ENDED_BEFORE, cutoff)?;
        tx.commit()?;
        if let Some(calls) = &mut self.stored {
            forget_in_memory(calls, forgotten);
        }
        Ok(())
    }
}

impl EventChanges {
    /// Counts `event`, and notes the call it changed (on `account`), if it did.
    fn count(&mut self, event: &Event, changed: Option<i64>) -> bool {
        match changed {
            Some(account) => {
                self.changed += 1;
                self.calls.push(ChangedCall {
                    node_id: event.node_id,
                    local_tag: event.local_tag.clone(),
                    account,
                });
                true
            }
            None => {
                self.unchanged += 1;
                false
            }
        }
    }
}

/// The nodes events came from: when each was heard last, and whether what its calls show
/// changed.
#[derive(Default)]
pub(super) struct Heard(IntMap<i64, (i64, bool)>);

impl Heard {
    pub fn note(&mut self, event: &Event, changed: bool) {
        let node = self.0.entry(event.node_id).or_insert((i64::MIN, false));
        node.0 = node.0.max(unix_millis(event.received_at));
        node.1 |= changed;
    }

    /// Records them in the nodes table (as of `generation`); the nodes, by id.
    pub fn touch(
        &self,
        tx: &rusqlite::Transaction<'_>,
        staleness: Staleness,
        generation: i64,
    ) -> rusqlite::Result<Vec<i64>> {
        for (&node_id, &(heard_ms, changed)) in &self.0 {
            nodes::touch(tx, staleness, node_id, heard_ms, generation, changed)?;
        }
        let mut ids: Vec<i64> = self.0.keys().copied().collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

/// Applies one event and counts it in `changes`; whether it changed a call. The line keys of the calls it changed go
/// into `retired` (the lines no longer stand for them), for the caller to forget once
/// committed: a snapshot's reader may hold the line keys meanwhile.
///
/// A node that had expired when the event came has its old calls removed first (the
/// writer's expiry may not have come to them yet), unless it is `fresh`: in the snapshot
/// being applied, which refreshes it.
pub(super) fn apply(
    tx: &rusqlite::Transaction<'_>,
    calls: &mut Stored,
    event: &Event,
    retired: &mut IntSet<i64>,
    periods: &mut Periods,
    fresh: &dyn Fn(i64) -> bool,
    changes: &mut EventChanges,
) -> rusqlite::Result<bool> {
    if !fresh(event.node_id) && nodes::expired(tx, event.node_id, unix_millis(event.received_at))? {
        nodes::remove(tx, periods, event.node_id, i64::MAX)?;
        retired.extend(calls.remove_node(event.node_id));
        changes.cleared.push(event.node_id);
    }
    let changed = apply_one(tx, calls, event, retired)?;
    Ok(changes.count(event, changed))
}

/// Applies one event to its call; the account of the call it changed, if it did.
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    calls: &mut Stored,
    event: &Event,
    retired: &mut IntSet<i64>,
) -> rusqlite::Result<Option<i64>> {
    let tag = calls.tag_hash(event.node_id, event.local_tag.as_bytes());
    let known = calls.find(tag);
    match (event.kind, known) {
        (EventKind::Disconnected, known) => {
            if let Some((call_id, call)) = known {
                tx.prepare_cached(DELETE_CALL)?.execute([call_id])?;
                retired.extend(call.line_key);
                calls.remove(call_id);
            }
            let received_ms = unix_millis(event.received_at);
            tx.prepare_cached(REMEMBER_ENDED)?.execute(params![
                event.node_id,
                event.local_tag,
                event.at_ms,
                received_ms
            ])?;
            let ended = calls.ended.entry(tag).or_insert(event.at_ms);
            *ended = (*ended).max(event.at_ms);
            Ok(known.map(|(_, call)| call.account))
        }
        // A late start or answer of a call that has ended already changes nothing.
        _ if calls.ended.contains_key(&tag) => Ok(None),
        (EventKind::Started, Some(_)) => Ok(None),
        (EventKind::Connected, Some((call_id, call))) => {
            let changed = answer(tx, calls, event, call_id, call)?;
            if changed {
                retired.extend(call.line_key);
            }
            Ok(changed.then_some(call.account))
        }
        (EventKind::Started | EventKind::Connected, None) => {
            let Some(made) = &event.call else {
                return Ok(None);
            };
            let row = made.row();
            let values = CallValues::of(
                &row,
                row.snapshot_timestamp.as_deref(),
                None,
                Some(event.at_ms),
            );
            let call_id = calls.next_call_id(row.customer_acc_id);
            values.write(tx, INSERT_CALL, call_id)?;
            calls.insert(
                call_id,
                StoredCall {
                    node_id: row.node_id,
                    tag,
                    account: row.customer_acc_id,
                    row_hash: values.row_hash,
                    key_hash: values.key_hash,
                    line_key: None,
                    own_timestamp: true,
                    seen_in: 0,
                    event_ms: Some(event.at_ms),
                },
            );
            Ok(Some(row.customer_acc_id))
        }
    }
}

/// Sets the `connect_time` of stored call `call_id`, unless it has one already (a snapshot
/// saw it answered). Its other values stay: a snapshot says more of a call than an event.
fn answer(
    tx: &rusqlite::Transaction<'_>,
    calls: &mut Stored,
    event: &Event,
    call_id: i64,
    call: StoredCall,
) -> rusqlite::Result<bool> {
    let mut row = read_call(tx, call_id)?;
    if row.connect_time.is_some() {
        return Ok(false);
    }
    // As a snapshot writes the same instant: UTC, the fraction cut.
    row.connect_time = Some(Cow::Owned(format_datetime(event.at_ms.div_euclid(1000))));
    let stamp = format_datetime(unix_millis(event.received_at).div_euclid(1000));
    let event_ms = Some(call.event_ms.map_or(event.at_ms, |e| e.max(event.at_ms)));
    // The indexed values stay: only the values are rewritten, not the index entries.
    let values = CallValues::of(&row, Some(&stamp), None, event_ms);
    values.write(tx, UPDATE_CALL_VALUES, call_id)?;
    calls.calls.insert(
        call_id,
        StoredCall {
            row_hash: values.row_hash,
            key_hash: values.key_hash,
            line_key: None,
            own_timestamp: true,
            event_ms,
            ..call
        },
    );
    Ok(true)
}

/// A stored call, read back in full.
fn read_call(tx: &rusqlite::Transaction<'_>, call_id: i64) -> rusqlite::Result<CallRow<'static>> {
    tx.prepare_cached(SELECT_CALL)?.query_row([call_id], |r| {
        let text = |i| r.get::<_, String>(i).map(Cow::Owned);
        let nullable = |i| r.get::<_, Option<String>>(i).map(|t| t.map(Cow::Owned));
        Ok(CallRow {
            node_id: r.get(0)?,
            local_tag: text(1)?,
            customer_id: r.get(2)?,
            customer_acc_id: r.get(3)?,
            snapshot_timestamp: nullable(4)?,
            start_time: text(5)?,
            connect_time: nullable(6)?,
            destination_prefix: text(7)?,
            destination_initial_interval: r.get(8)?,
            destination_initial_rate: text(9)?,
            destination_next_interval: r.get(10)?,
            destination_next_rate: text(11)?,
            destination_fee: text(12)?,
            src_name_in: text(13)?,
            src_prefix_in: text(14)?,
            dst_prefix_in: text(15)?,
            src_prefix_routing: text(16)?,
            dst_prefix_routing: text(17)?,
            from_domain: text(18)?,
            to_domain: text(19)?,
            ruri_domain: text(20)?,
            diversion_in: nullable(21)?,
            pai_in: nullable(22)?,
            ppi_in: nullable(23)?,
            privacy_in: nullable(24)?,
            rpid_in: nullable(25)?,
            rpid_privacy_in: nullable(26)?,
            auth_orig_transport_protocol_id: r.get(27)?,
            auth_orig_ip: text(28)?,
            auth_orig_port: r.get(29)?,
            buffered: false,
        })
    })
}

/// Forgets the oldest ended calls past `most`.
pub(super) fn trim_ended(
    tx: &rusqlite::Transaction<'_>,
    calls: &mut Stored,
    most: usize,
) -> rusqlite::Result<()> {
    if calls.ended.len() > most {
        let forgotten = forget_ended(tx, FORGET_OLDEST_ENDED, most as i64)?;
        forget_in_memory(calls, forgotten);
    }
    Ok(())
}

/// Runs a `DELETE … RETURNING node_id, local_tag` of `ended_calls`.
fn forget_ended(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    bound: i64,
) -> rusqlite::Result<Vec<(i64, String)>> {
    tx.prepare_cached(sql)?
        .query_map([bound], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

fn forget_in_memory(calls: &mut Stored, forgotten: Vec<(i64, String)>) {
    for (node_id, tag) in forgotten {
        let tag: TagHash = calls.tag_hash(node_id, tag.as_bytes());
        calls.ended.remove(&tag);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime};

    use super::*;

    fn ended(tag: &str, received_at: SystemTime) -> Event {
        Event {
            kind: EventKind::Disconnected,
            node_id: 7,
            local_tag: tag.into(),
            at_ms: 1_764_081_007_000,
            received_at,
            received: Instant::now(),
            call: None,
        }
    }

    fn remembered(writer: &Writer) -> Vec<String> {
        let mut stmt = writer
            .conn
            .prepare("SELECT local_tag FROM ended_calls ORDER BY heard_at_ms")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn ended_calls_are_remembered_within_their_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::open(&dir.path().join("calls.db")).unwrap();
        writer.ended_limits = (Duration::from_secs(60), 4);
        let now = SystemTime::now();
        let events: Vec<Event> = (0..10)
            .map(|i| ended(&format!("T{i}"), now - Duration::from_secs(10 - i)))
            .collect();
        writer.apply_events(&events).unwrap();
        // The count: the four heard last.
        assert_eq!(remembered(&writer), ["T6", "T7", "T8", "T9"]);
        assert_eq!(writer.stored.as_ref().unwrap().ended.len(), 4);
        // The time: a minute after they were heard, none.
        writer.expire(now + Duration::from_millis(57_500)).unwrap();
        assert_eq!(remembered(&writer), ["T8", "T9"]);
        writer.expire(now + Duration::from_secs(61)).unwrap();
        assert!(remembered(&writer).is_empty());
        assert!(writer.stored.as_ref().unwrap().ended.is_empty());
        // And across a reopening, what is stored is what is remembered.
        writer.apply_events(&[ended("T10", now)]).unwrap();
        drop(writer);
        let writer = Writer::open(&dir.path().join("calls.db")).unwrap();
        assert_eq!(remembered(&writer), ["T10"]);
    }
}
