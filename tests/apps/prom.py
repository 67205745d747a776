"""A plain WSGI app with its own prometheus_client metrics, in multiprocess mode.

``PROMETHEUS_MULTIPROC_DIR`` is set by the test before gunicorn starts: edgesync.Worker
turns edgesync.prometheus on in the master, so the app's metrics below (made at import,
in the master with ``--preload``, else in each worker) use its process identifier.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable

from prometheus_client import Counter, Gauge, Histogram

import edgesync
import edgesync.prometheus

from ._util import text as _text

hits = Counter("app_hits", "Requests to /hit")
latency = Histogram("app_latency_seconds", "A made-up latency", buckets=(0.01, 0.1, 1.0))
# The default multiprocess_mode ("all"): one series per process, dead ones dropped at compaction.
last_pid = Gauge("app_last_pid", "The pid of the process that served /hit last")
metrics = edgesync.prometheus.make_wsgi_app()


def noop() -> None:
    pass


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/hit":
        hits.inc()
        latency.observe(0.05)
        last_pid.set(os.getpid())
        edgesync.wait_until(noop)
        return _text(start_response, "hit")
    if path == "/metrics":
        return metrics(environ, start_response)
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    return _text(start_response, "not found", "404 Not Found")
