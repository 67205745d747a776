"""Tasks for tests/test_django_tasks.py: module-level functions, as Django requires."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from asgiref.sync import sync_to_async
from django.db import connections

try:
    from django.tasks import task
except ImportError:  # Django < 6: the backport
    from django_tasks import task

#: The DatabaseWrapper each ``*_connect`` task used (the tests check it was closed).
CONNECTIONS: List[Any] = []

#: Gates that ``blocked`` waits on, by name; the tests set them (or time out).
GATES: Dict[str, threading.Event] = {}


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="emails")
def send_email(to: str) -> str:
    return "sent to %s" % to


@task
def fail(message: str) -> None:
    raise ValueError(message)


@task
def blocked(gate: str) -> str:
    if not GATES.setdefault(gate, threading.Event()).wait(10):
        raise TimeoutError("gate %r was never opened" % gate)
    return threading.current_thread().name


@task
async def async_double(x: int) -> Dict[str, Any]:
    await asyncio.sleep(0)
    return {"value": 2 * x, "thread": threading.current_thread().name}


def _connect() -> str:
    connections["default"].ensure_connection()
    CONNECTIONS.append(connections["default"])  # this thread's own wrapper
    return threading.current_thread().name


@task
def sync_connect() -> str:
    return _connect()


@task
async def async_connect() -> List[str]:
    # Async ORM methods go through sync_to_async like this.
    return [threading.current_thread().name, await sync_to_async(_connect)()]


@task(takes_context=True)
def with_context(context: Any, label: str) -> List[Any]:
    return [label, context.attempt, context.task_result.id]


@task(backend="small")
def small(n: int) -> int:
    return n


@task
def write_when_released(directory: str, text: str) -> str:
    """Wait (10 s at most) for ``directory``/go to exist, then write ``directory``/done."""
    folder = Path(directory)
    deadline = time.monotonic() + 10
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("%s/go never appeared" % directory)
        time.sleep(0.01)
    (folder / "done").write_text(text)
    return text


@task
def spin(seconds: float) -> int:
    """Burn CPU in Python for up to ``seconds`` (a CPU limit should cancel it first)."""
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        n += 1
    return n
