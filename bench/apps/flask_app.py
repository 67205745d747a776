"""The Flask app every benchmark server runs, whatever its worker class.

Routes (each is one behaviour a scenario measures):

- ``/hello``: hello world (scenario 1, 3, 5, 6, 8).
- ``/plain`` and ``/task``: the same small view; ``/task`` also hands a light task
  to ``edgesync.wait_until`` (scenario 2); ``/task_tpe`` hands it to a plain
  ``ThreadPoolExecutor`` with as many threads (8) instead, for reference.
- ``/bg`` and ``/bg_tpe``: a view that hands a trivial task (``return n``) to
  ``edgesync.wait_until``, and the same view handing it to that
  ``ThreadPoolExecutor`` (scenario 2 at 2 workers, ``bench/manycore.sh``): what
  ``wait_until`` costs against the thread pool an app would otherwise use.
  ``/bg_tpe_app`` runs that task inside ``app.app_context()``, as Flask-Executor
  does and as ``wait_until`` does for a task scheduled in a Flask request.
- ``/fill?to=N[&probe=1]``: schedules background tasks that block until
  ``/release`` until N are pending in the instance (scenario 5). Answers JSON
  with the number pending and, with probe=1, whether one more was refused with
  ``QueueFull``.
- ``/hog``: spins in pure Python until edgesync cancels it (scenario 7, CPU).
- ``/grow?rate=MB_PER_S&limit_mb=L``: grows the worker's memory by 1 MB steps at
  ``rate`` MB/s (scenario 7, memory). It appends to ``$BENCH_MARKS_FILE``
  ``{"before": t}`` before each step while its RSS growth above the ready
  baseline is under ``limit_mb``, and ``{"crossed": t}`` once it is over;
  ``t`` is ``time.monotonic()``, CLOCK_MONOTONIC, the same clock in every
  process of the machine, so the client can subtract it from the moment it was
  answered. When the monitor acts before the thread can note the crossing, the
  last "before" mark is when the crossing step began.
- ``/durable`` and ``/nondurable``: the same view handing a no-op task to
  ``wait_until``, durable (recorded in ``durable_journal`` before it returns) or
  plain (``bench/journal_scale.py``).
- ``/pid``: the worker's pid.
- ``/io?ms=N``: waits N ms (default 20) without CPU, as a view waiting on a
  database or an API does, then answers (scenario 6, I/O-bound).

With ``BENCH_WARM_UP=1`` the app registers an ``edgesync.warm_up`` function that passes
``/hello`` and ``/pid`` through the app with Flask's test client (no socket), so the
process workers are forked from has done what each worker's first request would do
(``bench/births.py warmup``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

from flask import Flask, jsonify, request

import edgesync
from bench.apps import durable_tasks

app = Flask(__name__)

_gate = threading.Event()
_hoard: List[bytes] = []


def _light_task(n: int) -> int:
    """A light background task: a few microseconds of Python."""
    return sum(range(n))


def _payload() -> dict[str, Any]:
    # The work both /plain and /task do, so that they differ only by wait_until.
    return {"ok": True, "items": [1, 2, 3]}


@app.get("/hello")
def hello() -> str:
    return "Hello, World!"


@app.get("/io")
def io_wait() -> str:
    time.sleep(float(request.args.get("ms", "20")) / 1000.0)
    return "waited"


@app.get("/plain")
def plain() -> Any:
    return jsonify(_payload())


@app.get("/task")
def task() -> Any:
    edgesync.wait_until(_light_task, 50)
    return jsonify(_payload())


_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bench-tpe")


@app.get("/durable")
def durable_view() -> Any:
    edgesync.wait_until(durable_tasks.send_email, "a@b.c", 1)
    return jsonify(_payload())


@app.get("/nondurable")
def nondurable_view() -> Any:
    edgesync.wait_until(durable_tasks.send_email_plain, "a@b.c", 1)
    return jsonify(_payload())


@app.get("/task_tpe")
def task_tpe() -> Any:
    # The plain-Python way to do what /task does, for reference.
    _executor.submit(_light_task, 50)
    return jsonify(_payload())


def _trivial(n: int) -> int:
    return n


@app.get("/bg")
def bg() -> str:
    edgesync.wait_until(_trivial, 1)
    return "queued"


@app.get("/bg_tpe")
def bg_tpe() -> str:
    _executor.submit(_trivial, 1)
    return "queued"


def _in_app_context(n: int) -> int:
    with app.app_context():  # what Flask-Executor wraps each task in
        return _trivial(n)


@app.get("/bg_tpe_app")
def bg_tpe_app() -> str:
    _executor.submit(_in_app_context, 1)
    return "queued"


def _blocked(gate: threading.Event) -> None:
    gate.wait(600)


@app.get("/fill")
def fill() -> Any:
    # Schedule blocked tasks until ``to`` are pending; with probe=1, then try one
    # more, which a full queue must refuse with QueueFull.
    to = int(request.args.get("to", "0"))
    gate = _gate

    def pending() -> int:
        tasks = edgesync.runtime_metrics()["tasks"]
        return int(tasks["queued"] + tasks["running"])

    accepted = 0
    for _ in range(max(0, to - pending())):
        edgesync.wait_until(_blocked, gate)
        accepted += 1
    refused = None
    if request.args.get("probe"):
        try:
            edgesync.wait_until(_blocked, gate)
        except edgesync.QueueFull:
            refused = True
        else:
            refused = False
    return jsonify({"accepted": accepted, "pending": pending(), "one_more_refused": refused})


@app.get("/release")
def release() -> Any:
    global _gate
    _gate.set()
    _gate = threading.Event()
    return jsonify({"released": True})


@app.get("/hog")
def hog() -> str:
    # Pure Python, so a cancellation lands between two bytecodes. The cap only
    # keeps a server without CPU limits from spinning for ever.
    deadline = time.monotonic() + 30.0
    x = 0
    while time.monotonic() < deadline:
        x += 1
    return "not cancelled after %d iterations" % x


def _mark(**fields: Any) -> None:
    path = os.environ.get("BENCH_MARKS_FILE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(fields) + "\n").encode())
        finally:
            os.close(fd)


@app.get("/grow")
def grow() -> str:
    import psutil

    rate = float(request.args.get("rate", "200"))  # MB per second
    limit = float(request.args.get("limit_mb", "64")) * 2**20
    baseline = edgesync.runtime_metrics()["rss_baseline_bytes"] or psutil.Process().memory_info().rss
    proc = psutil.Process()
    step = 2**20
    start = time.monotonic()
    growth = proc.memory_info().rss - baseline
    for i in range(1, 4096):
        if growth < limit:
            # Noted *before* the allocation: if the monitor acts on the step that
            # crosses the limit before this thread can look, the mark is there.
            _mark(before=time.monotonic(), growth_mb=growth / 2**20)
        _hoard.append(b"\x01" * step)  # bytes(n) may map zero pages lazily; this touches them
        growth = proc.memory_info().rss - baseline
        if growth >= limit:
            _mark(crossed=time.monotonic(), growth_mb=growth / 2**20)
            limit = float("inf")  # once
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return "grew %d MB and nobody stopped it" % (len(_hoard))


@app.get("/pid")
def pid() -> str:
    return str(os.getpid())


if os.environ.get("BENCH_WARM_UP") == "1":
    @edgesync.warm_up
    def _warm_up() -> None:
        """What each worker's first request would do: Flask's request path, werkzeug's URL binding (the idna codec)."""
        client = app.test_client()
        for path in ("/hello", "/pid"):
            client.get(path)
