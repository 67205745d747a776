"""Invocations: one request handler run or one background task, on its own thread.

Every thread that runs invocations (gunicorn's request threads and our background
threads) owns one ``Slot``. The thread itself sets ``slot.current`` at the start and
end of each invocation; the limits monitor reads slots from its own thread, reads
each thread's CPU clock, and may cancel an invocation by raising
``InvocationCancelled`` inside that thread.

Rule: ``slot.lock`` is held whenever ``slot.current`` is cleared and whenever an
asynchronous exception is sent to the thread, so a cancellation can only ever hit
the invocation it was meant for. The thread clears any cancellation not yet
delivered when the invocation ends (``Slot.end_surely``).
"""

from __future__ import annotations

import ctypes
import json
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

REQUEST = "request"
TASK = "task"

_set_async_exc_c = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc_c.restype = ctypes.c_int


def _set_async_exc(ident: int, exc: Optional[type]) -> None:
    # No argtypes on purpose: a Python None must reach C as NULL ("clear the
    # pending exception"), which a py_object argtype would turn into Py_None.
    _set_async_exc_c(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None)


class InvocationCancelled(BaseException):
    """Raised inside an invocation that edgesync cancelled (a hard limit was reached).

    It derives from ``BaseException``, like ``SystemExit``, so that an app's
    ``except Exception:`` (Flask's error handler, for one) does not swallow it and
    the request can still be answered with status 546 (or 504).
    """


class Verdict:
    """Why an invocation was cancelled, and what its client should be answered."""

    __slots__ = ("reason", "status", "message", "at")

    def __init__(self, reason: str, status: int, message: str):
        self.reason = reason  # "cpu" | "request_idle_timeout" | "wall_clock" | "memory" | ...
        self.status = status  # 546 WORKER_LIMIT or 504
        self.message = message
        self.at = time.monotonic()


class Invocation:
    """One run of a request handler or a background task (mutable, owned by its slot)."""

    __slots__ = ("kind", "label", "started", "cpu_start", "response_started", "answered",
                 "verdict", "sock", "task", "retire_sent", "warned", "slot", "start_response")

    def __init__(self, slot: Slot, kind: str, label: Any, sock: Any = None, task: Any = None):
        self.slot = slot
        self.kind = kind
        self.label = label  # a request's "GET /path" or a task's name
        self.started = time.monotonic()
        # Set by the first CPU reading (see Slot.cpu_seconds): reading the clock here,
        # on the request's own thread, costs a system call on every request.
        self.cpu_start: Optional[float] = None
        self.response_started = False
        self.answered = False  # a response was written for it from outside its thread
        self.verdict: Optional[Verdict] = None
        self.sock = sock
        self.task = task
        self.retire_sent = False  # the soft CPU limit already asked for a retire
        self.warned = False  # the cpu beforeunload ratio was already reported
        self.start_response: Any = None

    def gated_start_response(self, status: str, headers: List[Tuple[str, str]],
                             exc_info: Any = None) -> Any:
        """The WSGI ``start_response`` handed to the app: refuses once answered from outside."""
        self.slot.gate_response(self)
        return self.start_response(status, headers, exc_info)


class Slot:
    """The invocation state of one thread; created on that thread."""

    __slots__ = ("ident", "clock_id", "lock", "current", "thread_name", "requests", "cancelled")

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self.thread_name = threading.current_thread().name
        # The clock id is taken on the thread itself, while it surely lives: thread
        # idents are reused after a thread ends, clock ids of dead threads are invalid.
        self.clock_id = time.pthread_getcpuclockid(self.ident)
        self.lock = threading.Lock()
        self.current: Optional[Invocation] = None
        # Counted by this thread alone, so no lock is needed; metrics sum all slots.
        self.requests = 0
        self.cancelled = 0

    def begin(self, kind: str, label: Any, sock: Any = None, task: Any = None) -> Invocation:
        inv = Invocation(self, kind, label, sock, task)
        self.current = inv
        return inv

    def end_surely(self, inv: Invocation) -> None:
        """Close ``inv``; retried if a late cancellation is delivered while it runs.

        A cancellation sent but not yet delivered would hit the next invocation on
        this thread: it is taken back here, under the lock that ``cancel`` holds.
        """
        while True:
            try:
                with self.lock:
                    if self.current is inv:
                        self.current = None
                    if inv.verdict is not None:
                        _set_async_exc(self.ident, None)
                return
            except InvocationCancelled:
                continue

    def cpu_seconds(self, inv: Invocation) -> Optional[float]:
        """CPU time ``inv`` has used so far, read from another thread; None if the thread is gone.

        The first reading counts the wall time since ``inv`` began as CPU time (an
        upper bound: a thread cannot burn more CPU than wall time). The monitor takes
        that reading within one sampling interval of the start, so the estimate is
        high by at most one interval, and requests shorter than an interval never
        pay for a clock read at all.
        """
        try:
            cpu = time.clock_gettime(self.clock_id)
        except OSError:
            return None
        if inv.cpu_start is None:
            inv.cpu_start = cpu - (time.monotonic() - inv.started)
        return cpu - inv.cpu_start

    def cancel(self, inv: Invocation, verdict: Verdict) -> bool:
        """Raise ``InvocationCancelled`` in this thread if ``inv`` still runs there."""
        with self.lock:
            if self.current is not inv or inv.verdict is not None:
                return False
            inv.verdict = verdict
            _set_async_exc(self.ident, InvocationCancelled)
            return True

    def answer_from_outside(self, inv: Invocation, payload: bytes) -> bool:
        """Write ``payload`` to ``inv``'s client unless its own thread has started answering.

        Used when the thread cannot unwind (blocked in C code). The socket is then
        shut down for writing, so whatever the thread writes later fails and the
        connection is closed, instead of a second response reaching the client.
        """
        with self.lock:
            if self.current is not inv or inv.response_started or inv.answered or inv.sock is None:
                return False
            inv.answered = True
        try:
            inv.sock.send(payload, socket.MSG_DONTWAIT)
            inv.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True

    def gate_response(self, inv: Invocation) -> None:
        """Called by the thread before its response starts: refuse if answered already."""
        with self.lock:
            if inv.answered:
                raise InvocationCancelled(inv.verdict.message if inv.verdict else "answered already")
            inv.response_started = True


class Tracker:
    """The slots of every thread of this instance that runs invocations."""

    def __init__(self) -> None:
        self._slots: Dict[int, Slot] = {}
        self._local = threading.local()

    def register_thread(self) -> Slot:
        """Create the calling thread's slot (call once, on that thread)."""
        slot = Slot()
        self._slots[slot.ident] = slot
        self._local.slot = slot
        return slot

    def unregister_thread(self, slot: Slot) -> None:
        if self._slots.get(slot.ident) is slot:
            del self._slots[slot.ident]

    def slot(self) -> Slot:
        """The calling thread's slot, created on first use."""
        try:
            s: Slot = self._local.slot
            return s
        except AttributeError:
            return self.register_thread()

    def current(self) -> Optional[Invocation]:
        """The invocation running on the calling thread, if any."""
        slot: Optional[Slot] = getattr(self._local, "slot", None)
        return slot.current if slot is not None else None

    def totals(self) -> Tuple[int, int]:
        """(requests begun, requests answered 546/504) over every thread."""
        slots = list(self._slots.values())
        return sum(s.requests for s in slots), sum(s.cancelled for s in slots)

    def live(self) -> List[Tuple[Slot, Invocation]]:
        """A snapshot of (slot, invocation) for every invocation running now."""
        out = []
        for slot in list(self._slots.values()):
            inv = slot.current
            if inv is not None:
                out.append((slot, inv))
        return out


def worker_limit_response(status: int, message: str) -> Tuple[str, List[Tuple[str, str]], bytes]:
    """The status line, headers and JSON body of a 546 (or 504) limit answer."""
    code = "WORKER_LIMIT" if status == 546 else "REQUEST_IDLE_TIMEOUT"
    reason = "WORKER_LIMIT" if status == 546 else "Gateway Timeout"
    body = json.dumps({"code": code, "message": message}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return "%d %s" % (status, reason), headers, body


def raw_response(status: int, message: str) -> bytes:
    """The whole HTTP/1.1 response of ``worker_limit_response``, to write on a socket."""
    line, headers, body = worker_limit_response(status, message)
    head = "HTTP/1.1 %s\r\n%sConnection: close\r\n\r\n" % (
        line, "".join("%s: %s\r\n" % h for h in headers))
    return head.encode("latin-1") + body

