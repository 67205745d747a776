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
from typing import Sequence

from bench.apps.flask_app import app

__all__ = ["app"]

if os.environ.get("BENCH_OTEL"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    import edgesync.otel

    class _Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=TraceIdRatioBased(float(os.environ["BENCH_OTEL"])))
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    trace.set_tracer_provider(provider)
    edgesync.otel.instrument()
