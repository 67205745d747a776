"""Invocations: one request handler run or one background task, on its own thread.

Every thread that runs invocations (gunicorn's request threads and our background
threads) owns one ``Slot``. The thread itself sets ``slot.current`` at the start and
end of each invocation; the limits monitor reads slots from its own thread, reads
each thread's CPU clock, and may cancel an invocation by raising
``InvocationCancelled`` inside that thread.

Rule: a cancellation can only ever hit the invocation it was meant for. ``cancel``
(under ``slot.lock``, held until the exception is sent) checks that the invocation
is current and sets its ``verdict`` in one step; the thread ends an invocation by
clearing ``slot.current`` and then reading ``verdict`` in one step, and if it finds
one, takes the lock and takes back any cancellation not yet delivered
(``Slot.end_surely``). A step is a run of bytecode with no call and no backward jump
in it: CPython 3.11 and later hand the GIL to another thread only at those, so no
other Python thread runs inside a step. Either ``cancel`` sees the invocation ended
and sends nothing, or the thread sees the verdict and waits on the lock for the
send. CPython 3.10 may also switch at a conditional jump that is taken (its
``POP_JUMP_IF_FALSE`` checks for a switch), as in ``cancel``'s check, so there
(``ONE_STEP`` false) the thread ends every invocation under the lock.

Rule: every outcome of an invocation (completed, failed, cancelled by a limit,
answered from outside, cancelled by its caller, abandoned) is counted once, by
``Tracker.record`` (under the tracker's lock), or, by the thread that ran the
invocation, in its own slot (``Slot.counts``: only that thread writes it, so no
lock, as for ``Slot.requests``); ``Tracker.count`` sums both, and metrics and
statsd read that.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._lifecycle import _Named


class Kind(_Named):
    """What an invocation runs."""

    REQUEST = "request"
    TASK = "task"


class Outcome(_Named):
    """How an invocation ended (counted once each, by ``Tracker.record``)."""

    COMPLETED = "completed"
    FAILED = "failed"  # raised (a request answered 500 by gunicorn, a task's exception)
    CANCELLED = "cancelled"  # a limit cancelled it and its own thread answered 546/504
    ANSWERED_OUTSIDE = "answered_outside"  # answered 546/504 from outside its blocked thread
    CALLER_CANCELLED = "caller_cancelled"  # a task's caller cancelled its future first
    ABANDONED = "abandoned"  # still pending when the instance unloaded


REQUEST = Kind.REQUEST
TASK = Kind.TASK

#: The place of each (kind, outcome) in a slot's ``counts``.
INDEX: Dict[Tuple[Kind, Outcome], int] = {(k, o): i for i, (k, o) in enumerate(
    (k, o) for k in Kind for o in Outcome)}

#: Whether a run of bytecode with no call and no backward jump is one step (the module's
#: rule): CPython 3.10 may switch threads at a taken conditional jump too.
ONE_STEP = sys.version_info >= (3, 11)

_set_async_exc_c = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc_c.restype = ctypes.c_int


def _set_async_exc(ident: int, exc: Optional[type]) -> None:
    # No argtypes on purpose: a Python None must reach C as NULL ("clear the
    # pending exception"), which a py_object argtype would turn into Py_None.
    _set_async_exc_c(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None)


class _TakenBack(BaseException):
    """What a thread sends itself to take back a cancellation (see ``_take_back``)."""


def _take_back(ident: int) -> None:
    """Drop the cancellation sent to the calling thread (``ident``) and not yet delivered.

    Not by clearing it with NULL: CPython 3.11 and 3.12 keep one interpreter-wide
    "asynchronous exception pending" flag, which ``PyThreadState_SetAsyncExc`` sets
    even for NULL and only a delivery clears. Left set, every call and loop of the
    process takes the eval loop's slow path (1.3-1.45x per call, measured), and a
    thread started under a trace or profile function (coverage, a debugger) spins at
    its first call. So a marker replaces the pending cancellation and is delivered
    here at once: the eval loop checks for it when the call that sent it returns.
    """
    try:
        _set_async_exc(ident, _TakenBack)
        _delivered()
    except _TakenBack:
        pass


def _delivered() -> None:
    """A Python call: if the marker was not delivered when ``_set_async_exc`` returned, it is here."""


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


#: ``answer(invocation, status, message) -> bool``: writes a whole limit response to a
#: request's client from outside its thread (``_wsgi.answer_from_outside``).
Answer = Callable[["Invocation", int, str], bool]


class Invocation:
    """One run of a request handler or a background task (mutable, owned by its slot).

    A background task is its own invocation: ``_pool.Task`` derives from this class,
    with the fields that only a request changes as class constants, so that running
    a task creates no object of its own.
    """

    __slots__ = ("kind", "label", "started", "cpu_start", "response_started", "answered",
                 "verdict", "answer", "retire_sent", "warned", "start_response")

    def __init__(self, kind: Kind, label: Any, answer: Optional[Answer] = None):
        self.kind = kind
        self.label = label  # a request's WSGI environ, or a name
        self.started = time.monotonic()
        # Set by the first CPU reading (see Slot.cpu_seconds): reading the clock here,
        # on the request's own thread, costs a system call on every request.
        self.cpu_start: Optional[float] = None
        self.response_started = False  # its thread let the first byte go (see gate_response)
        self.answered = False  # a response was written for it from outside its thread
        self.verdict: Optional[Verdict] = None
        self.answer = answer
        self.retire_sent = False  # the soft CPU limit already asked for a retire
        self.warned = False  # the cpu beforeunload ratio was already reported
        self.start_response: Any = None  # a request's, as the server passed it

    @property
    def task(self) -> Any:
        """The pool's ``Task`` when this invocation is a background task (``_pool.Task``), else None."""
        return None

    def describe(self) -> str:
        """``request GET /path`` or ``task module.fn``, for log lines (never argument values)."""
        label = self.label
        if isinstance(label, dict):  # a WSGI environ
            return "request %s %s" % (label.get("REQUEST_METHOD"), label.get("PATH_INFO"))
        return "%s %s" % (self.kind, label)


class Slot:
    """The invocation state of one thread; created on that thread."""

    __slots__ = ("ident", "clock_id", "lock", "current", "thread_name", "requests", "tracker",
                 "handling", "counts")

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.ident = threading.get_ident()
        self.thread_name = threading.current_thread().name
        # The clock id is taken on the thread itself, while it surely lives: thread
        # idents are reused after a thread ends, clock ids of dead threads are invalid.
        self.clock_id = time.pthread_getcpuclockid(self.ident)
        self.lock = threading.Lock()
        self.current: Optional[Invocation] = None
        # Requests begun, counted by this thread alone, so no lock is needed.
        self.requests = 0
        # Outcomes of this thread's own invocations, by INDEX: this thread alone writes them.
        self.counts = [0] * len(INDEX)
        # A request thread holds a connection: its response may still be written after
        # the app returned (and the invocation ended).
        self.handling = False

    def begin(self, kind: Kind, label: Any, answer: Optional[Answer] = None) -> Invocation:
        inv = Invocation(kind, label, answer)
        self.current = inv
        return inv

    def end_surely(self, inv: Invocation, outcome: Optional[Outcome] = None) -> None:
        """Close ``inv`` and count its ``outcome`` (None: counted elsewhere, or not at all).

        Retried if a late cancellation is delivered while it runs. One sent just before
        the call may also be delivered at its entry, before anything here runs: only
        the caller can catch that one, and calls again (``_wsgi``'s rule; ``_pool``
        retries the same way); no second one is ever sent to the same invocation.

        A cancellation sent but not yet delivered would hit the next invocation on
        this thread: it is taken back here, under the lock that ``cancel`` holds. The
        lock is taken only then (see the module's rule): ending an invocation that no
        limit cancelled, nearly every one, takes no lock (on 3.10, every one does).
        """
        while True:
            try:
                if ONE_STEP:
                    # One step (the module's rule): no call between these lines.
                    if self.current is inv:
                        self.current = None
                    if inv.verdict is not None:
                        with self.lock:  # held by cancel until its exception is sent
                            _take_back(self.ident)
                else:
                    with self.lock:
                        if self.current is inv:
                            self.current = None
                        if inv.verdict is not None:
                            _take_back(self.ident)
                break
            except InvocationCancelled:
                continue
        if outcome is not None and not inv.answered:  # an outside answer was counted then
            self.counts[INDEX[inv.kind, outcome]] += 1  # on this slot's own thread

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
            # One step (the module's rule): no call between the check and the verdict.
            if self.current is not inv or inv.verdict is not None:
                return False
            inv.verdict = verdict
            _set_async_exc(self.ident, InvocationCancelled)
            return True

    def answer_from_outside(self, inv: Invocation, status: int, message: str) -> bool:
        """Answer ``inv``'s client unless its own thread has let a byte of its response go.

        Used when the thread cannot unwind (blocked in C code) or the instance is
        terminated. The thread's own response is refused afterwards (``gate_response``),
        so no second response reaches the client. Counted as ``ANSWERED_OUTSIDE``.
        """
        with self.lock:
            # One step, as in cancel: once its thread has ended inv, it is never answered here.
            if (self.current is not inv or inv.response_started or inv.answered
                    or inv.answer is None):
                return False
            inv.answered = True
        # Counted before the answer goes out: a client that has its 504 or 546 and asks
        # runtime_metrics() next finds it among invocations_cancelled.
        self.tracker.record(inv.kind, Outcome.ANSWERED_OUTSIDE)
        if not inv.answer(inv, status, message):
            self.tracker.record(inv.kind, Outcome.ANSWERED_OUTSIDE, -1)
            return False
        return True

    def gate_response(self, inv: Invocation) -> None:
        """Called by the thread before the first byte of its response goes out.

        Raises ``InvocationCancelled`` if the client was answered from outside already.
        """
        with self.lock:
            if inv.answered:
                raise InvocationCancelled(inv.verdict.message if inv.verdict else "answered already")
            inv.response_started = True


class Tracker:
    """The slots of every thread of this instance that runs invocations."""

    def __init__(self) -> None:
        self._slots: Dict[int, Slot] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._outcomes: Dict[Tuple[Kind, Outcome], int] = {}
        self._gone_requests = 0  # requests begun on threads that ended since

    def record(self, kind: Kind, outcome: Outcome, n: int = 1) -> None:
        """Count ``n`` invocations of ``kind`` that ended with ``outcome`` (a negative ``n`` takes a count back)."""
        if n:
            key = (kind, outcome)
            with self._lock:
                self._outcomes[key] = self._outcomes.get(key, 0) + n

    def count(self, kind: Kind, outcome: Outcome) -> int:
        """Invocations of ``kind`` that ended with ``outcome``, over every thread."""
        with self._lock:
            return self._count(kind, outcome)

    def _count(self, kind: Kind, outcome: Outcome) -> int:
        i = INDEX[kind, outcome]
        return self._outcomes.get((kind, outcome), 0) + sum(s.counts[i] for s in list(self._slots.values()))

    def cancelled(self) -> int:
        """Invocations (requests and tasks) that a limit cancelled, answered either way."""
        with self._lock:
            return sum(self._count(k, o) for k in Kind for o in (Outcome.CANCELLED, Outcome.ANSWERED_OUTSIDE))

    def requests(self) -> int:
        """Request invocations begun, over every thread."""
        return self._gone_requests + sum(s.requests for s in list(self._slots.values()))

    def register_thread(self) -> Slot:
        """Create the calling thread's slot (call once, on that thread)."""
        slot = Slot(self)
        with self._lock:
            gone = self._slots.get(slot.ident)
            if gone is not None:  # a thread that ended without unregistering: its ident is reused
                self._fold(gone)
            self._slots[slot.ident] = slot
        self._local.slot = slot
        return slot

    def unregister_thread(self, slot: Slot) -> None:
        with self._lock:
            if self._slots.get(slot.ident) is slot:
                del self._slots[slot.ident]
                self._fold(slot)

    def _fold(self, slot: Slot) -> None:
        """Keep what ``slot`` counted once it is gone (the caller holds the lock)."""
        self._gone_requests += slot.requests
        for key, i in INDEX.items():
            if slot.counts[i]:
                self._outcomes[key] = self._outcomes.get(key, 0) + slot.counts[i]

    def slot(self) -> Slot:
        """The calling thread's slot, created on first use."""
        try:
            s: Slot = self._local.slot
            return s
        except AttributeError:
            return self.register_thread()

    def writing(self) -> bool:
        """Whether a thread holds a connection whose response was not answered from outside."""
        for slot in list(self._slots.values()):
            inv = slot.current
            if slot.handling and (inv is None or not inv.answered):
                return True
        return False

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
