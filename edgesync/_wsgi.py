"""The invocation boundary of a request: the call of the WSGI app.

design: every request invocation begins when the server calls the app and ends
when the response is complete, whatever protocol carried it (gunicorn calls the
app the same way for HTTP/1.x and HTTP/2). A response that is a list is complete
when the app returns (no app code runs while it is written); any other iterable
(a generator, an app that calls ``start_response`` lazily) is wrapped, so that the
invocation lasts until its ``close()`` and a limit hit while producing it is still
answered 546 / 504 as long as no byte went out. The first byte going out is the
one gate (``Slot.gate_response``) between the request's thread and an answer
written from outside it, on the connection gunicorn gives (``_gunicorn.http``).

Rule: wherever no limit may have cancelled the invocation yet, ``Slot.end_surely``
is called in a ``try`` whose ``except InvocationCancelled`` calls it again: a
cancellation sent in the instant the app is done may be delivered at the entry of
``end_surely``, before anything in it runs, and only the caller can catch it (no
function can: its own entry is such a point). At most one cancellation is ever
sent per invocation, so the second call is not interrupted. What the app gave (its
response, its exception) goes out as if the cancellation had come later, and the
invocation is counted with the outcome it had when it ended.
"""

from __future__ import annotations

import logging
import socket
import sys
from contextvars import Context, copy_context
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from ._gunicorn import http as gunicorn_http
from ._invocation import (
    REQUEST,
    Invocation,
    InvocationCancelled,
    Outcome,
    Slot,
    Tracker,
    raw_response,
    worker_limit_response,
)

log = logging.getLogger("edgesync")

StartResponse = Callable[..., Any]
_ERROR_500 = ("500 Internal Server Error",
              [("Content-Type", "text/plain"), ("Content-Length", "21")],
              b"Internal Server Error")


def answer_from_outside(inv: Invocation, status: int, message: str) -> bool:
    """Write a whole limit response to ``inv``'s client from another thread."""
    environ: dict[str, Any] = inv.label
    if gunicorn_http.http2(environ):
        # The request's own thread is blocked (that is why we answer), and it serves
        # this connection's streams one at a time, so nothing else writes to it now.
        _line, headers, body = worker_limit_response(status, message)
        try:
            return gunicorn_http.send_http2_response(inv.start_response, status,
                                                     [(k.lower(), v) for k, v in headers], body)
        except Exception:  # the stream or connection is gone: nothing left to answer
            log.debug("HTTP/2 answer from outside failed", exc_info=True)
            return False
    sock = gunicorn_http.client_socket(environ)
    if sock is None:
        return False
    try:
        sock.send(raw_response(status, message), socket.MSG_DONTWAIT)
        # Whatever the thread writes later fails, and the connection is closed.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


class Boundary:
    """The WSGI app as the server calls it (see the module doc).

    A cancelled invocation whose response has not started is answered with its
    verdict (546 WORKER_LIMIT or 504); an app that raises ``SystemExit`` or
    ``KeyboardInterrupt`` is answered 500 and logged, like any other exception,
    instead of closing the connection and ending the thread.

    Every request runs in a fresh copy of ``base``, the ``contextvars`` context of
    the thread that builds the boundary (gunicorn's main thread, once the app is
    loaded, after ``post_fork``): what the app set at
    import or in ``post_fork`` is visible, and nothing a request sets survives it,
    though request threads are reused (gthread lets one request's values leak into
    the next). Tasks copy the request's context when ``wait_until`` accepts them.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], tracker: Tracker, pid: int):
        self.app = app
        self.tracker = tracker
        self.pid = pid
        self.base = copy_context()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        slot = self.tracker.slot()
        slot.requests += 1
        inv = slot.begin(REQUEST, environ, answer_from_outside)
        inv.start_response = start_response
        gate = _Gate(slot, inv, start_response)
        context = self.base.copy()
        try:
            result = context.run(self.app, environ, gate.start_response)
        except InvocationCancelled:
            return self._answer_cancelled(slot, inv, start_response, "")
        except (SystemExit, KeyboardInterrupt):
            return self._answer_500(slot, inv, start_response)
        # why BaseException: the invocation must end, whatever ends the app call;
        # gunicorn answers the exception (500) as it does for any app.
        except BaseException:
            try:
                slot.end_surely(inv, Outcome.FAILED)
            except InvocationCancelled:  # delivered at its entry (the module's rule)
                slot.end_surely(inv, Outcome.FAILED)
            raise  # the app's exception
        try:
            if type(result) is not list and not (
                    isinstance(result, tuple) or _is_file_wrapper(result, environ)):
                return _Body(self, slot, inv, result, start_response, context)
            # No app code runs while a list is written: the response is out of the
            # app's hands, and a limit can no longer interrupt it.
            slot.gate_response(inv)
        except InvocationCancelled:
            # Delivered after the app returned and before its response was handed on
            # (here, or at the entry of gate_response or _Body): nothing went out, so
            # the verdict is answered instead, and the app's iterable is closed.
            _close_unsent(result, context, self.pid, inv)
            return self._answer_cancelled(slot, inv, start_response, "")
        try:
            slot.end_surely(inv, Outcome.COMPLETED)
        except InvocationCancelled:  # delivered at its entry (the module's rule)
            slot.end_surely(inv, Outcome.COMPLETED)
        return result

    def _answer_cancelled(self, slot: Slot, inv: Invocation, start_response: StartResponse,
                          sent: str) -> List[bytes]:
        """Answer ``inv``'s verdict if nothing was sent, else let the connection close."""
        verdict = inv.verdict
        if verdict is None or inv.answered or inv.response_started:
            if verdict is not None and inv.response_started and not inv.answered:
                log.warning("worker %d: %s was cancelled (reason=%s) after its response had "
                            "started%s: closing the connection", self.pid, inv.describe(),
                            verdict.reason, sent)
            slot.end_surely(inv, Outcome.CANCELLED if verdict is not None else Outcome.FAILED)
            raise  # the InvocationCancelled being handled (called from its except block)
        return _replace(slot, inv, start_response, worker_limit_response(verdict.status, verdict.message),
                        Outcome.CANCELLED)

    def _answer_500(self, slot: Slot, inv: Invocation, start_response: StartResponse) -> List[bytes]:
        log.exception("worker %d: %s raised %s", self.pid, inv.describe(),
                      type(sys.exc_info()[1]).__name__)
        if inv.response_started or inv.answered:
            try:
                slot.end_surely(inv, Outcome.FAILED)
            except InvocationCancelled:  # delivered at its entry (the module's rule)
                slot.end_surely(inv, Outcome.FAILED)
            raise InvocationCancelled("the response had started: the connection is closed")
        return _replace(slot, inv, start_response, _ERROR_500, Outcome.FAILED)


def _replace(slot: Slot, inv: Invocation, start_response: StartResponse,
             response: Tuple[str, List[Tuple[str, str]], bytes], outcome: Outcome) -> List[bytes]:
    """Answer ``response`` instead of what the app was producing (nothing was sent yet)."""
    status, headers, body = response
    try:
        # exc_info lets WSGI replace a status the app had set but not sent.
        start_response(status, headers, sys.exc_info())
        slot.gate_response(inv)
    finally:
        try:
            slot.end_surely(inv, outcome)
        except InvocationCancelled:  # delivered at its entry (the module's rule)
            slot.end_surely(inv, outcome)
    return [body]


def _close_unsent(result: Any, context: Context, pid: int, inv: Invocation) -> None:
    """Close the iterable an app returned that will not be sent (WSGI: ``close()`` is always called)."""
    close = getattr(result, "close", None)
    if close is None:
        return
    try:
        context.run(close)
    # why Exception: the client is answered the verdict whatever the app's close() does
    except Exception:
        log.exception("worker %d: closing the response of %s raised", pid, inv.describe())


def _is_file_wrapper(result: Any, environ: dict[str, Any]) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(result, wrapper)


class _Gate:
    """The ``start_response`` handed to the app, and the ``write`` it returns.

    ``start_response`` sends nothing (gunicorn sends the headers with the first
    write), so it does not gate; the legacy ``write`` callable does.
    """

    __slots__ = ("slot", "inv", "_start_response", "_write")

    def __init__(self, slot: Slot, inv: Invocation, start_response: StartResponse):
        self.slot = slot
        self.inv = inv
        self._start_response = start_response
        self._write: Optional[Callable[[bytes], Any]] = None

    def start_response(self, status: str, headers: List[Tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], Any]:
        self._write = self._start_response(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> Any:
        if not self.inv.response_started:
            self.slot.gate_response(self.inv)
        assert self._write is not None
        return self._write(data)


class _Body:
    """A response iterable that keeps its request's invocation open until ``close()``."""

    __slots__ = ("boundary", "slot", "inv", "iterable", "_it", "start_response", "outcome",
                 "_closed", "sent", "context")

    def __init__(self, boundary: Boundary, slot: Slot, inv: Invocation, iterable: Iterable[bytes],
                 start_response: StartResponse, context: Context):
        self.context = context  # the request's: its body is produced in it too
        self.boundary = boundary
        self.slot = slot
        self.inv = inv
        self.iterable = iterable
        self._it: Optional[Iterator[bytes]] = None
        self.start_response = start_response
        self.outcome: Optional[Outcome] = Outcome.COMPLETED
        self._closed = False
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        inv = self.inv
        try:
            if self._it is None:
                self._it = self.context.run(iter, self.iterable)
            chunk = self.context.run(next, self._it)
        except StopIteration:
            # gunicorn sends the headers when it closes an empty response.
            if not inv.response_started:
                self.slot.gate_response(inv)
            raise
        except InvocationCancelled:
            self.outcome = None  # counted by _answer_cancelled
            body = self.boundary._answer_cancelled(
                self.slot, inv, self.start_response, " (%d bytes sent)" % self.sent)
            self._it = iter(body)
            return next(self._it)
        except (SystemExit, KeyboardInterrupt):
            self.outcome = None
            self._it = iter(self.boundary._answer_500(self.slot, inv, self.start_response))
            return next(self._it)
        # why BaseException: the invocation ends in close(), which gunicorn calls on
        # every path; here only the outcome is noted.
        except BaseException:
            if self.outcome is Outcome.COMPLETED:
                self.outcome = Outcome.FAILED
            raise
        if not inv.response_started:
            self.slot.gate_response(inv)
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        """Close the app's iterable (once) and end the invocation."""
        if self._closed:
            return
        self._closed = True
        outcome = self.outcome
        if outcome is Outcome.COMPLETED and self.inv.verdict is not None:
            outcome = Outcome.CANCELLED  # landed in the server's write, between two chunks
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                self.context.run(close)
        finally:
            try:
                self.slot.end_surely(self.inv, outcome)
            except InvocationCancelled:  # delivered at its entry (the module's rule)
                self.slot.end_surely(self.inv, outcome)
