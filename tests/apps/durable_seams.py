"""A WSGI app for tests/test_durable_seams.py: tests/apps/durable.py, with a choice of durable task.

``/durable?fn=work|poison|dropped&first=&rerun=&delay=&n=&only=<pid>`` schedules ``n``
tasks (ids ``<pid>_<n>``, unique across the server) and records ``accepted`` for each
once ``wait_until`` returned; ``only=<pid>``: another worker answers 409. Also
``/ok``, ``/pid``, ``/metrics``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable, Dict, Iterable, Tuple

import edgesync

from . import durable_seam_tasks, durable_tasks
from ._util import query, record, text

_counter = itertools.count()


def _task(q: Dict[str, str], task_id: str) -> Tuple[Any, Tuple[Any, ...]]:
    fn = q.get("fn", "work")
    first, rerun = float(q.get("first", "0.01")), float(q.get("rerun", "0.01"))
    if fn == "poison":
        return durable_seam_tasks.poison, (task_id, float(q.get("delay", "0.2")))
    if fn == "dropped":
        return durable_seam_tasks.dropped, (task_id, first, rerun)
    return durable_tasks.work, (task_id, first, rerun)


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    q = query(environ)
    if path == "/durable":
        if q.get("only", str(os.getpid())) != str(os.getpid()):
            return text(start_response, "not worker %s" % q["only"], "409 Conflict")
        ids = []
        for _ in range(int(q.get("n", "1"))):
            task_id = "%d_%d" % (os.getpid(), next(_counter))
            fn, args = _task(q, task_id)
            edgesync.wait_until(fn, *args)
            record(type="accepted", id=task_id, fn=q.get("fn", "work"))
            ids.append(task_id)
        return text(start_response, "%s %d" % (" ".join(ids), os.getpid()))
    if path == "/ok":
        return text(start_response, "ok")
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    if path == "/metrics":
        return text(start_response, json.dumps(edgesync.runtime_metrics()))
    return text(start_response, "no such route", "404 Not Found")
