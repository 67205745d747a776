"""Flask integration: background tasks run inside an application context of their app.

The usual extension pattern, with ``init_app`` for app factories::

    from flask import Flask, current_app, request
    import edgesync
    from edgesync.flask import EdgeSync

    app = Flask(__name__)
    EdgeSync(app)                    # or: sync = EdgeSync(); sync.init_app(app)

    def send_welcome(email: str) -> None:
        current_app.logger.info("welcoming %s", email)   # works: an app context of `app`

    @app.post("/signup")
    def signup():
        email = request.form["email"]               # read the request now...
        edgesync.wait_until(send_welcome, email)    # ...and pass the values on
        return "ok"

What a task scheduled while a request (or any app context) of an ``init_app`` app
is active gets:

- ``current_app``, ``app.config`` and ``current_app.logger`` of that app: the task
  runs inside ``with app.app_context():``, so ``teardown_appcontext`` functions run
  when it ends (Flask-SQLAlchemy returns its session to the pool there).
- A fresh, empty ``g``: what the request stored in ``g`` is not shared with a
  thread that outlives the request.
- No request: ``flask.request`` and ``flask.session`` raise Flask's own
  ``RuntimeError: Working outside of request context``. The request's body, files
  and stream are closed once the response is sent; a task handed the live request
  would read a stale or half-consumed object from another thread.
- Every other ``contextvars`` variable the caller had set (logging, tracing,
  per-request ids), as with plain ``edgesync.wait_until``.

What to capture before scheduling: plain values, not the request. Pass
``request.form["email"]``, ``request.get_json()``, ``request.headers.get("X-Request-Id")``,
``request.url``, ``session["user_id"]`` or a ``FileStorage``'s bytes
(``f.read()``) as arguments. Pass ids, not ORM objects bound to the request's
database session; load them again in the task. ``flask.copy_current_request_context``
is the wrong tool here: it hands the task a request that Flask has already closed.

Tasks scheduled outside any app context (at import, from a CLI command without
one) and tasks of apps that did not call ``init_app`` are left as they are.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Callable, Optional, Tuple

from flask import Flask
from flask.globals import _cv_app, _cv_request

from . import _runtime
from ._pool import run_awaitable

__all__ = ["EdgeSync"]

#: The key this extension uses in ``app.extensions``.
EXTENSION_KEY = "edgesync"

# Flask's own context variables (flask/globals.py, Flask 3.x): the task gets its
# own app context instead, and no request context at all.
_FLASK_VARS = frozenset((_cv_app, _cv_request))


class EdgeSync:
    """Run ``edgesync.wait_until`` tasks of this Flask app inside its app context.

    ``EdgeSync(app)`` or, in an app factory, ``sync = EdgeSync()`` at module level
    and ``sync.init_app(app)`` in the factory. See the module docstring for what a
    task sees and what to capture from the request before scheduling it.
    """

    def __init__(self, app: Optional[Flask] = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Give ``app``'s background tasks an app context; idempotent.

        Stores this object in ``app.extensions["edgesync"]`` and registers the task
        hook once per process (registering it again is a no-op).
        """
        app.extensions[EXTENSION_KEY] = self
        _runtime.add_task_hook(_task_hook)


def _task_hook(fn: Callable[..., Any], context: contextvars.Context
               ) -> Tuple[Callable[..., Any], contextvars.Context]:
    """Called in the caller's thread by ``wait_until``: re-home the task in its app."""
    app_ctx = context.get(_cv_app)
    if app_ctx is None or EXTENSION_KEY not in app_ctx.app.extensions:
        return fn, context
    # A Context cannot forget a variable, so build a fresh one holding everything
    # the caller had except Flask's own variables.
    fresh = contextvars.Context()
    for var, value in context.items():
        if var not in _FLASK_VARS:
            fresh.run(var.set, value)
    return _in_app_context(app_ctx.app, fn), fresh


def _in_app_context(app: Flask, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run_in_app_context(*args: Any, **kwargs: Any) -> Any:
        with app.app_context():
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                # An ``async def`` task: run its body here, inside the app context,
                # not after the context has been popped.
                result = run_awaitable(result)
            return result

    return run_in_app_context
