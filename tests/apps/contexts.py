"""A view that sets a ContextVar on some requests only, and a task that reads it (tests/test_contexts.py)."""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Dict, Iterable, Iterator

import edgesync

from ._util import query, record, text

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
# Set at import, in the main thread: every request and task must see it.
app_name: contextvars.ContextVar[str] = contextvars.ContextVar("app_name", default="unset")
app_name.set("contexts-app")


def read_task(request: str, expected: str) -> None:
    record(type="task", request=request, expected=expected, seen=tenant.get(), app=app_name.get())


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    q = query(environ)
    rid = q.get("r", "?")
    at_start = tenant.get()
    if "set" in q:
        tenant.set(q["set"])
    edgesync.wait_until(read_task, rid, q.get("set", "-"))
    record(type="request", request=rid, at_start=at_start, app=app_name.get())
    if "stream" in q:
        def body() -> Iterator[bytes]:
            yield tenant.get().encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()
    return text(start_response, at_start)
