"""A gunicorn config file that runs cProfile on every thread of each worker.

Used by ``python bench/profile.py --cprofile``: ``gunicorn -c bench/profile_hook.py``
with ``BENCH_PROFILE_DIR`` set. ``post_fork`` (in the worker, before its threads
exist) starts a profiler on the main thread and, through ``threading.setprofile``,
on every thread started later (request threads, monitor, pool). ``worker_exit``
writes one pstats file per thread to ``$BENCH_PROFILE_DIR/<pid>-<thread>.pstats``.
"""

from __future__ import annotations

import cProfile
import os
import sys
import threading
from typing import Any, Dict

_profiles: Dict[str, cProfile.Profile] = {}
_lock = threading.Lock()


def _start_here(name: str) -> None:
    prof = cProfile.Profile()
    with _lock:
        _profiles[name] = prof
    prof.enable()


def _on_first_event(frame: Any, event: str, arg: Any) -> None:
    # Called once in each new thread (threading.setprofile): swap in a profiler.
    sys.setprofile(None)
    t = threading.current_thread()
    _start_here("%s-%d" % (t.name, t.ident or 0))


def post_fork(server: Any, worker: Any) -> None:
    threading.setprofile(_on_first_event)
    _start_here("MainThread")


def worker_exit(server: Any, worker: Any) -> None:
    out = os.environ.get("BENCH_PROFILE_DIR")
    if not out:
        return
    with _lock:
        profiles = dict(_profiles)
    for name, prof in profiles.items():
        try:
            prof.create_stats()
            prof.dump_stats(os.path.join(out, "%d-%s.pstats" % (os.getpid(), name)))
        except Exception as exc:  # a thread's profiler caught mid-event; the others still count
            print("profile_hook: %s: %r" % (name, exc), file=sys.stderr)
