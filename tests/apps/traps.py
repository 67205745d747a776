"""A plain WSGI app for tests/test_traps.py: wait_until at import, under any worker class.

``SCHEDULE_AT_IMPORT=1`` calls ``wait_until`` while the module is imported (in the
master with ``--preload``, in each worker otherwise) and records whether it was
accepted or refused; ``METRICS_AT_IMPORT=1`` reads ``runtime_metrics()`` there
first. ``/task`` schedules a task; every ``beforeunload`` is recorded with the pid
that fired it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable

import edgesync

from ._util import query, record, text


def on_beforeunload(event: edgesync.BeforeUnloadEvent) -> None:
    record(type=event.type, reason=event.reason)


def task(task_id: str) -> None:
    record(type="task_done", id=task_id)


edgesync.add_event_listener("beforeunload", on_beforeunload)

if os.environ.get("METRICS_AT_IMPORT"):
    record(type="metrics_at_import", state=edgesync.runtime_metrics()["state"])

if os.environ.get("SCHEDULE_AT_IMPORT"):
    try:
        edgesync.wait_until(task, "at-import")
    except RuntimeError as exc:
        record(type="refused", message=str(exc))
        if os.environ.get("SCHEDULE_AT_IMPORT") == "raise":
            raise


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    if path == "/task":
        edgesync.wait_until(task, query(environ).get("id", "-"))
        return text(start_response, "scheduled")
    return text(start_response, "not found", "404 Not Found")
