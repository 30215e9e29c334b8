-- active-calls-agent: the whole database schema (SPEC 5). A public contract: local scripts
-- may open the database read-only (`sqlite3 -readonly`) and query these tables.
--
-- The database holds only the switch's *current* calls, a cache of state the switch resends
-- every period; so a schema change bumps `user_version` below and the agent rebuilds the
-- tables from scratch instead of migrating them.

-- One row per node the agent has heard from (a snapshot or a call event): when it was last
-- heard decides whether its calls are still current (`feed.stale_after`, SPEC 2.5), also
-- across a restart.
CREATE TABLE nodes (
    node_id             INTEGER PRIMARY KEY,
    received_at_ms      INTEGER,          -- unix ms its latest snapshot was received (file: its mtime); NULL: none yet
    heard_at_ms         INTEGER NOT NULL, -- unix ms its latest snapshot or call event was received
    expires_at_ms       INTEGER NOT NULL, -- unix ms from which its calls are stale: heard_at_ms + the node's silence limit
    snapshot_timestamp  TEXT,             -- 'YYYY-MM-DD hh:mm:ss' UTC of its latest snapshot, shared by its rows; NULL: none yet
    period_ms           INTEGER,          -- its snapshot period, learned from consecutive snapshot_timestamps; NULL: not yet known
    source              TEXT    NOT NULL, -- 'file' or 'socket': which feed sent its latest snapshot; 'events' before any
    changed_in          INTEGER NOT NULL  -- generation.last when what the node's calls show last changed
) STRICT;

-- A counter that grows with every snapshot (and batch of call events) applied. A node keeps the value of the last
-- snapshot that changed what its calls show, so the scrape's ETag (SPEC 6), a hash of the
-- current nodes' (node_id, changed_in), changes when the scrape's answer does, and a resend
-- of the same calls keeps it. It starts at the database's creation time in microseconds:
-- a database created anew (a schema change, a deleted file) never repeats the numbers of
-- an old one, whose ETags an aggregator may still hold.
CREATE TABLE generation (last INTEGER NOT NULL) STRICT;
INSERT INTO generation (last) VALUES (CAST(unixepoch('subsec') * 1000000 AS INTEGER));

-- The key of the opaque call ids live streams show (SPEC 7): an id is a keyed hash
-- (HMAC-SHA-256) of the call's node and local_tag, so it is the same in every stream and
-- across restarts, yet tells a customer nothing of the local_tag. Random per store: a store
-- made anew gives every call a new id.
CREATE TABLE stream_key (key BLOB NOT NULL) STRICT;
INSERT INTO stream_key (key) VALUES (randomblob(32));

-- One row per current call. A rowid table: every secondary index entry is then just
-- (account, value, call_id), narrow keys that are cheap to write and to search. The agent
-- gives each account its own range of call ids (account * 2^20 + n), so an account's calls
-- lie together and its answer reads a few pages.
CREATE TABLE calls (
    call_id                         INTEGER PRIMARY KEY, -- the agent's own row id
    node_id                         INTEGER NOT NULL,
    local_tag                       TEXT    NOT NULL,
    customer_id                     INTEGER NOT NULL,
    customer_acc_id                 INTEGER NOT NULL,
    -- NULL: the row's snapshot_timestamp is its node's (nodes.snapshot_timestamp); kept per
    -- row only when it differs (a call an event started or answered: the time the agent
    -- received that event), so an unchanged call costs no write from one snapshot to the next.
    snapshot_timestamp              TEXT,
    start_time                      TEXT    NOT NULL,
    connect_time                    TEXT,
    destination_prefix              TEXT    NOT NULL,
    destination_initial_interval    INTEGER NOT NULL,
    destination_initial_rate        TEXT    NOT NULL, -- decimal text, as the switch sent it
    destination_next_interval       INTEGER NOT NULL,
    destination_next_rate           TEXT    NOT NULL,
    destination_fee                 TEXT    NOT NULL,
    src_name_in                     TEXT    NOT NULL,
    src_prefix_in                   TEXT    NOT NULL,
    dst_prefix_in                   TEXT    NOT NULL,
    src_prefix_routing              TEXT    NOT NULL,
    dst_prefix_routing              TEXT    NOT NULL,
    from_domain                     TEXT    NOT NULL,
    to_domain                       TEXT    NOT NULL,
    ruri_domain                     TEXT    NOT NULL,
    diversion_in                    TEXT,
    pai_in                          TEXT,
    ppi_in                          TEXT,
    privacy_in                      TEXT,
    rpid_in                         TEXT,
    rpid_privacy_in                 TEXT,
    auth_orig_transport_protocol_id INTEGER NOT NULL,
    auth_orig_ip                    TEXT    NOT NULL,
    auth_orig_port                  INTEGER NOT NULL,
    -- The five filterable strings with their bytes reversed, so that a byte suffix
    -- (`-ends-with`) is a prefix range search in an index. Not valid UTF-8, hence BLOB.
    src_name_in_rev                 BLOB    NOT NULL,
    src_prefix_in_rev               BLOB    NOT NULL,
    dst_prefix_in_rev               BLOB    NOT NULL,
    src_prefix_routing_rev          BLOB    NOT NULL,
    dst_prefix_routing_rev          BLOB    NOT NULL,
    -- Hashes of every stored value, and of the indexed ones (the account and the five
    -- strings): a snapshot rewrites a call only when it changed, and its index entries
    -- only when an indexed value did.
    row_hash                        INTEGER NOT NULL,
    key_hash                        INTEGER NOT NULL,
    -- A hash of the call's snapshot line without the values a switch writes anew in every
    -- snapshot (id, snapshot_timestamp, snapshot_date, end_time): a line with the same key
    -- is the same call, unchanged, and is recognised without being parsed. NULL: no such key.
    line_key                        INTEGER,
    -- NULL: the row is as a snapshot left it. Else the switch's time (unix ms) of the newest
    -- call event that made or changed it (its start, or its answer): a snapshot dated before
    -- this neither overrules the row nor, by leaving the call out, removes it (SPEC 2.4).
    event_ms                        INTEGER
) STRICT;

-- A call's identity is (node, local_tag), whatever account it is on: a node's calls are
-- read (and removed) through this index. It holds nothing else, so that a call whose
-- unindexed values change (it is answered) rewrites its row alone.
CREATE INDEX calls_by_node ON calls (node_id, local_tag);

-- Calls a "disconnected" event ended, remembered so that a snapshot dated before the end, or
-- a buffered row of the call, does not bring it back (SPEC 2.4). Bounded: an entry goes
-- after ten minutes, and the oldest go first past 100,000.
CREATE TABLE ended_calls (
    node_id      INTEGER NOT NULL,
    local_tag    TEXT    NOT NULL,
    ended_at_ms  INTEGER NOT NULL, -- the end the event carried (the switch's clock)
    heard_at_ms  INTEGER NOT NULL, -- when the agent received the event (its clock): what the bound counts from
    PRIMARY KEY (node_id, local_tag)
) STRICT, WITHOUT ROWID;
CREATE INDEX ended_calls_by_age ON ended_calls (heard_at_ms);

-- `-eq` and `-starts-with` are ranges over the column within one account (BINARY collation:
-- plain byte order, so `%`, `_` and case mean nothing special); `-ends-with` is a range over
-- the reversed column.
CREATE INDEX calls_src_name_in            ON calls (customer_acc_id, src_name_in);
CREATE INDEX calls_src_prefix_in          ON calls (customer_acc_id, src_prefix_in);
CREATE INDEX calls_dst_prefix_in          ON calls (customer_acc_id, dst_prefix_in);
CREATE INDEX calls_src_prefix_routing     ON calls (customer_acc_id, src_prefix_routing);
CREATE INDEX calls_dst_prefix_routing     ON calls (customer_acc_id, dst_prefix_routing);
CREATE INDEX calls_src_name_in_rev        ON calls (customer_acc_id, src_name_in_rev);
CREATE INDEX calls_src_prefix_in_rev      ON calls (customer_acc_id, src_prefix_in_rev);
CREATE INDEX calls_dst_prefix_in_rev      ON calls (customer_acc_id, dst_prefix_in_rev);
CREATE INDEX calls_src_prefix_routing_rev ON calls (customer_acc_id, src_prefix_routing_rev);
CREATE INDEX calls_dst_prefix_routing_rev ON calls (customer_acc_id, dst_prefix_routing_rev);

-- Fixed planner statistics (SQLite's "fixed results of ANALYZE"): without them SQLite
-- guesses that one account holds ~10 calls and reads the whole account instead of using a
-- filter's index. These say what a busy node looks like: ~1000 calls per account, a
-- string value shared by ~2 calls of an account. The agent never runs ANALYZE itself.
ANALYZE sqlite_schema;
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('calls', NULL, '100000'),
    ('calls', 'calls_by_node', '100000 20000 1'),
    ('calls', 'calls_src_name_in', '100000 1000 2'),
    ('calls', 'calls_src_prefix_in', '100000 1000 2'),
    ('calls', 'calls_dst_prefix_in', '100000 1000 2'),
    ('calls', 'calls_src_prefix_routing', '100000 1000 2'),
    ('calls', 'calls_dst_prefix_routing', '100000 1000 2'),
    ('calls', 'calls_src_name_in_rev', '100000 1000 2'),
    ('calls', 'calls_src_prefix_in_rev', '100000 1000 2'),
    ('calls', 'calls_dst_prefix_in_rev', '100000 1000 2'),
    ('calls', 'calls_src_prefix_routing_rev', '100000 1000 2'),
    ('calls', 'calls_dst_prefix_routing_rev', '100000 1000 2');

PRAGMA user_version = 7;
