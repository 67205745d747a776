"""A WSGI app for the tests of births (how workers are born, and how they may end).

At import: if ``$CODE_FILE`` is set, the file's text is the code's version (``/version``
answers it), and ``raise`` makes the import fail (a broken deploy). If
``$IMPORT_THREAD`` is set, the import starts a thread of that name (as some clients
and metrics exporters do). If ``$WAIT_UNTIL_AT_IMPORT`` is set, the import calls
``edgesync.wait_until``.

Routes: ``/pid`` answers the worker's pid. ``/exit_later?code=N&delay=S`` answers at
once and schedules a ``wait_until`` task that, ``S`` seconds later, ends the worker
with ``os._exit(N)`` (what a library's background thread may do: no Python exit, no
gunicorn code in between).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, Iterable

import edgesync

from ._util import query, record, text

VERSION = ""
if os.environ.get("CODE_FILE"):
    VERSION = open(os.environ["CODE_FILE"]).read().strip()
    if VERSION == "raise":
        raise RuntimeError("a broken deploy: this module cannot be imported")
if os.environ.get("WAIT_UNTIL_AT_IMPORT"):
    edgesync.wait_until(time.sleep, 0)
if os.environ.get("IMPORT_THREAD"):
    threading.Thread(target=time.sleep, args=(3600,), name=os.environ["IMPORT_THREAD"], daemon=True).start()


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
    if path == "/version":
        return text(start_response, "%s %d" % (VERSION, os.getpid()))
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    return text(start_response, "not found", "404 Not Found")
