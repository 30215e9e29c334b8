//! Live: one feed of what each commit changed, and what a stream keeps to turn it into
//! the `changes` it sends (SPEC 7).
//!
//! The writer publishes each commit's [`Scope`] (the nodes a snapshot or an expiry
//! replaced, the calls events touched) once, after the commit, on a broadcast channel: a
//! stream that reads the store because of a change sees at least that change. A scope
//! names *where* things changed, not the rows: every stream then reads, within its scope,
//! exactly the rows its own query selects, through the store's one filter engine, and
//! compares them with what it has sent ([`View`]): a row it has not sent is `added`, one
//! whose bytes differ is `changed`, one it sent and no longer reads there is `removed`.
//! So a stream that merges several scopes (it was busy, or its client was behind), or
//! reads a change it saw already in its first snapshot, still sends each difference once,
//! and its running state is always what a fresh query answers.
//!
//! A call's opaque id ([`CallIds`]) is an HMAC-SHA-256 of its node and `local_tag` under
//! a random key kept in the store: stable for the call's life, across streams and
//! restarts, and telling nothing of the `local_tag`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::store::{ChangedCall, Readers, Selection, StreamRow, Within};

/// Changes a stream's inbox holds that it has not looked at yet; one that falls further
/// behind reads everything again (which it can: scopes only say where to look).
pub const FEED_CAPACITY: usize = 1024;
/// Calls a merged scope names one by one at most; past it, it names their nodes instead.
const MAX_SCOPE_CALLS: usize = 4096;

/// Where one commit (or several, merged) changed the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Everything may have changed (the store was replaced, or a stream fell behind).
    pub everything: bool,
    /// Nodes whose calls may all have changed: a snapshot (every row's
    /// `snapshot_timestamp` is new), an expiry, a file that no longer names a node.
    pub nodes: BTreeSet<i64>,
    /// Calls events made, answered or ended.
    pub calls: Vec<ChangedCall>,
}

impl Scope {
    pub fn everything() -> Scope {
        Scope {
            everything: true,
            ..Scope::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.everything && self.nodes.is_empty() && self.calls.is_empty()
    }

    /// Adds `other`'s places to this scope's.
    pub fn merge(&mut self, other: &Scope) {
        if self.everything {
            return;
        }
        if other.everything {
            *self = Scope::everything();
            return;
        }
        self.nodes.extend(other.nodes.iter().copied());
        self.calls.extend(other.calls.iter().cloned());
        if self.calls.len() > MAX_SCOPE_CALLS {
            self.nodes.extend(self.calls.drain(..).map(|c| c.node_id));
        }
    }
}

/// One commit's scope, with the instant it was published.
#[derive(Debug)]
pub struct Change {
    pub published: Instant,
    pub scope: Scope,
}

/// The change feed: the writer publishes, every stream subscribes. Cheap to clone.
///
/// A change goes only to the streams it may concern: a snapshot's or an expiry's nodes
/// concern every stream, an event's call only the streams of its account (events never
/// move a call to another account) and the node's. So a thousand customers' streams cost
/// an event one lookup and a wake-up or two, not a thousand wake-ups.
#[derive(Clone, Default)]
pub struct Feed {
    subscribers: Arc<Mutex<Subscribers>>,
}

#[derive(Default)]
struct Subscribers {
    next: u64,
    /// Customer streams, by account.
    by_account: HashMap<i64, Vec<Inbox>>,
    /// Streams of every call (the node's).
    every: Vec<Inbox>,
}

/// Where one subscriber's changes wait.
#[derive(Clone)]
struct Inbox {
    id: u64,
    changes: mpsc::Sender<Arc<Change>>,
    /// Set when a change found the inbox full (it was dropped): the subscriber then reads
    /// everything again.
    lagged: Arc<AtomicBool>,
}

impl Inbox {
    fn put(&self, change: &Arc<Change>) {
        if self.changes.try_send(change.clone()).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// One stream's end of the feed; leaving it unsubscribes.
pub struct Subscription {
    id: u64,
    account: Option<i64>,
    changes: mpsc::Receiver<Arc<Change>>,
    lagged: Arc<AtomicBool>,
    subscribers: Arc<Mutex<Subscribers>>,
}

impl Subscription {
    /// The next change (`None`: the feed is gone). A subscriber that fell behind gets a
    /// change of everything instead of those it missed.
    pub async fn recv(&mut self) -> Option<Arc<Change>> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(Arc::new(Change {
                published: Instant::now(),
                scope: Scope::everything(),
            }));
        }
        self.changes.recv().await
    }

    /// A change already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Arc<Change>> {
        self.changes.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subscribers = lock(&self.subscribers);
        let list = match self.account {
            Some(account) => subscribers.by_account.entry(account).or_default(),
            None => &mut subscribers.every,
        };
        list.retain(|inbox| inbox.id != self.id);
        if let Some(account) = self.account
            && subscribers
                .by_account
                .get(&account)
                .is_some_and(Vec::is_empty)
        {
            subscribers.by_account.remove(&account);
        }
    }
}

fn lock(subscribers: &Mutex<Subscribers>) -> std::sync::MutexGuard<'_, Subscribers> {
    subscribers.lock().unwrap_or_else(|e| e.into_inner())
}

impl Feed {
    /// Publishes a committed scope to the streams it may concern. Never waits: the
    /// writer calls it.
    pub fn publish(&self, scope: Scope) {
        if scope.is_empty() {
            return;
        }
        let subscribers = lock(&self.subscribers);
        if subscribers.every.is_empty() && subscribers.by_account.is_empty() {
            return;
        }
        let change = Arc::new(Change {
            published: Instant::now(),
            scope,
        });
        for inbox in &subscribers.every {
            inbox.put(&change);
        }
        if change.scope.everything || !change.scope.nodes.is_empty() {
            for inbox in subscribers.by_account.values().flatten() {
                inbox.put(&change);
            }
            return;
        }
        let accounts: BTreeSet<i64> = change.scope.calls.iter().map(|c| c.account).collect();
        for account in accounts {
            for inbox in subscribers.by_account.get(&account).into_iter().flatten() {
                inbox.put(&change);
            }
        }
    }

    /// Subscribes a stream of `account`'s calls (`None`: of every call).
    pub fn subscribe(&self, account: Option<i64>) -> Subscription {
        let (sender, changes) = mpsc::channel(FEED_CAPACITY);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut subscribers = lock(&self.subscribers);
        subscribers.next += 1;
        let id = subscribers.next;
        let inbox = Inbox {
            id,
            changes: sender,
            lagged: lagged.clone(),
        };
        match account {
            Some(account) => subscribers
                .by_account
                .entry(account)
                .or_default()
                .push(inbox),
            None => subscribers.every.push(inbox),
        }
        Subscription {
            id,
            account,
            changes,
            lagged,
            subscribers: self.subscribers.clone(),
        }
    }
}

/// A call's opaque id: 128 bits of an HMAC, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallId(u128);

impl std::fmt::Display for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Makes call ids under one store's key.
#[derive(Clone)]
pub struct CallIds {
    key: Vec<u8>,
    mac: Hmac<Sha256>,
}

impl CallIds {
    pub fn new(key: &[u8]) -> CallIds {
        CallIds {
            key: key.to_vec(),
            // An HMAC takes a key of any length.
            mac: Hmac::new_from_slice(key).unwrap_or_else(|_| unreachable!()),
        }
    }

    pub fn id(&self, node_id: i64, local_tag: &[u8]) -> CallId {
        let mut mac = self.mac.clone();
        mac.update(&node_id.to_be_bytes());
        mac.update(local_tag);
        let digest = mac.finalize().into_bytes();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        CallId(u128::from_be_bytes(first))
    }
}

/// What a stream has sent of one call.
#[derive(Debug, Clone, Copy)]
struct Sent {
    node_id: i64,
    /// A hash of the row's bytes.
    hash: u64,
}

/// The differences one read found, as the `changes` event's JSON parts, and what the
/// stream will have sent once it sends them.
#[derive(Debug, Default)]
pub struct Delta {
    added: Vec<u8>,
    changed: Vec<u8>,
    removed: Vec<CallId>,
    updates: Vec<(CallId, Option<Sent>)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// `head`, then `{"added":[…],"changed":[…],"removed":[…]}`.
    pub fn json_after(&self, head: &[u8]) -> Vec<u8> {
        let ids = self.removed.len() * 35;
        let mut out =
            Vec::with_capacity(head.len() + self.added.len() + self.changed.len() + ids + 64);
        out.extend_from_slice(head);
        out.extend_from_slice(b"{\"added\":[");
        out.extend_from_slice(&self.added);
        out.extend_from_slice(b"],\"changed\":[");
        out.extend_from_slice(&self.changed);
        out.extend_from_slice(b"],\"removed\":[");
        for (i, id) in self.removed.iter().enumerate() {
            let comma = if i > 0 { "," } else { "" };
            let mut text = String::with_capacity(36);
            let _ = write!(text, "{comma}\"{id}\"");
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// What one stream selects and what it has sent: each change is read through it.
pub struct View {
    selection: Selection,
    /// A customer stream's account (the calls of other accounts it need not read).
    account: Option<i64>,
    /// The ids under the store's key, once a read has found it.
    ids: Option<CallIds>,
    sent: HashMap<CallId, Sent>,
}

impl View {
    pub fn new(selection: Selection) -> View {
        let account = match &selection {
            Selection::Customer(query) => Some(query.account_id),
            Selection::Node => None,
        };
        View {
            selection,
            account,
            ids: None,
            sent: HashMap::new(),
        }
    }

    /// The account this stream shows (`None`: every call of the node).
    pub fn account(&self) -> Option<i64> {
        self.account
    }

    /// `head`, then the first event's data: every row the selection shows at `now_ms`, in
    /// the endpoint's order, as `{"data":[…],"rows":N}`; from then on they count as sent.
    pub fn snapshot(
        &mut self,
        readers: &Readers,
        now_ms: i64,
        head: &[u8],
    ) -> rusqlite::Result<Vec<u8>> {
        self.sent.clear();
        let delta = self.read(readers, now_ms, &Scope::everything())?;
        // Nothing was sent before: every row is added, in the order read.
        let mut out = Vec::with_capacity(head.len() + delta.added.len() + 32);
        out.extend_from_slice(head);
        out.extend_from_slice(b"{\"data\":[");
        out.extend_from_slice(&delta.added);
        out.extend_from_slice(format!("],\"rows\":{}}}", delta.updates.len()).as_bytes());
        self.accept(delta);
        Ok(out)
    }

    /// Counts what `delta` says as sent: the caller has sent it.
    pub fn accept(&mut self, delta: Delta) {
        for (id, sent) in delta.updates {
            match sent {
                Some(sent) => self.sent.insert(id, sent),
                None => self.sent.remove(&id),
            };
        }
    }

    /// Reads what `scope` may have changed among the calls this stream selects, and
    /// returns how that differs from what it has sent. Nothing counts as sent until the
    /// caller [`accept`](Self::accept)s it: a stream that cannot send it now reads again.
    pub fn read(
        &mut self,
        readers: &Readers,
        now_ms: i64,
        scope: &Scope,
    ) -> rusqlite::Result<Delta> {
        // Each call of this stream's account is read where it is, by its key (an event
        // never moves a call to another account: a snapshot does, and its node is read).
        let mut candidates: HashSet<CallId> = HashSet::new();
        let mut calls = Vec::new();
        let mine = |c: &&ChangedCall| self.account.is_none_or(|a| a == c.account);
        for call in (scope.calls.iter())
            .filter(|c| !scope.nodes.contains(&c.node_id))
            .filter(mine)
        {
            let id = (self.ids.as_ref()).map(|ids| ids.id(call.node_id, call.local_tag.as_bytes()));
            candidates.extend(id.filter(|id| self.sent.contains_key(id)));
            calls.push(Within::Call(call.node_id, &call.local_tag));
        }
        let parts: Vec<Within<'_>> = if scope.everything {
            candidates.extend(self.sent.keys().copied());
            vec![Within::Everything]
        } else {
            candidates.extend(
                (self.sent.iter())
                    .filter(|(_, s)| scope.nodes.contains(&s.node_id))
                    .map(|(id, _)| *id),
            );
            (scope.nodes.iter().map(|&n| Within::Node(n)))
                .chain(calls)
                .collect()
        };
        if parts.is_empty() {
            return Ok(Delta::default());
        }
        let had_key = self.ids.as_ref().map(|ids| ids.key.clone());
        let mut delta = Delta::default();
        let mut seen: HashSet<CallId> = HashSet::new();
        let (ids, sent) = (&mut self.ids, &self.sent);
        let key = readers.stream_rows(&self.selection, now_ms, &parts, |row: StreamRow<'_>| {
            let ids = match ids {
                Some(ids) if ids.key == row.key => ids,
                _ => ids.insert(CallIds::new(row.key)),
            };
            let id = ids.id(row.node_id, row.local_tag);
            if !seen.insert(id) {
                return;
            }
            let hash = xxhash_rust::xxh3::xxh3_64(row.json);
            let out = match sent.get(&id) {
                None => &mut delta.added,
                Some(before) if before.hash != hash => &mut delta.changed,
                Some(_) => return,
            };
            let node_id = row.node_id;
            delta.updates.push((id, Some(Sent { node_id, hash })));
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(row.json);
            out.extend_from_slice(format!(",\"call\":\"{id}\"}}").as_bytes());
        })?;
        if had_key.as_deref().is_some_and(|had| had != key) && !scope.everything {
            // The store was made anew under another key: every id changed.
            return self.read(readers, now_ms, &Scope::everything());
        }
        if self.ids.as_ref().is_none_or(|ids| ids.key != key) {
            self.ids = Some(CallIds::new(&key));
        }
        for id in candidates {
            if !seen.contains(&id) {
                delta.removed.push(id);
                delta.updates.push((id, None));
            }
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(node_id: i64, tag: &str, account: i64) -> ChangedCall {
        ChangedCall {
            node_id,
            local_tag: tag.into(),
            account,
        }
    }

    fn calls(list: &[ChangedCall]) -> Scope {
        Scope {
            calls: list.to_vec(),
            ..Scope::default()
        }
    }

    #[tokio::test]
    async fn a_change_reaches_only_the_streams_it_may_concern() {
        let feed = Feed::default();
        let (mut a, mut b, mut node) = (
            feed.subscribe(Some(101)),
            feed.subscribe(Some(102)),
            feed.subscribe(None),
        );
        // An event of account 101: its stream and the node's, not 102's.
        feed.publish(calls(&[call(7, "x", 101)]));
        assert_eq!(a.try_recv().map(|c| c.scope.calls.len()), Some(1));
        assert!(node.try_recv().is_some());
        assert!(b.try_recv().is_none());
        // A snapshot's node: every stream.
        feed.publish(Scope {
            nodes: [7].into(),
            ..Scope::default()
        });
        for sub in [&mut a, &mut b, &mut node] {
            assert_eq!(sub.try_recv().map(|c| c.scope.nodes.len()), Some(1));
        }
        // A stream that left is no longer fed, and the others still are.
        drop(b);
        feed.publish(calls(&[call(7, "y", 102)]));
        assert!(a.try_recv().is_none());
        assert!(node.try_recv().is_some());
        assert!(!lock(&feed.subscribers).by_account.contains_key(&102));
    }

    #[tokio::test]
    async fn a_stream_whose_inbox_overflows_reads_everything_again() {
        let feed = Feed::default();
        let mut sub = feed.subscribe(Some(1));
        for i in 0..FEED_CAPACITY + 1 {
            feed.publish(calls(&[call(1, &i.to_string(), 1)]));
        }
        // Lost one: the next change it gets is "everything".
        let first = sub.recv().await.unwrap();
        assert!(first.scope.everything);
    }

    #[test]
    fn merged_scopes_keep_every_place_and_stay_bounded() {
        let mut scope = calls(&[call(1, "a", 5)]);
        scope.merge(&Scope {
            nodes: [2].into(),
            ..Scope::default()
        });
        assert_eq!((scope.nodes.len(), scope.calls.len()), (1, 1));
        let many: Vec<ChangedCall> = (0..MAX_SCOPE_CALLS)
            .map(|i| call(3, &i.to_string(), 5))
            .collect();
        scope.merge(&calls(&many));
        // Past the bound, the calls give way to their nodes.
        assert!(scope.calls.is_empty());
        assert_eq!(scope.nodes, [1, 2, 3].into());
        scope.merge(&Scope::everything());
        assert!(scope.everything && !scope.is_empty());
    }

    #[test]
    fn call_ids_are_keyed_stable_and_opaque() {
        let (one, other) = (CallIds::new(b"key one"), CallIds::new(b"key two"));
        let id = one.id(7, b"922631C6-DCD0-00000005");
        assert_eq!(id, one.id(7, b"922631C6-DCD0-00000005"));
        assert_ne!(
            id,
            one.id(8, b"922631C6-DCD0-00000005"),
            "the node is part of it"
        );
        assert_ne!(id, other.id(7, b"922631C6-DCD0-00000005"), "so is the key");
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
