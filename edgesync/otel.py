"""OpenTelemetry traces for edgesync: each background task in its own span, linked to its caller.

design: ``wait_until`` runs a task in a copy of the caller's ``contextvars``, so a
tracer used inside the task would make its spans children of the request span,
which has usually ended by then (opentelemetry-python-contrib #4251). With
``instrument()`` every task accepted from then on runs in its own span, a root
span (an explicitly empty parent context) of kind CONSUMER that *links* to the
span that called ``wait_until``, as OpenTelemetry's messaging conventions have a
processing span link to the context that created the work. Spans the task makes
are children of the task span. The sampler decides at the start, on the span's name
and kind; a span it drops is still made current (the task's own spans follow its
decision) but gets nothing else built: no attributes, link, events or bookkeeping.
The wrapper is a task hook (``_runtime.add_task_hook``, the framework integrations'
extension point): nothing here runs for a task unless ``instrument()`` was called,
and ``opentelemetry`` is imported only by this module.

Events on spans: a limit that cancels a task (``edgesync.cancelled``, with the
limit); ``beforeunload`` and ``unload`` on every task span still running, and on
one ``edgesync.worker`` span per instance, which starts when the instance began
serving and ends at ``unload`` (abandoned tasks' spans end there too, marked
abandoned). A durable task carries its caller's trace context in its record (the
journal row, the RQ job), so its re-run, by any worker or an RQ worker, links to
the original trace.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _durable, _events, _runtime
from ._events import BeforeUnloadEvent, UnloadEvent
from ._invocation import InvocationCancelled
from ._pool import NOT_AWAITABLE, run_awaitable

__all__ = ["instrument", "instrumented", "uninstrument"]

#: The instrumentation scope's name, as exporters show it.
SCOPE = "edgesync"

# Attribute names: OpenTelemetry's messaging conventions where one fits, else edgesync.*.
TASK_NAME = "edgesync.task.name"
TASK_ID = "edgesync.task.id"
TASK_ATTEMPT = "edgesync.task.attempt"
TASK_OUTCOME = "edgesync.task.outcome"  # completed | failed | cancelled | abandoned
TASK_CANCELLED_BY = "edgesync.task.cancelled_by"  # the limit: cpu, wall_clock, memory, ...
TASK_QUEUED_S = "edgesync.task.queued_s"
REASON = "edgesync.reason"

_propagator = TraceContextTextMapPropagator()
# Bound once: the task span's path looks each up per task otherwise.
_attach, _detach = otel_context.attach, otel_context.detach
_get_current_span, _set_span_in_context = trace.get_current_span, trace.set_span_in_context
_peek = _runtime.peek
_lock = threading.Lock()
_tracer: Optional[Tracer] = None
_provider: Optional[TracerProvider] = None
# Spans of the tasks running now (beforeunload / unload mark them). Added and popped
# without a lock (single dict operations are atomic): whoever pops a span ends it.
_running: Dict[Span, None] = {}
_worker: Optional[Tuple[int, Span]] = None  # (pid, the edgesync.worker span of this instance)


def instrument(tracer_provider: Optional[TracerProvider] = None) -> None:
    """Trace every background task accepted from now on, in this process and its forks.

    ``tracer_provider`` defaults to the global one (``trace.set_tracer_provider``),
    looked up when each span starts, so a provider set later (gunicorn's
    ``post_fork`` hook, the usual place: its exporter threads must start after the
    fork) is the one used. Calling it again changes only the provider. Call it at
    import time of the app, or in a gunicorn hook; ``uninstrument()`` undoes it.
    """
    global _tracer, _provider
    with _lock:
        _provider = tracer_provider
        _tracer = trace.get_tracer(SCOPE, _version(), tracer_provider=tracer_provider)
    _runtime.add_task_hook(_task_hook)
    _events.add_event_listener(_events.BEFOREUNLOAD, _on_beforeunload)
    _events.add_event_listener(_events.UNLOAD, _on_unload)
    _durable.tracing = _DurableTracing()


def uninstrument() -> None:
    """Stop tracing tasks accepted from now on (tasks already accepted keep their spans)."""
    global _tracer
    _runtime.remove_task_hook(_task_hook)
    _events.remove_event_listener(_events.BEFOREUNLOAD, _on_beforeunload)
    _events.remove_event_listener(_events.UNLOAD, _on_unload)
    _durable.tracing = None
    with _lock:
        _tracer = None


def instrumented() -> bool:
    """Whether ``instrument()`` is in effect."""
    return _tracer is not None


def _version() -> str:
    from . import __version__
    return __version__


# -- the task span ---------------------------------------------------------------------

def _task_hook(fn: Callable[..., Any], ctx: Any) -> Tuple[Callable[..., Any], Any]:
    tracer = _tracer
    if tracer is None:
        return fn, ctx
    # A partial, not a closure: nothing compiled per task. The tracer is bound now, so
    # a task accepted before uninstrument() keeps its span.
    return partial(_run_in_span, tracer, fn), ctx


def _current_task() -> Tuple[Any, Any]:
    """(pool Task, Invocation) of the task running on this thread, or (None, None)."""
    rt = _runtime.peek()
    inv = None if rt is None else rt.tracker.slot().current
    return (None if inv is None else inv.task), inv


_LINK_ATTRIBUTES = {"edgesync.link": "wait_until"}


def _run_in_span(tracer: Tracer, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # Runs on the task's thread, inside the task's copy of the caller's context: the
    # current span there is the one that called wait_until. (_current_task, inlined: per task.)
    rt = _peek()
    inv = None if rt is None else rt.tracker.slot().current
    task = None if inv is None else inv.task
    if task is None:
        # Not a task of an edgesync runtime: a handed-off durable task on an RQ or Celery worker,
        # which runs the task hooks too. Its span is the durable trace's (``_DurableTracing.run``),
        # named after the task and linked to the request that accepted it.
        return fn(*args, **kwargs)
    name = task.name
    # An explicitly empty parent: a root span, never a child of the (ended) request span.
    span = tracer.start_span("edgesync.task " + name, context=_EMPTY, kind=SpanKind.CONSUMER)
    # The sampler decided in start_span, on the name (which carries the task's name), the kind
    # and the empty parent. A span that does not record takes no attributes, link, events or
    # status: none are built. One that does gets them in one call each (one lock, one pass),
    # which costs the SDK what passing them to start_span would.
    recording = span.is_recording()
    if recording:
        span.set_attributes({"messaging.system": "edgesync", "messaging.operation.type": "process",
                             TASK_NAME: name, TASK_ATTEMPT: 1, TASK_ID: task.id,
                             TASK_QUEUED_S: round(task.started - task.accepted, 6)})
        caller = _get_current_span().get_span_context()  # still the caller's: attached below
        if caller.is_valid:
            span.add_link(caller, _LINK_ATTRIBUTES)
        _running[span] = None  # whoever pops it ends it: this thread, or the unload listener
    # Current even when the sampler dropped it: the task's own spans are its children (and follow
    # its sampling decision), never the finished request's.
    token = _attach(_set_span_in_context(span, _EMPTY))
    outcome = "completed"
    try:
        result = fn(*args, **kwargs)
        if result is not None and type(result) not in NOT_AWAITABLE and inspect.isawaitable(result):
            result = run_awaitable(result)  # inside the span, not after it ended
        return result
    except InvocationCancelled as exc:
        outcome = "cancelled"
        if recording:
            verdict = getattr(inv, "verdict", None)
            reason = getattr(verdict, "reason", "unknown")
            span.set_attribute(TASK_CANCELLED_BY, reason)
            # The exception raised in the thread carries no message; the verdict has it.
            span.add_event("edgesync.cancelled", {REASON: reason,
                                                  "exception.message": getattr(verdict, "message", str(exc))})
            span.set_status(Status(StatusCode.ERROR, "cancelled by the %s limit" % reason))
        raise
    # why BaseException: the task's own exception, recorded, then raised on unchanged.
    except BaseException as exc:
        outcome = "failed"
        if recording:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "%s: %s" % (type(exc).__name__, exc)))
        raise
    finally:
        _end(span, outcome, token, recording)


def _end(span: Span, outcome: str, token: object, recording: bool) -> None:
    # A cancellation may be delivered while this runs (a limit racing the task's end):
    # each step is retried until done, so the span is still exported, once.
    detached = ended = False
    while not ended:
        try:
            if not detached:
                _detach(token)  # type: ignore[arg-type]
                detached = True
            if recording and _running.pop(span, _GONE) is not _GONE:  # atomic: not ended by unload
                span.set_attribute(TASK_OUTCOME, outcome)
                span.end()
            ended = True
        except InvocationCancelled:
            continue


_GONE = object()
_EMPTY = otel_context.Context()


# -- instance events ---------------------------------------------------------------------

def _worker_span() -> Optional[Span]:
    """This instance's ``edgesync.worker`` span, started (back-dated to when it began serving) on first use."""
    global _worker
    tracer = _tracer
    rt = _runtime.peek()
    if tracer is None or rt is None:
        return None
    pid = os.getpid()
    with _lock:
        if _worker is None or _worker[0] != pid:
            began = time.time_ns() - int((time.monotonic() - rt.started) * 1e9)
            span = tracer.start_span("edgesync.worker", context=otel_context.Context(), start_time=began,
                                     attributes={"process.pid": pid, "edgesync.policy": rt.settings.policy})
            _worker = (pid, span)
        return _worker[1]


def _on_beforeunload(event: BeforeUnloadEvent) -> None:
    attributes: Dict[str, Any] = {REASON: event.reason, "edgesync.pending_tasks": len(event.pending_tasks)}
    if event.time_remaining is not None:
        attributes["edgesync.time_remaining_s"] = round(event.time_remaining, 3)
    for span in _snapshot():
        span.add_event("edgesync.beforeunload", attributes)
    worker = _worker_span()
    if worker is not None:
        worker.add_event("edgesync.beforeunload", attributes)


def _on_unload(event: UnloadEvent) -> None:
    global _worker
    abandoned = [t.id for t in event.abandoned_tasks]
    attributes: Dict[str, Any] = {REASON: event.reason, "edgesync.abandoned_tasks": len(abandoned)}
    # Tasks still running are abandoned: their threads never end before the process
    # does, so their spans end here, or never reach the exporter.
    running = [s for s in list(_running) if _running.pop(s, _GONE) is not _GONE]
    for span in running:
        span.add_event("edgesync.unload", attributes)
        span.set_attribute(TASK_OUTCOME, "abandoned")
        span.set_status(Status(StatusCode.ERROR, "abandoned: the instance unloaded (%s)" % event.reason))
        span.end()
    worker = _worker_span()
    if worker is not None:
        rt = _runtime.peek()
        if rt is not None:
            m = rt.metrics()
            worker.set_attributes({
                "edgesync.requests": m["requests"], "edgesync.tasks.completed": m["tasks"]["completed"],
                "edgesync.tasks.failed": m["tasks"]["failed"],
                "edgesync.invocations_cancelled": m["invocations_cancelled"],
                "edgesync.retire_reason": m["retire_reason"] or "",
                "edgesync.terminate_reason": m["terminate_reason"] or ""})
            if m["boot_cpu_s"] is not None:
                worker.set_attribute("edgesync.boot_cpu_s", m["boot_cpu_s"])
        worker.add_event("edgesync.unload", dict(attributes, **{"edgesync.abandoned_task_ids": abandoned}))
        worker.end()
        with _lock:
            _worker = None
    # The process exits next, maybe without atexit (a hard limit): hand the spans to the
    # exporter now, within the unload listeners' budget.
    provider = _provider or trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is not None:
        flush(300)


def _snapshot() -> List[Span]:
    return list(_running)


# -- durable tasks: the caller's trace context, carried in the task's record ------------

class _DurableTracing:
    """``_durable.tracing``: what a durable task's record carries, and the span of its re-run."""

    def carrier(self) -> Optional[Dict[str, str]]:
        """The calling span's W3C trace context (``traceparent``), if there is a valid one."""
        carrier: Dict[str, str] = {}
        _propagator.inject(carrier)  # writes nothing when the current span context is not valid
        return carrier or None

    @contextmanager
    def run(self, carrier: Dict[str, str], attempt: int, name: str) -> Iterator[None]:
        """Around a run of a durable task: link its span to the trace that created it.

        On an edgesync worker the task span exists already (the task hook): it gains
        the link. Elsewhere (an RQ worker) a task span is started here.
        """
        origin = _origin(carrier)
        current = trace.get_current_span()
        if current.is_recording() and current in _running:
            current.set_attribute(TASK_ATTEMPT, attempt)
            # A first run in the process that accepted it links to its caller already.
            if origin is not None and all(link.context != origin for link in getattr(current, "links", ())):
                current.add_link(origin, {"edgesync.link": "durable_origin"})
            yield
            return
        if not current.is_recording() and current.get_span_context().is_valid and _current_task()[0] is not None:
            # The task hook's span, which the sampler dropped: no second span for the same run.
            yield
            return
        tracer = _tracer
        if tracer is None:
            yield
            return
        links = [] if origin is None else [Link(origin, {"edgesync.link": "durable_origin"})]
        # The task runs outside an edgesync runtime (a job on an RQ worker): its own span.
        with tracer.start_as_current_span("edgesync.task " + name.replace(":", "."), context=otel_context.Context(),
                                          kind=SpanKind.CONSUMER, links=links,
                                          attributes={"messaging.system": "edgesync", TASK_ATTEMPT: attempt,
                                                      TASK_NAME: name.replace(":", ".")}):
            yield


def _origin(carrier: Dict[str, str]) -> Optional[SpanContext]:
    try:
        ctx = _propagator.extract(carrier)
    except Exception:  # a record written by another version: no link rather than no run
        return None
    origin = trace.get_current_span(ctx).get_span_context()
    return origin if origin.is_valid else None
