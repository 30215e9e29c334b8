"""What the checks against real peers share (scripts/clickhouse-check,
scripts/prometheus-check): verdict lines, free ports, polling with a deadline, the
release build, and the agent as a child process on free loopback ports."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "differential"))
import compare as diff  # noqa: E402  (token minting, shared with the differential)

DEADLINE = 60
FAILED = []


def say(verdict, what):
    print(f"{verdict} {what}", flush=True)
    if verdict == "FAIL":
        FAILED.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(what, check, timeout=DEADLINE):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise Failure(f"{what}: not within {timeout} s")
        time.sleep(0.1)


class Failure(Exception):
    pass


def stop_process(proc):
    """SIGTERM, and SIGKILL if it has not exited within 30 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build():
    """The release agent and the switch example, built when missing or stale."""
    agent = os.environ.get("AGENT") or os.path.join(ROOT, "target/release/active-calls-agent")
    switch = os.environ.get("SWITCH") or os.path.join(ROOT, "target/release/examples/switch")
    if not os.environ.get("AGENT") or not os.environ.get("SWITCH"):
        print("building the release binary and examples/switch (cargo build --release)",
              flush=True)
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin",
                        "active-calls-agent", "--example", "switch"], cwd=ROOT, check=True)
    return agent, switch


def mint(secret, access_id):
    return diff.mint(secret, access_id)


class Agent:
    """The real binary over `folder`: API and feed on free ports, nodes never stale, and
    `api`, `upstream` (TOML lines of those sections) and `extra` (whole sections) added to
    its configuration."""

    def __init__(self, binary, folder, api="", upstream="", extra=""):
        self.binary, self.folder = binary, folder
        self.api, self.feed = free_port(), free_port()
        self.secret = "check-" + os.urandom(8).hex()
        self.scrape_token = "scrape-" + os.urandom(8).hex()
        self.snapshot = os.path.join(folder, "snapshot.jsonl")
        self.config = os.path.join(folder, "config.toml")
        self.proc = None
        with open(os.path.join(folder, "scrape-tokens"), "w") as f:
            f.write(self.scrape_token + "\n")
        with open(self.config, "w") as f:
            f.write(f"""[api]
listen = "127.0.0.1:{self.api}"
jwt_secret = "{self.secret}"
{api}

[store]
path = "{folder}/active-calls.db"

[feed]
watch = "{self.snapshot}"
listen = "127.0.0.1:{self.feed}"
stale_after = 0

[directory]
path = "{folder}/directory.json"

[upstream]
scrape_tokens_file = "{folder}/scrape-tokens"
{upstream}
{extra}
""")

    def start(self):
        log = open(os.path.join(self.folder, "agent.log"), "a")
        self.proc = subprocess.Popen([self.binary, "serve", "--config", self.config],
                                     stdout=log, stderr=subprocess.STDOUT)
        eventually("the agent answering", lambda: self.get("/readyz", None) is not None)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        stop_process(self.proc)

    def get(self, path, token):
        if self.proc.poll() is not None:
            raise Failure(f"the agent exited {self.proc.returncode}; see {self.folder}/agent.log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.api, timeout=30)
            conn.putrequest("GET", path, skip_accept_encoding=True)
            if token:
                conn.putheader("Authorization", "Bearer " + token)
            conn.endheaders()
            reply = conn.getresponse()
            return reply.status, reply.read()
        except OSError:
            return None

    def post(self, body, expect=200):
        """Posts a snapshot as the switch's libcurl does; the agent must answer `expect`."""
        conn = http.client.HTTPConnection("127.0.0.1", self.feed, timeout=60)
        conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded"})
        reply = conn.getresponse()
        text = reply.read()
        if reply.status != expect:
            raise Failure(f"the feed answered {reply.status}: {text[:200]!r}")

    def write_file(self, body):
        tmp = self.snapshot + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.rename(tmp, self.snapshot)

    def scrape(self):
        status, body = self.get("/api/rest/node/v1/active-calls", self.scrape_token)
        if status != 200:
            raise Failure(f"scrape answered {status}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def serves(self, stamp):
        """Whether the agent's current calls are those of the snapshot at `stamp`."""
        rows = self.scrape()
        return bool(rows) and all(r["snapshot_timestamp"] == stamp for r in rows)

    def metric(self, name, label=""):
        """The sum of the agent's series `name` (without its prefix) whose labels hold
        `label`; a series missing altogether is a failure, not a 0."""
        _, body = self.get("/metrics", None)
        values = []
        for line in body.decode().splitlines():
            series = line.split(" ", 1)[0]
            if series.split("{", 1)[0] == "active_calls_agent_" + name and label in series:
                values.append(float(line.rsplit(" ", 1)[1]))
        if not values:
            raise Failure(f"no metric {name}{{{label}}}")
        return sum(values)
