"""A WSGI app for the tests of how a worker process ends (edgesync._exit).

At import: an ``atexit`` callback that records ``atexit``. If ``$UNFLUSHED_FILE`` is
set, that file is opened for appending, buffered, and so is ``$UNFLUSHED_FILE.gz``
through ``gzip.open`` (a text layer over a ``GzipFile`` over a buffered file: its
trailer is written only when it is closed); the app never flushes nor closes either.

Routes: ``/keep`` keeps an object, in a module global, whose ``__del__`` records
``finalized``: only Python's teardown of the modules runs it. ``/thread?s=`` starts a
non-daemon thread that sleeps ``s`` seconds, then records ``thread_done``.
``/unflushed`` writes a line into both (into their buffers: the line stays there). ``/pid``.
"""

from __future__ import annotations

import atexit
import gzip
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO

from ._util import query, record, text


class _RecordsItsFinalization:
    def __init__(self) -> None:
        # Bound now: the teardown may have wiped the os module when __del__ runs.
        self.path = os.environ.get("EVENTS_FILE")
        self.open, self.write, self.close, self.getpid = os.open, os.write, os.close, os.getpid
        self.flags = os.O_WRONLY | os.O_APPEND

    def __del__(self) -> None:
        if self.path:
            fd = self.open(self.path, self.flags)
            self.write(fd, b'{"type": "finalized", "pid": %d}\n' % self.getpid())
            self.close(fd)


_kept: Optional[_RecordsItsFinalization] = None
atexit.register(lambda: record(type="atexit"))
_unflushed: List[TextIO] = []
if os.environ.get("UNFLUSHED_FILE"):
    _unflushed = [open(os.environ["UNFLUSHED_FILE"], "a", buffering=8192),
                  gzip.open(os.environ["UNFLUSHED_FILE"] + ".gz", "wt")]


def _sleep_then_record(seconds: float) -> None:
    time.sleep(seconds)
    record(type="thread_done")


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _kept
    path = environ["PATH_INFO"]
    if path == "/keep":
        _kept = _RecordsItsFinalization()
        return text(start_response, "kept")
    if path == "/thread":
        threading.Thread(target=_sleep_then_record, args=(float(query(environ)["s"]),),
                         daemon=False).start()
        return text(start_response, "started")
    if path == "/unflushed" and _unflushed:
        for f in _unflushed:
            f.write("written by %d, never flushed by the app\n" % os.getpid())
        return text(start_response, "buffered")
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    return text(start_response, "not found", "404 Not Found")
