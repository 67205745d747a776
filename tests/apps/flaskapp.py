"""A Flask app built with edgesync.flask, for tests/test_flask.py (in process and under gunicorn).

``create_app()`` is an app factory (``EdgeSync().init_app``); ``app`` is the module's
instance that gunicorn serves. Tasks store what they saw in ``seen`` (by label);
``/seen?label=`` returns it, so tests under gunicorn can read it over HTTP.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from typing import Any, Dict, List

import flask
from flask import Flask, current_app, g, request

import edgesync
from edgesync.flask import EdgeSync

trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="-")

seen: Dict[str, Dict[str, Any]] = {}
progress: Dict[str, int] = {}
saved: List[Dict[str, Any]] = []  # what the beforeunload listener saved, in order
_lock = threading.Lock()

sync = EdgeSync()


def observe(label: str) -> Dict[str, Any]:
    """A task that reports what it can see of Flask and of its caller's context."""
    what: Dict[str, Any] = {
        "thread": threading.current_thread().name,
        "app": current_app.name,
        "greeting": current_app.config.get("GREETING"),
        "g": sorted(vars(g)),
        "trace_id": trace_id.get(),
        "has_app_context": flask.has_app_context(),
        "has_request_context": flask.has_request_context(),
    }
    try:
        what["request_path"] = request.path
    except RuntimeError as exc:
        what["request_error"] = str(exc)
    g.written_by_task = True
    current_app.logger.info("task %s ran in app %s", label, current_app.name)
    seen[label] = what
    return what


async def observe_async(label: str) -> Dict[str, Any]:
    return observe(label)


def job(job_id: str, steps: int) -> None:
    for step in range(1, steps + 1):
        time.sleep(current_app.config["STEP_SECONDS"])
        with _lock:
            progress[job_id] = step


def save_progress(event: edgesync.BeforeUnloadEvent) -> None:
    with _lock:
        saved.append({"reason": event.reason, "progress": dict(progress)})


edgesync.add_event_listener("beforeunload", save_progress)


def create_app(name: str = "flaskapp", with_edgesync: bool = True) -> Flask:
    app = Flask(name)
    app.config.update(GREETING="hello from %s" % name, STEP_SECONDS=0.01)
    app.logger.setLevel(logging.INFO)
    if with_edgesync:
        sync.init_app(app)

    @app.teardown_appcontext
    def record_teardown(exc: BaseException | None) -> None:
        if "written_by_task" in g:
            seen.setdefault("teardowns", {})[threading.current_thread().name] = True

    @app.get("/observe")
    def schedule_observe() -> Any:
        g.user = "alice"
        trace_id.set(request.args.get("trace", "-"))
        label = request.args["label"]
        if request.args.get("async"):
            edgesync.wait_until(observe_async(label))
        else:
            edgesync.wait_until(observe, label)
        return {"scheduled": label}

    @app.get("/seen")
    def get_seen() -> Any:
        return seen.get(request.args["label"]) or ({"missing": request.args["label"]}, 404)

    @app.post("/jobs")
    def start_job() -> Any:
        steps = request.form.get("steps", 3, type=int)
        job_id = "job%d" % len(progress)
        progress[job_id] = 0
        edgesync.wait_until(job, job_id, steps)
        return {"job": job_id}, 202

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str) -> Any:
        return {"job": job_id, "done": progress.get(job_id)}

    @app.get("/pid")
    def pid() -> Any:
        return str(os.getpid())

    return app


app = create_app()
plain_app = create_app("plain", with_edgesync=False)  # never called EdgeSync(app): same isolation
