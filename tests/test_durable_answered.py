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
import threading
import time
from typing import Callable, List, Set

import pytest

from .support import Server, wait_for

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
