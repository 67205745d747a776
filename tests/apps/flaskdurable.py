"""A Flask app whose durable task needs the app context (``current_app``), for the durable contract tests.

``GET /durable?first=&n=&only=<pid>`` schedules ``n`` durable tasks ``welcome(id, first)``
(ids ``<pid>_<n>``) as tests/apps/durable.py does, and records ``accepted`` for each. The
task records ``durable_start`` and ``durable_done`` with what it read through
``current_app``: a re-run, in another worker or on an RQ worker, must read the same.
``/named`` and ``/partial`` schedule it through ``edgesync.named`` and ``functools.partial``;
``/flaky?failures=`` schedules ``flaky_welcome``, which raises ``ConnectionError`` (retried) first.
"""

from __future__ import annotations

import functools
import itertools
import os
import time

from flask import Flask, current_app, request

import edgesync

from ._util import record

app = Flask(__name__)
app.config["MAIL_FROM"] = "welcome@example.test"
_counter = itertools.count()


@edgesync.durable
def welcome(task_id: str, first: float) -> None:
    attempt = edgesync.current_attempt()
    where = os.environ.get("DURABLE_WHERE", "gunicorn")
    record(type="durable_start", id=task_id, attempt=attempt, where=where)
    time.sleep(first if attempt == 1 else 0.01)
    # Raises "Working outside of application context" without one: the run is then not done.
    record(type="durable_done", id=task_id, attempt=attempt, where=where, mail_from=current_app.config["MAIL_FROM"])


@edgesync.durable(retry_on=ConnectionError, max_retries=3, backoff=0.05)
def flaky_welcome(task_id: str, failures: int) -> None:
    """Raises ConnectionError on its first ``failures`` attempts, then does what ``welcome`` does."""
    attempt = edgesync.current_attempt()
    where = os.environ.get("DURABLE_WHERE", "gunicorn")
    record(type="durable_start", id=task_id, attempt=attempt, where=where)
    if attempt <= failures:
        raise ConnectionError("the mail server is down (attempt %d)" % attempt)
    record(type="durable_done", id=task_id, attempt=attempt, where=where, mail_from=current_app.config["MAIL_FROM"])


def _schedule(how: str) -> str:
    if request.args.get("only", str(os.getpid())) != str(os.getpid()):
        return "not worker %s" % request.args["only"], 409  # type: ignore[return-value]
    ids = []
    for _ in range(int(request.args.get("n", "1"))):
        task_id = "%d_%d" % (os.getpid(), next(_counter))
        first = float(request.args.get("first", "0.01"))
        if how == "flaky":
            fut = edgesync.wait_until(flaky_welcome, task_id, int(request.args.get("failures", "2")))
        elif how == "named":
            fut = edgesync.wait_until(edgesync.named("send-welcome", welcome), task_id, first)
        elif how == "partial":
            fut = edgesync.wait_until(functools.partial(welcome, task_id), first)
        else:
            fut = edgesync.wait_until(welcome, task_id, first)
        record(type="accepted", id=task_id, task_id=edgesync.task_id(fut))
        ids.append(task_id)
    return "%s %d" % (" ".join(ids), os.getpid())


@app.get("/durable")
def durable() -> str:
    return _schedule("plain")


@app.get("/named")
def named() -> str:
    return _schedule("named")


@app.get("/partial")
def partial() -> str:
    return _schedule("partial")


@app.get("/flaky")
def flaky() -> str:
    return _schedule("flaky")


@app.get("/pid")
def pid() -> str:
    return str(os.getpid())
