"""A WSGI app for the durable-task fault tests: every durable task id is accounted for.

``/durable?first=&rerun=&grow=&n=&only=<pid>`` schedules ``n`` durable tasks
``tests.apps.durable_tasks.work(id, first, rerun, grow)`` (ids ``<pid>_<n>``, unique
across the server) and records ``accepted`` for each once ``wait_until`` returned;
``QueueFull`` is answered 503 and recorded as ``queue_full``. With ``only=<pid>``
another worker answers 409 and schedules nothing. Also ``/ok``, ``/pid``, ``/metrics``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable, Dict, Iterable, Tuple

import edgesync

from . import durable_tasks
from ._util import query, record, text

_counter = itertools.count()

#: ``choose(query, task_id) -> (durable function, its arguments)``: which task a ``/durable`` request schedules.
Choose = Callable[[Dict[str, str], str], Tuple[Any, Tuple[Any, ...]]]


def work(q: Dict[str, str], task_id: str) -> Tuple[Any, Tuple[Any, ...]]:
    return durable_tasks.work, (task_id, float(q.get("first", "0.01")), float(q.get("rerun", "0.01")),
                                int(q.get("grow", "0")))


def make_app(choose: Choose) -> Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """The app, scheduling what ``choose`` says on ``/durable`` (tests/apps/durable_seams.py: another app)."""
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        q = query(environ)
        if path == "/durable":
            if q.get("only", str(os.getpid())) != str(os.getpid()):
                return text(start_response, "not worker %s" % q["only"], "409 Conflict")
            ids = []
            for _ in range(int(q.get("n", "1"))):
                task_id = "%d_%d" % (os.getpid(), next(_counter))
                fn, args = choose(q, task_id)
                try:
                    edgesync.wait_until(fn, *args)
                except edgesync.QueueFull:
                    record(type="queue_full", id=task_id)
                    return text(start_response, "queue full", "503 Service Unavailable")
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
    return app


app = make_app(work)
