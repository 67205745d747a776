"""What the fault cases share: the apps they load, how they stop, and how they account for every task.

The fault cases (test_faults.py, test_recycle.py, test_soak.py) serve tests/apps/faults.py under
wrk and end with a reconciliation (``reconcile``): each task ``wait_until`` accepted either
completed or is named in an "abandoned task" log line; nothing is unaccounted for. The durable
cases (test_durable_faults.py, test_handoff.py) serve tests/apps/durable.py and account for each
durable task id (``durable_tally``): completed in a gunicorn worker or in RQ, or pending in Redis;
none lost. Each tally prints its figures (run with ``-s`` to see them).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .support import Server, WrkResult, require_wrk, wait_for

APP = "tests.apps.faults:app"
DURABLE_APP = "tests.apps.durable:app"


# One request in ten schedules a short task (2-20 ms): ~250 tasks/s at the ~2,500
# requests/s this machine reaches keep ~3 background threads busy, even when wrk's
# kept-alive connections all land on one worker (8 threads): no backlog, and no
# QueueFull, by accident.
TASKS = "/task?lo=0.002&hi=0.02"


@dataclass
class Tally:
    """The reconciliation of one case, and its figures."""

    accepted: Dict[str, int]  # task id -> pid of the worker that accepted it
    completed: Set[str]
    failed: Set[str]  # completed by raising (subset of completed)
    abandoned: Set[str]
    unaccounted: Set[str]
    requests: int = 0
    failed_requests: int = 0
    deliberate: Dict[int, int] = field(default_factory=dict)

    def show(self, case: str) -> str:
        line = ("[%s] requests sent %d, failed %d%s; tasks accepted %d, completed %d%s, abandoned %d, "
                "unaccounted %d" % (
                    case, self.requests, self.failed_requests,
                    "".join(", deliberate %d: %d" % kv for kv in sorted(self.deliberate.items())),
                    len(self.accepted), len(self.completed & set(self.accepted)),
                    " (%d by raising)" % len(self.failed) if self.failed else "",
                    len(self.abandoned & set(self.accepted)), len(self.unaccounted)))
        print("\n" + line)
        return line


ABANDONED = re.compile(r"worker (\d+): abandoned task tests\.apps\.faults\.job_(\d+_\d+) \((running|queued)")


def reconcile(server: Server) -> Tally:
    """Match accepted tasks against completions and abandoned-task log lines."""
    events = server.events()
    accepted = {e["id"]: e["pid"] for e in events if e["type"] == "accepted"}
    completed = {e["id"] for e in events if e["type"] == "task_done"}
    failed = {e["id"] for e in events if e["type"] == "task_done" and e.get("failed")}
    abandoned = {m.group(2) for m in ABANDONED.finditer(server.log)}
    unaccounted = set(accepted) - completed - abandoned
    return Tally(accepted, completed, failed, abandoned, unaccounted)


def start(server_factory: Callable[..., Server], *args: str, workers: int = 2, threads: int = 4,
          env: Optional[Dict[str, str]] = None, app: str = APP) -> Server:
    """``workers`` workers of ``threads`` threads serving ``app``, each answering; skips without wrk."""
    require_wrk()
    return server_factory("--workers", str(workers), "--threads", str(threads), *args, app=app,
                          env=env, workers_ready=workers)


def stop_cleanly(server: Server, within: float = 20.0) -> float:
    """The master must still be running; SIGTERM it: it exits 0. Returns the seconds it took."""
    assert server.exited() is None, "the master halted:\n" + server.log
    t0 = time.monotonic()
    assert server.stop(timeout=within) == 0, server.log
    return time.monotonic() - t0


def stop_and_reconcile(server: Server, result: WrkResult, case: str) -> Tally:
    """Stop ``server`` cleanly, check its log, and reconcile its tasks, with wrk's figures; print them."""
    stop_cleanly(server)
    check_log(server)
    tally = reconcile(server)
    tally.requests, tally.failed_requests = result.requests, result.failed()
    tally.show(case)
    return tally


#: The last line of every traceback a case provokes on purpose.
DELIBERATE_ERRORS = re.compile(
    r"^(ValueError: task \d+_\d+ fails on purpose|RuntimeError: listener failed on purpose)$", re.M)


def check_log(server: Server) -> None:
    """No heartbeat timeout, no halt, and no traceback other than the deliberate ones."""
    log = server.log
    assert "WORKER TIMEOUT" not in log
    assert "Reason:" not in log, "the master halted:\n" + log
    tracebacks = log.count("Traceback (most recent call last)")
    assert tracebacks == len(DELIBERATE_ERRORS.findall(log)), "unexpected traceback:\n" + log


# -- durable tasks ----------------------------------------------------------------------------------


@dataclass
class DurableTally:
    """The reconciliation of one durable case, and its figures."""

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
    """Match the durable task ids the app accepted against the runs that completed them."""
    events = server.events()
    accepted = {e["id"] for e in events if e["type"] == "accepted"}
    done: Dict[str, List[str]] = {}
    for e in events:
        if e["type"] == "durable_done":
            done.setdefault(e["id"], []).append(e["where"])
    reruns = {e["id"] for e in events if e["type"] == "durable_start" and e["attempt"] >= 2}
    return DurableTally(accepted, done, reruns, at_once=runs_at_once(events))


def runs_at_once(events: List[Dict[str, Any]], alive: Optional[Callable[[int], bool]] = None) -> Set[str]:
    """Ids with two runs alive at the same time: a run lasts from its start to its end (its
    ``durable_done``, or for ever while its process lives; a run whose process died without
    finishing ended before any later run of its id started, which is what this checks)."""
    is_alive = alive or _alive
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
        if not is_alive(pid):  # it died mid-run: it ended no later than the next run of its id started
            later = [r[0] for r in runs[task_id] if r[0] > run[0]]
            run[1] = min(later, default=run[0])
    at_once = set()
    for task_id, spans in runs.items():
        spans.sort()
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
            at_once.add(task_id)
    return at_once


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped: an orphaned worker whose master was
    SIGKILLed waits for init to reap it) is dead."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return False


def all_done(server: Server, also: Callable[[DurableTally], Set[str]] = lambda t: set()) -> Callable[[], bool]:
    """A wait condition: every accepted durable id completed (or is in ``also``'s set)."""
    def check() -> bool:
        tally = durable_tally(server)
        return bool(tally.accepted) and not (tally.accepted - set(tally.done) - also(tally))
    return check


def plant(server: Server, pid: int, query: str, route: str = "durable") -> List[str]:
    """Schedule durable tasks on worker ``pid`` through ``/<route>`` (retrying until a request lands there)."""
    planted: List[str] = []

    def once() -> bool:
        status, body = server.get("/%s?only=%d&%s" % (route, pid, query))
        if status == 200:
            planted.extend(body.decode().split()[:-1])
        return bool(planted)
    wait_for(once, 10, "durable tasks to land on worker %d" % pid)
    return planted
