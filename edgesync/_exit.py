"""How a worker process ends once gunicorn is done with it: Python's exit, minus the teardown.

design: when a worker is done, gunicorn's child code (arbiter.py ``spawn_worker``) logs
"Worker exiting", calls the ``worker_exit`` hook and raises ``SystemExit``, which unwinds
through the arbiter's code to Python's exit. Python then (1) joins the non-daemon
threads, (2) runs the ``atexit`` callbacks (``logging.shutdown`` among them: every log
handler flushed and closed), (3) flushes ``sys.stdout`` and ``sys.stderr``, and (4) tears
down every module, deallocating what is left. In a forked worker (4) is the costly
part: almost every object it frees or decrefs lives on a page the worker shares with
the master, and writing the page copies it (copy-on-write). bench/forkcost.py measures
16-20 ms of CPU per exit even with ``gc.freeze()``, 1.3 ms through ``leave``; at
``wall_clock_limit_ms=4000`` that was ~5% of a CPU-bound recycling server's throughput
(bench/run.py, scenario 6).

``leave`` does (1) to (3) as Python does, closes the file objects the app left open
for writing (what (4) would have done for them: their buffers are flushed), and ends
the process with ``os._exit``. What it skips, Python does not promise either: "It is
not guaranteed that ``__del__()`` methods are called for objects that still exist when
the interpreter exits" (the language reference, ``object.__del__``). Measured here, (4)
did not even flush an unclosed file reliably: a daemon thread that still reaches the
app at exit keeps its module alive past the teardown (about 1 exit in 20).

The arbiter's ``spawn_worker``, wrapped in the master (``_gunicorn.arbiter``), calls
``leave`` where the child leaves gunicorn's call through ``SystemExit``, after
gunicorn's end of the worker; a worker forked by a mold calls it at the end of
gunicorn's child half (``_gunicorn.child.run_worker``).
"""

from __future__ import annotations

import _io
import atexit
import fcntl
import gc
import os
import stat
import sys
import threading
from typing import NoReturn

#: Where the process's open descriptors are listed (Linux; /dev/fd on macOS and the BSDs).
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


def leave(code: object) -> NoReturn:
    """End this worker with the exit status of ``SystemExit(code)`` (see the module docstring)."""
    # Python's own order (Py_FinalizeEx): threads, then atexit, then the standard streams.
    threading._shutdown()  # type: ignore[attr-defined]  # also runs threading's own exit callbacks
    atexit._run_exitfuncs()
    status = _status(code)
    if _writable_file_open():
        _close_open_files()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: Python's exit ignores it too
            pass
    os._exit(status)


def _status(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``: None is 0; any other non-int is printed, then 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 1


def _writable_file_open() -> bool:
    """Whether a regular file is open for writing (the standard streams' fds 0-2 aside).

    A Python file object's buffer can only reach a file that is still open: when none
    is, there is nothing to flush and no need to walk every object to find one.
    """
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
                return True
        return False
    return True  # no listing: assume one


def _close_open_files() -> None:
    """Close every file object still open for writing, outermost first.

    Outermost: no other file object refers to it (a text layer before the buffer under
    it, a ``GzipFile`` before its file), so each one's close still has somewhere to
    write. The worker unfroze when its life ended (``Worker.init_process``): the
    objects its boot made are listed too. The standard streams stay open (``leave``
    flushes them).
    """
    keep = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    # _io._IOBase, the C base of every io class, not the io.IOBase ABC: the same
    # objects, but a plain type check (measured ~3 ms instead of ~10-15 ms over the
    # ~35,000 objects of a Flask worker).
    files = {id(o): o for o in gc.get_objects() if isinstance(o, _io._IOBase) and id(o) not in keep}
    inner = set()
    for f in files.values():
        for ref in gc.get_referents(f):
            # A file object written in Python holds the one under it in its __dict__.
            for r in gc.get_referents(ref) if isinstance(ref, dict) else (ref,):
                if id(r) in files and r is not f:
                    inner.add(id(r))
    outer_first = sorted(files.values(), key=lambda f: id(f) in inner)
    for f in outer_first:
        try:
            if not f.closed and f.writable():
                f.close()
        except Exception:  # as in a finalizer: one file's failure does not stop the others
            pass
