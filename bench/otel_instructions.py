"""Instructions per ``/task`` request with edgesync.otel off and on, counted by valgrind's callgrind.

    python bench/otel_instructions.py [--requests 600] [--modes off,on1,on01,on0]

req/s side by side (bench/observability.py) cannot resolve a few percent on a loaded
machine; an instruction count is the same whatever else the machine does. Each
configuration runs the bench Flask app in-process (Flask's test client) with an eager
edgesync runtime (each task runs inline, on the request's thread, through the pool's
whole path), twice under callgrind, with 0 and with ``--requests`` requests after 100
warm-up ones, and the difference over the requests is the cost of one request and its
task. Only the main thread's instructions are counted (``--separate-threads``): the
runtime's monitor and the SDK's export thread wake on timers, so their counts grow with
how slow the run is, not with the work. Configurations: ``off`` (no OpenTelemetry),
``on1`` (the SDK as bench/apps/observed.py sets it, every trace sampled,
``edgesync.otel.instrument()``), ``on01`` (a ``TraceIdRatioBased(0.1)`` sampler), ``on0``
(``TraceIdRatioBased(0)``: every task span dropped). Needs ``valgrind``; a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RATIOS = {"off": None, "on1": "1", "on01": "0.1", "on0": "0"}


def child(mode: str, n: int) -> None:
    sys.path.insert(0, str(REPO))
    if RATIOS[mode] is not None:
        os.environ["BENCH_OTEL"] = RATIOS[mode]  # type: ignore[assignment]
    from bench.apps.observed import app
    from edgesync import testing

    client = app.test_client()
    with testing.runtime(eager=True):
        for _ in range(100):
            client.get("/task")
        for _ in range(n):
            client.get("/task")


def count(mode: str, n: int) -> int:
    """Instructions of the main thread of a child running ``n`` requests in ``mode``."""
    sys.path.insert(0, str(REPO))
    from bench.harness import main_thread_instructions

    return main_thread_instructions([__file__, "--child", mode, str(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--modes", default=",".join(RATIOS), help="comma-separated: " + ", ".join(RATIOS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    per = {}
    for mode in ["off"] + [m for m in args.modes.split(",") if m != "off"]:
        per[mode] = (count(mode, args.requests) - count(mode, 0)) / args.requests
        print("%s: %.0f" % (mode, per[mode]), file=sys.stderr, flush=True)
    print("| configuration | instructions per /task request | vs off |")
    print("|---|---|---|")
    for mode, value in per.items():
        print("| %s | %.0f | %+.1f%% |" % (mode, value, 100 * (value / per["off"] - 1)))


if __name__ == "__main__":
    main()
