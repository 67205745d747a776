"""The fault suite with durable tasks: real gunicorn, real SIGKILL / SIGTERM / hard limits, a real journal.

Each case ends with a reconciliation: every durable task id the app accepted
(``accepted`` records of tests/apps/durable.py) completed (a ``durable_done`` record
of tests/apps/durable_tasks.py), in the worker that accepted it or, after that worker
died, in another one; none is lost. Each case prints its figures (``-s``): accepted,
completed, re-run (attempt >= 2), ran twice (completed more than once: at-least-once
made visible), ran at once (two runs of one id alive at the same time: never), lost.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import pytest

from .conftest import Server, wait_for
from .test_faults import Wrk, require_wrk, stop_cleanly

APP = "tests.apps.durable:app"
JOURNAL = {"EDGESYNC_DURABLE_JOURNAL": "journal.db"}

pytestmark = pytest.mark.slow


@dataclass
class DurableTally:
    accepted: Set[str]
    done: Dict[str, List[str]]  # id -> where each completed run ran ("gunicorn" or "rq")
    reruns: Set[str]  # ids that started at attempt >= 2
    pending_in_redis: Set[str] = field(default_factory=set)
    at_once: Set[str] = field(default_factory=set)  # ids with two runs alive at the same time
    kept: Set[str] = field(default_factory=set)  # given up on purpose, kept in the journal

    @property
    def lost(self) -> Set[str]:
        return self.accepted - set(self.done) - self.pending_in_redis - self.kept

    @property
    def twice(self) -> Set[str]:
        return {i for i, runs in self.done.items() if len(runs) > 1}

    def show(self, case: str) -> str:
        where = Counter(w for runs in self.done.values() for w in runs[:1])
        line = ("[%s] durable tasks accepted %d, completed %d (%s), re-run %d, ran twice %d, ran at once %d, "
                "pending in Redis %d, given up (kept) %d, lost %d"
                % (case, len(self.accepted), len(set(self.done) & self.accepted),
                   ", ".join("%s %d" % kv for kv in sorted(where.items())), len(self.reruns), len(self.twice),
                   len(self.at_once), len(self.pending_in_redis), len(self.kept), len(self.lost)))
        print("\n" + line)
        return line


def durable_tally(server: Server) -> DurableTally:
    events = server.events()
    accepted = {e["id"] for e in events if e["type"] == "accepted"}
    done: Dict[str, List[str]] = {}
    for e in events:
        if e["type"] == "durable_done":
            done.setdefault(e["id"], []).append(e["where"])
    reruns = {e["id"] for e in events if e["type"] == "durable_start" and e["attempt"] >= 2}
    return DurableTally(accepted, done, reruns, at_once=runs_at_once(events))


def runs_at_once(events: List[Dict[str, Any]], alive: Callable[[int], bool] = lambda pid: _alive(pid)) -> Set[str]:
    """Ids with two runs alive at the same time: a run lasts from its start to its end (its
    ``durable_done``, or for ever while its process lives; a run whose process died without
    finishing ended before any later run of its id started, which is what this checks)."""
    runs: Dict[str, List[List[float]]] = {}
    open_runs: Dict[Tuple[str, int, int], List[float]] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        key = (e.get("id", ""), e["pid"], e.get("attempt", 0))
        if e["type"] == "durable_start":
            open_runs[key] = [e["t"], math.inf]
            runs.setdefault(key[0], []).append(open_runs[key])
        elif e["type"] == "durable_done" and key in open_runs:
            open_runs.pop(key)[1] = e["t"]
    for (task_id, pid, _), run in open_runs.items():
        if not alive(pid):  # it died mid-run: it ended no later than the next run of its id started
            later = [r[0] for r in runs[task_id] if r[0] > run[0]]
            run[1] = min(later, default=run[0])
    at_once = set()
    for task_id, spans in runs.items():
        spans.sort()
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
            at_once.add(task_id)
    return at_once


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def all_done(server: Server, also: Callable[[DurableTally], Set[str]] = lambda t: set()) -> Callable[[], bool]:
    def check() -> bool:
        tally = durable_tally(server)
        return bool(tally.accepted) and not (tally.accepted - set(tally.done) - also(tally))
    return check


def start(server_factory: Callable[..., Server], *args: str, workers: int = 2,
          env: Optional[Dict[str, str]] = None) -> Server:
    require_wrk()
    return server_factory("--workers", str(workers), "--threads", "4", *args, app=APP,
                          env={**JOURNAL, **(env or {})}, workers_ready=workers)


def check_log(server: Server) -> None:
    log = server.log
    assert "WORKER TIMEOUT" not in log
    assert "Reason:" not in log, "the master halted:\n" + log
    assert "Traceback (most recent call last)" not in log, log
    assert "gave up durable task" not in log


def plant(server: Server, pid: int, query: str) -> List[str]:
    """Schedule durable tasks on worker ``pid`` (retrying until a request lands there)."""
    planted: List[str] = []

    def once() -> bool:
        status, body = server.get("/durable?only=%d&%s" % (pid, query))
        if status == 200:
            planted.extend(body.decode().split()[:-1])
        return bool(planted)
    wait_for(once, 10, "durable tasks to land on worker %d" % pid)
    return planted


def test_sigkill_under_load_loses_no_durable_task(server_factory: Callable[..., Server]) -> None:
    server = start(server_factory)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, "first=60&rerun=0.05&n=5")
    load = Wrk(server, 5, {"/ok": 3, "/durable?first=0.002&rerun=0.002": 1})
    wait_for(lambda: time.monotonic() - load.started > 1.5, 5, "wrk to be under way")
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(r"Worker \(pid:%d\) was sent SIGKILL" % victim, timeout=10)
    result = load.result()
    wait_for(all_done(server), 30, "every accepted durable task to complete")
    stop_cleanly(server)
    check_log(server)
    tally = durable_tally(server)
    tally.show("SIGKILL under load (%d requests)" % result.requests)
    assert tally.lost == set() and tally.at_once == set()
    assert set(planted) <= tally.reruns, "the killed worker's tasks were re-run"
    assert re.search(r"re-running \d+ durable task\(s\) of dead process %d" % victim, server.log)
    assert len(tally.accepted) > 100


def test_drain_past_graceful_timeout_leaves_tasks_for_a_live_worker(server_factory: Callable[..., Server]) -> None:
    server = start(server_factory)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, "first=30&rerun=0.05&n=4")
    for _ in range(20):
        assert server.get("/durable?first=0.01")[0] == 200
    os.kill(victim, signal.SIGTERM)  # graceful_timeout 5 s: the 30 s tasks cannot finish
    server.wait_for_log(r"worker %d: 4 durable task\(s\) not done, left in the journal" % victim, timeout=10)
    wait_for(all_done(server), 30, "every accepted durable task to complete")
    stop_cleanly(server)
    check_log(server)
    tally = durable_tally(server)
    tally.show("drain past graceful_timeout (SIGTERM to one worker)")
    assert tally.lost == set() and tally.at_once == set() and set(planted) <= tally.reruns
    assert "was sent SIGKILL" not in server.log


@pytest.mark.parametrize("limit", ["wall_clock", "memory"])
def test_hard_limit_termination_leaves_tasks_for_a_live_worker(server_factory: Callable[..., Server],
                                                               limit: str) -> None:
    if limit == "wall_clock":
        env, query = {"EDGESYNC_WALL_CLOCK_LIMIT_MS": "4000"}, "first=60&rerun=0.05&n=3"
    else:  # OOM-style: the task itself grows the instance past memory_limit_mb on its first attempt
        env, query = {"EDGESYNC_MEMORY_LIMIT_MB": "48"}, "first=0&rerun=0.05&grow=400"
    server = start(server_factory, env=env)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, query)
    server.wait_for_log(r"worker %d: terminating \(reason=%s\)" % (victim, limit), timeout=15)
    wait_for(all_done(server), 30, "every accepted durable task to complete")
    stop_cleanly(server)
    log = server.log
    assert "Traceback (most recent call last)" not in log and "Reason:" not in log, log
    tally = durable_tally(server)
    tally.show("%s hard limit terminates the instance" % limit)
    assert tally.lost == set() and tally.at_once == set() and set(planted) <= tally.reruns
    assert re.search(r"Worker \(pid:%d\) exited with code 1" % victim, log)


def test_reruns_show_in_metrics_and_statsd(server_factory: Callable[..., Server]) -> None:
    from .test_statsd import StatsdListener
    statsd = StatsdListener()
    try:
        server = start(server_factory, "--statsd-host", "127.0.0.1:%d" % statsd.port, "--statsd-prefix", "myapp")
        victim, survivor = server.worker_pids()
        plant(server, victim, "first=60&rerun=30&n=3")
        statsd.wait_for("myapp.edgesync.durable.pending:3|g")
        os.kill(victim, signal.SIGKILL)
        statsd.wait_for("myapp.edgesync.durable.rerun:3|c")
        # The worker that claimed them (the survivor or the replacement) says so in runtime_metrics().
        claimer = wait_for(lambda: [m for m in [server.get_json("/metrics")["durable"]] if m["rerun"] == 3],
                           10, "the claiming worker to answer /metrics")[0]
        assert (claimer["pending"], claimer["journal_pending"], claimer["given_up"]) == (3, 3, 0)
        assert claimer["journal"].endswith("journal.db")
    finally:
        statsd.close()
