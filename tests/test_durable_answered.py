"""An answered request's durable task is never lost: what is not committed belongs to requests not answered.

Real gunicorn, real SIGKILLs, judged from the client side: every request that got a 200
(its body names the durable task ids its ``wait_until`` accepted) must have its task run
to the end, in the worker that accepted it or, after that worker was killed, in another
one. The workers are killed again and again while eight keep-alive clients keep requests
in flight, so kills land while threads are queued behind a commit, inside one, and
between a commit and the answer; a write that a request had not seen committed must
never be one whose request was answered (nor may a future group commit of the journal break this).
"""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, List, Set

import pytest

from .fault_suite import plant
from .support import Server, journal_rows, journal_spooled, journal_tasks, wait_for

APP = "tests.apps.durable:app"

pytestmark = pytest.mark.slow


def _client(server: Server, stop: threading.Event, answered: List[str], failures: List[str]) -> None:
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/durable?first=0.002&rerun=0.002&n=2")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status == 200:
                answered.extend(body.split()[:-1])
            else:
                failures.append("%d %s" % (resp.status, body[:80]))
        except (OSError, http.client.HTTPException):  # its worker was killed mid-request: no answer, no claim
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def test_every_answered_request_has_its_task_run_through_repeated_sigkills(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", "--threads", "4", app=APP,
                            env={"EDGESYNC_DURABLE_JOURNAL": "journal.db"}, workers_ready=2)
    stop = threading.Event()
    answered: List[str] = []
    failures: List[str] = []
    clients = [threading.Thread(target=_client, args=(server, stop, answered, failures)) for _ in range(8)]
    for c in clients:
        c.start()
    killed: Set[int] = set()
    try:
        for round_ in range(8):
            wanted = len(answered) + 40
            wait_for(lambda: len(answered) >= wanted, 30, "requests answered before kill %d" % round_)  # noqa: B023
            victim = server.worker_pids()[round_ % 2]
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            wait_for(lambda: len(set(server.worker_pids()) - killed) == 2, 30, "the killed worker to be replaced")
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    ids = set(answered)
    assert len(ids) == len(answered) and len(ids) >= 320, "ids are unique and enough requests were answered"

    def unfinished() -> Set[str]:
        done = {e["id"] for e in server.events("durable_done")}
        return ids - done
    deadline = time.monotonic() + 60
    while unfinished() and time.monotonic() < deadline:
        time.sleep(0.2)
    lost = unfinished()
    reruns = {e["id"] for e in server.events("durable_start") if e["attempt"] >= 2}
    print("\n[repeated SIGKILL, group commit] answered %d tasks, killed %d workers, re-run %d, lost %d, "
          "non-200 answers %d" % (len(ids), len(killed), len(reruns), len(lost), len(failures)))
    assert lost == set(), "answered but never run: %s" % sorted(lost)[:10]
    assert reruns, "some kills landed while accepted tasks were pending (they were re-run by a live worker)"
    assert failures == []


def test_an_answered_task_outlives_its_worker_while_sqlite_is_locked(server_factory: Callable[..., Server],
                                                                     tmp_path: Path) -> None:
    # Another process holds the journal's write lock (a long transaction, an operator's command):
    # the worker records the task in its spool, answers, and dies before the spool reaches SQLite.
    journal = tmp_path / "journal.db"
    server = server_factory("--workers", "2", "--threads", "4", app=APP, workers_ready=2,
                            env={"EDGESYNC_DURABLE_JOURNAL": str(journal)})
    victim = server.worker_pids()[0]
    blocker = sqlite3.connect(journal, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock, held
    try:
        planted = plant(server, victim, "first=30&rerun=0.05&n=2")
        # (A task's arguments hold the id the app gave it.)
        spooled = [t.args for _, t in journal_spooled(journal) if t.recorded]
        assert all(any('"%s"' % i in args for args in spooled) for i in planted), "recorded in the spool"
        os.kill(victim, signal.SIGKILL)
        assert journal_rows(journal, "id") == [], "nothing written to SQLite"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The survivor (or the replacement) reads the dead worker's spool and runs the tasks again.
    wait_for(lambda: set(planted) <= {e["id"] for e in server.events("durable_done")}, 30,
             "the answered tasks of the killed worker to run to their end")
    reruns = {e["id"]: e["attempt"] for e in server.events("durable_start") if e["attempt"] >= 2}
    assert set(reruns) == set(planted), "each started before the kill: its re-run is its second attempt"
    wait_for(lambda: journal_tasks(journal, "id") == [], 10, "the journal to be empty")
