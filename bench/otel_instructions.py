"""Instructions per ``/task`` request with edgesync.otel off and on, counted by valgrind's callgrind.

    python bench/otel_instructions.py [--requests 600]

req/s side by side (bench/observability.py) cannot resolve a few percent on a loaded
machine; an instruction count is the same whatever else the machine does. Each
configuration runs the bench Flask app in-process (Flask's test client, the default
edgesync runtime: tasks on their own threads) twice under callgrind, with 0 and with
``--requests`` requests after 100 warm-up ones, and the difference over the requests is
the cost of one request and its task. Configurations: ``off`` (no OpenTelemetry),
``on1`` (the SDK, every trace sampled, ``edgesync.otel.instrument()``), ``on01`` (a
``TraceIdRatioBased(0.1)`` sampler). Needs ``valgrind``; takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RATIOS = {"off": None, "on1": "1", "on01": "0.1"}


def child(mode: str, n: int) -> None:
    sys.path.insert(0, str(REPO))
    if RATIOS[mode] is not None:
        os.environ["BENCH_OTEL"] = RATIOS[mode]  # type: ignore[assignment]
    from bench.apps.observed import app
    from edgesync import testing

    client = app.test_client()
    with testing.runtime() as rt:
        for _ in range(100):
            client.get("/task")
        rt.runtime.pool.wait_idle(time.monotonic() + 60)
        for _ in range(n):
            client.get("/task")
        rt.runtime.pool.wait_idle(time.monotonic() + 600)


def count(mode: str, n: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          __file__, "--child", mode, str(n)], capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError("callgrind printed no count:\n" + out.stderr[-2000:])
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    per = {}
    for mode in RATIOS:
        per[mode] = (count(mode, args.requests) - count(mode, 0)) / args.requests
    print("| configuration | instructions per /task request | vs off |")
    print("|---|---|---|")
    for mode, value in per.items():
        print("| %s | %.0f | %+.1f%% |" % (mode, value, 100 * (value / per["off"] - 1)))


if __name__ == "__main__":
    main()
