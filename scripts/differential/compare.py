#!/usr/bin/env python3
"""Differential checker: active-calls-agent vs the ClickHouse SQL of yeti-web.

Feeds the same random snapshots of one node to
  * the agent (via its watched snapshot file), queried over HTTP, and
  * an in-process ClickHouse (chdb), queried with the SQL of yeti-web's
    ClickhouseReport::CustomerOutgoingActiveCalls, values bound as query parameters
    exactly as yeti-web passes them (raw strings, no escaping by the click_house gem),
and compares the answers. See README.md beside this file.
"""

import argparse
import collections
import json
import os
import random
import re
import sys
import time
import urllib.parse
import uuid
from decimal import Decimal

# The checks' harness (the agent, tokens, the work folder), one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checklib import Agent, Failure, binaries, mint, run, say  # noqa: E402

COLUMNS = [
    "snapshot_timestamp", "start_time", "connect_time", "destination_prefix",
    "destination_initial_interval", "destination_initial_rate", "destination_next_interval",
    "destination_next_rate", "destination_fee", "src_name_in", "src_prefix_in",
    "dst_prefix_in", "src_prefix_routing", "dst_prefix_routing", "from_domain", "to_domain",
    "ruri_domain", "diversion_in", "pai_in", "ppi_in", "privacy_in", "rpid_in",
    "rpid_privacy_in", "auth_orig_transport_protocol_id", "auth_orig_ip", "auth_orig_port",
]
TEXT_COLS = ["src_name_in", "src_prefix_in", "dst_prefix_in", "src_prefix_routing",
             "dst_prefix_routing"]
OPS = {"eq": "{c} = {{{p}: String}}",
       "starts-with": "startsWith({c}, {{{p}: String}})",
       "ends-with": "endsWith({c}, {{{p}: String}})",
       "contains": "positionCaseInsensitive({c}, {{{p}: String}}) > 0"}
PLAIN_STR = ["destination_prefix", "from_domain", "to_domain", "ruri_domain", "auth_orig_ip"]
NULLABLE_STR = ["diversion_in", "pai_in", "ppi_in", "privacy_in", "rpid_in", "rpid_privacy_in"]
RATES = ["destination_initial_rate", "destination_next_rate", "destination_fee"]

# The data alphabet: mixed case, UTF-8, LIKE/GLOB/regex metacharacters, backslash, space.
ALPHABET = ["a", "b", "A", "B", "z", "Z", "1", "0", "9", "Ä", "ä", "é", "É", "%", "_", "*",
            "?", "[", "\\", " ", "."]
JUNK_EXTRA = ["\x00", "\t", "+", "&", "=", "#", "<", "/", "ß", "😀", "\\N", "\\x41", "\\t",
              "\\\\", "%25", "'", '"']
FALSE_WORDS = {"", "0", "f", "F", "false", "FALSE", "off", "OFF"}

CH_TABLE_TEMPLATE = """
CREATE TABLE active_calls (
    snapshot_timestamp DateTime('UTC'),
    node_id Int32,
    local_tag String,
    customer_id Int32,
    customer_acc_id Int32,
    start_time DateTime('UTC'),
    connect_time Nullable(DateTime('UTC')),
    destination_prefix String,
    destination_initial_interval Int32,
    destination_initial_rate {rate},
    destination_next_interval Int32,
    destination_next_rate {rate},
    destination_fee {rate},
    src_name_in String, src_prefix_in String, dst_prefix_in String,
    src_prefix_routing String, dst_prefix_routing String,
    from_domain String, to_domain String, ruri_domain String,
    diversion_in Nullable(String), pai_in Nullable(String), ppi_in Nullable(String),
    privacy_in Nullable(String), rpid_in Nullable(String), rpid_privacy_in Nullable(String),
    auth_orig_transport_protocol_id Int8,
    auth_orig_ip String,
    auth_orig_port Int32
) ENGINE = MergeTree ORDER BY (snapshot_timestamp, customer_acc_id)
"""

CH_SQL_HEAD = ("SELECT " + ", ".join(COLUMNS) + " FROM active_calls "
               "WHERE snapshot_timestamp = (select max(snapshot_timestamp) from active_calls) "
               "AND customer_id = {customer_id: Int32} AND customer_acc_id = {account_id: Int32}")

NORMALIZATIONS = collections.Counter()


# ----------------------------------------------------------------------------------------
# ClickHouse side

def ch_unescape(b):
    """ClickHouse's parse of a String query parameter ("escaped" text format), as observed
    on chdb; used only for values that are not valid UTF-8 (chdb's Python binding cannot
    pass those). Returns bytes, or None for a value ClickHouse rejects."""
    simple = {ord("0"): 0, ord("a"): 7, ord("b"): 8, ord("e"): 0x1B, ord("f"): 0x0C,
              ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("v"): 0x0B}
    same = set(b"\"'/=\\`")

    def hexval(c):
        s = chr(c)
        return int(s, 16) if s in "0123456789abcdefABCDEF" else -1

    out = bytearray()
    i = 0
    while i < len(b):
        c = b[i]
        if c in (9, 10):
            return None
        if c != 0x5C:
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(b):
            return None
        d = b[i + 1]
        if d == ord("x"):
            if i + 4 > len(b):
                return None
            out.append(((hexval(b[i + 2]) << 4) + hexval(b[i + 3])) & 0xFF)
            i += 4
        elif d == ord("N"):
            i += 2
        elif d in simple:
            out.append(simple[d])
            i += 2
        elif d in same:
            out.append(d)
            i += 2
        else:
            out += bytes([0x5C, d])
            i += 2
    return bytes(out)


class ClickHouse:
    def __init__(self, rate_type):
        from chdb import session
        self.s = session.Session()
        self.s.query("CREATE DATABASE IF NOT EXISTS diff")
        self.s.query("USE diff")
        self.s.query("DROP TABLE IF EXISTS active_calls")
        self.s.query(CH_TABLE_TEMPLATE.format(rate=rate_type))
        self.emulated = 0

    def insert(self, lines):
        # The very lines the agent reads; ClickHouse settings at their defaults.
        self.s.query("INSERT INTO active_calls FORMAT JSONEachRow\n" + "\n".join(lines))

    def raw(self, sql, params=None):
        return json.loads(str(self.s.query(sql, "JSON", params=params or {})))

    def query(self, customer_id, account_id, filters, escape=False):
        """filters: list of (name, value bytes). Returns ('rows', data, meta, n) or
        ('error', msg). escape=False binds each value as yeti-web does (the raw string, which
        ClickHouse parses in its escaped text format); escape=True escapes it first
        (backslash, tab, newline), so ClickHouse sees exactly the bytes given."""
        conds = []
        params = {"customer_id": str(customer_id), "account_id": str(account_id)}
        literal = {}
        for name, value in filters:
            if name == "connect-time-null":
                # ActiveModel-style truth table as in SPEC 1.2 (done in Ruby, not in SQL).
                conds.append("connect_time IS NOT NULL" if value.decode("utf-8", "replace")
                             in FALSE_WORDS and valid_utf8(value) else "connect_time IS NULL")
                continue
            p, sql = filter_condition(name)
            if escape:
                value = (value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t")
                         .replace(b"\n", b"\\n"))
            if valid_utf8(value):
                params[p] = value.decode("utf-8")
            else:
                # Not valid UTF-8: emulate the parameter parse, bind the result as bytes.
                self.emulated += 1
                parsed = ch_unescape(value)
                if parsed is None:
                    return ("error", "Cannot parse escape sequence (emulated)")
                if "String" not in sql:
                    return ("error", "cannot be parsed as int (emulated)")
                literal[p] = parsed
            conds.append(sql)
        sql = CH_SQL_HEAD
        for c in conds:
            sql += " AND " + c
        for p, b in literal.items():
            sql = re.sub(r"\{%s: String\}" % p, "unhex('%s')" % b.hex(), sql)
        sql += " ORDER BY start_time DESC FORMAT JSON"
        try:
            res = self.raw(sql, params)
        except Exception as e:  # chdb raises ChdbError / RuntimeError
            return ("error", str(e).split("\n")[0][:160])
        return ("rows", res["data"], res["meta"], res["rows"])


def valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def split_text_filter(name):
    for op in OPS:
        if name.endswith("-" + op):
            return name[: -len(op) - 1].replace("-", "_"), op
    raise ValueError(name)


# ----------------------------------------------------------------------------------------
# Agent side

def filter_condition(name):
    """The central API's condition for a value filter: (query parameter name, SQL). Raises
    ValueError for a name that is not a filter of the endpoint."""
    typed = {
        "auth-orig-ip": "String",
        "auth-orig-port": "Int32",
        "auth-orig-transport-protocol-id": "Int8",
    }
    p = name.replace("-", "_")
    if name in typed:
        return p, "%s = {%s: %s}" % (p, p, typed[name])
    col, op = split_text_filter(name)
    return p, OPS[op].format(c=col, p=p)


def encode_query(pairs, rng):
    """pairs: list of (name, value bytes) -> query string (form-urlencoded)."""
    out = []
    for name, value in pairs:
        enc = urllib.parse.quote_from_bytes(value, safe="")
        if rng.random() < 0.5:
            enc = enc.replace("%20", "+")
        out.append(f"{name}={enc}")
    return "&".join(out)


# ----------------------------------------------------------------------------------------
# Data generation

CUSTOMERS = [1001, 1002, 1003]
ACCOUNTS = [(101, 1001), (102, 1001), (103, 1002), (104, 1002), (105, 1003)]
ACCESS = {1001: 5001, 1002: 5002, 1003: 5003}


def directory(rng):
    uuids = {a: str(uuid.UUID(int=rng.getrandbits(128), version=1)) for a, _ in ACCOUNTS}
    d = {"accounts": [{"id": a, "uuid": uuids[a], "contractor_id": c} for a, c in ACCOUNTS],
         "api_accesses": [{"id": ACCESS[c], "customer_id": c, "account_ids": []}
                          for c in CUSTOMERS],
         "customers": [{"id": c} for c in CUSTOMERS],
         "customer_portal_access_profiles": [{"id": 1}]}
    return d, uuids


def rand_str(rng, lo=0, hi=6):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def fmt_time(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def gen_snapshot(rng, rnd, ncalls):
    snap_t = 1764081000 + rnd * 10
    snap_ts = fmt_time(snap_t)
    # Small per-column pools so -eq / -starts-with hit several rows; a few fresh values too.
    pools = {c: [rand_str(rng) for _ in range(rng.randint(6, 25))] + ["", "", "aÄ", "Aä"]
             for c in TEXT_COLS + PLAIN_STR + NULLABLE_STR}
    times = [snap_t - rng.randint(1, 7200) for _ in range(rng.randint(20, 60))]
    rows = []
    for i in range(ncalls):
        acc, cust = rng.choice(ACCOUNTS)
        if rng.random() < 0.04:  # a row whose customer_id is not the account's contractor
            cust = rng.choice([c for c in CUSTOMERS if c != cust])
        start = rng.choice(times) if rng.random() < 0.7 else snap_t - rng.randint(1, 86400)
        r = {"node_id": 1, "local_tag": f"R{rnd}-{i:05d}-{rng.randint(0, 9999):04X}",
             "snapshot_timestamp": snap_ts, "customer_id": cust, "customer_acc_id": acc,
             "start_time": fmt_time(start),
             "connect_time": None if rng.random() < 0.3 else fmt_time(start + rng.randint(0, 60))}
        for c in TEXT_COLS + PLAIN_STR:
            x = rng.random()
            if x < 0.05:
                r[c] = None
            elif x < 0.08:
                continue  # key missing
            elif x < 0.85:
                r[c] = rng.choice(pools[c])
            else:
                r[c] = rand_str(rng)
        for c in NULLABLE_STR:
            x = rng.random()
            if x < 0.3:
                r[c] = None
            elif x < 0.35:
                continue
            else:
                r[c] = rng.choice(pools[c])
        for c in ["destination_initial_interval", "destination_next_interval"]:
            v = rng.choice([1, 60, 30, 0])
            r[c] = str(v) if rng.random() < 0.4 else v
        for c in RATES:
            r[c] = rng.choice(["0.11", "0.0", "1", "0.5", "0.0001", "12.345600", "0.010",
                               "100", "0.000001", "3.50"])
        x = rng.random()
        if x < 0.9:
            v = rng.choice([5060, 5061, 5080, 0, 65535, 1, 15060])
            r["auth_orig_port"] = str(v) if rng.random() < 0.4 else v
        elif x < 0.95:
            r["auth_orig_port"] = None
        x = rng.random()
        if x < 0.9:
            v = rng.choice([1, 2, 3, 0])
            r["auth_orig_transport_protocol_id"] = str(v) if rng.random() < 0.4 else v
        elif x < 0.95:
            r["auth_orig_transport_protocol_id"] = None
        rows.append(r)
    return snap_ts, rows


# ----------------------------------------------------------------------------------------
# Query generation

FILTER_NAMES = ([f"{c.replace('_', '-')}-{op}" for c in TEXT_COLS for op in OPS]
                + ["auth-orig-ip", "auth-orig-port", "auth-orig-transport-protocol-id",
                   "connect-time-null"])


def case_change(rng, s):
    k = rng.random()
    if k < 0.25:
        return s.upper()
    if k < 0.5:
        return s.lower()
    if k < 0.65:
        return s.swapcase()
    return "".join(ch.upper() if rng.random() < 0.5 else ch.lower() for ch in s)


def derive_text(rng, rows, col, op):
    """A needle for a text filter, as bytes."""
    k = rng.random()
    if k < 0.12 or not rows:  # junk
        alpha = ALPHABET + JUNK_EXTRA
        return "".join(rng.choice(alpha) for _ in range(rng.randint(0, 5))).encode()
    src_col = col if rng.random() < 0.85 else rng.choice(TEXT_COLS)
    v = (rng.choice(rows).get(src_col) or "")
    if rng.random() < 0.15:
        # byte-level cut: may split a UTF-8 sequence
        b = v.encode()
        i, j = sorted((rng.randint(0, len(b)), rng.randint(0, len(b))))
        mode = rng.random()
        if mode < 0.33:
            return b[:j]
        if mode < 0.66:
            return b[i:]
        return b[i:j]
    mode = rng.random()
    if mode < 0.3:
        s = v
    else:
        i, j = sorted((rng.randint(0, len(v)), rng.randint(0, len(v))))
        s = v[:j] if mode < 0.5 else (v[i:] if mode < 0.7 else v[i:j])
    if rng.random() < 0.4:
        s = case_change(rng, s)
    return s.encode()


def derive_int(rng, rows, col, bits):
    base = [r.get(col) for r in rows if r.get(col) is not None] or [5060]
    v = int(rng.choice(base))
    k = rng.random()
    if k < 0.6:
        return str(v).encode()
    wrap = 1 << bits
    variants = [f"+{v}", f"0{v}", f"-0", f"{v + wrap}", f"{v - wrap}", f" {v}", f"{v} ", "",
                "abc", f"{v}.0", "1e3", "0x10", str((1 << (bits - 1))), f"-{v}",
                "99999999999999999999", f"{v}\t", "\\N"]
    return rng.choice(variants).encode()


def derive_value(rng, rows, name):
    if name == "auth-orig-ip":
        return derive_text(rng, rows, "auth_orig_ip", "eq")
    if name == "auth-orig-port":
        return derive_int(rng, rows, "auth_orig_port", 32)
    if name == "auth-orig-transport-protocol-id":
        return derive_int(rng, rows, "auth_orig_transport_protocol_id", 8)
    if name == "connect-time-null":
        return rng.choice(["", "0", "f", "F", "false", "FALSE", "off", "OFF", "False", "1",
                           "true", "yes", "abc", "t", "no", "on"]).encode()
    col, op = split_text_filter(name)
    return derive_text(rng, rows, col, op)


# ----------------------------------------------------------------------------------------
# Comparison

def norm_rows(rows, rate_type, side):
    out = []
    for r in rows:
        r = dict(r)
        if rate_type.startswith("Decimal"):
            for c in RATES:
                if r.get(c) is not None:
                    d = Decimal(str(r[c]))
                    if side == "ch" and not isinstance(r[c], str):
                        NORMALIZATIONS["Decimal rate printed as JSON number -> Decimal value"] += 1
                    elif side == "agent":
                        NORMALIZATIONS["agent rate text -> Decimal value"] += 1
                    r[c] = str(d.normalize()) if d != 0 else "0"
        out.append(r)
    return out


def canon(r):
    return json.dumps(r, sort_keys=True, ensure_ascii=False)


def compare(agent_status, agent_body, ch, rate_type):
    """Returns (verdict, detail). verdict: 'match', 'match-reject', or a mismatch class."""
    if ch[0] == "error":
        if agent_status == 400:
            return "match-reject", None
        return "agent-answers/ch-rejects", {"agent_status": agent_status, "ch_error": ch[1]}
    _, ch_data, ch_meta, ch_rows = ch
    if agent_status != 200:
        return "agent-rejects/ch-answers", {"agent_status": agent_status,
                                            "agent_body": agent_body.decode("utf-8", "replace"),
                                            "ch_rows": ch_rows}
    body = json.loads(agent_body)
    if list(body.keys()) != ["data", "rows"] or body["rows"] != len(body["data"]):
        return "agent-envelope", {"keys": list(body.keys()), "rows": body.get("rows")}
    for r in body["data"]:
        if list(r.keys()) != COLUMNS:
            return "agent-row-keys", {"keys": list(r.keys())}
    a = norm_rows(body["data"], rate_type, "agent")
    c = norm_rows(ch_data, rate_type, "ch")
    ca = collections.Counter(canon(r) for r in a)
    cc = collections.Counter(canon(r) for r in c)
    if ca != cc:
        only_a = list((ca - cc).elements())
        only_c = list((cc - ca).elements())
        cls = ("agent-extra-rows" if only_a and not only_c else
               "agent-missing-rows" if only_c and not only_a else "rows-differ")
        return cls, {"only_agent": only_a[:3], "only_ch": only_c[:3],
                     "n_only_agent": len(only_a), "n_only_ch": len(only_c),
                     "n_agent": len(a), "n_ch": len(c)}
    # Order: only between distinct start_time values. Both lists hold the same multiset, so
    # comparing the start_time sequences and the multiset of each run of equal start_time
    # checks exactly that.
    def groups(rows):
        g = []
        for r in rows:
            if g and g[-1][0] == r["start_time"]:
                g[-1][1][canon(r)] += 1
            else:
                g.append((r["start_time"], collections.Counter({canon(r): 1})))
        return g
    if groups(a) != groups(c):
        return "order", {"agent_start_times": [r["start_time"] for r in a][:20],
                         "ch_start_times": [r["start_time"] for r in c][:20]}
    return "match", None


# ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="snapshots (default 30)")
    ap.add_argument("--queries", type=int, default=250, help="queries per snapshot")
    ap.add_argument("--calls", type=int, default=300, help="calls per snapshot")
    ap.add_argument("--seed", type=int, default=20251125)
    ap.add_argument("--rate-type", default="String",
                    help="ClickHouse type of the rate columns: String (default) or e.g. "
                         "'Decimal(18, 6)'")
    ap.add_argument("--out", default=None,
                    help="JSON report (default report.json in the work folder, which is "
                         "kept when anything differs)")
    args = ap.parse_args()
    binary, = binaries("agent")
    return run(lambda work: differential(args, binary, work), "differential")


def differential(args, binary, work):
    rng = random.Random(args.seed)
    agent = Agent(binary, os.path.join(work, "agent"), api="token_lifetime = 0")
    d, uuids = directory(rng)
    with open(os.path.join(agent.folder, "directory.json"), "w") as f:
        json.dump(d, f, indent=1)
    tokens = {c: mint(agent.secret, ACCESS[c]) for c in CUSTOMERS}

    ch = ClickHouse(args.rate_type)
    self_check_unescape(ch, rng)

    stats = collections.Counter()
    per_filter = collections.Counter()
    classes = collections.defaultdict(list)
    t0 = time.time()
    agent.start()
    for rnd in range(args.rounds):
        snap_ts, rows = gen_snapshot(rng, rnd, args.calls)
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        ch.insert(lines)
        agent.write_file(("INSERT INTO active_calls FORMAT JSONEachRow\n"
                          + "\n".join(lines) + "\n").encode())
        wait_visible(agent, tokens, uuids, rows, snap_ts)
        by_acc = collections.defaultdict(list)
        for r in rows:
            by_acc[r["customer_acc_id"]].append(r)
        for q in range(args.queries):
            acc, cust = rng.choice(ACCOUNTS)
            acc_rows = [r for r in by_acc[acc] if r["customer_id"] == cust] or rows
            names = rng.sample(FILTER_NAMES, rng.choice([0, 1, 1, 1, 2, 2, 3, 4]))
            filters = [(n, derive_value(rng, acc_rows, n)) for n in names]
            stats["queries"] += 1
            for n, _ in filters:
                per_filter[n] += 1
            for escape in (False, True):
                res = run_one(agent, ch, tokens[cust], uuids[acc], cust, acc, filters, rng,
                              args.rate_type, escape)
                stats[res["mode"] + ":" + res["verdict"]] += 1
                if res["verdict"] not in ("match", "match-reject"):
                    res["minimal"] = minimize(agent, ch, tokens[cust], uuids[acc], cust,
                                              acc, filters, rng, args.rate_type, escape)
                    classes[classify(res)].append(res)
        print(f"round {rnd + 1}/{args.rounds}: {stats['queries']} queries, "
              f"{sum(len(v) for v in classes.values())} mismatches, "
              f"{time.time() - t0:.0f}s", flush=True)

    report = {"seed": args.seed, "rounds": args.rounds, "rate_type": args.rate_type,
              "stats": dict(stats), "per_filter": dict(per_filter),
              "emulated_param_parses": ch.emulated,
              "normalizations": dict(NORMALIZATIONS),
              "classes": {k: {"count": len(v), "examples": smallest(v, 3)}
                          for k, v in sorted(classes.items())}}
    out = args.out or os.path.join(work, "report.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    # The report outlives the run only where it is kept.
    print_summary(report, out if args.out or classes or os.environ.get("KEEP") else None)
    if classes:
        say("FAIL", f"the agent and ClickHouse differ: {len(classes)} mismatch classes")


def self_check_unescape(ch, rng):
    """The emulated parameter parse must agree with ClickHouse on valid UTF-8 values."""
    alpha = ALPHABET + JUNK_EXTRA + ["\\x4g", "\\xZZ", "\\0", "\\a", "\\e", "\\'", "\\`", "\\q",
                                     "\\=", "\\/", "\\Ä", "x"]
    for _ in range(300):
        v = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 6)))
        try:
            got = bytes.fromhex(ch.raw("SELECT hex({v: String}) AS h", {"v": v})["data"][0]["h"])
        except Exception:
            got = None
        want = ch_unescape(v.encode())
        if got != want:
            raise Failure(f"ch_unescape disagrees with ClickHouse on {v!r}: {got!r} {want!r}")


def wait_visible(agent, tokens, uuids, rows, snap_ts, timeout=20):
    counts = collections.Counter((r["customer_id"], r["customer_acc_id"]) for r in rows)
    (cust, acc), n = counts.most_common(1)[0]
    path = f"/api/rest/customer/v1/outgoing-active-calls?account-id={uuids[acc]}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, body = agent.get(path, tokens[cust])
        if st == 200:
            b = json.loads(body)
            if b["rows"] == n and b["data"][0]["snapshot_timestamp"] == snap_ts:
                return
        time.sleep(0.05)
    raise Failure(f"snapshot {snap_ts} not visible after {timeout}s")


def run_one(agent, ch, token, acc_uuid, cust, acc, filters, rng, rate_type, escape):
    qs = encode_query([("account-id", acc_uuid.encode())] + filters, rng)
    path = "/api/rest/customer/v1/outgoing-active-calls?" + qs
    st, body = agent.get(path, token)
    chres = ch.query(cust, acc, filters, escape)
    verdict, detail = compare(st, body, chres, rate_type)
    if detail and len(filters) == 1 and filters[0][0] not in (
            "auth-orig-port", "auth-orig-transport-protocol-id", "connect-time-null"):
        col = (split_text_filter(filters[0][0])[0] if filters[0][0] != "auth-orig-ip"
               else "auth_orig_ip")
        for side in ("only_agent", "only_ch"):
            if side in detail:
                detail[side + "_" + col] = [json.loads(r)[col] for r in detail[side]]
    return {"verdict": verdict, "mode": "escaped" if escape else "raw", "query": qs,
            "customer": cust, "account": acc,
            "filters": [(n, v.decode("utf-8", "backslashreplace"), v.hex()) for n, v in filters],
            "detail": detail}


def minimize(agent, ch, token, acc_uuid, cust, acc, filters, rng, rate_type, escape):
    """The single filters that mismatch on their own."""
    out = []
    for f in filters:
        r = run_one(agent, ch, token, acc_uuid, cust, acc, [f], rng, rate_type, escape)
        if r["verdict"] not in ("match", "match-reject"):
            out.append(r)
    return out


def needle_features(b):
    feats = []
    if b"\\" in b:
        feats.append("backslash")
    if b"\t" in b or b"\n" in b:
        feats.append("tab/newline")
    if not valid_utf8(b):
        feats.append("invalid-utf8")
    elif any(c > 127 for c in b):
        feats.append("non-ascii")
    if b == b"":
        feats.append("empty")
    return feats


def classify(res):
    if res["minimal"]:
        m = res["minimal"][0]
        name, _, hexv = m["filters"][0]
        kind = name
        for op in OPS:
            if name.endswith("-" + op):
                kind = op
        feats = needle_features(bytes.fromhex(hexv))
        if kind in ("auth-orig-port", "auth-orig-transport-protocol-id"):
            feats = [int_feature(bytes.fromhex(hexv), 32 if kind == "auth-orig-port" else 8)]
        return f"{res['mode']} | {m['verdict']} | {kind} | {'+'.join(feats) or 'plain'}"
    return f"{res['mode']} | {res['verdict']} | combination-only"


def int_feature(b, bits):
    t = b.decode("utf-8", "replace")
    if re.fullmatch(r"[+-]?[0-9]+", t):
        v = int(t)
        return "in-range" if -(1 << (bits - 1)) <= v < (1 << (bits - 1)) else "out-of-range"
    return "not-an-integer"


def smallest(results, k):
    """Examples for a class: single-filter reproductions first, those where the two sides
    disagree on real rows first, then the shortest query."""
    def key(r):
        m = r["minimal"][0] if r["minimal"] else r
        d = m["detail"] or {}
        return (-min(d.get("ch_rows", 0), 1), len(m["query"]), m["query"])
    return sorted(results, key=key)[:k]


def print_summary(report, out):
    s = report["stats"]
    print(f"\n== {s.get('queries', 0)} queries, each compared twice; rate type "
          f"{report['rate_type']}")
    for mode in ("raw", "escaped"):
        n = {k.split(":", 1)[1]: v for k, v in s.items() if k.startswith(mode + ":")}
        bad = sum(v for k, v in n.items() if k not in ("match", "match-reject"))
        print(f"   {mode:7} params: {n.get('match', 0)} same rows, {n.get('match-reject', 0)}"
              f" rejected by both, {bad} mismatches")
    print("filters used:", ", ".join(f"{k}={v}" for k, v in sorted(report["per_filter"].items())))
    print("param parses emulated (invalid UTF-8):", report["emulated_param_parses"])
    print("normalizations applied:", report["normalizations"] or "none")
    if not report["classes"]:
        print("NO MISMATCHES")
    for k, v in report["classes"].items():
        print(f"\n-- {k}: {v['count']}")
        ex = v["examples"][0]
        m = ex["minimal"][0] if ex["minimal"] else ex
        print("   query:", m["query"])
        det = {k: v for k, v in m["detail"].items() if k not in ("only_agent", "only_ch")}
        print("   detail:", json.dumps(det, ensure_ascii=False)[:600])
    if out:
        print("\nfull report:", out)


if __name__ == "__main__":
    sys.exit(main())
