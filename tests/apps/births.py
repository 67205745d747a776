"""A WSGI app for the tests of births (how workers are born, and how they may end).

Routes: ``/pid`` answers the worker's pid. ``/exit_later?code=N&delay=S`` answers at
once and schedules a ``wait_until`` task that, ``S`` seconds later, ends the worker
with ``os._exit(N)`` (what a library's background thread may do: no Python exit, no
gunicorn code in between).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Iterable

import edgesync

from ._util import query, record, text


def _exit_later(code: int, delay: float) -> None:
    time.sleep(delay)
    record(type="exiting", code=code)
    os._exit(code)


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/exit_later":
        q = query(environ)
        edgesync.wait_until(_exit_later, int(q["code"]), float(q.get("delay", "0.2")))
        return text(start_response, str(os.getpid()))
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    return text(start_response, "not found", "404 Not Found")
