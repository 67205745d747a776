"""Hand-off of durable tasks to RQ, for real: redis-server, an ``rq worker`` process, gunicorn, signals.

Every case reconciles each durable task id the app accepted: completed in a gunicorn
worker, completed by the RQ worker, or still pending in Redis (an RQ job whose
arguments carry the id): 0 lost. redis-server runs on 127.0.0.1 on a port the OS
assigned, with no persistence (``--save '' --appendonly no``). Without redis-server these
tests skip, unless ``ESTEST_REQUIRE_REDIS=1`` (set by .ci/run).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Dict, Optional

import pytest

from .fault_suite import DURABLE_APP, DurableTally, durable_tally, plant, stop_cleanly
from .support import QUEUE, Redis, RQWorker, Server, Wrk, require_wrk, wait_for

pytestmark = pytest.mark.slow

def start(server_factory: Callable[..., Server], redis: Redis, handoff_on: str, journal: bool = True,
          workers: int = 2, env: Optional[Dict[str, str]] = None) -> Server:
    require_wrk()
    settings = {"EDGESYNC_HANDOFF": "rq", "EDGESYNC_HANDOFF_ON": handoff_on,
                "EDGESYNC_HANDOFF_REDIS_URL": redis.url, "EDGESYNC_HANDOFF_QUEUE": QUEUE}
    if journal:
        settings["EDGESYNC_DURABLE_JOURNAL"] = "journal.db"
    return server_factory("--workers", str(workers), "--threads", "4", app=DURABLE_APP, env={**settings, **(env or {})},
                          workers_ready=workers)


def settle(server: Server, redis: Redis, timeout: float = 120) -> None:
    """Wait until every accepted id completed somewhere (RQ worker running).

    One RQ worker runs the jobs one by one (about 20 ms each on a loaded 2-core machine), and a
    run can hand it over a thousand: the deadline is generous, and reached only on a failure.
    """
    def check() -> bool:
        tally = durable_tally(server)
        return bool(tally.accepted) and not (tally.accepted - set(tally.done))
    try:
        wait_for(check, timeout, "every accepted durable task to complete in gunicorn or RQ")
    except AssertionError:
        tally = durable_tally(server)
        missing = tally.accepted - set(tally.done)
        raise AssertionError("not completed: %s; of them pending in Redis: %s" % (
            sorted(missing)[:20], sorted(missing & redis.pending_ids())[:20])) from None


def settle_and_stop(server: Server, redis: Redis, case: str) -> DurableTally:
    """Wait until every accepted id completed somewhere, stop ``server`` cleanly; the tally, printed."""
    settle(server, redis)
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show(case)
    return tally


def test_always_hand_off_under_sigkill_and_sigterm(server_factory: Callable[..., Server], redis_server: Redis,
                                                   rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    # handoff_on = "always": wait_until is an enqueue. No RQ worker yet: every task waits in Redis,
    # whatever happens to the gunicorn workers that enqueued them.
    server = start(server_factory, redis_server, "always", journal=False)
    first, second = server.worker_pids()
    load = Wrk(server, 5, {"/ok": 3, "/durable?first=0.001": 1})
    wait_for(lambda: time.monotonic() - load.started > 1.5, 5, "wrk to be under way")
    os.kill(first, signal.SIGKILL)
    os.kill(second, signal.SIGTERM)
    result = load.result()
    tally = durable_tally(server)
    tally.pending_in_redis = redis_server.pending_ids()
    tally.show("handoff always, SIGKILL + SIGTERM under load, before the RQ worker starts (%d requests)"
               % result.requests)
    assert tally.lost == set() and tally.done == {} and len(tally.accepted) > 100
    rq_workers(redis_server, server)
    tally = settle_and_stop(server, redis_server, "handoff always, after the RQ worker ran")
    assert tally.lost == set() and {w for runs in tally.done.values() for w in runs} == {"rq"}
    assert redis_server.pending_ids() == set()


def test_deadline_hand_off_with_journal(server_factory: Callable[..., Server], redis_server: Redis,
                                        rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    # One background thread: a 30 s task planted on the victim runs, 4 short ones wait behind it
    # (with the victim's share of wrk's tasks). At the drain deadline all that never started go
    # to RQ; the running one stays in the journal and is re-run by a live gunicorn worker once the
    # victim has exited.
    server = start(server_factory, redis_server, "deadline", env={"EDGESYNC_BACKGROUND_THREADS": "1"})
    rq_workers(redis_server, server)
    victim, other = server.worker_pids()
    planted = plant(server, victim, "first=30&rerun=0.05") + plant(server, victim, "first=0.05&n=4")
    load = Wrk(server, 4, {"/ok": 3, "/durable?first=0.001": 1})
    wait_for(lambda: time.monotonic() - load.started > 1, 5, "wrk to be under way")
    os.kill(victim, signal.SIGTERM)  # graceful_timeout 5 s: the 30 s tasks cannot finish
    server.wait_for_log(r"worker %d: handed \d+ durable task\(s\) to rq queue" % victim, timeout=10)
    server.wait_for_log(r"worker %d: 1 durable task\(s\) not done, left in the journal" % victim, timeout=10)
    result = load.result()
    os.kill(other, signal.SIGKILL)  # and a SIGKILL under load for good measure: the journal has its tasks
    tally = settle_and_stop(server, redis_server,
                            "handoff at the drain deadline, with a journal (%d requests)" % result.requests)
    assert tally.lost == set()
    ran_in_rq = {i for i, runs in tally.done.items() if "rq" in runs}
    assert len(ran_in_rq & set(planted)) == 4
    assert len(set(planted) - ran_in_rq) == 1 and (set(planted) - ran_in_rq) <= tally.reruns


def test_deadline_hand_off_without_journal(server_factory: Callable[..., Server], redis_server: Redis,
                                           rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    # No journal: everything not done at the deadline goes to RQ, the running task too
    # (as attempt 2: it may have done part of its work).
    server = start(server_factory, redis_server, "deadline", journal=False,
                   env={"EDGESYNC_BACKGROUND_THREADS": "2"})
    rq_workers(redis_server, server)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, "first=30&rerun=0.05&n=2") + plant(server, victim, "first=0.05&n=2")
    os.kill(victim, signal.SIGTERM)
    server.wait_for_log(r"worker %d: handed 4 durable task\(s\) to rq queue" % victim, timeout=10)
    tally = settle_and_stop(server, redis_server, "handoff at the drain deadline, no journal")
    assert tally.lost == set() and all(tally.done[i] == ["rq"] for i in planted)
    assert len(set(planted) & tally.reruns) == 2  # the two that were running: attempt 2 on RQ


def test_queue_full_hand_off(server_factory: Callable[..., Server], redis_server: Redis,
                             rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    server = start(server_factory, redis_server, "deadline_or_queue_full", workers=1,
                   env={"EDGESYNC_MAX_PENDING_TASKS": "3", "EDGESYNC_BACKGROUND_THREADS": "1"})
    rq_workers(redis_server, server)
    assert server.get("/durable?first=3")[0] == 200  # holds the one background thread for 3 s
    status, body = server.get("/durable?first=0.01&n=19")
    assert status == 200, body  # no QueueFull: 2 more wait here (3 pending at most), 17 went to RQ
    tally = settle_and_stop(server, redis_server, "handoff instead of QueueFull")
    where = [runs[0] for runs in tally.done.values()]
    assert tally.lost == set() and (where.count("gunicorn"), where.count("rq")) == (3, 17)
    assert not server.events("queue_full")


def test_hand_off_at_a_hard_limit_termination(server_factory: Callable[..., Server], redis_server: Redis,
                                              rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    # The wall-clock hard limit (4 s) terminates the instance with a 60 s task running and two waiting
    # behind it on its one background thread: all three go to RQ (the running one as attempt 2).
    server = start(server_factory, redis_server, "deadline", journal=False,
                   env={"EDGESYNC_WALL_CLOCK_LIMIT_MS": "4000", "EDGESYNC_BACKGROUND_THREADS": "1"})
    rq_workers(redis_server, server)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, "first=60&rerun=0.05") + plant(server, victim, "first=0.05&n=2")
    server.wait_for_log(r"worker %d: terminating \(reason=wall_clock\)" % victim, timeout=15)
    server.wait_for_log(r"worker %d: handed 3 durable task\(s\) to rq queue" % victim, timeout=10)
    tally = settle_and_stop(server, redis_server, "handoff at a wall-clock hard-limit termination, no journal")
    assert tally.lost == set() and all(tally.done[i] == ["rq"] for i in planted)
    assert set(planted) & tally.reruns == {planted[0]}
