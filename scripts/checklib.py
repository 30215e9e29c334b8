"""The one harness of the checks under scripts/ that run the agent from outside
(clickhouse-check, prometheus-check, upstream-check, openapi-check, differential/compare.py):
verdict lines, free ports, polling with a deadline, the release binaries found where cargo
put them, tokens, the agent as a child process on free loopback ports, and a work folder
whose processes are stopped and which is removed whatever happens.

Standard library only: a check must run on a bare node with python3."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DEADLINE = 60
FAILED = []
CHILDREN = []  # the processes started, for run() to stop whatever happens


# ----------------------------------------------------------------------------------------
# Verdicts and waiting

class Failure(Exception):
    """A check that cannot go on; run() reports it as a FAIL line."""


def say(verdict, what):
    """One verdict line (PASS, FAIL, SKIP) as CI logs show them; a FAIL makes the exit 1."""
    print(f"{verdict} {what}", flush=True)
    if verdict == "FAIL":
        FAILED.append(what)


def eventually(what, check, timeout=DEADLINE):
    """check()'s first truthy value; a Failure naming `what` once `timeout` s have passed, so
    that no wait hangs a CI run."""
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise Failure(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def free_port():
    """A loopback port free now, so that checks run beside each other and a real agent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------
# The binaries

# name: (the variable that names a binary built elsewhere, cargo's flags, its path in the
# target directory)
BINARIES = {
    "agent": ("AGENT", ["--bin", "active-calls-agent"], "release/active-calls-agent"),
    "switch": ("SWITCH", ["--example", "switch"], "release/examples/switch"),
}


def target_dir():
    """Cargo's target directory for this checkout as cargo resolves it (CARGO_TARGET_DIR,
    .cargo/config.toml), not ./target: the binaries are wherever cargo put them."""
    done = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)["target_directory"]


def binaries(*names):
    """The paths of the release binaries `names` ("agent", "switch"): each the one its
    variable (AGENT, SWITCH) names, else built here. Cargo itself decides whether one is
    missing or stale, so a check never runs an old build of edited sources. Every binary
    not named by its variable is built in one go, whichever the check needs: the example
    brings the dev-dependencies' features, and building the agent without it would
    rebuild it, check after check."""
    given = {n: os.path.abspath(os.environ[BINARIES[n][0]])
             for n in BINARIES if os.environ.get(BINARIES[n][0])}
    if any(n not in given for n in names):
        flags = [f for n, (_, fs, _) in BINARIES.items() if n not in given for f in fs]
        print(f"building {' '.join(flags)} (cargo build --release --locked)", flush=True)
        subprocess.run(["cargo", "build", "--release", "--locked", *flags], cwd=ROOT,
                       check=True)
        target = target_dir()
        for n, (_, _, path) in BINARIES.items():
            given.setdefault(n, os.path.join(target, path))
    return [given[n] for n in names]


# ----------------------------------------------------------------------------------------
# Child processes and the work folder

def spawn(args, log, **kwargs):
    """A child process writing to the file `log` (appended), stopped by run() at the end
    even when the check fails or is interrupted."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, **kwargs)
    CHILDREN.append(proc)
    return proc


def stop_process(proc, sig=signal.SIGTERM, timeout=30):
    """Sends `sig`, then SIGKILL if it has not exited within `timeout` s; returns (exit
    code, seconds it took), which checks of a graceful stop judge."""
    began = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in CHILDREN:
        CHILDREN.remove(proc)
    return proc.returncode, time.monotonic() - began


def _interrupted(signum, _frame):
    """A CI timeout (SIGTERM) or Ctrl-C unwinds through run()'s cleanup."""
    raise SystemExit(128 + signum)


def run(check, name):
    """Runs check(work) in a new work folder; returns the exit status (1 on any FAIL). A
    Failure becomes a FAIL line; whatever happens, the processes started are stopped (the
    last started first) and the folder removed, unless KEEP is set or something failed:
    then its path is printed, logs and all."""
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    work = tempfile.mkdtemp(prefix=name + ".")
    try:
        check(work)
    except Failure as e:
        say("FAIL", str(e))
    finally:
        for proc in reversed(list(CHILDREN)):
            stop_process(proc)
        if os.environ.get("KEEP") or FAILED:
            print(f"work folder kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if FAILED else 0


# ----------------------------------------------------------------------------------------
# Tokens

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret, access_id):
    """A customer token for API access `access_id`, signed as yeti-web's portal signs them
    (HS256, aud customer-v1), without asking the binary under test."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"aud": ["customer-v1"], "sub": access_id}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


# ----------------------------------------------------------------------------------------
# The agent

METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


class Agent:
    """The real binary over `folder` (the caller puts directory.json there): API and feed on
    free loopback ports, a random secret and scrape token, nodes never stale, and `api`,
    `feed`, `upstream` (TOML lines of those sections) and `extra` (whole sections) added to
    its configuration. Every start logs to agent.log, at info: the checks read it."""

    def __init__(self, binary, folder, api="", feed="", upstream="", extra=""):
        os.makedirs(folder, exist_ok=True)
        self.binary, self.folder = binary, folder
        self.api, self.feed = free_port(), free_port()
        self.secret = "check-" + os.urandom(8).hex()
        self.scrape_token = "scrape-" + os.urandom(8).hex()
        self.snapshot = os.path.join(folder, "snapshot.jsonl")
        self.config = os.path.join(folder, "config.toml")
        self.log = os.path.join(folder, "agent.log")
        self.proc = None
        self.log_offset = 0
        self.start_seconds = None
        tokens = os.path.join(folder, "scrape-tokens")
        with open(tokens, "w") as f:
            f.write(f"# the check's aggregator\n{self.scrape_token}\n")
        os.chmod(tokens, 0o600)
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
{feed}

[directory]
path = "{folder}/directory.json"

[upstream]
scrape_tokens_file = "{tokens}"
{upstream}
{extra}
""")

    def start(self):
        """Starts it and waits, within DEADLINE, for /readyz to answer 200: the directory
        read and the listeners bound."""
        self.log_offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        began = time.monotonic()
        self.proc = spawn([self.binary, "serve", "--config", self.config], self.log,
                          env={**os.environ, "RUST_LOG": "info"})
        eventually("the agent ready (/readyz 200)", self.ready)
        self.start_seconds = time.monotonic() - began

    def ready(self):
        try:
            return self.request("GET", "/readyz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def stop(self, sig=signal.SIGTERM):
        """(exit code, seconds to exit) after `sig`."""
        return stop_process(self.proc, sig)

    def kill(self):
        return self.stop(signal.SIGKILL)

    def log_lines(self):
        """The lines it logged since its last start."""
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace").splitlines()

    def request(self, method, path, headers=None, body=None, port=None, timeout=30):
        """One request on a new connection to the API (or `port`), no Accept-Encoding
        unless given: (status, lower-cased headers, body). A Failure with the log's tail
        when the agent is gone, rather than a refused connection."""
        if self.proc.poll() is not None:
            tail = "\n".join(self.log_lines()[-20:])
            raise Failure(f"the agent exited {self.proc.returncode}; {self.log} ends:\n{tail}")
        conn = http.client.HTTPConnection("127.0.0.1", port or self.api, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            reply = conn.getresponse()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
        finally:
            conn.close()

    def get(self, path, token=None, headers=None):
        """(status, body) of a GET on the API, with `token` as the bearer."""
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = "Bearer " + token
        status, _, body = self.request("GET", path, headers)
        return status, body

    def post(self, body, path="/", headers=None, expect=200):
        """Posts a snapshot to the feed socket as the switch's libcurl does; the agent must
        answer `expect`. Returns the seconds the answer took."""
        began = time.monotonic()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        status, _, text = self.request("POST", path, headers, body, port=self.feed,
                                       timeout=60)
        if status != expect:
            raise Failure(f"the feed answered {status}: {text[:200]!r}")
        return time.monotonic() - began

    def write_file(self, body):
        """Writes the watched snapshot file as a well-behaved writer does: a temporary file
        in the same folder, then a rename."""
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

    def metrics(self):
        """{(series name, labels): value} of its /metrics (on the API listener)."""
        status, body = self.get("/metrics")
        if status != 200:
            raise Failure(f"/metrics answered {status}")
        found = {}
        for line in body.decode().splitlines():
            m = METRIC_LINE.match(line)
            if m:
                found[(m.group(1), m.group(2) or "")] = float(m.group(3))
        return found

    def metric(self, name, label=""):
        """The sum of its series `name` (without the prefix) whose labels hold `label`; a
        series missing altogether is a failure, not a 0."""
        values = [value for (series, labels), value in self.metrics().items()
                  if series == "active_calls_agent_" + name and label in labels]
        if not values:
            raise Failure(f"no metric {name}{{{label}}}")
        return sum(values)
