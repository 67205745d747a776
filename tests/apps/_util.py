"""What the test apps share: recording events for the tests, and plain-text answers."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List
from urllib.parse import parse_qs


def record(**fields: Any) -> None:
    """Append ``fields`` as one JSON line to ``$EVENTS_FILE`` (if set).

    One ``os.write`` on an O_APPEND descriptor per line: lines written by several
    processes at once never interleave.
    """
    path = os.environ.get("EVENTS_FILE")
    if not path:
        return
    fields.setdefault("pid", os.getpid())
    fields.setdefault("t", time.time())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def text(start_response: Callable[..., Any], body: str, status: str = "200 OK") -> List[bytes]:
    """Answer ``body`` as text/plain with its Content-Length."""
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def query(environ: Dict[str, Any]) -> Dict[str, str]:
    """The request's query string as a dict (the first value of each key)."""
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
