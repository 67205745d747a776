"""What a task keeps of its caller's ``contextvars`` context, and what it must not.

A task runs in a copy of the caller's context (taken at ``wait_until``), so
logging and tracing variables reach it. A web framework's own request state must
not: by the time the task runs the request is finished (Flask has closed its
body, files and stream), and ``g`` belongs to a request that may be reused.

Rule: this module is the one place that decides, for every task of every app,
with or without ``edgesync.flask.EdgeSync``. It never imports a framework: a
framework the app has not imported cannot have put anything in the context.

- Flask (>= 2.3) keeps its app and request contexts in two ``ContextVar`` objects
  of ``flask.globals``. A task scheduled while they are set gets a context without
  them, and runs inside ``with app.app_context():`` of the caller's app: a fresh
  ``g``, ``current_app`` and ``app.config``, and the app's ``teardown_appcontext``
  functions when it ends. ``flask.request`` raises Flask's "Working outside of
  request context".
- Django keeps the request out of ``contextvars`` (it is an argument of the view),
  its database connections in thread-locals, and its other per-request state
  (active language, urlconf override) in ``asgiref.local.Local``, whose storage
  asgiref (3.13, tested) tags with its thread, so none of it reaches a task
  running on another thread. Nothing to strip.

A durable task may run again far from its caller: re-run from the journal by another
worker or after a restart, or handed to an RQ worker on another machine. Every run
gets the same setup as the first (``run_in_app``): the app it runs in is the one the
task recorded (the import path of the WSGI app, gunicorn's ``app_uri``, which an RQ
worker imports once) or, without one, the app this process serves (``set_process_app``,
set by the gunicorn worker when it loads the app). A Flask app (the object itself, or
one a middleware wraps as ``.app``, ``.application`` or ``.__wrapped__``) gives the run
an app context of its own unless one is active already (the first run's, above);
Django's connection hygiene comes with the task hooks (``edgesync.django.install``),
which every run goes through.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from ._pool import NOT_AWAITABLE, run_awaitable

# flask/globals.py (2.3 - 3.1): the app context, then the request context.
_FLASK_GLOBALS = "flask.globals"
_FLASK_VARS = ("_cv_app", "_cv_request")
_found: Tuple[Any, Tuple[contextvars.ContextVar[Any], ...]] = (None, ())


def _flask_vars(flask_globals: Any) -> Tuple[contextvars.ContextVar[Any], ...]:
    """Flask's variables, the app context's first; () for a Flask without them (nothing to strip)."""
    global _found
    if _found[0] is not flask_globals:
        found = [getattr(flask_globals, name, None) for name in _FLASK_VARS]
        # Without a request variable (a Flask that keeps the request in its app
        # context) stripping the app context alone is still right.
        usable = isinstance(found[0], contextvars.ContextVar)
        _found = (flask_globals, tuple(v for v in found if isinstance(v, contextvars.ContextVar))
                  if usable else ())
    return _found[1]


def isolate(fn: Callable[..., Any], context: contextvars.Context
            ) -> Tuple[Callable[..., Any], contextvars.Context]:
    """``(fn, context)`` for a task, without its caller's framework request state.

    Called by ``wait_until`` in the caller's thread, where it only looks: one dict
    lookup unless Flask is imported, two ``in`` tests unless a Flask context is
    active. The work (a context without Flask's variables, an app context) is done
    by the returned callable, on the task's thread, off the request's path.
    """
    flask_globals = sys.modules.get(_FLASK_GLOBALS)
    if flask_globals is None:
        return fn, context
    found = _found  # (the cache _flask_vars keeps, read here without a call)
    flask_vars = found[1] if found[0] is flask_globals else _flask_vars(flask_globals)
    for var in flask_vars:
        if var in context:
            return _Isolated(fn, flask_vars), context
    return fn, context


class _Isolated:
    """Runs ``fn`` in a copy of the current context without Flask's variables, in a fresh app context."""

    __slots__ = ("fn", "flask_vars")

    def __init__(self, fn: Callable[..., Any], flask_vars: Tuple[contextvars.ContextVar[Any], ...]):
        self.fn = fn
        self.flask_vars = flask_vars

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A Context cannot forget a variable: build a fresh one holding everything
        # the caller had except Flask's own variables.
        fresh = contextvars.Context()
        app_ctx = None
        for var, value in contextvars.copy_context().items():
            if var not in self.flask_vars:
                fresh.run(var.set, value)
            elif var is self.flask_vars[0]:
                app_ctx = value
        app = getattr(app_ctx, "app", None)
        return fresh.run(self._run, app, args, kwargs)

    def _run(self, app: Any, args: Any, kwargs: Any) -> Any:
        if app is None:
            return self.fn(*args, **kwargs)
        with app.app_context():
            result = self.fn(*args, **kwargs)
            if result is not None and type(result) not in NOT_AWAITABLE and inspect.isawaitable(result):
                # An ``async def`` task: run its body here, inside the app context,
                # not after the context has been popped.
                result = run_awaitable(result)
            return result


# -- the app a run belongs to --------------------------------------------------------

_process_app: Tuple[Optional[str], Any] = (None, None)
_loaded: Dict[str, Any] = {}
_loaded_lock = threading.Lock()
_flask_of: Dict[int, Tuple[Any, Any]] = {}  # id(wsgi app) -> (wsgi app, its Flask app or None)


def set_process_app(path: Optional[str], app: Any) -> None:
    """The WSGI app this process serves, and its import path (gunicorn's ``app_uri``) if known."""
    global _process_app
    _process_app = (path, app)


def process_app_path() -> Optional[str]:
    """The import path a durable task records, so that a run elsewhere finds its app."""
    return _process_app[0]


def load_app(path: Optional[str]) -> Any:
    """The app at ``path`` (``module:name`` or ``module:factory()``, as gunicorn takes it), imported
    once per process; this process's own app for its own path or for None."""
    if path is None or path == _process_app[0]:
        return _process_app[1]
    app = _loaded.get(path)
    if app is None:
        with _loaded_lock:
            app = _loaded.get(path)
            if app is None:
                from ._gunicorn import import_app  # the syntax gunicorn's app_uri has
                app = _loaded[path] = import_app(path)
    return app


def _find_flask(app: Any) -> Any:
    if app is None or "flask" not in sys.modules:
        return None
    seen = _flask_of.get(id(app))
    if seen is not None and seen[0] is app:
        return seen[1]
    flask_cls = sys.modules["flask"].Flask
    found, obj = None, app
    for _ in range(5):  # the app, then what middlewares wrap (ProxyFix.app, WhiteNoise.application)
        if isinstance(obj, flask_cls):
            found = obj
            break
        obj = next((getattr(obj, a) for a in ("app", "application", "__wrapped__") if hasattr(obj, a)), None)
        if obj is None:
            break
    _flask_of[id(app)] = (app, found)
    return found


def run_in_app(app: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` inside ``app``'s framework setup: a Flask app context of its own,
    unless one is active already; an ``async def`` result runs to completion inside it."""
    flask_app = _find_flask(app)
    if flask_app is None or _flask_app_active():
        return _finish(fn(*args, **kwargs))
    with flask_app.app_context():
        return _finish(fn(*args, **kwargs))


def _flask_app_active() -> bool:
    flask_vars = _flask_vars(sys.modules[_FLASK_GLOBALS])
    return bool(flask_vars) and flask_vars[0].get(None) is not None


def _finish(result: Any) -> Any:
    if result is None:  # most tasks return nothing: no need to look further
        return None
    return run_awaitable(result) if inspect.isawaitable(result) else result
