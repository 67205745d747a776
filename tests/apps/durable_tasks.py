"""Durable tasks for the tests: module-level, importable, JSON arguments.

Each run records ``durable_start`` and ``durable_done`` (``tests/apps/_util.record``:
JSON lines in ``$EVENTS_FILE``) with the task's id, its attempt number, the pid and
``where`` it ran (``$DURABLE_WHERE``: ``rq`` in the RQ worker, else ``gunicorn``), so a
test can reconcile every id across gunicorn workers and the RQ worker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, List

import edgesync

from ._util import record

#: In-process tests: what ran, and a gate that blocks ``gated`` until it is set.
ran: List[Dict[str, object]] = []
gate = threading.Event()


@edgesync.durable
def note(task_id: str, payload: Dict[str, object]) -> str:
    ran.append({"id": task_id, "payload": payload, "attempt": edgesync.current_attempt()})
    return task_id


@edgesync.durable(max_attempts=2)
def gated(task_id: str) -> None:
    gate.wait(30)
    ran.append({"id": task_id, "attempt": edgesync.current_attempt()})


@edgesync.durable
async def note_async(task_id: str) -> int:
    ran.append({"id": task_id, "attempt": edgesync.current_attempt()})
    return edgesync.current_attempt()


@edgesync.durable
def work(task_id: str, first: float, rerun: float = 0.0, grow_mb: int = 0) -> None:
    """Sleep ``first`` s on the first attempt, ``rerun`` s on later ones; record start and end."""
    attempt = edgesync.current_attempt()
    where = os.environ.get("DURABLE_WHERE", "gunicorn")
    record(type="durable_start", id=task_id, attempt=attempt, where=where)
    hog = []
    if attempt == 1 and grow_mb:
        for _ in range(grow_mb):  # grows the instance past its memory limit: terminated
            hog.append(bytearray(2**20))
            time.sleep(0.005)
    time.sleep(first if attempt == 1 else rerun)
    record(type="durable_done", id=task_id, attempt=attempt, where=where)


def plain(task_id: str) -> None:
    """Not durable (for the test that a renamed durable function is refused)."""


renamed = edgesync.durable(plain)  # its path names `plain`, the undecorated function


@edgesync.durable
def boom(task_id: str) -> None:
    raise ValueError("durable task %s fails on purpose" % task_id)


@edgesync.durable(retry_on=(ConnectionError,), max_retries=2, backoff=0.01)
def flaky(task_id: str, failures: int) -> int:
    """Raises ConnectionError on its first ``failures`` attempts (retried twice at most), then returns."""
    attempt = edgesync.current_attempt()
    ran.append({"id": task_id, "attempt": attempt})
    if attempt <= failures:
        raise ConnectionError("flaky %s fails on attempt %d" % (task_id, attempt))
    return attempt


@edgesync.durable(retry_on=ConnectionError, backoff=0.01)
def wrong_error(task_id: str) -> None:
    """Raises an exception its retry_on does not name: never retried."""
    ran.append({"id": task_id, "attempt": edgesync.current_attempt()})
    raise KeyError(task_id)
