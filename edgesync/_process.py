"""Which process a ``wait_until`` with no runtime installed runs in, and what that means.

``edgesync.Worker`` installs its runtime in ``init_process``, before it loads the
app, so inside it ``wait_until`` never gets here. Everywhere else the first
``wait_until`` asks ``first_runtime()``:

- In the gunicorn master, before any fork (the app imported there by
  ``--preload`` / ``preload_app = True``): refused with ``RuntimeError``. The
  master is not an instance: it serves no request, the threads a runtime would
  start there do not survive ``fork`` (and a fork taken while one holds a lock
  can deadlock the worker), and a master that drained tasks and fired
  ``beforeunload`` at its exit would run the app's listeners in a process that
  has nothing to save.
- In a worker of another gunicorn worker class (``-k gthread``, ``sync``...):
  the default in-process runtime runs the task, and one warning says what does
  not apply there (limits, drain within ``graceful_timeout``, replacement).
- In edgesync's mold (``mold = true``), which imports the app to fork the workers:
  refused with ``RuntimeError``, for the master's reasons; the workers then import
  the app themselves (``_mold``).
- Anywhere else (``flask run``, a script, a test): the default runtime, silently.

Which gunicorn process this is comes from ``edgesync._gunicorn.roles`` (without
importing gunicorn), read once, on the first ``wait_until``.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Optional, Tuple

from . import _runtime
from ._config import load_settings
from ._gunicorn import roles
from ._runtime import Runtime

log = logging.getLogger("edgesync")

_warned = False

MASTER_REFUSAL = (
    "edgesync.wait_until() was called in the gunicorn master, not in a worker (an app imported in the "
    "master with --preload / preload_app = True, or a master-side server hook). The master is not an instance: it "
    "serves no request and its threads do not survive fork, so it runs no background work. Schedule the "
    "work from a request, or at worker start (gunicorn's post_worker_init hook), or run it inline at "
    "import; or drop --preload.")


MOLD_REFUSAL = (
    "edgesync.wait_until() was called while edgesync's mold imported the app (mold = true, the default). The "
    "mold is not an instance: it forks the workers, serves no request and must run no thread, so it runs no "
    "background work. Schedule the work from a request or at worker start (a function decorated with "
    "@edgesync.after_fork); until then the workers import the app themselves.")


class MoldRefusal(RuntimeError):
    """``wait_until`` in edgesync's mold (``MOLD_REFUSAL``): the mold gives up, and each worker imports the app."""


#: In the mold: where (``file:line``, outside edgesync) the app first called wait_until, caught or not.
_mold_refused: Optional[str] = None


def mold_refusal() -> Optional[str]:
    """In the mold: where its import called ``wait_until`` (refused), or None."""
    return _mold_refused


def _app_caller() -> str:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
    frames = [f for f in traceback.extract_stack() if not os.path.abspath(f.filename).startswith(here)]
    return "%s:%s" % (frames[-1].filename, frames[-1].lineno) if frames else "?"

_in_mold = False


def set_mold(flag: bool) -> None:
    """Say that this process is (True) or is no longer (False, a worker it forked) edgesync's mold."""
    global _in_mold
    _in_mold = flag


def gunicorn_role() -> Tuple[Optional[str], Any]:
    """``("master", arbiter)``, ``("mold", None)``, ``("worker", worker)`` or ``(None, None)`` for this process."""
    if _in_mold:
        return "mold", None
    return roles.gunicorn_role()


def first_runtime() -> Runtime:
    """The runtime for a ``wait_until`` made while none is installed (see the module docstring)."""
    global _warned
    role, owner = gunicorn_role()
    if role == "master":
        raise RuntimeError(MASTER_REFUSAL)
    if role == "mold":
        global _mold_refused
        if _mold_refused is None:  # the app may catch the refusal: the mold gives up all the same
            _mold_refused = _app_caller()
        raise MoldRefusal(MOLD_REFUSAL)
    if role == "worker" and not _warned:
        from ._gunicorn.worker import Worker

        if not isinstance(owner, Worker):
            _warned = True
            cls = type(owner)
            log.warning(
                "edgesync: wait_until() in a gunicorn worker of class %s.%s, not edgesync.Worker: tasks run on "
                "a plain in-process pool with no CPU, memory or wall-clock limits, no drain within "
                "graceful_timeout (gunicorn may kill the worker while tasks run, with no log line) and no "
                "replacement before the worker exits. Serve with: gunicorn -k edgesync.Worker",
                cls.__module__, cls.__qualname__)
    return _runtime.current()


def metrics_runtime() -> Runtime:
    """The runtime ``runtime_metrics()`` reads when none is installed.

    In the gunicorn master a throwaway one (never installed: it starts no thread,
    registers no exit drain, so the master never fires ``beforeunload``, and a later
    ``wait_until`` there is still refused); elsewhere the default runtime.
    """
    if gunicorn_role()[0] in ("master", "mold"):
        return Runtime(load_settings())
    return _runtime.current()
