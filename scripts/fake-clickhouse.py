#!/usr/bin/env python3
"""A fake ClickHouse that takes inserts over HTTP and records them (standard library only).

    scripts/fake-clickhouse.py --record DIR [--port PORT] [--user U --password P]

It plays the part of ClickHouse's HTTP interface the agent's relay uses:

* `POST /?query=INSERT INTO <table> FORMAT JSONEachRow&insert_deduplication_token=T&...`
  with the rows in the body (gzip when `Content-Encoding: gzip`), answered 200 with an
  empty body. A malformed query or a line that is not a JSON object gets 400 with a
  ClickHouse-style message; wrong credentials (when --user is given) 403 with
  `X-ClickHouse-Exception-Code: 516`, as ClickHouse answers them.
* Deduplication as ClickHouse does it for a table with deduplication on: an insert whose
  `insert_deduplication_token` was stored already is answered 200 and stores nothing.
* `GET /ping` answers `Ok.`.

Everything is recorded under DIR, so the fake can be stopped (SIGTERM or SIGKILL: the
port then refuses connections, like a ClickHouse that is down) and started again on the
same port and DIR, keeping its arrival order and its deduplication memory:

* `DIR/inserts.jsonl`: one JSON object per insert request, in arrival order: `seq`,
  `time`, `status`, `token`, `duplicate`, `query`, `params`, `headers`, `wire_bytes`,
  `rows_file` (the decoded body, for 200s), `error`. Written and flushed before the answer.
* `DIR/rows/<seq>.jsonl`: the decoded body of insert `seq`, byte for byte.

Once listening it prints `listening on 127.0.0.1:<port>` on stdout (useful with --port 0).
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

INSERT = re.compile(r"^\s*INSERT\s+INTO\s+([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)?)\s+FORMAT\s+JSONEachRow\s*$",
                    re.IGNORECASE)
# ClickHouse error codes used in the answers.
SYNTAX_ERROR = 62
CANNOT_PARSE_INPUT = 27
AUTHENTICATION_FAILED = 516


class Record:
    """The inserts received so far, on disk and in memory (tokens stored, next seq)."""

    def __init__(self, directory):
        self.dir = directory
        self.rows_dir = os.path.join(directory, "rows")
        os.makedirs(self.rows_dir, exist_ok=True)
        self.path = os.path.join(directory, "inserts.jsonl")
        self.lock = threading.Lock()
        self.stored_tokens = set()
        self.next_seq = 1
        # A restart resumes from what an earlier run of the fake recorded.
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    self.next_seq = max(self.next_seq, entry["seq"] + 1)
                    if entry["status"] == 200 and not entry["duplicate"]:
                        self.stored_tokens.add(entry["token"])
        self.file = open(self.path, "a", encoding="utf-8")

    def add(self, entry, rows):
        """Assigns the entry its seq, decides whether it is a duplicate (for a 200), and
        writes it; returns the entry."""
        with self.lock:
            entry["seq"] = self.next_seq
            self.next_seq += 1
            entry["time"] = time.time()
            entry["duplicate"] = False
            if entry["status"] == 200:
                entry["duplicate"] = entry["token"] in self.stored_tokens
                self.stored_tokens.add(entry["token"])
            if rows is not None:
                name = f"{entry['seq']:06d}.jsonl"
                with open(os.path.join(self.rows_dir, name), "wb") as f:
                    f.write(rows)
                entry["rows_file"] = os.path.join("rows", name)
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
            return entry


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-clickhouse"

    # Set on the class before serving.
    record = None
    user = None
    password = None

    def log_message(self, fmt, *args):  # to stderr, with a timestamp
        sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), fmt % args))

    def answer(self, status, text="", headers=()):
        body = text.encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if urlsplit(self.path).path in ("/", "/ping"):
            self.answer(200, "Ok.\n")
        else:
            self.answer(404, "There is no handle %s\n" % self.path)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def credentials(self, params):
        """The user and key as ClickHouse takes them: headers, URL parameters, or Basic."""
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        key = self.headers.get("X-ClickHouse-Key") or params.get("password")
        return user, key

    def do_POST(self):
        wire = self.read_body()
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        entry = {
            "path": url.path,
            "params": params,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "wire_bytes": len(wire),
            "token": params.get("insert_deduplication_token", ""),
            "query": params.get("query"),
            "rows_file": None,
            "error": None,
        }
        status, text, extra = self.insert(entry, wire, params)
        entry["status"] = status
        if status != 200:
            entry["error"] = text.strip()
        rows = entry.pop("_rows", None)
        self.record.add(entry, rows if status == 200 else None)
        self.answer(status, text, extra)

    def insert(self, entry, wire, params):
        """What ClickHouse would answer: (status, text, extra headers)."""
        if self.user is not None and self.credentials(params) != (self.user, self.password):
            return (403, "Code: 516. DB::Exception: %s: Authentication failed: password is "
                    "incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)\n"
                    % (self.credentials(params)[0] or "default"),
                    [("X-ClickHouse-Exception-Code", str(AUTHENTICATION_FAILED))])
        try:
            body = gzip.decompress(wire) if self.headers.get("Content-Encoding") == "gzip" else wire
        except (OSError, EOFError, zlib.error) as e:
            return (400, "Code: 432. DB::Exception: cannot decompress: %s\n" % e,
                    [("X-ClickHouse-Exception-Code", "432")])
        query = params.get("query")
        if query is None:
            # ClickHouse also takes the query as the body's first line.
            query, _, body = body.partition(b"\n")
            query = query.decode("utf-8", "replace")
            entry["query"] = query
        if not INSERT.match(query):
            return (400, "Code: %d. DB::Exception: Syntax error: not an INSERT ... FORMAT "
                    "JSONEachRow: %r\n" % (SYNTAX_ERROR, query[:100]),
                    [("X-ClickHouse-Exception-Code", str(SYNTAX_ERROR))])
        for number, line in enumerate(body.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    raise ValueError("not an object")
            except ValueError as e:
                return (400, "Code: %d. DB::Exception: Cannot parse input: row %d: %s\n"
                        % (CANNOT_PARSE_INPUT, number, e),
                        [("X-ClickHouse-Exception-Code", str(CANNOT_PARSE_INPUT))])
        if not entry["token"]:
            # Without a token, ClickHouse deduplicates by the data's hash.
            entry["token"] = "sha256:" + hashlib.sha256(body).hexdigest()
        entry["_rows"] = body
        return 200, "", [("X-ClickHouse-Summary", '{"written_rows":"%d"}' % body.count(b"\n"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", required=True, help="folder of the record (created)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--user", help="require this X-ClickHouse-User (and --password)")
    parser.add_argument("--password", default="")
    args = parser.parse_args()

    Handler.record = Record(args.record)
    Handler.user, Handler.password = args.user, args.password
    # HTTPServer sets SO_REUSEADDR: a restart binds the same port at once.
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    # SIGTERM stops at once (open connections die with the process), like a crash.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
