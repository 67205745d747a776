"""How a worker process ends once gunicorn is done with it: Python's exit, minus the teardown.

design: when a worker is done, gunicorn's child code (arbiter.py ``spawn_worker``) logs
"Worker exiting", calls the ``worker_exit`` hook and raises ``SystemExit``, which unwinds
into the arbiter's code; Python then finalizes the interpreter. It (1) joins the
non-daemon threads, (2) runs the ``atexit`` callbacks (``logging.shutdown`` among them,
which flushes and closes every log handler), (3) flushes ``sys.stdout`` and
``sys.stderr``, and (4) tears down every module, deallocating every object left. In a
forked worker (4) is the costly part: almost every object it frees or decrefs lives on
a page the worker still shares with the master, and writing the page copies it
(copy-on-write). bench/forkcost.py measures it: about 20 ms of CPU per exit, even with
``gc.freeze()``. At ``wall_clock_limit_ms=4000`` that is ~5% of a CPU-bound recycling
server's throughput (bench/run.py, scenario 6).

``leave`` does (1) to (3) as Python does, then ends the process with ``os._exit``. What
it skips Python does not promise either: "It is not guaranteed that ``__del__()``
methods are called for objects that still exist when the interpreter exits" (the
language reference, ``object.__del__``). One such finalizer does matter in practice: a
file object the app never closed flushes its buffer when it is deallocated. Its buffer
can only reach a file that is still open, so ``leave`` skips the teardown only when no
regular file is open for writing once (1) to (3) are done (the standard streams aside:
flushed in (3)); otherwise the worker exits the usual way, with the teardown.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import stat
import sys
import threading
from typing import Optional

#: Where the process's open descriptors are listed (Linux; /dev/fd on macOS and the BSDs).
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


def leave(code: object) -> None:
    """End this worker with ``SystemExit(code)``'s status; return only if teardown is needed.

    Call it in the worker, in place of letting the ``SystemExit`` unwind, once gunicorn's
    own end of the worker has run. Returns (and the caller re-raises) when a regular file
    is still open for writing, as described in the module docstring.
    """
    # (1) and (2) in Python's own order (Py_FinalizeEx): threads first, then atexit.
    threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads, runs their atexit
    atexit._run_exitfuncs()
    status = _status(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: Python's exit ignores it too
            pass
    if _open_for_writing() is None:
        os._exit(status)


def _status(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``: None is 0, other non-ints are printed, then 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 1


def _open_for_writing() -> Optional[str]:
    """The first regular file this process has open for writing (fds 0-2 aside), or a reason to assume one."""
    for fd_dir in _FD_DIRS:
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            fd = int(name)
            if fd <= 2:
                continue
            try:
                mode = os.fstat(fd).st_mode
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError:  # the listing's own descriptor, closed by now
                continue
            if stat.S_ISREG(mode) and flags & os.O_ACCMODE != os.O_RDONLY:
                return "fd %d" % fd
        return None
    return "no descriptor listing"
