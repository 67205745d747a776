"""A WSGI app for the fault, isolation and soak tests: every task is accounted for.

Each task ``wait_until`` accepts gets an id ``<pid>_<n>`` that is unique across the
whole server. The app writes an ``accepted`` record right after ``wait_until``
returns, and the task writes ``task_done`` when it ends (a failing task: the
``unhandledrejection`` listener writes it, with ``failed: true``). The task's
function is named ``job_<id>``, so edgesync's "abandoned task
tests.apps.faults.job_<id> (...)" log line names the very task. A test can then
reconcile: every accepted id is done or abandoned, none unaccounted for.

Records are JSON lines in ``$EVENTS_FILE`` (one ``os.write`` on an O_APPEND
descriptor per line, so lines from several processes never interleave).

Routes: ``/ok``; ``/task?lo=&hi=&n=&only=`` (n tasks, each sleeping a random time in
[lo, hi]; ``QueueFull`` is answered 503 and recorded; with ``only=<pid>``, another
worker answers 409 and schedules nothing); ``/fail`` (a task that raises);
``/ctx?id=`` (isolation: the task checks it sees its own request's context and
data); ``/stubborn?cpu=0|1`` (a task that swallows every exception, cancellation
included); ``/burn?ms=&only=`` (spins that many ms of CPU in the request: with a
low ``cpu_soft_limit_ms`` the worker that answers retires); ``/sleep?s=``;
``/pid``; ``/metrics``; ``/gc`` (how many objects the collector has frozen:
``gc.get_freeze_count()``).

Environment: ``LISTENER_RAISES=1`` adds a ``beforeunload`` listener that raises
(and one after it that records ``after_raising``); ``LISTENER_BLOCKS=<seconds>``
adds one that sleeps that long; ``LOG_EVERY_FAILURE=<n>`` lets every n-th failing
task reach edgesync's default logging (the others call ``prevent_default()``, so a
storm of thousands does not write thousands of tracebacks).

Files that change how a worker boots, checked in each worker after the app is
loaded (``edgesync.after_fork``: whether the worker imported the app, or a mold or
a preloading master did): while ``$BOOT_HOLD_FILE`` exists, the worker's boot waits
(at most 60 s), writing a ``boot_held`` record first; if ``$BOOT_FAIL_FILE``
exists, the boot raises (gunicorn's boot-error handling then halts the master).
The import itself raises too while ``$BOOT_FAIL_FILE`` exists: where a worker
imports the app, that is where it fails.
"""

from __future__ import annotations

import atexit
import contextvars
import gc
import itertools
import json
import os
import random
import re
import time
from typing import Any, Callable, Dict, Iterable

import edgesync

from ._util import query, record
from ._util import text as _text

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
request_data: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("request_data")
_counter = itertools.count()
_JOB = re.compile(r"job_(\d+_\d+)$")


def new_id() -> str:
    return "%d_%d" % (os.getpid(), next(_counter))


def job(task_id: str, body: Callable[[], Any]) -> Callable[[], Any]:
    """``body`` as a function named ``job_<task_id>`` (the name edgesync logs)."""
    def run() -> Any:
        return body()
    run.__name__ = run.__qualname__ = "job_" + task_id
    return run


def schedule(task_id: str, body: Callable[[], Any]) -> None:
    """``wait_until`` the job, then record that it was accepted (QueueFull propagates)."""
    edgesync.wait_until(job(task_id, body))
    record(type="accepted", id=task_id)


# -- listeners ------------------------------------------------------------------


def on_beforeunload(event: edgesync.BeforeUnloadEvent) -> None:
    record(type="beforeunload", reason=event.reason, time_remaining=event.time_remaining,
           pending=len(event.pending_tasks))


def on_rejection(event: edgesync.UnhandledRejectionEvent) -> None:
    match = _JOB.search(event.task_name or "")
    if match is None:
        return
    task_id = match.group(1)
    record(type="task_done", id=task_id, failed=True, error=type(event.reason).__name__)
    every = int(os.environ.get("LOG_EVERY_FAILURE", "0") or 0)
    if not every or int(task_id.rsplit("_", 1)[1]) % every:
        event.prevent_default()


def _failing(what: str) -> None:
    fail = os.environ.get("BOOT_FAIL_FILE")
    if fail and os.path.exists(fail):
        raise RuntimeError("the app fails to %s on purpose (%s exists)" % (what, fail))


@edgesync.after_fork
def _boot_switches() -> None:
    _failing("boot")
    hold = os.environ.get("BOOT_HOLD_FILE")
    if hold and os.path.exists(hold):
        record(type="boot_held")
        deadline = time.monotonic() + 60
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.02)


_failing("import")
edgesync.add_event_listener("beforeunload", on_beforeunload)
edgesync.add_event_listener("unhandledrejection", on_rejection)
# When the worker process ends (gunicorn's worker exits through SystemExit, so atexit
# handlers run): a test compares it with the termination beforeunload's time.
atexit.register(lambda: record(type="worker_exit"))

if os.environ.get("LISTENER_RAISES"):
    def raising_listener(event: Any) -> None:
        raise RuntimeError("listener failed on purpose")
    edgesync.add_event_listener("beforeunload", raising_listener)
    # Registered after the raising one: it must still run.
    edgesync.add_event_listener("beforeunload", lambda ev: record(type="after_raising", reason=ev.reason))

if os.environ.get("LISTENER_BLOCKS"):
    def blocking_listener(event: Any) -> None:
        record(type="blocking_listener", reason=event.reason)
        time.sleep(float(os.environ["LISTENER_BLOCKS"]))
        record(type="blocking_listener_returned", reason=event.reason)
    edgesync.add_event_listener("beforeunload", blocking_listener)


# -- task bodies ------------------------------------------------------------------


def sleeper(task_id: str, seconds: float) -> Callable[[], None]:
    def body() -> None:
        time.sleep(seconds)
        record(type="task_done", id=task_id)
    return body


def failer(task_id: str) -> Callable[[], None]:
    def body() -> None:
        raise ValueError("task %s fails on purpose" % task_id)
    return body


def context_checker(task_id: str, expected: str, path: str) -> Callable[[], None]:
    def body() -> None:
        time.sleep(random.random() * 0.005)  # interleave with other requests' tasks
        data = request_data.get(None)
        seen = (request_id.get(), None if data is None else data.get("id"),
                None if data is None else data.get("path"))
        ok = seen == (expected, expected, path)
        record(type="task_done", id=task_id, ctx=expected, ok=ok, seen=list(seen))
    return body


def stubborn(task_id: str, burn_cpu: bool) -> Callable[[], None]:
    def body() -> None:
        record(type="stubborn_started", id=task_id)
        while True:
            # why BaseException: this task ignores everything, cancellation included,
            # to show that only the instance's hard limits can end it. The loop runs in
            # a function of its own: CPython 3.13.0 lets an exception raised into a
            # thread while a loop evaluates its condition skip the handler in that
            # frame (docs/pythons-and-frameworks.md), not one in the caller's.
            try:
                _work_forever(burn_cpu)
            except BaseException:
                record(type="stubborn_ignored", id=task_id)
    return body


def _work_forever(burn_cpu: bool) -> None:
    while True:
        if burn_cpu:
            deadline = time.monotonic() + 0.01
            while time.monotonic() < deadline:
                pass
        else:
            time.sleep(0.01)


# -- routes ------------------------------------------------------------------------


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    q = query(environ)
    if path == "/ok":
        return _text(start_response, "ok")
    task_id = new_id()
    try:
        if path == "/task":
            if q.get("only", str(os.getpid())) != str(os.getpid()):
                # Meant for another worker (a test aiming at one process): schedule nothing.
                return _text(start_response, "not worker %s" % q["only"], "409 Conflict")
            lo, hi = float(q.get("lo", "0.05")), float(q.get("hi", q.get("lo", "0.05")))
            schedule(task_id, sleeper(task_id, random.uniform(lo, hi)))
            for _ in range(int(q.get("n", "1")) - 1):  # a burst: more tasks from one request
                more = new_id()
                schedule(more, sleeper(more, random.uniform(lo, hi)))
            return _text(start_response, "%s %d" % (task_id, os.getpid()))
        if path == "/fail":
            schedule(task_id, failer(task_id))
            return _text(start_response, task_id)
        if path == "/ctx":
            expected = q["id"]
            request_id.set(expected)
            request_data.set({"id": expected, "path": path})
            schedule(task_id, context_checker(task_id, expected, path))
            # The task runs in a copy taken at wait_until time: later changes to this
            # request's context must not reach it.
            request_id.set("changed-after-wait_until")
            request_data.set({"id": "changed", "path": "changed"})
            return _text(start_response, task_id)
        if path == "/stubborn":
            schedule(task_id, stubborn(task_id, q.get("cpu") == "1"))
            return _text(start_response, "%s %d" % (task_id, os.getpid()))
    except edgesync.QueueFull:
        record(type="queue_full", id=task_id)
        return _text(start_response, "queue full", "503 Service Unavailable")
    if path == "/burn":
        if q.get("only", str(os.getpid())) != str(os.getpid()):
            return _text(start_response, "not worker %s" % q["only"], "409 Conflict")
        end = time.thread_time() + float(q.get("ms", "100")) / 1000.0
        while time.thread_time() < end:
            pass
        return _text(start_response, "burnt %d" % os.getpid())
    if path == "/sleep":
        time.sleep(float(q.get("s", "1")))
        return _text(start_response, "slept %d" % os.getpid())
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    if path == "/metrics":
        return _text(start_response, json.dumps(edgesync.runtime_metrics()))
    if path == "/gc":
        return _text(start_response, str(gc.get_freeze_count()))
    return _text(start_response, "no such route", "404 Not Found")
