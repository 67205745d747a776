"""Flask integration: background tasks run inside an application context of their app.

Nothing to set up: edgesync's core gives every Flask app's tasks an app context.
The usual extension pattern (``init_app`` for app factories) is accepted, and optional::

    from flask import Flask, current_app, request
    import edgesync
    from edgesync.flask import EdgeSync

    app = Flask(__name__)
    EdgeSync(app)                    # optional; or: sync = EdgeSync(); sync.init_app(app)

    def send_welcome(email: str) -> None:
        current_app.logger.info("welcoming %s", email)   # works: an app context of `app`

    @app.post("/signup")
    def signup():
        email = request.form["email"]               # read the request now...
        edgesync.wait_until(send_welcome, email)    # ...and pass the values on
        return "ok"

What a task scheduled while a request (or any app context) is active gets, with
or without ``EdgeSync(app)`` (edgesync's core does this for every Flask app, see
docs/flask.md):

- ``current_app``, ``app.config`` and ``current_app.logger`` of the caller's app:
  the task runs inside ``with app.app_context():``, so ``teardown_appcontext``
  functions run when it ends (Flask-SQLAlchemy returns its session to the pool there).
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
one) get no app context. ``EdgeSync(app)`` itself only registers the extension in
``app.extensions["edgesync"]``; it is kept so that apps written for it keep working.
"""

from __future__ import annotations

from typing import Optional

from flask import Flask

__all__ = ["EdgeSync"]

#: The key this extension uses in ``app.extensions``.
EXTENSION_KEY = "edgesync"


class EdgeSync:
    """The Flask extension object, kept for the extension pattern: ``EdgeSync(app)`` or ``init_app(app)``.

    It does nothing more than record itself in ``app.extensions["edgesync"]``. Every
    task scheduled from a Flask app context runs in a fresh app context of that app,
    without the request, whether or not the app registered this extension (edgesync's
    core does it for every Flask app; see the module docstring). Apps written with it
    keep working; new apps need not use it.
    """

    def __init__(self, app: Optional[Flask] = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Store this object in ``app.extensions["edgesync"]``; idempotent."""
        app.extensions[EXTENSION_KEY] = self
