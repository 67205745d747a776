"""Shared fixtures: real gunicorn servers on 127.0.0.1, a thread-leak check, and the end-of-run summary.

``server_factory`` starts ``sys.executable -m gunicorn -k edgesync.Worker`` (support.py's
``Server``) on a port the OS assigns, waits for it with a deadline, prints its log when the test
fails, fails the test if the log shows ``WORKER TIMEOUT``, and always stops it. The summary at the
end of the run names the real components that were missing (wrk, redis-server...) and how to
install them, and how long the run took.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from edgesync._events import EVENT_TYPES, listeners

from .support import COMPONENTS, Redis, RQWorker, Server, stop_and_show_logs

# Re-exported: test modules import these from support.py, some older ones from here.
from .support import REPO as REPO
from .support import wait_for as wait_for


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


STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[STARTED] = time.monotonic()


@pytest.hookimpl(trylast=True)  # after the other plugins' summaries: the duration includes them
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Never skip quietly: name each real component some tests lacked, and how to install it.

    Installing is left to the caller (``.ci/run`` does it as root, then sets ``ESTEST_REQUIRE_*=1``
    so that a missing component fails the run): a test run does not change the machine. Also says
    how long the run took, on how many CPUs, under what load.
    """
    tr = terminalreporter
    lacking = [c for c in COMPONENTS if c.skipped]
    if lacking:
        tr.write_sep("=", "real components missing", yellow=True, bold=True)
        for c in lacking:
            tr.write_line("%s: %d test(s) skipped; to run them: %s%s" % (
                c.name, c.skipped, c.install,
                " (then %s=1 makes its absence a failure)" % c.require_env if c.require_env else ""))
        tr.write_line(".ci/run installs wrk and redis-server when missing (as root) and sets "
                      "ESTEST_REQUIRE_WRK=1 ESTEST_REQUIRE_REDIS=1.")
    took = round(time.monotonic() - config.stash.get(STARTED, time.monotonic()))
    tr.write_line("edgesync: the run took %d s (%d min %02d s) on %d CPU(s), load average %s at its end; %s" % (
        took, took // 60, took % 60, len(os.sched_getaffinity(0)), "/".join("%.1f" % x for x in os.getloadavg()),
        "missing: %s (see above)" % ", ".join(c.name for c in lacking) if lacking
        else "no test skipped for want of a real component"), yellow=bool(lacking))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rq_workers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[Redis, Server], RQWorker]]:
    started: List[RQWorker] = []

    def make(redis: Redis, server: Server) -> RQWorker:
        worker = RQWorker(redis, server.events_path, tmp_path)
        started.append(worker)
        return worker
    yield make
    stop_and_show_logs(request, started)


@pytest.fixture
def fresh_durable_tasks() -> Iterator[None]:
    """tests/apps/durable_tasks with its record of runs empty and its gate closed; the gate opens at teardown."""
    from .apps import durable_tasks

    durable_tasks.ran.clear()
    durable_tasks.gate.clear()
    yield
    durable_tasks.gate.set()
