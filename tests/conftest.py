"""Shared fixtures: real gunicorn servers on 127.0.0.1, and a thread-leak check.

``server_factory`` starts ``sys.executable -m gunicorn -k edgesync.Worker`` on a
port the OS assigns, waits for it with a deadline, prints its log when the test
fails, fails the test if the log shows ``WORKER TIMEOUT``, and always stops it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from edgesync._events import EVENT_TYPES, listeners

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


class Server:
    """One gunicorn master running an app from tests/apps, driven from outside."""

    def __init__(self, workdir: Path, app: str, args: List[str], env: Dict[str, str]):
        self.workdir = workdir
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
        cmd = [sys.executable, "-m", "gunicorn", "-k", "edgesync.Worker", *bind,
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``server_factory(*gunicorn_args, app=..., env=..., toml=...)`` -> a started Server."""
    servers: List[Server] = []

    def make(*args: str, app: str = "tests.apps.core:app", env: Optional[Dict[str, str]] = None,
             toml: Optional[str] = None, start: bool = True, workers_ready: int = 1) -> Server:
        workdir = tmp_path / ("server%d" % len(servers))
        workdir.mkdir()
        if toml is not None:
            (workdir / "edgesync.toml").write_text(toml)
        server = Server(workdir, app, list(args), dict(env or {}))
        servers.append(server)
        if start:
            server.start(workers_ready=workers_ready)
        return server

    yield make
    failed = getattr(request.node, "rep_call", None)
    for server in servers:
        if server.proc is None:
            continue
        try:
            if server.exited() is None:
                server.stop()
        finally:
            server.kill()
            if failed is not None and failed.failed:
                sys.stdout.write("\n----- gunicorn log (%s) -----\n%s\n" % (server.workdir, server.log))
    for server in servers:
        if server.proc is not None:
            assert "WORKER TIMEOUT" not in server.log, server.log


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    """One gunicorn master with one edgesync worker and four threads, default settings."""
    return server_factory("--threads", "4")


@pytest.fixture
def registry_restored() -> Iterator[None]:
    """Fail a test that leaves event listeners registered (use it where tests register them)."""
    before = {t: list(listeners(t)) for t in EVENT_TYPES}
    yield
    assert {t: list(listeners(t)) for t in EVENT_TYPES} == before, "the test left listeners registered"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set it to let blocked tasks finish; set at teardown in any case."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads of its own running (after a short deadline)."""
    before = set(threading.enumerate())
    yield
    def leaked() -> List[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]
    deadline = time.monotonic() + 3.0
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not leaked(), "threads leaked by the test: %s" % [t.name for t in leaked()]
