"""The app's two hooks around a worker's birth: warm the process workers are forked from, fix up each worker.

design: a worker is forked from the process that imported the app (edgesync's mold, or
the gunicorn master with ``--preload``) and shares what that import made. Two things
only the app knows: what makes its first requests slow (lazy imports, compiled
templates, a URL map built on first use), which is worth doing once before the forks
instead of in every worker; and what must not be shared (a database connection opened
at import), which each worker must reopen. ``warm_up(fn)`` and ``after_fork(fn)``
register a function for each, at import, and edgesync calls them at the right moment
in whichever process that is.

Rule: warm-up functions run once, in the process that imported the app, right after
the import: in the mold before it freezes its heap and forks; in the master with
``--preload`` (no mold) before its first fork; in a worker that imported the app itself
before it serves. A process forked from one that ran them does not run them again.
After-fork functions run once in each ``edgesync.Worker``, after the app is loaded
and before gunicorn's ``post_worker_init``, whichever process forked it. Both run in
registration order on the main thread; an exception propagates, so it counts as the
app's import failing in that process (a refused generation in a mold, a boot error in
a worker). Outside a gunicorn server neither runs: nothing is forked there.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, TypeVar

F = TypeVar("F", bound=Callable[[], object])

_warm_ups: List[Callable[[], object]] = []
_after_forks: List[Callable[[], object]] = []
#: Whether this process ran the warm-up functions, or was forked from one that did.
_warmed = False
#: The worker that ran the after-fork functions (a pid: a fork of it is another process).
_forked_in: Optional[int] = None


def _checked(fn: object, name: str) -> None:
    if not callable(fn):
        raise TypeError("edgesync.%s() takes a function called with no argument, got %r; use it as a decorator "
                        "(@edgesync.%s) or pass the function" % (name, fn, name))


def warm_up(fn: F) -> F:
    """Register ``fn()`` to warm the app once, where it was imported, before workers are forked from there.

    Call it at import (it is a decorator; it returns ``fn``). ``fn`` runs once per code
    generation in edgesync's mold (or in the gunicorn master with ``--preload``, or in a
    worker that imported the app itself), after the import and before the heap is
    frozen and the workers are forked, so every worker starts with what it made: pass
    a few requests through the app without a socket (Flask's ``app.test_client()``,
    Django's ``Client``), fill caches, import what the first requests would import.
    It must start no thread and schedule no ``wait_until`` (a mold refuses both). If it
    raises, the import counts as failed there: a new generation is refused and the
    previous code serves on. Outside a gunicorn server it never runs.
    """
    _checked(fn, "warm_up")
    _warm_ups.append(fn)
    return fn


def after_fork(fn: F) -> F:
    """Register ``fn()`` to run in each worker after its birth, before it serves.

    Call it at import (it is a decorator; it returns ``fn``). ``fn`` runs once in every
    ``edgesync.Worker`` once the app is loaded, before gunicorn's ``post_worker_init``,
    whether the worker was forked by edgesync's mold, by a preloading master or imported
    the app itself: reopen there what the import opened and each worker must own (a
    database connection, a client's connection pool), start the worker's own threads.
    Registered in a worker that ran its after-fork functions already (a module imported
    lazily), it runs at once. If it raises, the worker fails to boot. Outside a gunicorn
    server it never runs.
    """
    _checked(fn, "after_fork")
    _after_forks.append(fn)
    if _forked_in == os.getpid():
        fn()
    return fn


def warm() -> None:
    """In the process that imported the app: run the warm-up functions, unless this process or its forker did."""
    global _warmed
    if _warmed:
        return
    _warmed = True
    for fn in list(_warm_ups):
        fn()


def forked() -> None:
    """In a worker whose app is loaded: run the after-fork functions."""
    global _forked_in
    _forked_in = os.getpid()
    for fn in list(_after_forks):
        fn()
