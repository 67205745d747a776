"""A long-running background task, and a beforeunload listener that saves its progress.

The first example of Supabase's background-tasks guide, ported to Flask. Run it
from the repository root:

    gunicorn -k edgesync.Worker -b 127.0.0.1:8000 --chdir examples flask_app:app

    curl -X POST 127.0.0.1:8000/jobs -d steps=20     # answers at once: {"job": "...", "steps": 20}
    curl 127.0.0.1:8000/jobs/<job>                     # watch it count up

Stop gunicorn (Ctrl-C) before a job is done: the listener writes what each job
had done, and why the worker stopped, to progress.jsonl.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

from flask import Flask, current_app, request

import edgesync
from edgesync.flask import EdgeSync

PROGRESS_FILE = os.environ.get("PROGRESS_FILE", "progress.jsonl")

app = Flask(__name__)
app.logger.setLevel("INFO")  # outside debug mode Flask logs only warnings and errors
EdgeSync(app)

progress: dict[str, int] = {}  # job id -> steps done, in this worker process
lock = threading.Lock()


def long_running_task(job_id: str, steps: int) -> None:
    for step in range(1, steps + 1):
        time.sleep(0.5)  # one unit of real work: a call to an API, a chunk of a file...
        with lock:
            progress[job_id] = step
    current_app.logger.info("job %s: all %d steps done", job_id, steps)


def save_progress(event: edgesync.BeforeUnloadEvent) -> None:
    # Runs once per reason, just before this worker stops: keep what the tasks have
    # done so far, so the work can be resumed elsewhere.
    with lock:
        snapshot = {"pid": os.getpid(), "reason": event.detail["reason"], "progress": dict(progress)}
    with open(PROGRESS_FILE, "a") as f:
        f.write(json.dumps(snapshot) + "\n")


edgesync.add_event_listener("beforeunload", save_progress)


@app.post("/jobs")
def start_job():
    steps = request.form.get("steps", 10, type=int)  # read the request now: the task gets values
    job_id = uuid.uuid4().hex[:8]
    with lock:
        progress[job_id] = 0
    edgesync.wait_until(long_running_task, job_id, steps)  # does not block
    return {"job": job_id, "steps": steps}, 202


@app.get("/jobs/<job_id>")
def job_status(job_id: str):
    with lock:
        done = progress.get(job_id)
    if done is None:
        return {"error": "no job %s in worker %d" % (job_id, os.getpid())}, 404
    return {"job": job_id, "done": done}


@app.get("/")
def index():
    return "POST /jobs (steps=N) starts a background job; GET /jobs/<job> shows its progress.\n"
