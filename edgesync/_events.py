"""Events and their listeners: ``beforeunload`` and ``unhandledrejection``.

Listeners live in one process-wide registry, not on a runtime, so a listener
registered at import time works whether gunicorn imports the app in the master
(``preload_app``: the registry is inherited through ``fork``) or in each worker.
The registry follows the DOM's ``addEventListener`` rules that Supabase and
Cloudflare users know: adding the same listener twice is a no-op, removing one
that is not registered is a no-op, listeners run in registration order.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ._lifecycle import Reason

log = logging.getLogger("edgesync")

BEFOREUNLOAD = "beforeunload"
UNHANDLEDREJECTION = "unhandledrejection"
UNLOAD = "unload"
EVENT_TYPES = (BEFOREUNLOAD, UNHANDLEDREJECTION, UNLOAD)

#: The reasons a ``beforeunload`` event carries (docs/model.md, "Events"), declared in ``_lifecycle.Reason``.
REASONS = tuple(r.value for r in Reason)


@dataclass(frozen=True)
class TaskInfo:
    """A background task that had not finished when an event was dispatched.

    Plain data: ``info.to_dict()`` (or ``dataclasses.asdict(info)``) is JSON-serialisable.
    """

    name: str  # the name given with edgesync.named, else module.qualname; never argument values
    state: str  # "queued" | "running" | "tracked" (a future scheduled elsewhere)
    age: float  # seconds since wait_until accepted it
    running_for: Optional[float]  # seconds since it started, None while queued
    id: str = ""  # edgesync.task_id(future) of the task, as in its log lines

    def to_dict(self) -> Dict[str, Any]:
        """``{"id", "name", "state", "age", "running_for"}``: strings, floats and None only."""
        return {"id": self.id, "name": self.name, "state": self.state, "age": self.age,
                "running_for": self.running_for}


class BeforeUnloadEvent:
    """Tells listeners that the instance is about to stop, and why.

    ``reason`` is one of ``REASONS``; ``detail == {"reason": reason}`` is the shape
    Supabase's ``ev.detail.reason`` has. ``deadline`` is the ``time.monotonic()``
    value by which the instance stops (None when no deadline is known yet, as for
    an early warning with its limit disabled); ``time_remaining`` counts down to it.
    ``pending_tasks`` lists the background tasks not finished at dispatch time.
    """

    type = BEFOREUNLOAD

    def __init__(self, reason: str, deadline: Optional[float], pending_tasks: Tuple[TaskInfo, ...]):
        self.reason = reason
        self.detail: Dict[str, str] = {"reason": reason}
        self.deadline = deadline
        self.pending_tasks = pending_tasks

    @property
    def time_remaining(self) -> Optional[float]:
        """Seconds left before the instance stops (never negative), or None if unknown."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def __repr__(self) -> str:
        return "<BeforeUnloadEvent reason=%r time_remaining=%r pending=%d>" % (
            self.reason, self.time_remaining, len(self.pending_tasks))


class UnhandledRejectionEvent:
    """A background task raised. ``reason`` is the exception, ``future`` its future.

    Unless a listener calls ``prevent_default()``, edgesync logs the exception once,
    with its traceback, on the ``edgesync`` logger.
    """

    type = UNHANDLEDREJECTION

    def __init__(self, reason: BaseException, future: Future[Any], task_name: str):
        self.reason = reason
        self.future = future
        self.task_name = task_name
        self.default_prevented = False

    def prevent_default(self) -> None:
        """Handle the rejection here: edgesync will not log it."""
        self.default_prevented = True

    def __repr__(self) -> str:
        return "<UnhandledRejectionEvent task=%s reason=%r>" % (self.task_name, self.reason)


class UnloadEvent:
    """The drain is over: sent once, at the very end, with the tasks it abandoned.

    It extends the seed's model the way the DOM's ``unload`` follows
    ``beforeunload``: ``beforeunload`` (``termination``) fires when a stop *begins*,
    so that the app has the whole window; ``unload`` fires when the drain has
    *ended*, so that a listener saving progress saves the final state and knows
    exactly what did not finish. ``reason`` is the drain's (``early_drop``,
    ``termination``, the limit that terminated the instance, or ``close``);
    ``abandoned_tasks`` lists every task given up (each also logged), empty when all
    finished. Listeners run on the events thread and have ``UNLOAD_BUDGET`` seconds
    together (``_lifecycle.UNLOAD_BUDGET``, 0.5 s: the process is about to exit).
    """

    type = UNLOAD

    def __init__(self, reason: str, abandoned_tasks: Tuple[TaskInfo, ...]):
        self.reason = reason
        self.detail: Dict[str, str] = {"reason": reason}
        self.abandoned_tasks = abandoned_tasks

    def __repr__(self) -> str:
        return "<UnloadEvent reason=%r abandoned=%d>" % (self.reason, len(self.abandoned_tasks))


Event = Union[BeforeUnloadEvent, UnhandledRejectionEvent, UnloadEvent]
Listener = Callable[[Any], Any]

_lock = threading.Lock()
_listeners: Dict[str, List[Listener]] = {t: [] for t in EVENT_TYPES}


def _check_type(type: str) -> None:
    if not isinstance(type, str) or type not in _listeners:
        raise ValueError(
            "unknown event type %r: edgesync dispatches %s" % (type, ", ".join(map(repr, EVENT_TYPES))))


def add_event_listener(type: str, listener: Listener) -> None:
    """Call ``listener(event)`` on every ``type`` event of this process.

    ``type`` is ``"beforeunload"``, ``"unhandledrejection"`` or ``"unload"``; anything else raises
    ``ValueError``. A non-callable listener raises ``TypeError``. Adding a listener
    that is already registered for ``type`` does nothing (as in the DOM).
    """
    _check_type(type)
    if not callable(listener):
        raise TypeError("add_event_listener(%r, listener): listener must be callable, got %r" % (type, listener))
    with _lock:
        if listener not in _listeners[type]:
            # Copy-on-write: dispatch iterates a snapshot without taking the lock.
            _listeners[type] = _listeners[type] + [listener]


def remove_event_listener(type: str, listener: Listener) -> None:
    """Stop calling ``listener`` for ``type`` events; a listener not registered is ignored."""
    _check_type(type)
    with _lock:
        _listeners[type] = [x for x in _listeners[type] if x != listener]


def listeners(type: str) -> List[Listener]:
    """The listeners registered for ``type``, in order (a snapshot)."""
    return _listeners[type]


def clear_listeners() -> None:
    """Remove every listener (for test isolation)."""
    with _lock:
        for t in EVENT_TYPES:
            _listeners[t] = []


def dispatch(event: Event) -> None:
    """Call each listener of ``event.type`` in registration order, on this thread.

    A listener that raises is logged with its traceback and the next one still runs.
    """
    for listener in _listeners[event.type]:
        try:
            listener(event)
        # why BaseException: a listener's SystemExit or a stray cancellation must not
        # skip the listeners after it, nor end the thread that dispatches.
        except BaseException:
            log.exception("%s listener %r raised", event.type, listener)


def reset_after_fork() -> None:
    """Give the child of a fork a fresh registry lock (another thread may have held it)."""
    global _lock
    _lock = threading.Lock()
