#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ from real inputs:
the lines of tests/fixtures/snapshot-1.jsonl and snapshot-2.jsonl (two consecutive
snapshots of a node, byte for byte as the switch sends them), the query strings of
tests/endpoint.rs, and
tokens signed HS256 with the targets' secret (fuzz_targets/common/mod.rs) for the API
accesses of tests/fixtures/directory.json. Rerun it after changing those; scripts/fuzz
does not need it (the seeds are kept in the repository)."""

import base64
import hashlib
import hmac
import json
import pathlib
import shutil

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"
SECRET = b"fuzz-secret"  # common::SECRET
COOKIE = "_yeti_customer_v1_session"
A101 = "21636369-8b52-1b4a-97b7-50923ceb3ffd"
A102 = "795b929e-9a9a-10fd-aa7b-5bf55eb561a4"
A103 = "9b08923d-10c6-1fd9-94b2-b8fda02f34a6"
A104 = "781f9c58-d664-1fa9-a8a8-529f035efa25"
FAR = 4102444800  # 2100-01-01


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims, header=None, secret=SECRET):
    header = header or {"alg": "HS256", "typ": "JWT"}
    h = json.dumps(header, separators=(",", ":")).encode()
    p = json.dumps(claims, separators=(",", ":")).encode()
    msg = f"{b64(h)}.{b64(p)}"
    sig = hmac.new(secret, msg.encode(), hashlib.sha256).digest()
    return f"{msg}.{b64(sig)}"


def switch_line(row):
    """A row as the switch writes it: no spaces, every non-ASCII character a \\uXXXX escape
    (the keys keep the order they have, byte order for the sample's rows)."""
    return json.dumps(row, separators=(",", ":")).encode()


def spaced(line):
    """A JSONEachRow line in the spaced layout of other writers, non-ASCII as raw UTF-8
    (the INSERT line as it is)."""
    if not line.lstrip().startswith(b"{"):
        return line
    return json.dumps(json.loads(line), ensure_ascii=False).encode()


def swap(line, old, new):
    """`line` with its one `old` replaced by `new` (which must be there)."""
    assert line.count(old) == 1, (old, line[:80])
    return line.replace(old, new)


def main():
    shutil.rmtree(SEEDS, ignore_errors=True)
    snapshot = (ROOT / "tests/fixtures/snapshot-1.jsonl").read_bytes()
    following = (ROOT / "tests/fixtures/snapshot-2.jsonl").read_bytes()

    # snapshot_line: every line of the sample snapshot, the query line, variants.
    lines = snapshot.split(b"\n")
    for i, line in enumerate(lines):
        if line.strip():
            write("snapshot_line", f"fixture-{i:02}", line)
    # The lines of the next snapshot that changed more than their id and timestamps.
    stable = {json.loads(l)["local_tag"]: json.loads(l) for l in lines[1:] if l.strip()}
    volatile = ("id", "snapshot_timestamp", "snapshot_date", "end_time")
    for line in following.split(b"\n")[1:]:
        if line.strip():
            now = json.loads(line)
            before = stable.get(now["local_tag"])
            if before is None or any(now[k] != before[k] for k in now if k not in volatile):
                write("snapshot_line", f"next-{now['local_tag']}", line)
    row = json.loads(lines[1])
    variants = {
        "epoch-times": dict(row, start_time=1764081000, connect_time=1764081010),
        "string-ints": dict(row, node_id="7", customer_id="1001", customer_acc_id="+101"),
        "no-timestamp": {k: v for k, v in row.items() if k not in ("snapshot_timestamp", "end_time")},
        "old-protocol-key": {
            **{k: v for k, v in row.items() if k != "auth_orig_transport_protocol_id"},
            "auth_orig_protocol_id": 2,
        },
        "escapes": dict(row, src_name_in="\u00c4\\\"\t", local_tag="t\u00e9g"),
        "bad-rate": dict(row, destination_fee="1e"),
    }
    for name, value in variants.items():
        write("snapshot_line", name, switch_line(value))
    # Other writers space their JSON and send raw UTF-8 (the layout of the old fixture).
    for i, line in enumerate(lines[1:6], 1):
        write("snapshot_line", f"spaced-{i:02}", spaced(line))
    nested = dict(row, metadata={"tags": [1, 2], "note": "x"}, snapshot_date=None)
    write("snapshot_line", "compact-nested", switch_line(nested))
    write("snapshot_line", "insert-same-line",
          b"INSERT INTO active_calls FORMAT JSONEachRow " + lines[1])
    write("snapshot_line", "latin1", swap(lines[1], b'"src_name_in":"a_b"', b'"src_name_in":"\xc4\xe9"'))

    # snapshot_apply: the whole samples, small parts of them, a refused one.
    write("snapshot_apply", "fixture", snapshot)
    write("snapshot_apply", "fixture-next", following)
    write("snapshot_apply", "spaced", b"\n".join(spaced(l) for l in lines if l.strip()) + b"\n")
    write("snapshot_apply", "compact-nested", b"\n".join([lines[1], switch_line(nested)]) + b"\n")
    # The regression of tests/fuzz_regressions.rs: a snapshot_timestamp key only nested.
    hidden = {k: v for k, v in row.items() if k != "snapshot_timestamp"}
    hidden["metadata"] = {"snapshot_timestamp": "2020-01-01 00:00:00"}
    hidden = switch_line(hidden)
    write("snapshot_apply", "nested-timestamp", hidden + b"\n")
    write("snapshot_line", "nested-timestamp", hidden)
    write("snapshot_apply", "first-rows", b"\n".join(lines[:4]) + b"\n")
    write("snapshot_apply", "no-insert", b"\n".join(lines[1:4]) + b"\n")
    repeated = swap(lines[1], b'"src_prefix_in":"79040479666"', b'"src_prefix_in":"999"')
    write("snapshot_apply", "repeated-call", b"\n".join([lines[0], lines[1], repeated]) + b"\n")
    write("snapshot_apply", "skipped-row", b"\n".join([lines[0], lines[2], b'{"local_tag":"","node_id":3}']) + b"\n")
    write("snapshot_apply", "refused", b"\n".join([lines[0], lines[1], b"not json"]) + b"\n")

    # query_params: the query strings of tests/endpoint.rs.
    queries = [
        f"account-id={A101}",
        f"account-id={A102}",
        f"account-id={A101.upper()}",
        f"account-id={A103}",
        f"account-id={A102}&auth-orig-port=5061",
        "account-id=",
        f"account-id={A101.replace('-', '')}",
        "account-id=00000000-0000-0000-0000-000000000000",
        f"account-id=%7B{A101}%7D",
        f"account-id={A101}&auth-orig-port=abc",
        f"account-id={A101}&auth-orig-port=99999999999",
        f"account-id={A101}&auth-orig-port=%2B0005061",
        f"account-id={A101}&auth-orig-transport-protocol-id=200",
        f"account-id={A101}&dst-prefix-in-eq[k]=1",
        f"account-id[]={A101}",
        f"auth-orig-port=x&account-id={A101}",
        "account-id=bad&auth-orig-port=x",
        f"account-id={A101}&page=2&sort[]=x",
        f"account-id={A102}&auth-orig-ip=2001%3Adb8%3A%3A1",
        f"account-id={A102}&connect-time-null=1&connect-time-null=0&auth-orig-port=1&auth-orig-port=5061",
        f"account-id={A102}&connect-time-null=FALSE",
        f"account-id={A103}&src-name-in-contains=%C3%AB",
        f"account-id={A103}&src-name-in-contains=%D0%BE",
        f"account-id={A103}&src-name-in-starts-with=%D0",
        f"account-id={A103}&src-name-in-ends-with=%AB",
        f"account-id={A103}&src-name-in-contains=A_B",
        f"account-id={A102}&src-name-in-eq=mixed+case",
        f"account-id={A102}&src-prefix-in-starts-with=380&dst-prefix-in-ends-with=%25&src-prefix-routing-contains=_",
        f"account-id={A102}&dst-prefix-routing-eq=%5Btag%5D&src-prefix-in-contains=%5C",
        "",
    ]
    for i, q in enumerate(queries):
        write("query_params", f"endpoint-{i:02}", q)

    # auth_headers: lines "A<Authorization value>" or "C<Cookie value>".
    static = lambda access: token({"aud": ["customer-v1"], "sub": access})
    dynamic = token({"aud": "customer-v1", "sub": "D", "exp": FAR,
                     "cfg": {"customer_id": 1001, "account_ids": [101],
                             "customer_portal_access_profile_id": 2}})
    headers = {
        "bearer-5001": f"ABearer {static(5001)}",
        "bearer-6002": f"ABearer {static(6002)}",
        "bare-string-sub": "A" + token({"aud": "customer-v1", "sub": "5002", "exp": FAR}),
        "dynamic": f"ABearer {dynamic}",
        "cookie": f"Cfoo=bar; {COOKIE}={static(5001)}; other=1",
        "quoted-cookie": f'C{COOKIE}="{static(6001)}"',
        "blank-header-then-cookie": f"A   \nC{COOKIE}={static(5002)}",
        "header-wins": f"ABearer {static(5001)}\nC{COOKIE}={static(5002)}",
        "two-cookie-headers": f"Cx=1\nC{COOKIE}={static(6001)}",
        "other-secret": "ABearer " + token({"aud": ["customer-v1"], "sub": 5001}, secret=b"other"),
        "expired": "ABearer " + token({"aud": ["customer-v1"], "sub": 5001, "exp": 1}),
        "alg-none": "ABearer " + b64(b'{"alg":"none"}') + "." + b64(b'{"aud":["customer-v1"],"sub":5001}') + ".",
        "garbage": "ABearer not.a.jwt",
    }
    for name, value in headers.items():
        write("auth_headers", name, value)

    # auth_claims: a mode byte ('0' header, '1' cookie, '2'/'3' with a header line), claims.
    claims = {
        "static": {"aud": ["customer-v1"], "sub": 5001},
        "static-restricted": {"aud": "customer-v1", "sub": "6001", "exp": FAR},
        "dynamic": {"aud": ["customer-v1"], "sub": "D",
                    "cfg": {"customer_id": 1002, "account_ids": [103, "104"],
                            "allowed_ips": ["0.0.0.0/0"], "provision_gateway_id": None}},
        "dynamic-profile": {"aud": "customer-v1", "sub": "D", "exp": FAR + 0.5,
                            "cfg": {"customer_id": "1001", "customer_portal_access_profile_id": 2,
                                    "allow_outgoing_numberlists_ids": []}},
        "no-aud": {"sub": 5001},
        "wrong-aud": {"aud": ["admin", "x"], "sub": 5001},
        "expired": {"aud": ["customer-v1"], "sub": 5001, "exp": 1},
        "unknown-access": {"aud": ["customer-v1"], "sub": 9999},
        "unknown-cfg-key": {"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 1001, "x": 1}},
    }
    for i, (name, value) in enumerate(claims.items()):
        mode = "01"[i % 2]
        write("auth_claims", name, mode + json.dumps(value))
    write("auth_claims", "custom-header", "2" + '{"alg":"HS256","kid":"k"}\n' + json.dumps(claims["static"]))
    write("auth_claims", "custom-header-cookie", "3" + '{"typ":"JWT","alg":"HS256"}\n' + json.dumps(claims["dynamic"]))


if __name__ == "__main__":
    main()
