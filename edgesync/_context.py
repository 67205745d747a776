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
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from typing import Any, Callable, Tuple

from ._pool import run_awaitable

# flask/globals.py (2.3 - 3.1): the app context, then the request context.
_FLASK_GLOBALS = "flask.globals"
_FLASK_VARS = ("_cv_app", "_cv_request")
_found: Tuple[Any, Tuple[contextvars.ContextVar[Any], ...]] = (None, ())


def _flask_vars(flask_globals: Any) -> Tuple[contextvars.ContextVar[Any], ...]:
    global _found
    if _found[0] is not flask_globals:
        _found = (flask_globals, tuple(v for v in (getattr(flask_globals, n, None) for n in _FLASK_VARS)
                                       if isinstance(v, contextvars.ContextVar)))
    return _found[1]


def isolate(fn: Callable[..., Any], context: contextvars.Context
            ) -> Tuple[Callable[..., Any], contextvars.Context]:
    """``(fn, context)`` for a task, without its caller's framework request state.

    Called by ``wait_until`` in the caller's thread; costs one dict lookup unless
    Flask is imported, and two more unless a Flask context is active.
    """
    flask_globals = sys.modules.get(_FLASK_GLOBALS)
    if flask_globals is None:
        return fn, context
    flask_vars = _flask_vars(flask_globals)
    if not any(var in context for var in flask_vars):
        return fn, context
    cv_app = getattr(flask_globals, "_cv_app", None)
    app_ctx = context.get(cv_app) if isinstance(cv_app, contextvars.ContextVar) else None
    # A Context cannot forget a variable: build a fresh one holding everything the
    # caller had except Flask's own variables.
    fresh = contextvars.Context()
    for var, value in context.items():
        if var not in flask_vars:
            fresh.run(var.set, value)
    app = getattr(app_ctx, "app", None)
    return (fn if app is None else _in_app_context(app, fn)), fresh


def _in_app_context(app: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run_in_app_context(*args: Any, **kwargs: Any) -> Any:
        with app.app_context():
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                # An ``async def`` task: run its body here, inside the app context,
                # not after the context has been popped.
                result = run_awaitable(result)
            return result

    return run_in_app_context
