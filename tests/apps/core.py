"""A plain WSGI app that exercises edgesync from real gunicorn workers.

Each route is one behaviour the integration tests drive from outside. Listeners
and tasks write JSON lines to ``$EVENTS_FILE`` (one ``os.write`` on an O_APPEND
descriptor per line, so lines from several processes never interleave).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List

import edgesync

from ._util import query, record
from ._util import text as _text

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_hoard: List[bytes] = []


def on_beforeunload(event: edgesync.BeforeUnloadEvent) -> None:
    record(type=event.type, reason=event.reason, detail=event.detail,
           time_remaining=event.time_remaining,
           pending=[t.name for t in event.pending_tasks])


def on_rejection(event: edgesync.UnhandledRejectionEvent) -> None:
    record(type=event.type, error=repr(event.reason), task=event.task_name)
    if os.environ.get("PREVENT_DEFAULT"):
        event.prevent_default()


edgesync.add_event_listener("beforeunload", on_beforeunload)
edgesync.add_event_listener("unhandledrejection", on_rejection)

# An app whose import costs CPU, as a large one's does (BOOT_CPU_MS of it).
_boot_until = time.process_time() + float(os.environ.get("BOOT_CPU_MS", "0")) / 1000
while time.process_time() < _boot_until:
    sum(range(1000))


# -- tasks -------------------------------------------------------------------


def sleepy_task(task_id: str, seconds: float) -> str:
    record(type="task_start", id=task_id)
    time.sleep(seconds)
    record(type="task_done", id=task_id)
    return task_id


def context_task(expected: str) -> None:
    time.sleep(0.001)
    record(type="ctx", expected=expected, seen=request_id.get())


def failing_task() -> None:
    raise ValueError("boom from a background task")


def cpu_task(task_id: str) -> None:
    record(type="task_start", id=task_id)
    x = 0
    while True:
        x += 1


async def async_task(task_id: str) -> str:
    import asyncio
    await asyncio.sleep(0.01)
    record(type="task_done", id=task_id)
    return task_id


# -- routes ------------------------------------------------------------------


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    q = query(environ)
    if path == "/task":
        edgesync.wait_until(sleepy_task, q.get("id", "t"), float(q.get("sleep", "0.5")))
        return _text(start_response, "scheduled %s" % q.get("id", "t"))
    if path == "/async":
        edgesync.wait_until(async_task(q.get("id", "a")))
        return _text(start_response, "scheduled")
    if path == "/ctx":
        request_id.set(q["id"])
        edgesync.wait_until(context_task, q["id"])
        return _text(start_response, "ok")
    if path == "/fail":
        edgesync.wait_until(failing_task)
        return _text(start_response, "scheduled a failing task")
    if path == "/burst":
        accepted, refused, message = 0, 0, ""
        for i in range(int(q["n"])):
            try:
                edgesync.wait_until(sleepy_task, "b%d" % i, float(q.get("sleep", "1")))
                accepted += 1
            except edgesync.QueueFull as exc:
                refused += 1
                message = str(exc)
        return _text(start_response, json.dumps({"accepted": accepted, "refused": refused,
                                                 "message": message}))
    if path == "/taskhog":
        edgesync.wait_until(cpu_task, q.get("id", "hog"))
        return _text(start_response, "scheduled a CPU hog")
    if path == "/hog":
        x = 0
        deadline = time.monotonic() + float(q.get("s", "60"))
        while time.monotonic() < deadline:
            x += 1
        return _text(start_response, "survived")
    if path == "/chog":
        # CPU burnt inside one C call that releases the GIL: no exception can land.
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", int(q.get("n", "200000000")))
        return _text(start_response, "survived")
    if path == "/gilhog":
        # One C call that never releases the GIL: every Python thread stops.
        sum(range(10**13))
        return _text(start_response, "survived")
    if path == "/mem":
        _hoard.append(bytearray(int(q["mb"]) * 1024 * 1024))
        for chunk in _hoard:  # touch the pages so they count in RSS
            chunk[::4096] = b"x" * len(chunk[::4096])
        return _text(start_response, "holding %d MB" % (sum(len(c) for c in _hoard) // 2**20))
    if path == "/sleep":
        time.sleep(float(q.get("s", "1")))
        return _text(start_response, "slept %d" % os.getpid() if "pid" in q else "slept")
    if path == "/metrics":
        return _text(start_response, json.dumps(edgesync.runtime_metrics()))
    if path == "/server_metrics":
        return _text(start_response, json.dumps(edgesync.server_metrics()))
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    return _text(start_response, "ok")
