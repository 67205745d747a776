"""What one task costs with edgesync.otel, against the floors the OpenTelemetry SDK sets.

    python bench/otel_floors.py [--n 20000] [--repeat 5]      # CPU us per call
    python bench/otel_floors.py --callgrind [--n 2000]        # instructions per call (valgrind)

Each row is the cost of one call of an operation, measured on the calling thread only:
``time.thread_time`` (best of ``--repeat`` runs of ``--n`` calls), or with ``--callgrind``
the instructions valgrind counts on the main thread (``--separate-threads``: the SDK's
export thread and the runtime's own threads are not counted), the difference between a
run of ``--n`` calls and a run of none. Both stay put when other processes load the
machine; req/s does not (bench/observability.py).

The SDK is set up as bench/apps/observed.py sets it (``make_provider``): a
``TraceIdRatioBased`` sampler at 1 (every span recorded) or 0 (none), a
``BatchSpanProcessor``, an exporter that drops the spans. Rows:

- ``sdk span, recorded``: a bare ``start_span`` + ``end``.
- ``sdk span, recorded, as edgesync's``: the same with the task span's name, kind,
  attributes, link (to a valid caller), outcome, made current and back.
- ``sdk span, not sampled`` (bare), and ``as edgesync's``: started, made current, ended.
- ``make current``: ``set_span_in_context`` + ``attach`` + ``detach``.
- ``carrier()``: the caller's W3C trace context for a durable task's record.
- ``task ...``: ``wait_until(fn)`` in an eager runtime (the task runs inline, on this
  thread, through the pool's whole path), with a recorded request span current: ``off``
  (fn does nothing, no edgesync.otel); ``off + sdk span in the task`` (fn makes the span
  of the row above itself: the SDK's floor inside a task, in the same process state);
  ``on`` (``edgesync.otel.instrument(provider)``, fn does nothing).

edgesync's own part per task is ``on`` minus ``off + sdk span in the task``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

ROWS = ["sdk span, recorded", "sdk span, recorded, as edgesync's", "sdk span, not sampled",
        "sdk span, not sampled, as edgesync's", "make current", "carrier()",
        "task, off", "task, off + sdk span in the task (recorded)", "task, on, every span recorded",
        "task, off + sdk span in the task (not sampled)", "task, on, every span dropped"]


def operations() -> Dict[str, Tuple[Callable[[], Any], Callable[[], Any]]]:
    """Each row: (setup, returning the call to repeat; teardown)."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    import edgesync
    import edgesync.otel
    from bench.apps.observed import make_provider
    from edgesync import testing

    recorded, dropped = make_provider(1.0), make_provider(0.0)
    tracers = {1: recorded.get_tracer("edgesync"), 0: dropped.get_tracer("edgesync")}
    empty = otel_context.Context()
    request = tracers[1].start_span("GET /task")
    request_context = trace.set_span_in_context(request)
    caller = request.get_span_context()
    link_attributes = {"edgesync.link": "wait_until"}

    def bare(ratio: int) -> Callable[[], None]:
        tracer = tracers[ratio]
        return lambda: tracer.start_span("edgesync.task bench.x", context=empty).end()

    def as_edgesync(ratio: int) -> Callable[[], None]:
        tracer = tracers[ratio]

        def span() -> None:
            s = tracer.start_span("edgesync.task bench.x", context=empty, kind=SpanKind.CONSUMER)
            if s.is_recording():
                s.set_attributes({"messaging.system": "edgesync", "messaging.operation.type": "process",
                                  "edgesync.task.name": "bench.x", "edgesync.task.attempt": 1,
                                  "edgesync.task.id": "%d-%d" % (1234, 5), "edgesync.task.queued_s": 1e-5})
                s.add_link(caller, link_attributes)
            token = otel_context.attach(trace.set_span_in_context(s, empty))
            otel_context.detach(token)
            if s.is_recording():
                s.set_attribute("edgesync.task.outcome", "completed")
                s.end()
        return span

    def make_current() -> None:
        otel_context.detach(otel_context.attach(trace.set_span_in_context(request, empty)))

    tracing = edgesync.otel._DurableTracing()

    def noop() -> None:
        return None

    state: Dict[str, Any] = {}

    def task(fn: Callable[[], None], provider: Any) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            if provider is not None:
                edgesync.otel.instrument(provider)
            state["rt"] = testing.runtime(eager=True)
            state["rt"].__enter__()
            state["token"] = otel_context.attach(request_context)
            return lambda: edgesync.wait_until(fn)
        return setup

    def teardown() -> None:
        otel_context.detach(state.pop("token"))
        state.pop("rt").__exit__(None, None, None)
        edgesync.otel.uninstrument()

    def with_request(call: Callable[[], Any]) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            state["token"] = otel_context.attach(request_context)
            return call
        return setup

    def detach() -> None:
        otel_context.detach(state.pop("token"))

    def plain(call: Callable[[], Any]) -> Callable[[], Callable[[], Any]]:
        return lambda: call

    def nothing() -> None:
        return None

    return {
        ROWS[0]: (plain(bare(1)), nothing),
        ROWS[1]: (plain(as_edgesync(1)), nothing),
        ROWS[2]: (plain(bare(0)), nothing),
        ROWS[3]: (plain(as_edgesync(0)), nothing),
        ROWS[4]: (plain(make_current), nothing),
        ROWS[5]: (with_request(tracing.carrier), detach),
        ROWS[6]: (task(noop, None), teardown),
        ROWS[7]: (task(as_edgesync(1), None), teardown),
        ROWS[8]: (task(noop, recorded), teardown),
        ROWS[9]: (task(as_edgesync(0), None), teardown),
        ROWS[10]: (task(noop, dropped), teardown),
    }


def timed(row: str, n: int, repeat: int) -> float:
    """CPU us of this thread per call of ``row``: best of ``repeat`` runs of ``n``."""
    setup, teardown = operations()[row]
    call = setup()
    try:
        for _ in range(n // 10):  # warm up
            call()
        best = float("inf")
        for _ in range(repeat):
            t = time.thread_time()
            for _ in range(n):
                call()
            best = min(best, (time.thread_time() - t) / n)
        return best * 1e6
    finally:
        teardown()


def child(row: str, n: int) -> None:
    setup, teardown = operations()[row]
    call = setup()
    for _ in range(200):  # warm up (the same in both runs)
        call()
    for _ in range(n):
        call()
    teardown()


def main_thread_instructions(row: str, n: int) -> int:
    return harness.main_thread_instructions([__file__, "--child", str(ROWS.index(row)), str(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="calls per run (20000; 2000 with --callgrind)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead of timing")
    parser.add_argument("--rows", help="comma-separated row numbers (0-%d) to measure; default all" % (len(ROWS) - 1))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(ROWS[int(args.child[0])], int(args.child[1]))
        return
    n = args.n or (2000 if args.callgrind else 20000)
    results: List[Tuple[str, float]] = []
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    for row in rows:
        if args.callgrind:
            value = (main_thread_instructions(row, n) - main_thread_instructions(row, 0)) / n
        else:
            value = timed(row, n, args.repeat)
        results.append((row, value))
        print("%s: %.2f" % (row, value), file=sys.stderr, flush=True)
    unit = "instructions" if args.callgrind else "CPU us (thread)"
    print("| operation | %s per call |" % unit)
    print("|---|---|")
    for row, value in results:
        print("| %s | %s |" % (row, f"{value:,.0f}" if args.callgrind else "%.2f" % value))
    got = dict(results)
    for label, on, floor in (("recorded", ROWS[8], ROWS[7]), ("dropped", ROWS[10], ROWS[9])):
        if on not in got or floor not in got:
            continue
        print("edgesync's own part per task, every span %s: %+.2f (on %.2f - off with the sdk span in the task %.2f)"
              % (label, got[on] - got[floor], got[on], got[floor]))


if __name__ == "__main__":
    main()
