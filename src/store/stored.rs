//! The writer's picture of the stored calls, kept in memory between applies.
//!
//! A snapshot of 100k calls must find each of its lines' calls, compare them and tell
//! which ended, without a query per line: so the writer loads once what it compares (ids,
//! hashes, line keys, and the calls events ended) and keeps it up to date with every
//! snapshot and event it applies. It reads them from the table: once after a start, an idle
//! spell or a failed write, never per snapshot, so no index is kept up to date for it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, LazyLock};

/// Every stored call, with what the writer compares and looks up.
const LOAD_STORED_CALLS: &str = "SELECT call_id, node_id, local_tag, customer_acc_id, row_hash,
    key_hash, line_key, snapshot_timestamp IS NOT NULL, event_ms FROM calls";
/// The calls events ended, still remembered.
const LOAD_ENDED_CALLS: &str = "SELECT node_id, local_tag, ended_at_ms FROM ended_calls";

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

/// The maps the writer touches for every line of every snapshot, keyed by integers (the
/// agent's call ids and hashes, the switch's node ids): hashed by one multiplication
/// rather than std's SipHash, which was the largest cost of an unchanged line. A per-run
/// random seed keeps the bucket of a key unknown to whoever writes the snapshots.
pub(super) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;
pub(super) type IntSet<K> = HashSet<K, BuildHasherDefault<IntHasher>>;

static INT_HASH_SEED: LazyLock<u64> = LazyLock::new(|| fastrand::u64(..));

pub(super) struct IntHasher(u64);

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
#[derive(Clone, Copy, Default)]
pub(super) struct StoredCall {
    pub node_id: i64,
    pub tag: TagHash,
    pub account: i64,
    pub row_hash: i64,
    pub key_hash: i64,
    pub line_key: Option<i64>,
    /// The call keeps a snapshot timestamp of its own (rare, but every call an event made
    /// or changed): not for the fast path.
    pub own_timestamp: bool,
    /// The last snapshot (an [`Stored::epoch`]) that had this call.
    pub seen_in: u64,
    /// The switch's time of the newest event that made or changed the call (`calls.event_ms`).
    pub event_ms: Option<i64>,
}

/// A hash of a call's (node, local tag), keyed per process, so that no input can be made
/// to collide: the writer's name for a call, without holding its tag.
pub(super) type TagHash = u64;

/// The writer's picture of the stored calls: loaded once from the table, then kept up to
/// date by each snapshot it applies, so that an apply finds a call, compares it and tells
/// what ended without a query.
pub(super) struct Stored {
    pub calls: CallTable,
    pub by_tag: IntMap<TagHash, i64>,
    /// Line keys of the stored calls: shared with the snapshot's reader thread (which
    /// parses only the lines not found here) while a snapshot applies.
    pub by_line: Arc<IntMap<i64, i64>>,
    /// The next call id of each id range (see [`id_range`]).
    next_ids: IntMap<i64, i64>,
    /// Counts the snapshots applied: a call seen in this one has `seen_in == epoch`.
    pub epoch: u64,
    seed: u64,
    /// The calls an event ended (`ended_calls`), with the end the event carried.
    pub ended: IntMap<TagHash, i64>,
}

impl Stored {
    pub fn load(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Stored> {
        let mut stored = Stored {
            calls: CallTable::default(),
            by_tag: IntMap::default(),
            by_line: Arc::default(),
            next_ids: IntMap::default(),
            epoch: 0,
            seed: fastrand::u64(..),
            ended: IntMap::default(),
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
                event_ms: r.get(8)?,
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
        let mut stmt = tx.prepare_cached(LOAD_ENDED_CALLS)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let tag = stored.tag_hash(r.get(0)?, r.get_ref(1)?.as_bytes()?);
            stored.ended.insert(tag, r.get(2)?);
        }
        Ok(stored)
    }

    pub fn tag_hash(&self, node_id: i64, tag: &[u8]) -> TagHash {
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
    pub fn next_call_id(&mut self, account: i64) -> i64 {
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

    pub fn insert(&mut self, call_id: i64, call: StoredCall) {
        self.by_tag.insert(call.tag, call_id);
        self.calls.insert(call_id, call);
    }

    /// The id and picture of the call `tag` names, if it is stored.
    pub fn find(&self, tag: TagHash) -> Option<(i64, StoredCall)> {
        let id = *self.by_tag.get(&tag)?;
        Some((id, *self.calls.get(&id)?))
    }

    /// Forgets every call of `node_id`; the line keys that stood for them.
    pub fn remove_node(&mut self, node_id: i64) -> Vec<i64> {
        let ids: Vec<i64> = self
            .calls
            .iter()
            .filter(|(_, call)| call.node_id == node_id)
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.remove(id)?.line_key)
            .collect()
    }

    pub fn remove(&mut self, call_id: i64) -> Option<StoredCall> {
        let call = self.calls.remove(&call_id)?;
        if self.by_tag.get(&call.tag) == Some(&call_id) {
            self.by_tag.remove(&call.tag);
        }
        Some(call)
    }
}

/// Slots in each chunk of a [`CallTable`] (~400 KB).
const CHUNK_SLOTS: usize = 4096;
/// The id of a [`CallTable`] slot that holds no call.
const FREE_SLOT: i64 = i64::MIN;

/// The stored calls by id: a map from each id to a slot, and the calls in chunks of
/// slots, rather than a map holding the calls.
///
/// Why: a hash table grows by doubling, all at once. A snapshot adds its new calls before
/// the ended ones go (those are known only at its end), so a 10% churn could tip a table of
/// 100k calls over its buckets in the middle of an apply: 12.7 MB became 25 MB, and both
/// were held while it moved (measured with heaptrack: the largest cause of the agent's
/// peak RSS after SQLite's page cache). Here the map holds 16 bytes a call, chunks are
/// added one at a time and never move, and the slots of removed calls are used again.
#[derive(Default)]
pub(super) struct CallTable {
    slot_of: IntMap<i64, u32>,
    /// (call id, call), or ([`FREE_SLOT`], _) for a slot free again or never used.
    chunks: Vec<Box<[(i64, StoredCall)]>>,
    free: Vec<u32>,
    /// Slots handed out so far: the next slot that was never used.
    used: u32,
}

impl CallTable {
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn contains_key(&self, call_id: &i64) -> bool {
        self.slot_of.contains_key(call_id)
    }

    pub fn get(&self, call_id: &i64) -> Option<&StoredCall> {
        let &slot = self.slot_of.get(call_id)?;
        Some(&self.slot(slot).1)
    }

    pub fn get_mut(&mut self, call_id: &i64) -> Option<&mut StoredCall> {
        let &slot = self.slot_of.get(call_id)?;
        Some(&mut self.slot_mut(slot).1)
    }

    /// Stores `call` as `call_id`, in place of the call of that id if there is one.
    pub fn insert(&mut self, call_id: i64, call: StoredCall) {
        if let Some(held) = self.get_mut(&call_id) {
            *held = call;
            return;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            if self.used as usize == self.chunks.len() * CHUNK_SLOTS {
                let chunk = vec![(FREE_SLOT, StoredCall::default()); CHUNK_SLOTS];
                self.chunks.push(chunk.into_boxed_slice());
            }
            self.used += 1;
            self.used - 1
        });
        *self.slot_mut(slot) = (call_id, call);
        self.slot_of.insert(call_id, slot);
    }

    pub fn remove(&mut self, call_id: &i64) -> Option<StoredCall> {
        let slot = self.slot_of.remove(call_id)?;
        self.free.push(slot);
        let (id, call) = self.slot_mut(slot);
        *id = FREE_SLOT;
        Some(*call)
    }

    /// Every call with its id, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&i64, &StoredCall)> {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter())
            .take(self.used as usize)
            .filter(|(id, _)| *id != FREE_SLOT)
            .map(|(id, call)| (id, call))
    }

    fn slot(&self, slot: u32) -> &(i64, StoredCall) {
        let slot = slot as usize;
        &self.chunks[slot / CHUNK_SLOTS][slot % CHUNK_SLOTS]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut (i64, StoredCall) {
        let slot = slot as usize;
        &mut self.chunks[slot / CHUNK_SLOTS][slot % CHUNK_SLOTS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(account: i64) -> StoredCall {
        StoredCall {
            account,
            ..StoredCall::default()
        }
    }

    fn accounts(table: &CallTable) -> Vec<(i64, i64)> {
        let mut all: Vec<_> = table.iter().map(|(&id, c)| (id, c.account)).collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn a_call_table_replaces_removes_and_reuses_slots() {
        let mut table = CallTable::default();
        let count = CHUNK_SLOTS as i64 + 10; // more than one chunk
        for id in 0..count {
            table.insert(id, call(id));
        }
        table.insert(5, call(-5)); // in place
        assert_eq!(table.len(), count as usize);
        assert_eq!(table.get(&5).map(|c| c.account), Some(-5));
        for id in (0..count).filter(|id| id % 2 == 0) {
            assert_eq!(table.remove(&id).map(|c| c.account), Some(id));
        }
        assert!(table.remove(&0).is_none());
        assert!(!table.contains_key(&2) && table.get(&2).is_none());
        let odd: Vec<_> = (0..count)
            .filter(|id| id % 2 == 1)
            .map(|id| (id, if id == 5 { -5 } else { id }))
            .collect();
        assert_eq!(accounts(&table), odd);
        // New calls take the freed slots: no chunk is added.
        let chunks = table.chunks.len();
        for id in count..count + count / 2 {
            table.insert(id, call(id));
        }
        assert_eq!(table.chunks.len(), chunks);
        assert_eq!(table.len(), odd.len() + (count / 2) as usize);
        if let Some(c) = table.get_mut(&(count + 1)) {
            c.account = 7;
        }
        assert_eq!(table.get(&(count + 1)).map(|c| c.account), Some(7));
    }
}
