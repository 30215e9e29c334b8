#!/usr/bin/env python3
"""ClickHouse (chdb, in-process) figures for the agent's benchmark data and queries.

Reads what `active-calls-agent bench --dump DIR` writes:
  DIR/snapshot.jsonl   the 100,000-call snapshot as a switch sends it (INSERT line first)
  DIR/directory.json   accounts: uuid -> id, contractor_id
  DIR/queries.txt      one endpoint target a line: the account-filtered mix, then one
                       selective -eq / -starts-with / -ends-with example in the big account
and measures, in one chdb session (settings at their defaults but
input_format_skip_unknown_fields=1):
  * INSERT INTO active_calls FORMAT JSONEachRow of the snapshot into a fresh MergeTree
    table (median of N runs);
  * yeti-web's central SQL (ClickhouseReport::CustomerOutgoingActiveCalls) for every query
    of queries.txt, values bound as ClickHouse query parameters;
  * 200 selective -eq / -starts-with / -ends-with queries each in the big account.
Times are the wall time of the chdb call (SQL text in, JSON bytes out), plus ClickHouse's
own `statistics.elapsed` from the JSON answer (the analogue of the agent's X-Runtime).

Usage: python3 scripts/clickhouse_bench.py [--dir /tmp/chbench] [--summary FILE]
(`bench` runs it itself when chdb is installed, and prints its figures as multiples.)
"""

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential"))
from compare import (CH_SQL_HEAD, CH_TABLE_TEMPLATE, FALSE_WORDS,  # noqa: E402
                     filter_condition)

BIG_ACCOUNT_UUID = "00000000-0000-4000-8000-000000000001"
INSERT_HEAD = "INSERT INTO active_calls FORMAT JSONEachRow"


def percentile(sorted_v, p):
    """The same rank rule as the agent's bench (nearest rank, rounded)."""
    if not sorted_v:
        return float("nan")
    return sorted_v[round((len(sorted_v) - 1) * p)]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def escape_param(v):
    """ClickHouse parses String query parameters in its escaped text format; escape so that
    it sees exactly these characters."""
    return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def parse_target(target):
    """Endpoint target -> (account uuid, [(name, value)]): known parameters in the order of
    their first appearance, each with its last value (as Rack / the agent do)."""
    query = urllib.parse.urlsplit(target).query
    order, last = [], {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in last:
            order.append(name)
        last[name] = value
    account = last.get("account-id")
    filters = [(n, last[n]) for n in order if n != "account-id"]
    return account, filters


def build_sql(customer_id, account_id, filters):
    """The central API's SQL and its query parameters."""
    params = {"customer_id": str(customer_id), "account_id": str(account_id)}
    conds = []
    for name, value in filters:
        if name == "connect-time-null":
            # ActiveModel boolean cast, done in Ruby before the SQL is built.
            conds.append("connect_time IS NOT NULL" if value in FALSE_WORDS
                         else "connect_time IS NULL")
            continue
        try:
            p, sql = filter_condition(name)
        except ValueError:
            continue  # not a filter of the endpoint: ignored
        params[p] = escape_param(value)
        conds.append(sql)
    sql = CH_SQL_HEAD
    for c in conds:
        sql += " AND " + c
    sql += " ORDER BY start_time DESC FORMAT JSON"
    return sql, params


class Bench:
    def __init__(self):
        from chdb import session
        self.s = session.Session()
        self.s.query("CREATE DATABASE IF NOT EXISTS bench")
        self.s.query("USE bench")
        self.s.query("SET input_format_skip_unknown_fields = 1")

    def fresh_table(self):
        self.s.query("DROP TABLE IF EXISTS active_calls SYNC")
        self.s.query(CH_TABLE_TEMPLATE.format(rate="String"))

    def scalar(self, sql):
        return str(self.s.query(sql, "TSV")).strip()

    def timed(self, sql, params):
        """(wall ms of the chdb call, ClickHouse elapsed ms, rows)."""
        t0 = time.perf_counter()
        res = self.s.query(sql, "JSON", params=params)
        wall = (time.perf_counter() - t0) * 1000.0
        body = json.loads(res.bytes())
        return wall, body["statistics"]["elapsed"] * 1000.0, body["rows"]


def fmt(label, walls, elapsed, rows):
    w, e = sorted(walls), sorted(elapsed)
    return (f"| {label} | {percentile(w, 0.5):.3f} / {percentile(w, 0.99):.3f} ms "
            f"| {percentile(e, 0.5):.3f} / {percentile(e, 0.99):.3f} ms "
            f"| {len(walls)} | {statistics.mean(rows):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/chbench")
    ap.add_argument("--insert-runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=200,
                    help="repetitions of each selective kind (default 200)")
    ap.add_argument("--warmup", type=int, default=200,
                    help="leading mix queries left out of the figures, as the agent's "
                         "bench does (default 200)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--summary",
                    help="also write the insert's median and the mix's p50 / p99 (ms, "
                         "without the warm-up) here as JSON, for `bench` to divide by")
    args = ap.parse_args()

    with open(os.path.join(args.dir, "directory.json")) as f:
        accounts = {a["uuid"]: (a["id"], a["contractor_id"])
                    for a in json.load(f)["accounts"]}
    with open(os.path.join(args.dir, "queries.txt")) as f:
        targets = [line.strip() for line in f if line.strip()]
    with open(os.path.join(args.dir, "snapshot.jsonl"), encoding="utf-8") as f:
        snapshot = f.read()
    if not snapshot.startswith(INSERT_HEAD):
        snapshot = INSERT_HEAD + "\n" + snapshot
    rss_loaded = peak_rss_mb()

    import chdb
    b = Bench()
    print(f"chdb {chdb.__version__}, ClickHouse {b.scalar('SELECT version()')}")
    print(f"snapshot: {len(snapshot.encode()) / 1e6:.1f} MB; peak RSS after reading it into "
          f"Python: {rss_loaded:.0f} MB")

    # ---- insert
    times = []
    for i in range(args.insert_runs):
        b.fresh_table()
        t0 = time.perf_counter()
        b.s.query(snapshot)
        times.append((time.perf_counter() - t0) * 1000.0)
        n = b.scalar("SELECT count() FROM active_calls")
        print(f"insert run {i + 1}: {times[-1]:.0f} ms, {n} rows")
    parts = b.scalar("SELECT count() FROM system.parts WHERE database = 'bench' "
                     "AND table = 'active_calls' AND active")
    print(f"insert, median of {args.insert_runs}: {statistics.median(times):.0f} ms "
          f"(min {min(times):.0f}, max {max(times):.0f}); active parts: {parts}")
    rss_insert = peak_rss_mb()
    del snapshot

    # ---- queries.txt
    mix, examples = [], []
    for t in targets:
        acc, filters = parse_target(t)
        (examples if acc == BIG_ACCOUNT_UUID else mix).append((acc, filters))
    walls, els, rows, errors = [], [], [], 0
    for acc, filters in mix:
        acc_id, cust = accounts[acc]
        sql, params = build_sql(cust, acc_id, filters)
        try:
            w, e, r = b.timed(sql, params)
        except Exception as exc:  # chdb raises RuntimeError / ChdbError
            errors += 1
            print("error:", exc, file=sys.stderr)
            continue
        walls.append(w)
        els.append(e)
        rows.append(r)
    base_w, base_e = [], []
    for _ in range(200):
        w, e, _r = b.timed("SELECT 1 FORMAT JSON", None)
        base_w.append(w)
        base_e.append(e)
    print(f"\nfirst (cold) mix query: {walls[0]:.3f} ms wall")
    print("| measure | chdb call wall time (p50 / p99) | ClickHouse elapsed (p50 / p99) "
          "| queries | mean rows |")
    print("|---|---|---|---|---|")
    print(fmt("account-filtered mix, 0-3 filters, all", walls, els, rows))
    k = args.warmup
    print(fmt(f"the same without the first {k} (as the agent)", walls[k:], els[k:],
              rows[k:]))
    print(fmt("baseline: SELECT 1 FORMAT JSON", base_w, base_e, [1]))
    if args.summary:
        w, e = sorted(walls[k:]), sorted(els[k:])
        with open(args.summary, "w") as f:
            json.dump({"insert_ms": statistics.median(times),
                       "wall_ms": [percentile(w, 0.5), percentile(w, 0.99)],
                       "elapsed_ms": [percentile(e, 0.5), percentile(e, 0.99)]}, f)

    big_id, big_cust = accounts[BIG_ACCOUNT_UUID]
    values = b.scalar(
        f"SELECT DISTINCT dst_prefix_in FROM active_calls WHERE customer_acc_id = {big_id} "
        f"AND customer_id = {big_cust} AND length(dst_prefix_in) >= 8 "
        f"ORDER BY dst_prefix_in").split("\n")
    total = b.scalar(f"SELECT count() FROM active_calls WHERE customer_acc_id = {big_id}")
    rng = random.Random(args.seed)
    kinds = [("-eq", "dst-prefix-in-eq", lambda v: v),
             ("-starts-with", "dst-prefix-in-starts-with", lambda v: v[:-2]),
             ("-ends-with", "dst-prefix-in-ends-with", lambda v: v[-6:])]
    for kind, name, make in kinds:
        walls, els, rows = [], [], []
        for _ in range(args.reps):
            v = rng.choice(values)
            sql, params = build_sql(big_cust, big_id, [(name, make(v))])
            w, e, r = b.timed(sql, params)
            walls.append(w)
            els.append(e)
            rows.append(r)
        print(fmt(f"selective {kind} in the big account ({total} calls)", walls, els, rows))
    for acc, filters in examples:
        sql, params = build_sql(big_cust, big_id, filters)
        w, e, r = b.timed(sql, params)
        print(f"  queries.txt example {filters}: {r} rows, {w:.3f} ms wall, {e:.3f} ms elapsed")
    if errors:
        print(f"{errors} mix queries failed")

    print(f"\npeak RSS of this Python process: after reading the snapshot {rss_loaded:.0f} MB, "
          f"after the inserts {rss_insert:.0f} MB, at the end {peak_rss_mb():.0f} MB "
          f"(current {current_rss_mb():.0f} MB, with the snapshot text freed)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
