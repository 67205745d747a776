"""A Flask app (with ``edgesync.flask``) for the isolation test under load.

``GET /ctx?id=`` stores the id in ``g``, in a contextvar and in a request-derived
value, then schedules a task. The task, running in its own app context, checks
that ``g`` started empty (no request's ``g`` reached it), that its own writes to
``g`` are still its own after a short random sleep (no other task shares its
``g``), that the contextvar is its request's, and that the request data it was
handed is its request's. It records ``task_done`` with ``ok`` (see
tests/apps/faults.py for the records and the reconciliation).
"""

from __future__ import annotations

import contextvars
import os
import random
import time
from typing import Dict

from flask import Flask, g, request

import edgesync
from edgesync.flask import EdgeSync

from .faults import job, new_id, record

trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="-")

app = Flask(__name__)
EdgeSync(app)


def check(task_id: str, expected: str, data: Dict[str, str]) -> None:
    g_at_start = sorted(vars(g))
    g.task_id = task_id
    time.sleep(random.random() * 0.005)  # interleave with other requests' tasks
    seen = {"g_at_start": g_at_start, "g_task_id": getattr(g, "task_id", None),
            "trace_id": trace_id.get(), "data": data}
    ok = (g_at_start == [] and seen["g_task_id"] == task_id and seen["trace_id"] == expected
          and data == {"id": expected, "path": "/ctx"})
    record(type="task_done", id=task_id, ctx=expected, ok=ok, seen=seen)


@app.get("/ctx")
def ctx() -> str:
    expected = request.args["id"]
    g.request_id = expected
    trace_id.set(expected)
    task_id = new_id()
    data = {"id": request.args["id"], "path": request.path}  # captured now: the task has no request
    edgesync.wait_until(job(task_id, lambda: check(task_id, expected, data)))
    record(type="accepted", id=task_id)
    trace_id.set("changed-after-wait_until")
    g.request_id = "changed"
    return task_id


@app.get("/pid")
def pid() -> str:
    return str(os.getpid())
