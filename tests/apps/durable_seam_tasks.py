"""Durable tasks for tests/test_durable_seams.py: one that kills its worker, one a deploy un-declares.

Each run records ``durable_start`` and ``durable_done`` as ``tests.apps.durable_tasks.work``
does, so the fault suite's reconciliation counts them too.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import edgesync

from ._util import record


@edgesync.durable(max_attempts=2)
def poison(task_id: str, delay: float) -> None:
    """SIGKILL the worker running it after ``delay`` s while the file ``$POISON_FLAG`` exists; else complete."""
    attempt = edgesync.current_attempt()
    record(type="durable_start", id=task_id, attempt=attempt, where="gunicorn")
    time.sleep(delay)
    if os.path.exists(os.environ.get("POISON_FLAG", "/nonexistent")):
        os.kill(os.getpid(), signal.SIGKILL)
    record(type="durable_done", id=task_id, attempt=attempt, where="gunicorn")


def _durable_unless_undeclared(f: Callable[..., Any]) -> Any:
    # A deploy that removed @durable: the same import path now names a plain function.
    return f if os.environ.get("UNDECLARE_DURABLE") else edgesync.durable(f)


@_durable_unless_undeclared
def dropped(task_id: str, first: float, rerun: float = 0.0) -> None:
    attempt = edgesync.current_attempt()
    record(type="durable_start", id=task_id, attempt=attempt, where="gunicorn")
    time.sleep(first if attempt == 1 else rerun)
    record(type="durable_done", id=task_id, attempt=attempt, where="gunicorn")
