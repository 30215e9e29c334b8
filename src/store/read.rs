//! Reading the store: customer queries, the scrape, listings and node figures, through a
//! small pool of read-only connections.
//!
//! A query's SQL comes from `query` (the filter language), a row's bytes from `answer`;
//! this file runs them on a pooled connection and hands the bytes on. A node's calls are shown while it has not expired (`nodes.expires_at_ms`, set by the
//! writer from the node's silence limit), so every reader applies the same rule with one
//! comparison.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags};

use super::answer::{ROW_KEYS, write_row, write_scrape_row};
use super::damage::{StoreHealth, is_damage};
use super::query::{CallListing, CallQuery, CountBy, build, build_listing};
use super::{open, wal_of};

/// How many idle read connections the pool keeps.
const MAX_IDLE_READERS: usize = 4;

/// The nodes a scrape shows (SPEC 6): every one not stale at ?1 that has calls (a node
/// heard only through events that changed nothing shows nothing, and its `ETag` with it).
const SCRAPE_NODES: &str = "SELECT node_id, changed_in, period_ms FROM nodes
  WHERE expires_at_ms > ?1 AND EXISTS (SELECT 1 FROM calls WHERE calls.node_id = nodes.node_id)
  ORDER BY node_id";
/// Their calls, in the scrape's order: the identity columns, then [`answer_columns`].
/// Ordered by `n.node_id` (the nodes' own rowid order), SQLite walks the nodes, then each
/// node's calls in `calls_by_node`, and never sorts: rows go out as they are read.
const SCRAPE_CALLS: &str = concat!(
    "SELECT c.node_id, c.local_tag, c.customer_id, c.customer_acc_id, ",
    answer_columns!(),
    " FROM nodes AS n CROSS JOIN calls AS c ON c.node_id = n.node_id
  WHERE n.expires_at_ms > ?1 ORDER BY n.node_id, c.local_tag"
);

/// Each node's calls, when it was last heard and its period: what `/metrics`, `/readyz`
/// and `calls --by node` show.
const NODE_STATS: &str = "SELECT node_id, received_at_ms, heard_at_ms, expires_at_ms, period_ms,
    (SELECT count(*) FROM calls WHERE calls.node_id = nodes.node_id) FROM nodes ORDER BY node_id";

/// One node as [`Readers::node_stats`] sees it (times in ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node_id: i64,
    /// When its last snapshot was received; `None`: only its call events so far.
    pub received_at_ms: Option<i64>,
    /// When its last snapshot or call event was received.
    pub heard_at_ms: i64,
    /// When its calls stop being current, unless it is heard from again.
    pub expires_at_ms: i64,
    /// Its snapshot period, once learned.
    pub period_ms: Option<i64>,
    pub calls: i64,
}

/// A current node and the generation in which what its calls show last changed: what a
/// scrape's `ETag` is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeGeneration {
    pub node_id: i64,
    pub changed_in: i64,
    /// Its snapshot period, once learned (shown beside a scrape).
    pub period_ms: Option<i64>,
}

/// The store's size on disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreSize {
    /// The database file and its WAL.
    pub total: u64,
    pub wal: u64,
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
    /// Idle connections, each with the store generation it was opened on.
    idle: Mutex<Vec<(u64, Connection)>>,
    /// Connections open (idle or in use), and a wake-up when one is given back.
    open: Mutex<usize>,
    returned: std::sync::Condvar,
    health: Arc<StoreHealth>,
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
            health: Arc::default(),
        }
    }

    /// What the readers, the writer and `/readyz` know of the store's health: a reader
    /// that finds the store damaged reports it there, and drops connections to a store
    /// that was replaced.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
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

    pub(super) fn with_connection<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let (generation, conn) = self.take()?;
        let result = f(&conn);
        if let Err(e) = &result
            && is_damage(e)
        {
            self.health.report_damage(generation);
        }
        // Given back under the count's lock, which a waiter holds from its look at the
        // idle ones until it waits: the wake-up cannot fall between the two. One that read
        // a damaged or replaced store is closed instead.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let current = generation == self.health.generation() && result.is_ok();
        if idle.len() < MAX_IDLE_READERS && current {
            idle.push((generation, conn));
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
    pub fn file_sizes(&self) -> StoreSize {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let wal = size(&wal_of(&self.path));
        StoreSize {
            total: size(&self.path) + wal,
            wal,
        }
    }

    /// An idle connection, a new one below the cap, or (at the cap) the next given back.
    fn take(&self) -> rusqlite::Result<(u64, Connection)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let generation = loop {
            // Read anew after each wait: the store may have been replaced meanwhile.
            let generation = self.health.generation();
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // Connections to a store replaced since they were opened are closed.
            let before = idle.len();
            idle.retain(|(opened_on, _)| *opened_on == generation);
            *open -= before - idle.len();
            if let Some(conn) = idle.pop() {
                return Ok(conn);
            }
            drop(idle);
            if *open < MAX_OPEN_READERS {
                *open += 1;
                break generation;
            }
            open = self.returned.wait(open).unwrap_or_else(|e| e.into_inner());
        };
        drop(open);
        let opened = open_reader(&self.target, self.flags);
        if let Err(e) = &opened {
            if is_damage(e) {
                self.health.report_damage(generation);
            }
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            *open -= 1;
            drop(open);
            self.returned.notify_one();
        }
        opened.map(|conn| (generation, conn))
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

    /// Every call of every node not stale at `now_ms`, read in one transaction (so
    /// from one state of the store, however long the reading takes). `nodes` first gets the
    /// nodes with the generation their calls last changed in, and says whether to go on;
    /// then `row` gets each call as a JSON object (SPEC 6), until it says to stop.
    pub fn scrape(
        &self,
        now_ms: i64,
        nodes: impl FnOnce(&[NodeGeneration]) -> bool,
        mut row: impl FnMut(&[u8]) -> bool,
    ) -> rusqlite::Result<()> {
        self.with_connection(|conn| {
            let tx = conn.unchecked_transaction()?;
            if !nodes(&current_nodes(&tx, now_ms)?) {
                return Ok(());
            }
            let mut stmt = tx.prepare_cached(SCRAPE_CALLS)?;
            let mut rows = stmt.query([now_ms])?;
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

    /// The nodes a scrape at `now_ms` would show: enough for its `ETag`.
    pub fn node_generations(&self, now_ms: i64) -> rusqlite::Result<Vec<NodeGeneration>> {
        self.with_connection(|conn| current_nodes(conn, now_ms))
    }

    /// Every node with a snapshot, with its call count (an index range per node).
    pub fn node_stats(&self) -> rusqlite::Result<Vec<NodeStats>> {
        self.with_connection(|conn| {
            let mut stmt = conn.prepare_cached(NODE_STATS)?;
            let rows = stmt.query_map([], |r| {
                Ok(NodeStats {
                    node_id: r.get(0)?,
                    received_at_ms: r.get(1)?,
                    heard_at_ms: r.get(2)?,
                    expires_at_ms: r.get(3)?,
                    period_ms: r.get(4)?,
                    calls: r.get(5)?,
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
/// The nodes not stale at `now_ms`, by node id.
pub(super) fn current_nodes(
    conn: &Connection,
    now_ms: i64,
) -> rusqlite::Result<Vec<NodeGeneration>> {
    conn.prepare_cached(SCRAPE_NODES)?
        .query_map([now_ms], |r| {
            Ok(NodeGeneration {
                node_id: r.get(0)?,
                changed_in: r.get(1)?,
                period_ms: r.get(2)?,
            })
        })?
        .collect()
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
    use crate::store::{SCHEMA, Writer};

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
}
