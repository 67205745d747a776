"""Which gunicorn process this is, told without importing gunicorn (``import edgesync`` must not).

design: the master that edgesync's worker class patched is known directly: ``arbiter.install``
records it here. Two cases leave no such record, and only the main thread's stack tells
them: an app imported by the master before ``check_config`` (``--preload``: ``Arbiter.setup``
runs before ``Arbiter.start``), and a worker of another worker class (``-k gthread``), where
edgesync patched nothing. There the stack holds the ``Arbiter`` (its ``spawn_worker`` frame
for the whole life of a worker, with the worker in its locals; ``setup`` or ``reload`` while
the master preloads the app). The stack is read once, on the first ``wait_until``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional, Tuple

_patched: Any = None  # the arbiter edgesync's worker class patched
_patched_in = 0  # in this process (its master's pid)


def record_master(arbiter: Any) -> None:
    """In the master, from ``arbiter.install``: the arbiter it patched."""
    global _patched, _patched_in
    _patched, _patched_in = arbiter, os.getpid()


def gunicorn_role() -> Tuple[Optional[str], Any]:
    """``("master", arbiter)``, ``("worker", worker)`` or ``(None, None)`` for this process."""
    if _patched is not None and _patched_in == os.getpid():
        return "master", _patched
    arbiter_module = sys.modules.get("gunicorn.arbiter")
    if arbiter_module is None:
        return None, None
    arbiter_class = getattr(arbiter_module, "Arbiter", None)
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if frame.f_globals.get("__name__") == "gunicorn.arbiter":
            local = frame.f_locals
            arbiter = local.get("self")
            if arbiter_class is not None and isinstance(arbiter, arbiter_class):
                worker = local.get("worker")
                # Arbiter.pid is set by start(); a preload runs in setup(), before it.
                if getattr(arbiter, "pid", None) in (None, os.getpid()):
                    return "master", arbiter
                return ("worker", worker) if worker is not None else (None, None)
        frame = frame.f_back
    return None, None


def checking_config() -> bool:
    """Whether this process is ``gunicorn --check-config`` loading the app (the caller's stack says).

    That run imports the app and exits: it never resolves the worker class, so
    ``Worker.check_config`` never runs there (gunicorn/app/base.py, ``run``).
    """
    if "gunicorn.app.base" not in sys.modules:
        return False
    frame = sys._getframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "gunicorn.app.base" and frame.f_code.co_name == "run":
            cfg = getattr(frame.f_locals.get("self"), "cfg", None)
            return bool(getattr(cfg, "check_config", False))
        frame = frame.f_back  # type: ignore[assignment]
    return False
