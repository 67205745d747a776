"""A WSGI app for the tests of births (how workers are born, and how they may end).

At import: if ``$CODE_FILE`` is set, the file's text is the code's version (``/version``
answers it), and ``raise`` makes the import fail (a broken deploy). If
``$IMPORT_THREAD`` is set, the import starts a thread of that name (as some clients
and metrics exporters do). If ``$WAIT_UNTIL_AT_IMPORT`` is set, the import calls
``edgesync.wait_until``. If ``$IMPORT_OS_THREAD`` is set, it starts an OS thread that
``threading`` does not list (as a C library's own pool: OpenBLAS's).

The app uses both birth hooks. At import it opens a "connection" (a socketpair, as
a database client would open one) that each worker must own: its after-fork
function (``edgesync.after_fork``) reopens it in the worker. Its warm-up function
(``edgesync.warm_up``) passes one ``/pid`` request through the app without a socket
and notes which process did (``$WARM_UP_FAIL_FILE`` exists: it raises). ``/hooks``
answers JSON: this worker's pid, the pid its connection was opened in, the process
that warmed the app up, how often, and what its request answered.

Routes: ``/pid`` answers the worker's pid. ``/lazy_import`` imports ``colorsys`` (a
standard-library module nothing else imports) and answers whether this worker had it
already (``had <pid>`` or ``imported <pid>``). ``/exit_later?code=N&delay=S`` answers at
once and schedules a ``wait_until`` task that, ``S`` seconds later, ends the worker
with ``os._exit(N)`` (what a library's background thread may do: no Python exit, no
gunicorn code in between).
"""

from __future__ import annotations

import _thread
import ctypes
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List

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
if os.environ.get("IMPORT_OS_THREAD"):
    _thread.start_new_thread(time.sleep, (3600,))


class _Connection:
    """What a database client opens at import: one end of a socketpair, and the pid that opened it."""

    def __init__(self) -> None:
        self.sock, self._peer = socket.socketpair()
        self.opened_in = os.getpid()

    def close(self) -> None:
        self.sock.close()
        self._peer.close()


CONNECTION = _Connection()
WARMED: Dict[str, Any] = {"by": None, "times": 0, "answer": ""}


@edgesync.after_fork
def _reconnect() -> None:
    global CONNECTION
    CONNECTION.close()
    CONNECTION = _Connection()


@edgesync.warm_up
def _warm() -> None:
    fail = os.environ.get("WARM_UP_FAIL_FILE")
    if fail and os.path.exists(fail):
        raise RuntimeError("the warm-up fails on purpose (%s exists)" % fail)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/pid", "QUERY_STRING": "", "wsgi.input": None}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
    WARMED.update(by=os.getpid(), times=WARMED["times"] + 1, answer=body.decode())


def _exit_later(code: int, delay: float) -> None:
    time.sleep(delay)
    record(type="exiting", code=code)
    os._exit(code)


SEEN: List[str] = []  # every path this module's app was called with, in this process and its forker
#: An object of the app's own, made at import: immortal in a mold's workers on CPython 3.12+ (/immortal).
MADE_AT_IMPORT = {"made": "at import"}


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    SEEN.append(path)
    if path == "/seen":
        return text(start_response, json.dumps({"pid": os.getpid(), "seen": SEEN}))
    if path == "/hooks":
        return text(start_response, json.dumps({
            "pid": os.getpid(), "connection_opened_in": CONNECTION.opened_in, "warmed_by": WARMED["by"],
            "warm_ups": WARMED["times"], "warm_up_answer": WARMED["answer"]}))
    if path == "/exit_later":
        q = query(environ)
        edgesync.wait_until(_exit_later, int(q["code"]), float(q.get("delay", "0.2")))
        return text(start_response, str(os.getpid()))
    if path == "/version":
        return text(start_response, "%s %d" % (VERSION, os.getpid()))
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    if path == "/immortal":  # is an object the app made at import immortal here (edgesync._heap)?
        count = ctypes.c_int32.from_address(id(MADE_AT_IMPORT)).value
        return text(start_response, json.dumps({"pid": os.getpid(), "immortal": count < 0}))
    if path == "/server_metrics":
        return text(start_response, json.dumps(edgesync.server_metrics()))
    if path == "/lazy_import":
        # A standard-library module nothing imports at start, imported by the request
        # (as werkzeug imports the idna codec on its first request): was it there already?
        had = "colorsys" in sys.modules
        import colorsys  # noqa: F401
        return text(start_response, "%s %d" % ("had" if had else "imported", os.getpid()))
    return text(start_response, "not found", "404 Not Found")
