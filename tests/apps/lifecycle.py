"""Routes for the lifecycle and invocation-boundary tests (tests/test_lifecycle.py).

Streaming bodies, lazy ``start_response``, handlers that raise ``SystemExit``, and
a ``beforeunload`` listener that schedules work of its own while the instance
drains. Events are JSON lines in ``$EVENTS_FILE`` (see ``_util.record``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator

import edgesync

from ._util import query, record, text


def _state_task(task_id: str) -> None:
    m = edgesync.runtime_metrics()
    record(type="task_state", id=task_id, state=m["state"], cause=m.get("cause"))


def _late_task(task_id: str) -> None:
    time.sleep(0.2)
    record(type="task_done", id=task_id)


def on_beforeunload(event: edgesync.BeforeUnloadEvent) -> None:
    m = edgesync.runtime_metrics()
    record(type="beforeunload", reason=event.reason, state=m["state"], cause=m.get("cause"))
    if os.environ.get("LISTENER_SCHEDULES"):
        try:
            edgesync.wait_until(_late_task, "from-listener")
            record(type="listener_scheduled")
        except RuntimeError as exc:
            record(type="listener_refused", error=str(exc))


edgesync.add_event_listener("beforeunload", on_beforeunload)
if os.environ.get("UNLOAD_RECORDS"):
    edgesync.add_event_listener("unload", lambda ev: record(
        type="unload", reason=ev.reason, abandoned=[t.to_dict() for t in ev.abandoned_tasks]))


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        x += 1


class _Body:
    """A response iterable that records how often it was closed."""

    def __init__(self, chunks: Iterator[bytes], name: str):
        self.chunks = chunks
        self.name = name

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        record(type="closed", name=self.name)


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    q = query(environ)
    if path == "/slow_task":  # a task that reads the state while the worker drains
        def slow(task_id: str) -> None:
            record(type="task_start", id=task_id)
            time.sleep(float(q.get("sleep", "0.5")))
            _state_task(task_id)
        edgesync.wait_until(slow, q.get("id", "t"))
        return text(start_response, "scheduled")
    if path == "/stream_spin":
        # Generator: start_response at once, then CPU burnt before the first chunk.
        def chunks() -> Iterator[bytes]:
            _spin(float(q.get("s", "3")))
            yield b"late"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(chunks(), "stream_spin")
    if path == "/lazy_spin":
        # start_response is called lazily, inside the iterable.
        def lazy() -> Iterator[bytes]:
            _spin(float(q.get("s", "3")))
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"late"
        return _Body(lazy(), "lazy_spin")
    if path == "/stream_sleep":  # blocked (not burning CPU) before the first chunk
        def sleeper() -> Iterator[bytes]:
            time.sleep(float(q.get("s", "3")))
            yield b"late"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(sleeper(), "stream_sleep")
    if path == "/stream_then_spin":  # one chunk sent, then the limit
        def sent_then_spin() -> Iterator[bytes]:
            yield b"first chunk\n"
            _spin(float(q.get("s", "3")))
            yield b"never"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(sent_then_spin(), "stream_then_spin")
    if path == "/stream_ok":
        def ok() -> Iterator[bytes]:
            yield b"a"
            yield b"b"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(ok(), "stream_ok")
    if path == "/exit":
        raise SystemExit(3)
    if path == "/interrupt":
        raise KeyboardInterrupt
    if path == "/hog":
        _spin(float(q.get("s", "3")))
        return text(start_response, "survived")
    if path == "/csleep":  # blocked in C (time.sleep): no exception can land
        time.sleep(float(q.get("s", "3")))
        return text(start_response, "slept")
    if path == "/metrics":
        return text(start_response, json.dumps(edgesync.runtime_metrics()))
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    return text(start_response, "ok")
