"""A plain WSGI app traced with the real OpenTelemetry SDK, and edgesync.otel on.

Every span ends up as one JSON line in ``$SPANS_FILE``: the exporter below is the
SDK's own ``SpanExporter`` interface, behind the SDK's ``SimpleSpanProcessor``
(exported as each span ends; one ``os.write`` per line on an O_APPEND descriptor,
so the lines of several workers never interleave). The provider is set at import,
which happens in each worker after its fork (no ``--preload``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Iterable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

import edgesync
import edgesync.otel

from ._util import query, record
from ._util import text as _text


def _hex(value: int, width: int) -> str:
    return format(value, "0%dx" % width)


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            assert ctx is not None
            lines.append(json.dumps({
                "name": s.name, "pid": os.getpid(),
                "trace_id": _hex(ctx.trace_id, 32), "span_id": _hex(ctx.span_id, 16),
                "parent": None if s.parent is None else _hex(s.parent.span_id, 16),
                "kind": s.kind.name, "status": s.status.status_code.name,
                "start": s.start_time, "end": s.end_time,
                "attributes": dict(s.attributes or {}),
                "links": [{"trace_id": _hex(link.context.trace_id, 32), "span_id": _hex(link.context.span_id, 16),
                           "attributes": dict(link.attributes or {})} for link in s.links],
                "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events],
            }))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(line + "\n" for line in lines).encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class DropTaskSpans(Sampler):
    """Drops every root span named ``edgesync.task ...`` started without links (the task hook's), samples
    the other roots (a durable task's own span, started with the link to its origin, would be sampled)."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None, attributes: Any = None,
                      links: Any = None, trace_state: Any = None) -> SamplingResult:
        drop = name.startswith("edgesync.task ") and not links
        return SamplingResult(Decision.DROP, None) if drop else SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "DropTaskSpans"


# OTEL_TEST_DROP_TASKS=1: task spans are sampled out; every other span follows its parent.
provider = TracerProvider(sampler=ParentBased(DropTaskSpans()) if os.environ.get("OTEL_TEST_DROP_TASKS") else None)
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["SPANS_FILE"])))
trace.set_tracer_provider(provider)
edgesync.otel.instrument()
tracer = trace.get_tracer("tests.apps.otel")


def work(tag: str, seconds: float) -> str:
    record(type="task_start", id=tag)
    time.sleep(seconds)
    with tracer.start_as_current_span("inner " + tag):
        pass
    record(type="task_done", id=tag)
    return tag


@edgesync.durable
def durable_work(tag: str, first: float) -> None:
    """Sleeps ``first`` s on its first attempt only."""
    attempt = edgesync.current_attempt()
    record(type="durable_start", id=tag, attempt=attempt)
    time.sleep(first if attempt == 1 else 0)
    record(type="durable_done", id=tag, attempt=attempt)


def burn(tag: str) -> None:
    record(type="task_start", id=tag)
    x = 0
    while True:
        x += 1


def fail(tag: str) -> None:
    raise ValueError("boom " + tag)


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    q = query(environ)
    tag = q.get("id", "t")
    # The app's own request span, as an instrumentation library would start it.
    with tracer.start_as_current_span("GET " + path, kind=trace.SpanKind.SERVER,
                                      attributes={"test.id": tag}):
        if path == "/bg":
            fut = edgesync.wait_until(work, tag, float(q.get("sleep", "0.2")))
            return _text(start_response, edgesync.task_id(fut))
        if path == "/durable":
            edgesync.wait_until(durable_work, tag, float(q.get("sleep", "0")))
            return _text(start_response, "kept")
        if path == "/burn":
            edgesync.wait_until(burn, tag)
            return _text(start_response, "burning")
        if path == "/fail":
            edgesync.wait_until(fail, tag)
            return _text(start_response, "failing")
        if path == "/hello":
            return _text(start_response, "hello")
        if path == "/pid":
            return _text(start_response, str(os.getpid()))
        return _text(start_response, "not found", "404 Not Found")
