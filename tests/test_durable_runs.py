"""The durable contract at the seams, for real: gunicorn, SIGKILL / SIGTERM, redis-server, rq worker.

Runs, ids and refusal; the journal's own seams are in test_durable_seams.py.

- Every run of a durable task gets the first run's setup: a Flask task that reads
  ``current_app`` completes when re-run by another worker after a SIGKILL, and on an RQ
  worker (which imports the app by the path the task recorded).
- ``edgesync.named`` and ``functools.partial`` keep durability: re-run after a SIGKILL.
- One id: ``task_id(fut)`` is the RQ job id, and the id of the re-run's log line.
- A drain that hands tasks to RQ or keeps them in the journal abandons none of them.
- Redis stopped: ``wait_until`` returns (kept in the journal) or raises (nothing kept).
- Django's standard LOGGING does not silence edgesync.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest

from .fault_suite import all_done, durable_tally, plant, stop_cleanly
from .support import QUEUE, Redis, RQWorker, Server, require_wrk, wait_for

pytestmark = pytest.mark.slow

APP = "tests.apps.flaskdurable:app"


def start(server_factory: Callable[..., Server], journal: bool = True, workers: int = 2,
          env: Optional[Dict[str, str]] = None, redis: Optional[Redis] = None, handoff_on: str = "deadline") -> Server:
    require_wrk()
    settings = {"EDGESYNC_DURABLE_JOURNAL": "journal.db"} if journal else {}
    # A success line per task at INFO (not one summary a minute): the tests follow each id.
    settings["EDGESYNC_TASK_LOG_INTERVAL_MS"] = "0"
    if redis is not None:
        settings.update({"EDGESYNC_HANDOFF": "rq", "EDGESYNC_HANDOFF_ON": handoff_on,
                         "EDGESYNC_HANDOFF_REDIS_URL": redis.url, "EDGESYNC_HANDOFF_QUEUE": QUEUE})
    return server_factory("--workers", str(workers), "--threads", "4", app=APP, env={**settings, **(env or {})},
                          workers_ready=workers)


def durable_ids(server: Server) -> Dict[str, str]:
    """App id -> edgesync.task_id(future), as the view recorded it."""
    return {e["id"]: e["task_id"] for e in server.events("accepted")}


def test_reruns_after_sigkill_run_in_the_flask_app_and_keep_their_id(server_factory: Callable[..., Server]) -> None:
    server = start(server_factory)
    victim = server.worker_pids()[0]
    planted = (plant(server, victim, "first=60") + plant(server, victim, "first=60", route="named")
               + plant(server, victim, "first=60", route="partial"))
    server.wait_for_events("durable_start", 3, where=lambda e: e["pid"] == victim)
    os.kill(victim, signal.SIGKILL)
    wait_for(all_done(server), 30, "every accepted durable task to complete")
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show("Flask durable tasks (plain, named, partial) re-run after SIGKILL")
    assert tally.lost == set() and set(planted) <= tally.reruns
    assert {e["mail_from"] for e in server.events("durable_done")} == {"welcome@example.test"}
    assert "Working outside of application context" not in server.log
    assert re.search(r"re-running 3 durable task\(s\) of dead process %d" % victim, server.log)
    ids = durable_ids(server)
    for app_id in planted:  # the re-run's line carries the id wait_until gave
        assert re.search(r"worker \d+: task (tests\.apps\.flaskdurable\.welcome|send-welcome) succeeded in "
                         r"[\d.]+s, id=%s" % ids[app_id], server.log), ids[app_id]


def test_a_flask_task_handed_to_rq_runs_in_the_app_and_its_job_id_is_its_id(
        server_factory: Callable[..., Server], redis_server: Redis,
        rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    server = start(server_factory, journal=False, redis=redis_server, handoff_on="always")
    status, body = server.get("/durable?n=3")
    assert status == 200, body
    import rq
    ids = durable_ids(server)
    job_ids = set(rq.Queue(QUEUE, connection=redis_server.client).get_job_ids())
    assert job_ids == set(ids.values()) and len(job_ids) == 3
    rq_workers(redis_server, server)
    wait_for(all_done(server), 60, "the RQ worker to run the three tasks")
    stop_cleanly(server)
    done = server.events("durable_done")
    assert {(e["where"], e["mail_from"]) for e in done} == {("rq", "welcome@example.test")}


@pytest.mark.parametrize("where", ["gunicorn", "rq"])
def test_retries_run_in_gunicorn_and_on_rq_as_the_next_attempts(
        server_factory: Callable[..., Server], redis_server: Redis,
        rq_workers: Callable[[Redis, Server], RQWorker], where: str) -> None:
    server = start(server_factory, journal=where == "gunicorn", workers=1, redis=redis_server,
                   handoff_on="always" if where == "rq" else "deadline")
    rq_log = rq_workers(redis_server, server).log_path if where == "rq" else None
    assert server.get("/flaky?failures=2&n=2")[0] == 200
    wait_for(all_done(server), 60, "both tasks to complete on their third attempt")
    stop_cleanly(server)
    starts = server.events("durable_start")
    assert sorted((e["id"], e["attempt"], e["where"]) for e in starts) == sorted(
        (app_id, attempt, where) for app_id in durable_ids(server) for attempt in (1, 2, 3))
    assert {(e["attempt"], e["mail_from"]) for e in server.events("durable_done")} == {(3, "welcome@example.test")}
    log = server.log + (rq_log.read_text() if rq_log is not None else "")
    for task_id in durable_ids(server).values():
        assert len(re.findall(r"durable task tests\.apps\.flaskdurable:flaky_welcome raised ConnectionError on "
                              r"attempt \d; retrying in [\d.]+s as attempt \d, id=%s" % task_id, log)) == 2, log


def test_a_drain_that_hands_off_or_keeps_tasks_abandons_none(
        server_factory: Callable[..., Server], redis_server: Redis,
        rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    # One background thread: a 30 s task runs (kept in the journal at the drain deadline), 4 wait
    # behind it (handed to RQ). None of the five is abandoned.
    server = start(server_factory, redis=redis_server, env={"EDGESYNC_BACKGROUND_THREADS": "1"})
    victim = server.worker_pids()[0]
    running = plant(server, victim, "first=30")
    queued = plant(server, victim, "first=0.05&n=4")
    server.wait_for_events("durable_start", 1, where=lambda e: e["pid"] == victim)
    os.kill(victim, signal.SIGTERM)  # graceful_timeout 5 s: the 30 s task cannot finish
    server.wait_for_log(r"worker %d: unloaded \(" % victim, timeout=15)
    ids = durable_ids(server)
    log = server.log
    assert "abandoned task" not in log, log
    assert re.search(r"worker %d: unloaded \([^;]*; \d+ requests served, 0 tasks abandoned\)" % victim, log)
    assert re.search(r"worker %d: task tests\.apps\.flaskdurable\.welcome \(running, ran [\d.]+s\) kept in the "
                     r"journal for a live worker to re-run, id=%s" % (victim, ids[running[0]]), log)
    for app_id in queued:
        assert re.search(r"worker %d: task tests\.apps\.flaskdurable\.welcome \(queued, never started, waited "
                         r"[\d.]+s\) handed to rq queue '%s' as job %s, id=%s"
                         % (victim, QUEUE, ids[app_id], ids[app_id]), log), app_id
    rq_workers(redis_server, server)
    wait_for(all_done(server), 60, "every task to complete in gunicorn or RQ")
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show("SIGTERM drain: 1 kept in the journal, 4 handed to RQ")
    assert tally.lost == set()


@pytest.mark.parametrize("handoff_on", ["always", "deadline_or_queue_full"])
def test_redis_stopped_with_a_journal_keeps_every_accepted_task(
        server_factory: Callable[..., Server], redis_server: Redis, handoff_on: str) -> None:
    # deadline_or_queue_full: 3 run here, 3 overflow (their hand-off fails: kept for a later claim).
    env = {"EDGESYNC_MAX_PENDING_TASKS": "3", "EDGESYNC_BACKGROUND_THREADS": "1"} if handoff_on != "always" else {}
    server = start(server_factory, redis=redis_server, handoff_on=handoff_on, workers=1, env=env)
    redis_server.stop()
    status, body = server.get("/durable?first=0.3&n=6")
    assert status == 200, body  # accepted: each kept in the journal (run here, or by a later claim)
    wait_for(all_done(server), 30, "every accepted task to complete here")
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show("Redis stopped, handoff_on=%s, with a journal" % handoff_on)
    assert tally.lost == set() and len(tally.accepted) == 6 and tally.twice == set()
    assert "could not hand durable task" in server.log


def test_redis_stopped_without_a_journal_refuses_and_keeps_nothing(
        server_factory: Callable[..., Server], redis_server: Redis) -> None:
    server = start(server_factory, journal=False, redis=redis_server, handoff_on="always", workers=1)
    redis_server.stop()
    status, _ = server.get("/durable?first=0.01")
    assert status == 500  # wait_until raised: the client may retry, nothing runs twice
    stop_cleanly(server)  # the drain would run (or log) a task kept despite the error
    assert server.events("accepted") == [] and server.events("durable_start") == []


@pytest.mark.parametrize("hygiene", ["on", "off"])
def test_django_standard_logging_does_not_silence_edgesync(server_factory: Callable[..., Server], tmp_path: Path,
                                                          hygiene: str) -> None:
    env = {"DJANGO_DB": str(tmp_path / "db.sqlite3"), "DJANGOSITE_HYGIENE": hygiene,
           "DJANGOSITE_LOGGING": "standard"}
    server = server_factory("--threads", "2", app="tests.apps.djangosite.wsgi", env=env)
    pid = server.worker_pids()[0]
    server.wait_for_log(r"worker %d: serving \(" % pid, timeout=10)
    assert "disabled the edgesync, edgesync.tasks logger(s)" in server.log
    stop_cleanly(server)
    assert re.search(r"worker %d: unloaded \(" % pid, server.log)
