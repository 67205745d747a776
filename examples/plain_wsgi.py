"""edgesync in a plain WSGI app: no framework, just a callable.

    gunicorn -k edgesync.Worker -b 127.0.0.1:8000 --chdir examples plain_wsgi:app

    curl 127.0.0.1:8000/hello    # answered at once; the audit line is written after

Each request is answered first; an audit line is then appended to audit.log
(or $AUDIT_FILE) by a background task.
"""

from __future__ import annotations

import json
import os
import time

import edgesync

AUDIT_FILE = os.environ.get("AUDIT_FILE", "audit.log")


def write_audit(method: str, path: str, at: float) -> None:
    with open(AUDIT_FILE, "a") as f:
        f.write(json.dumps({"method": method, "path": path, "at": at, "pid": os.getpid()}) + "\n")


def app(environ, start_response):
    # Capture plain values: the environ belongs to the request, which ends first.
    edgesync.wait_until(write_audit, environ["REQUEST_METHOD"], environ["PATH_INFO"], time.time())
    body = b"Hello from a plain WSGI app\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
