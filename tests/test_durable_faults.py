"""The fault suite with durable tasks: real gunicorn, real SIGKILL / SIGTERM / hard limits, a real journal.

Each case ends with a reconciliation: every durable task id the app accepted
(``accepted`` records of tests/apps/durable.py) completed (a ``durable_done`` record
of tests/apps/durable_tasks.py), in the worker that accepted it or, after that worker
died, in another one; none is lost. Each case prints its figures (``-s``): accepted,
completed, re-run (attempt >= 2), ran twice (completed more than once: at-least-once
made visible), ran at once (two runs of one id alive at the same time: never), lost.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable, Dict, Optional

import pytest

from .fault_suite import DURABLE_APP, all_done, durable_tally, plant, stop_cleanly
from .support import Server, StatsdListener, Wrk, require_wrk, wait_for

JOURNAL = {"EDGESYNC_DURABLE_JOURNAL": "journal.db"}

pytestmark = pytest.mark.slow


def start(server_factory: Callable[..., Server], *args: str, workers: int = 2,
          env: Optional[Dict[str, str]] = None) -> Server:
    require_wrk()
    return server_factory("--workers", str(workers), "--threads", "4", *args, app=DURABLE_APP,
                          env={**JOURNAL, **(env or {})}, workers_ready=workers)


def check_log(server: Server) -> None:
    log = server.log
    assert "WORKER TIMEOUT" not in log
    assert "Reason:" not in log, "the master halted:\n" + log
    assert "Traceback (most recent call last)" not in log, log
    assert "gave up durable task" not in log


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
