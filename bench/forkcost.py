"""What one recycled worker costs in CPU: with and without ``gc.freeze()``, and with edgesync's exit.

    python bench/forkcost.py [--children 15] [--requests 1000]

The parent imports the bench Flask app (as gunicorn's master does with
``--preload``; like the master, it never calls it), then forks children one
after the other. Each child calls the app ``--requests`` times through WSGI (no
sockets: only the process's own costs are counted), notes its CPU time after the
first call and after the last, and
exits the way a gunicorn worker does (``sys.exit``: Python's finalization). The
parent reads the child's whole CPU time from ``wait4``. So, per child:

- first call: CPU of the first request (lazy imports, cold caches);
- calls: CPU of all the requests;
- exit: whole CPU minus CPU at the exit point (finalization and teardown).

``frozen`` children are forked after ``gc.freeze()`` (edgesync's master does so
before each fork; its worker freezes again once the app is loaded). ``leave``
children are frozen too and end as an edgesync worker does
(``edgesync._exit.leave``: atexit, then ``os._exit``, no teardown). Medians of
``--children`` children each.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.apps.flask_app import app  # noqa: E402  (after the path is set)
from edgesync import _exit  # noqa: E402

ENVIRON = {
    "REQUEST_METHOD": "GET", "PATH_INFO": "/hello", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": None,
    "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    "wsgi.version": (1, 0),
}


def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
    return lambda data: None


def call() -> None:
    body = app(dict(ENVIRON), start_response)
    b"".join(body)


def child(requests: int, out: int, leave: bool) -> None:
    t0 = time.process_time()
    call()
    first = time.process_time()
    for _ in range(requests - 1):
        call()
    end = time.process_time()
    os.write(out, b"%r %r %r" % (t0, first - t0, end - t0))
    os.close(out)
    if leave:
        _exit.leave(0)
    # As gunicorn's spawn_worker ends a worker: SystemExit, then Python's whole
    # finalization (nothing on the way up has a finally clause or a context manager).
    sys.exit(0)


def measure(requests: int, children: int, frozen: bool, leave: bool) -> Dict[str, float]:
    rows: List[List[float]] = []
    for _ in range(children):
        if frozen:
            gc.freeze()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(requests, w, leave)
        os.close(w)
        if frozen:
            gc.unfreeze()
        _, status, usage = os.wait4(pid, 0)
        with os.fdopen(r, "rb") as pipe:
            report = pipe.read()
        if status != 0:
            raise SystemExit("a child failed (status %d)" % status)
        start, first, served = (float(x) for x in report.split())
        whole = usage.ru_utime + usage.ru_stime
        rows.append([start, first, served, whole - start - served])
    cols = list(zip(*rows, strict=True))
    return {"fork and start": statistics.median(cols[0]) * 1e3, "first call": statistics.median(cols[1]) * 1e3,
            "calls": statistics.median(cols[2]) * 1e3, "exit": statistics.median(cols[3]) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--children", type=int, default=15)
    p.add_argument("--requests", type=int, default=1000)
    a = p.parse_args()
    variants = (("plain", False, False), ("frozen", True, False), ("frozen, leave", True, True))
    results = {name: measure(a.requests, a.children, frozen, leave) for name, frozen, leave in variants}
    print("CPU ms per child, median of %d, %d requests each (bench/forkcost.py)" % (a.children, a.requests))
    print("%-16s" % "" + "".join("%15s" % name for name, _, _ in variants))
    for key in results["plain"]:
        print("%-16s" % key + "".join("%15.1f" % results[name][key] for name, _, _ in variants))


if __name__ == "__main__":
    main()
