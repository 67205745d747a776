"""Hand-off of durable tasks to Celery, for real: redis-server, ``celery worker`` processes, gunicorn, signals.

Both ways to run the worker side: standalone (``celery -A edgesync.celery worker``, started in
the app's directory, reading ``edgesync.toml``) and a user's app that includes
``edgesync.celery``. Every case reconciles each durable id the app accepted: 0 lost, and
says how many ran twice. Delivery: ``edgesync.run_durable`` is ``acks_late`` and
``reject_on_worker_lost``; a solo worker SIGKILLed mid-task leaves its message unacknowledged
in Redis, which gives it out again after the visibility timeout (3 s here, through
``handoff_visibility_timeout_ms``, instead of Celery's 1 hour); a prefork pool child killed
mid-task gives its message back at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from edgesync._config import ConfigError, Settings, load_settings, settings_reference_markdown

from .fault_suite import all_done, durable_tally, plant, stop_cleanly
from .support import REPO, Redis, Server, require_wrk, stop_and_show_logs, wait_for

APP = "tests.apps.flaskdurable:app"
QUEUE = "edgesync-test"
CELERY = str(Path(sys.executable).with_name("celery"))


# -- configuration (fast) ------------------------------------------------------------------


def test_celery_needs_a_broker_url_and_says_which_key(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text('[edge_runtime]\nhandoff = "celery"\n'
                                           'handoff_redis_url = "redis://127.0.0.1:6379/0"\n')
    with pytest.raises(ConfigError, match=r"^edgesync\.toml: \[edge_runtime\] handoff = 'celery' needs "
                                          r"handoff_broker_url, the broker's URL .*got none "
                                          r"\(handoff_redis_url is RQ's\)"):
        load_settings({}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"EDGESYNC_HANDOFF_BROKER_URL: handoff_broker_url must be a redis://, "
                                          r"rediss://, sentinel://, amqp://, amqps:// or pyamqp:// URL, or \"\" "
                                          r"\(off\), got 'localhost:6379'"):
        load_settings({"EDGESYNC_HANDOFF_BROKER_URL": "localhost:6379"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"handoff_broker_url = 'redis://h/0' is Celery's: handoff = 'rq' reads "
                                          r"its Redis from handoff_redis_url"):
        load_settings({"EDGESYNC_HANDOFF": "rq", "EDGESYNC_HANDOFF_BROKER_URL": "redis://h/0"}, cwd="/")
    with pytest.raises(ConfigError, match=r"handoff_visibility_timeout_ms must be an integer >= 1000, got 10"):
        Settings(handoff_visibility_timeout_ms=10)
    st = load_settings({"EDGESYNC_HANDOFF": "celery", "EDGESYNC_HANDOFF_BROKER_URL": "amqp://u:pw@rabbit:5672//"},
                       cwd="/")
    assert (st.handoff, st.handoff_broker_url, st.handoff_visibility_timeout_ms) == (
        "celery", "amqp://u:pw@rabbit:5672//", 3600000)
    assert "| `handoff_broker_url` |" in settings_reference_markdown()


def test_the_celery_target_says_where_without_the_password() -> None:
    from edgesync._handoff import target_for
    target = target_for(Settings(handoff="celery", handoff_broker_url="redis://:s3cret@cache:6379/1",
                                 handoff_queue="mail"))
    assert target is not None and target.engine == "celery"
    assert target.describe() == "celery queue 'mail' at redis://:***@cache:6379/1"
    assert target.where("ab12") == "handed to celery queue 'mail' as task ab12"


def test_the_standalone_app_without_a_broker_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    proc = subprocess.run([sys.executable, "-c", "import edgesync.celery as m; m.app"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert ("celery -A edgesync.celery: no broker: set handoff_broker_url in [edge_runtime] of edgesync.toml in %s"
            % tmp_path) in proc.stderr


# -- for real (slow) ----------------------------------------------------------------------------


class CeleryWorker:
    """A ``celery worker`` process: standalone (``-A edgesync.celery``) or a user's app."""

    def __init__(self, redis: Redis, server: Server, workdir: Path, standalone: bool = True, pool: str = "solo",
                 visibility_ms: int = 3600000):
        n = len(list(workdir.glob("celery*.log")))
        self.log_path = workdir / ("celery%d.log" % n)
        self.log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
        env.update({"EVENTS_FILE": str(server.events_path), "DURABLE_WHERE": "celery", "PYTHONUNBUFFERED": "1"})
        if standalone:
            # Started in the app's directory (the repository), its edgesync.toml named by EDGESYNC_CONFIG:
            # the worker imports tests.apps.flaskdurable because it puts its working directory on sys.path.
            toml = workdir / ("edgesync-celery%d.toml" % n)
            toml.write_text('[edge_runtime]\nhandoff = "celery"\nhandoff_broker_url = "%s"\nhandoff_queue = "%s"\n'
                            "handoff_visibility_timeout_ms = %d\n" % (redis.url, QUEUE, visibility_ms))
            env["EDGESYNC_CONFIG"] = str(toml)
            argv = [CELERY, "-A", "edgesync.celery", "worker"]
        else:
            env.update({"CELERY_BROKER_URL": redis.url, "PYTHONPATH": str(REPO)})
            argv = [CELERY, "-A", "tests.apps.celeryapp", "worker", "-Q", QUEUE]
        argv += ["-P", pool, "-c", "1", "-l", "info", "--without-heartbeat", "--without-mingle", "--without-gossip"]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), 60, "the celery worker to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "celery worker exited: %s" % self.log_path.read_text(errors="replace")
        return "ready." in self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def celery_workers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., CeleryWorker]]:
    started: List[CeleryWorker] = []

    def make(redis: Redis, server: Server, **kwargs: object) -> CeleryWorker:
        worker = CeleryWorker(redis, server, tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker
    yield make
    stop_and_show_logs(request, started)


def start(server_factory: Callable[..., Server], redis: Redis, handoff_on: str, journal: bool = False,
          workers: int = 2, env: Optional[Dict[str, str]] = None) -> Server:
    require_wrk()
    settings = {"EDGESYNC_HANDOFF": "celery", "EDGESYNC_HANDOFF_ON": handoff_on,
                "EDGESYNC_HANDOFF_BROKER_URL": redis.url, "EDGESYNC_HANDOFF_QUEUE": QUEUE}
    if journal:
        settings["EDGESYNC_DURABLE_JOURNAL"] = "journal.db"
    return server_factory("--workers", str(workers), "--threads", "4", app=APP, env={**settings, **(env or {})},
                          workers_ready=workers)


def durable_ids(server: Server) -> Dict[str, str]:
    """App id -> edgesync.task_id(future), as the view recorded it."""
    return {e["id"]: e["task_id"] for e in server.events("accepted")}


def queued_messages(redis: Redis) -> List[Dict[str, object]]:
    """The headers of the Celery messages waiting in QUEUE (kombu's Redis transport: a list of JSON)."""
    return [json.loads(raw)["headers"] for raw in redis.client.lrange(QUEUE, 0, -1)]


def starts(server: Server) -> Counter[str]:
    return Counter(e["id"] for e in server.events("durable_start"))


@pytest.mark.slow
def test_standalone_worker_runs_flask_tasks_and_the_celery_task_id_is_the_durable_id(
        server_factory: Callable[..., Server], redis_server: Redis,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    server = start(server_factory, redis_server, "always")
    status, body = server.get("/durable?n=3")
    assert status == 200, body
    ids = durable_ids(server)
    headers = queued_messages(redis_server)
    assert {h["id"] for h in headers} == set(ids.values()) and len(headers) == 3
    assert {h["task"] for h in headers} == {"edgesync.run_durable"}
    celery_workers(redis_server, server)
    wait_for(all_done(server), 60, "the celery worker to run the three tasks")
    stop_cleanly(server)
    done = server.events("durable_done")
    assert {(e["where"], e["mail_from"]) for e in done} == {("celery", "welcome@example.test")}
    tally = durable_tally(server)
    tally.show("handoff celery always, standalone worker")
    assert tally.lost == set() and tally.twice == set()


@pytest.mark.slow
def test_a_user_app_including_edgesync_celery_runs_what_a_drain_hands_off(
        server_factory: Callable[..., Server], redis_server: Redis,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    # One background thread: a 30 s task runs (kept in the journal at the drain deadline), 4 wait
    # behind it (handed to Celery at the drain). None is abandoned; the user's app runs the 4.
    server = start(server_factory, redis_server, "deadline", journal=True, env={"EDGESYNC_BACKGROUND_THREADS": "1"})
    victim = server.worker_pids()[0]
    running = plant(server, victim, "first=30")
    queued = plant(server, victim, "first=0.05&n=4")
    server.wait_for_events("durable_start", 1, where=lambda e: e["pid"] == victim)
    os.kill(victim, signal.SIGTERM)  # graceful_timeout 5 s: the 30 s task cannot finish
    server.wait_for_log(r"worker %d: unloaded \(" % victim, timeout=15)
    ids = durable_ids(server)
    log = server.log
    assert "abandoned task" not in log, log
    assert re.search(r"worker %d: task tests\.apps\.flaskdurable\.welcome \(running, ran [\d.]+s\) kept in the "
                     r"journal for a live worker to re-run, id=%s" % (victim, ids[running[0]]), log)
    for app_id in queued:
        assert re.search(r"worker %d: task tests\.apps\.flaskdurable\.welcome \(queued, never started, waited "
                         r"[\d.]+s\) handed to celery queue '%s' as task %s, id=%s"
                         % (victim, QUEUE, ids[app_id], ids[app_id]), log), app_id
    celery_workers(redis_server, server, standalone=False)
    wait_for(all_done(server), 90, "every task to complete in gunicorn or on the user's Celery worker")
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show("SIGTERM drain: 1 kept in the journal, 4 handed to a user's Celery app")
    assert tally.lost == set()
    assert {app_id for app_id, runs in tally.done.items() if runs == ["celery"]} == set(queued)


@pytest.mark.slow
def test_a_solo_worker_sigkilled_mid_task_loses_nothing_its_task_runs_again_after_the_visibility_timeout(
        server_factory: Callable[..., Server], redis_server: Redis,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    server = start(server_factory, redis_server, "always")
    status, body = server.get("/durable?n=4&first=2")
    assert status == 200, body
    worker = celery_workers(redis_server, server, visibility_ms=3000)
    first = server.wait_for_events("durable_start", 1, timeout=30)[0]
    worker.proc.send_signal(signal.SIGKILL)  # mid-task: its 2 s sleep has begun
    worker.proc.wait(10)
    killed_at = time.time()
    celery_workers(redis_server, server, visibility_ms=3000)
    wait_for(all_done(server), 90, "every task to complete on the second worker")
    stop_cleanly(server)
    tally = durable_tally(server)
    line = tally.show("handoff celery, solo worker SIGKILLed mid-task, visibility timeout 3 s")
    runs = starts(server)
    again = [e for e in server.events("durable_start") if e["id"] == first["id"]][1]
    print("ran twice: %d of %d (%s); its second start came %.1fs after the first, %.1fs after the kill"
          % (sum(1 for n in runs.values() if n > 1), len(runs), first["id"], again["t"] - first["t"],
             again["t"] - killed_at))
    assert tally.lost == set(), line
    # Only the task that was running ran twice (prefetch 1: the others waited in the queue) ...
    assert {i for i, n in runs.items() if n > 1} == {first["id"]} and set(runs.values()) <= {1, 2}
    # ... as attempt 2 (the message was redelivered), not before Redis's visibility timeout had passed
    # since the first worker took it.
    assert (first["attempt"], again["attempt"]) == (1, 2) and first["id"] in tally.reruns
    assert again["t"] - first["t"] >= 3.0


@pytest.mark.slow
def test_a_prefork_child_killed_mid_task_gives_its_message_back_at_once(
        server_factory: Callable[..., Server], redis_server: Redis,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    # reject_on_worker_lost: the pool's parent rejects the message of a child that died, and Redis
    # queues it again now, not after the visibility timeout (left at Celery's 1 hour here).
    server = start(server_factory, redis_server, "always")
    status, body = server.get("/durable?n=2&first=2")
    assert status == 200, body
    celery_workers(redis_server, server, pool="prefork")
    first = server.wait_for_events("durable_start", 1, timeout=30)[0]
    os.kill(first["pid"], signal.SIGKILL)
    killed_at = time.time()
    wait_for(all_done(server), 60, "every task to complete on the worker's next child")
    stop_cleanly(server)
    tally = durable_tally(server)
    line = tally.show("handoff celery, prefork child SIGKILLed mid-task")
    runs = starts(server)
    again = [e for e in server.events("durable_start") if e["id"] == first["id"]][1]
    print("ran twice: %d of %d; the second start came %.1fs after the kill"
          % (sum(1 for n in runs.values() if n > 1), len(runs), again["t"] - killed_at))
    assert tally.lost == set(), line
    assert runs[first["id"]] == 2 and again["pid"] != first["pid"] and again["attempt"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("journal", [True, False])
def test_broker_stopped_keeps_the_task_in_the_journal_or_refuses_it(
        server_factory: Callable[..., Server], redis_server: Redis, journal: bool) -> None:
    server = start(server_factory, redis_server, "always", journal=journal, workers=1)
    redis_server.stop()
    began = time.monotonic()
    status, body = server.get("/durable?first=0.01&n=2", timeout=30)
    took = time.monotonic() - began
    if journal:
        assert status == 200, body  # kept in the journal and run here
        wait_for(all_done(server), 30, "both tasks to complete here")
        assert re.search(r"could not hand durable task tests\.apps\.flaskdurable:welcome to celery queue '%s' at "
                         r"redis://127\.0\.0\.1:\d+/0; kept in the journal and run here" % QUEUE, server.log)
    else:
        assert status == 500  # wait_until raised: nothing kept
    stop_cleanly(server)
    tally = durable_tally(server)
    if journal:
        assert tally.lost == set() and len(tally.accepted) == 2 and tally.twice == set()
    else:
        assert server.events("accepted") == [] and server.events("durable_start") == []
    assert took < 10, "a broker that refuses must not hold the view (%.1fs)" % took


@pytest.mark.slow
def test_retries_on_a_celery_worker_run_as_the_next_attempts_logged_with_the_durable_id(
        server_factory: Callable[..., Server], redis_server: Redis,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    server = start(server_factory, redis_server, "always", workers=1)
    worker = celery_workers(redis_server, server)
    assert server.get("/flaky?failures=2&n=2")[0] == 200
    wait_for(all_done(server), 60, "both tasks to complete on their third attempt")
    stop_cleanly(server)
    ids = durable_ids(server)
    assert sorted((e["id"], e["attempt"], e["where"]) for e in server.events("durable_start")) == sorted(
        (app_id, attempt, "celery") for app_id in ids for attempt in (1, 2, 3))
    assert {(e["attempt"], e["mail_from"]) for e in server.events("durable_done")} == {(3, "welcome@example.test")}
    log = worker.log_path.read_text(errors="replace")
    for task_id in ids.values():
        assert len(re.findall(r"process \d+: durable task tests\.apps\.flaskdurable:flaky_welcome raised "
                              r"ConnectionError on attempt \d; retrying in [\d.]+s as attempt \d, id=%s" % task_id,
                              log)) == 2, log
        assert re.search(r"Task tests\.apps\.flaskdurable:flaky_welcome\[%s\] succeeded" % task_id, log), log


@pytest.mark.slow
def test_a_redelivered_task_past_its_max_attempts_is_given_up(
        redis_server: Redis, tmp_path: Path,
        celery_workers: Callable[..., CeleryWorker]) -> None:
    # Sent as attempt 1 of at most 1: the pool child running it is killed, the message comes back
    # (reject_on_worker_lost) as attempt 2, which is past the cap: given up, not run again.
    from types import SimpleNamespace

    from edgesync._handoff import Handed, target_for
    target = target_for(Settings(handoff="celery", handoff_broker_url=redis_server.url, handoff_queue=QUEUE))
    assert target is not None
    task_id = "0f1e2d3c4b5a697887"
    target.send(Handed(task_id, "tests.apps.durable_tasks:work", json.dumps([["once", 30], {}]), 1, 1, None))
    events = SimpleNamespace(events_path=tmp_path / "events.jsonl")
    worker = celery_workers(redis_server, events, pool="prefork")

    def started() -> List[Dict[str, object]]:
        lines = events.events_path.read_text().splitlines() if events.events_path.exists() else []
        return [e for e in map(json.loads, lines) if e["type"] == "durable_start"]
    first = wait_for(started, 30, "the task to start")[0]
    os.kill(int(str(first["pid"])), signal.SIGKILL)
    wait_for(lambda: "gave up durable task" in worker.log_path.read_text(errors="replace"), 60,
             "the redelivered message to be given up")
    log = worker.log_path.read_text(errors="replace")
    assert re.search(r"process \d+: gave up durable task tests\.apps\.durable_tasks:work: its 1 attempt\(s\) all "
                     r"ended with their process, id=%s" % task_id, log), log
    assert [e["attempt"] for e in started()] == [1]
