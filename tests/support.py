"""The test harness: real processes on 127.0.0.1, waiting with deadlines, and the tools the tests need.

- ``wait_for``: poll a predicate until it holds or a deadline passes; ``free_port``: a port the OS
  gave and took back.
- ``missing`` (and ``require_wrk``): a real component a test needs (``wrk``, ``redis-server``...)
  is absent: the test skips (fails when the component's ``ESTEST_REQUIRE_*`` variable is 1), and
  the end of the run lists what was missing and how to install it (conftest.py's
  ``pytest_terminal_summary``).
- ``Server``: one gunicorn master (``sys.executable -m gunicorn -k edgesync.Worker``) on a port the
  OS assigns, driven from outside; conftest.py's ``server_factory`` fixture starts and stops them.
- ``run_example`` and ``call``: the example commands of docs/getting-started.md, run as written.
- ``Wrk``: wrk in the background with a path mix, counting every status.
- ``StatsdListener``: a UDP socket that keeps the statsd lines it receives.

Test modules import from here (and from fault_suite.py), never from one another.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port() -> int:
    """A port of 127.0.0.1 that the OS assigned and nothing listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def background(fn: Callable[[], object]) -> Tuple[threading.Thread, List[object]]:
    """Run ``fn`` on a thread; its result (or exception) lands in the returned list."""
    out: List[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # reported by the caller's assertion on ``out``
            out.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t, out


# -- real components ---------------------------------------------------------------------------------


@dataclass
class Component:
    """Something real that some tests need and pip does not install."""

    name: str
    install: str  # how to get it, one command or sentence
    require_env: str = ""  # ESTEST_REQUIRE_* : when "1", a missing component fails the test
    skipped: int = 0  # tests skipped for want of it in this run


WRK = Component("wrk", "apt-get install -y wrk", "ESTEST_REQUIRE_WRK")
REDIS = Component("redis-server", "apt-get install -y redis-server", "ESTEST_REQUIRE_REDIS")
DJANGO_TASKS = Component("django.tasks", "Django >= 6 (Python >= 3.12), or pip install 'django-tasks>=0.12'")
TCP_MIGRATE_REQ = Component("net.ipv4.tcp_migrate_req", "run the tests as root, on Linux >= 5.14")

#: Every component a test may find missing, in the order the end-of-run summary lists them.
COMPONENTS = [WRK, REDIS, DJANGO_TASKS, TCP_MIGRATE_REQ]


def missing(component: Component, why: str) -> NoReturn:
    """Skip the test (or its module) for want of ``component``; fail instead if its ESTEST_REQUIRE_* is 1.

    The skip is counted: the end of the run says what was missing and how to install it.
    """
    if component.require_env and os.environ.get(component.require_env) == "1":
        pytest.fail("%s: %s, and %s=1: %s" % (component.name, why, component.require_env, component.install))
    component.skipped += 1
    hint = "; set %s=1 to make this a failure" % component.require_env if component.require_env else ""
    pytest.skip("%s: %s (%s)%s" % (component.name, why, component.install, hint), allow_module_level=True)


def require_wrk() -> str:
    """The path of wrk, the load generator of the load tests (skip or fail without it)."""
    path = shutil.which("wrk")
    if path is None:
        missing(WRK, "not installed (the load generator of this test)")
    return path


# -- gunicorn --------------------------------------------------------------------------------------


class Server:
    """One gunicorn master running an app from tests/apps, driven from outside."""

    def __init__(self, workdir: Path, app: str, args: List[str], env: Dict[str, str],
                 launcher: Sequence[str] = ()):
        self.workdir = workdir
        self.launcher = list(launcher)  # e.g. ["unshare", "--pid", "--fork"]: what runs gunicorn
        self.log_path = workdir / "gunicorn.log"
        self.events_path = workdir / "events.jsonl"
        self.app = app
        self.args = args
        self.env = env
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0

    # -- process ---------------------------------------------------------------

    def start(self, workers_ready: int = 1, timeout: float = 20.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
        env.update({"EVENTS_FILE": str(self.events_path), "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        # A test that passes its own -b (--reuse-port: every worker binds the address itself, so
        # port 0 would give each its own port) names the port; otherwise the OS picks one.
        bind = [] if "-b" in self.args else ["-b", "127.0.0.1:0"]
        cmd = [*self.launcher, sys.executable, "-m", "gunicorn", "-k", "edgesync.Worker", *bind,
               "--no-control-socket", "--pythonpath", str(REPO), "--log-level", "info",
               "--graceful-timeout", "5", "--timeout", "10", *self.args, self.app]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        pattern = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)" if bind else r"Listening at: .*()")

        def listening() -> Optional[re.Match[str]]:
            # The exit status first, the log second: a master that has exited has written
            # all it will, so a log without the line then means it never listened. A master
            # that listened and then exited (a bad edgesync.toml fails check_config right
            # after "Listening at") is started: its exit is the caller's to examine.
            code = self.exited()
            match = pattern.search(self.log)
            if match is None and code is not None:
                raise AssertionError("gunicorn exited with %s before listening:\n%s" % (code, self.log))
            return match
        match = wait_for(listening, timeout, "gunicorn to listen")
        self.port = int(match.group(1) or self.args[self.args.index("-b") + 1].rsplit(":", 1)[1])
        if workers_ready:
            self.wait_for_log(r"Booting worker with pid", count=workers_ready, timeout=timeout)
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until a worker answers a request."""
        def answered() -> bool:
            try:
                return self.get("/pid", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(answered, timeout, "a worker to answer")

    def exited(self) -> Optional[int]:
        assert self.proc is not None
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the master and wait for it; SIGKILL the group if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError("gunicorn did not stop within %.0fs" % timeout) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if not self.log_file.closed:
            self.log_file.close()

    # -- observing -------------------------------------------------------------

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 15.0) -> List[str]:
        """Wait until ``pattern`` matches ``count`` lines of the log; return those lines."""
        rx = re.compile(pattern)

        def found() -> List[str]:
            lines = [line for line in self.log.splitlines() if rx.search(line)]
            return lines if len(lines) >= count else []
        return list(wait_for(found, timeout, "%d log line(s) matching %r" % (count, pattern)))

    def events(self, type: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.events_path.exists():
            return []
        # A line is complete once its newline is written: a process may be writing the
        # last one while this reads (one write per line, but a read may see half of it).
        complete = self.events_path.read_text().split("\n")[:-1]
        out = [json.loads(line) for line in complete if line]
        return [e for e in out if type is None or e["type"] == type]

    def wait_for_events(self, type: str, count: int = 1, timeout: float = 15.0,
                        where: Callable[[Dict[str, Any]], bool] = lambda e: True) -> List[Dict[str, Any]]:
        def found() -> List[Dict[str, Any]]:
            got = [e for e in self.events(type) if where(e)]
            return got if len(got) >= count else []
        return list(wait_for(found, timeout, "%d %r event(s)" % (count, type)))

    def worker_pids(self) -> List[int]:
        """Workers booted and not yet reported as exited."""
        booted = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", self.log)]
        gone = {int(p) for p in re.findall(r"Worker exiting \(pid: (\d+)\)", self.log)}
        gone |= {int(p) for p in re.findall(r"Worker \(pid:(\d+)\) (?:was sent|exited)", self.log)}
        return [p for p in booted if p not in gone]

    # -- HTTP ------------------------------------------------------------------

    def request(self, method: str, path: str, timeout: float = 10.0) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 10.0) -> Tuple[int, bytes]:
        return self.request("GET", path, timeout)

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (status, body)
        return json.loads(body)


def workers_of(master: int, molds: bool = False) -> List[int]:
    """The master's live children but its mold (named ``edgesync-mold``): its workers, from /proc via psutil;
    ``molds``: its molds instead."""
    try:
        kids = psutil.Process(master).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for kid in kids:
        try:
            if kid.status() != psutil.STATUS_ZOMBIE and (kid.name() == "edgesync-mold") == molds:
                out.append(kid.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def readme_commands() -> Dict[str, str]:
    """The example commands of docs/getting-started.md, by the app they serve (their last word)."""
    page = (REPO / "docs" / "getting-started.md").read_text()
    section = page.split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the Examples section of docs/getting-started.md has no bash block"
    return {line.split()[-1]: line for line in match.group(1).splitlines() if line.strip()}


def run_example(server_factory: Callable[..., Server], app: str, env: Dict[str, str]) -> Server:
    """Run the docs' command for ``app``: its set-up steps, then gunicorn."""
    *setup, serve = readme_commands()[app].split(" && ")
    for step in setup:
        words = shlex.split(step)
        if words[0] == ".venv/bin/pip":
            continue  # installs what this venv already has
        assert words[0] == ".venv/bin/python", step
        subprocess.run([sys.executable, *words[1:]], cwd=REPO, env={**os.environ, **env},
                       check=True, timeout=120)
    words = shlex.split(serve)
    assert words[:5] == [".venv/bin/gunicorn", "-k", "edgesync.Worker", "-b", "127.0.0.1:8000"], serve
    args = [str(REPO / w) if prev == "--chdir" else w for prev, w in zip(words[4:-2], words[5:-1], strict=True)]
    server = server_factory(*args, app=words[-1], env=env, workers_ready=0)
    server.wait_for_log(r"Booting worker with pid")

    def answers() -> bool:
        try:
            server.get("/readiness-probe", timeout=2)
            return True
        except OSError:
            return False
    wait_for(answers, 20, "the example to answer")
    return server


def call(server: Server, method: str, path: str, form: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    """One HTTP request; the body is decoded as JSON when it is JSON."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (server.port, path), data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in ctype else body


# -- wrk -------------------------------------------------------------------------------------------

WRK_LUA = r"""
-- Mixes paths given as "path:weight" arguments ("{id}" becomes a unique id) and
-- counts every response status; done() prints the totals for the test to parse.
local threads = {}
local count = 0

function setup(thread)
  count = count + 1
  thread:set("tid", count)
  table.insert(threads, thread)
end

function init(args)
  paths = {}
  for _, a in ipairs(args) do
    local p, w = a:match("^(.*):(%d+)$")
    for i = 1, tonumber(w) do table.insert(paths, p) end
  end
  n = 0
  statuses = {}
end

function request()
  n = n + 1
  local p = paths[(n % #paths) + 1]
  p = p:gsub("{id}", tid .. "-" .. n)
  return wrk.format("GET", p)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("STATUS %d %d\n", k, v)) end
  local e = summary.errors
  io.write(string.format("ERRORS connect=%d read=%d write=%d timeout=%d\n",
                         e.connect, e.read, e.write, e.timeout))
  io.write(string.format("REQUESTS %d\n", summary.requests))
end
"""


@dataclass
class WrkResult:
    """What one wrk run saw."""

    requests: int
    statuses: Dict[int, int]
    socket_errors: Dict[str, int]
    output: str

    def failed(self, allowed: Tuple[int, ...] = (200,)) -> int:
        """Socket errors plus responses whose status is not in ``allowed``."""
        bad = sum(n for status, n in self.statuses.items() if status not in allowed)
        return bad + sum(self.socket_errors.values())


class Wrk:
    """wrk running in the background against ``server`` with a path mix."""

    def __init__(self, server: Server, seconds: float, mix: Dict[str, int], connections: int = 8,
                 threads: int = 2, headers: Tuple[str, ...] = ()):
        script = server.workdir / "mix.lua"
        script.write_text(WRK_LUA)
        self.threads = threads
        self.connections = connections
        cmd = [require_wrk(), "-t", str(threads), "-c", str(connections), "-d", "%ds" % math.ceil(seconds),
               "--timeout", "15s", "-s", str(script), *[a for h in headers for a in ("-H", h)],
               "http://127.0.0.1:%d" % server.port,
               "--", *["%s:%d" % (path, weight) for path, weight in mix.items()]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = time.monotonic()
        self.seconds = seconds

    def result(self) -> WrkResult:
        out, _ = self.proc.communicate(timeout=self.seconds + 30)
        assert self.proc.returncode == 0, "wrk failed:\n" + out
        statuses = {int(s): int(n) for s, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M)}
        errors_line = re.search(r"^ERRORS (.*)$", out, re.M)
        requests = re.search(r"^REQUESTS (\d+)$", out, re.M)
        assert errors_line and requests, "unexpected wrk output:\n" + out
        errors = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", errors_line.group(1))}
        # wrk's own summary says the same in its words; check we read it right.
        socket_line = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if socket_line:
            assert [int(x) for x in socket_line.groups()] == [errors[k] for k in
                                                              ("connect", "read", "write", "timeout")], out
        else:
            assert sum(errors.values()) == 0, out
        return WrkResult(int(requests.group(1)), statuses, errors, out)

    def stop(self) -> WrkResult:
        """End the run now (wrk stops on SIGINT and reports as usual)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.result()


# -- statsd ----------------------------------------------------------------------------------------


class StatsdListener:
    """A UDP socket on 127.0.0.1 (port from the OS) that keeps every statsd line it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: List[str] = []

    def wait_for(self, *wanted: str, timeout: float = 15.0) -> None:
        """Receive until every line in ``wanted`` has arrived; fail after ``timeout`` s."""
        def arrived() -> bool:
            self.sock.settimeout(0.1)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                pass
            else:
                self.lines.extend(line for line in data.decode().splitlines() if line)
            return all(self.received(w) for w in wanted)
        try:
            wait_for(arrived, timeout, "statsd lines %s" % (wanted,), interval=0)
        except AssertionError as exc:
            raise AssertionError("%s\nreceived: %s" % (exc, sorted(set(self.lines)))) from None

    def received(self, line: str) -> bool:
        """``line`` arrived, possibly with a sampling rate appended (gunicorn adds ``|@1.0``); for a counter
        (``name:N|c``), the increments received for ``name`` add up to N (a client may send one in parts)."""
        if line.endswith("|c"):
            name, _, value = line[:-2].rpartition(":")
            total = 0.0
            for got in self.lines:
                fields = got.split("|")
                metric, _, count = fields[0].rpartition(":")
                if len(fields) > 1 and fields[1] == "c" and metric == name:
                    total += float(count)
            return total == float(value)
        return any(got == line or got.startswith(line + "|@") for got in self.lines)

    def close(self) -> None:
        self.sock.close()


# -- Redis and RQ (the hand-off tests start their own) ----------------------------------------------

QUEUE = "edgesync-test"


class Redis:
    """A redis-server process of this test, and a client to look into it."""

    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            missing(REDIS, "not installed (the hand-off tests start their own)")
        self.port = free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.log_path = workdir / "redis.log"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--logfile", str(self.log_path)], cwd=workdir)
        import redis
        self.client = redis.Redis.from_url(self.url)

        def pong() -> bool:
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited: %s" % self.log_path.read_text()
                return False
        wait_for(pong, 10, "redis-server to answer PING")

    def pending_ids(self) -> Set[str]:
        """The test ids of the durable tasks queued in RQ and not yet taken by a worker."""
        import rq
        queue = rq.Queue(QUEUE, connection=self.client)
        return {json.loads(job.args[1])[0][0] for job in queue.get_jobs()}

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class RQWorker:
    """``rq worker`` on QUEUE: imports tests.apps.durable_tasks, records ``where = rq``."""

    def __init__(self, redis: Redis, events: Path, workdir: Path):
        env = {**os.environ, "EVENTS_FILE": str(events), "DURABLE_WHERE": "rq", "PYTHONPATH": str(REPO)}
        self.log_path = workdir / "rq.log"
        self.log = open(self.log_path, "ab")
        rq_exe = str(Path(sys.executable).with_name("rq"))
        self.proc = subprocess.Popen([rq_exe, "worker", "--url", redis.url, "--path", str(REPO),
                                      "--worker-class", "rq.worker.SimpleWorker", QUEUE],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


# -- limits -----------------------------------------------------------------------------------------

NO_LIMITS = {"EDGESYNC_WALL_CLOCK_LIMIT_MS": "0", "EDGESYNC_CPU_SOFT_LIMIT_MS": "0",
             "EDGESYNC_CPU_HARD_LIMIT_MS": "0", "EDGESYNC_MEMORY_LIMIT_MB": "0",
             "EDGESYNC_REQUEST_IDLE_TIMEOUT_MS": "0"}


def limits(**values: int) -> Dict[str, str]:
    env = dict(NO_LIMITS)
    env.update({"EDGESYNC_" + k.upper(): str(v) for k, v in values.items()})
    return env


# -- the durable journal --------------------------------------------------------------------------------

def journal_rows(path: Path, columns: str = "id, fn, args, attempt, max_attempts, owner_pid",
                 order: str = "accepted") -> List[Tuple[Any, ...]]:
    """The rows of the durable journal at ``path`` (its ``columns``, in ``order``), read on a connection of the test."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT %s FROM edgesync_tasks ORDER BY %s" % (columns, order)).fetchall()
    finally:
        conn.close()


def journal_spooled(path: Path) -> List[Tuple[int, Any]]:
    """What the spools of the journal at ``path`` hold (every process's): (owner pid, ``Spooled``) pairs."""
    from edgesync._journal import read_spool, spool_dir

    directory = spool_dir(str(path))
    if not os.path.isdir(directory):
        return []
    return [(int(name.rsplit("-", 2)[1]), task) for name in sorted(os.listdir(directory))
            for task in read_spool(os.path.join(directory, name))[1]]


def journal_marked(path: Path) -> Set[str]:
    """The ids of the tasks whose run started and is marked in a spool of the journal at ``path``."""
    return {task.id for _, task in journal_spooled(path) if task.started}


def journal_tasks(path: Path, columns: str = "id, fn, args, attempt, max_attempts, owner_pid") -> List[Tuple[Any, ...]]:
    """The pending tasks of the journal at ``path`` as ``journal_rows`` gives them, with those still only in a
    spool (attempt 0, not given up), in the order they were accepted."""
    names = [c.strip() for c in columns.split(",")]
    rows = journal_rows(path, "accepted, id, " + columns)
    known = {r[1] for r in rows}
    for pid, t in journal_spooled(path):
        if t.recorded and t.id not in known:
            value = {"id": t.id, "fn": t.fn, "args": t.args, "attempt": 0, "max_attempts": t.max_attempts,
                     "owner_pid": pid, "given_up IS NOT NULL": 0, "given_up": None, "last_error": None}
            rows.append((t.accepted, t.id) + tuple(value[n] for n in names))
    return [r[2:] for r in sorted(rows, key=lambda r: r[0])]


def journal_runs(path: Path, by: str = "args") -> Dict[str, int]:
    """Runs started so far of each task of the journal at ``path`` (see ``journal_tasks``), by its ``args``
    (or ``id``): its row's count, plus one if its run is marked in a spool (a run in progress, or ended and
    not yet deleted)."""
    marked = journal_marked(path)
    return {(task_id if by == "id" else args): attempt + (task_id in marked)
            for task_id, args, attempt in journal_tasks(path, "id, args, attempt")}


def stop_and_show_logs(request: pytest.FixtureRequest, started: List[Any]) -> None:
    """At a fixture's teardown: stop each process it ``started`` (each has ``stop()`` and ``log_path``), and
    print their logs when the test failed."""
    for process in started:
        process.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for process in started:
            sys.stdout.write("\n----- %s -----\n%s\n" % (process.log_path.name,
                                                         process.log_path.read_text(errors="replace")))
