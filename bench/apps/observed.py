"""The benchmark Flask app (``bench.apps.flask_app``) with edgesync.otel on, for bench/observability.py.

``BENCH_OTEL=<ratio>`` (1 = every trace): the OpenTelemetry SDK with a
``BatchSpanProcessor`` whose exporter drops the spans (what edgesync adds is the span
per task and its processing, not the network of a collector), a
``TraceIdRatioBased(ratio)`` sampler, and ``edgesync.otel.instrument()``. Configured at import, in
each worker after its fork (no ``--preload``), as OpenTelemetry asks of gunicorn apps.
Prometheus needs nothing here: ``PROMETHEUS_MULTIPROC_DIR`` in the server's
environment turns edgesync.prometheus on.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from bench.apps.flask_app import app

__all__ = ["app", "make_provider"]


def make_provider(ratio: float) -> Any:
    """The SDK as these benchmarks configure it: a ``TraceIdRatioBased(ratio)`` sampler, a
    ``BatchSpanProcessor`` and an exporter that drops the spans (bench/otel_floors.py uses it too)."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    class _Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=TraceIdRatioBased(ratio))
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    return provider


if os.environ.get("BENCH_OTEL"):
    from opentelemetry import trace

    import edgesync.otel

    trace.set_tracer_provider(make_provider(float(os.environ["BENCH_OTEL"])))
    edgesync.otel.instrument()
