"""The cost of the observability extras, side by side: edgesync.otel and edgesync.prometheus.

``python bench/observability.py [--rounds 5] [--seconds 5]`` prints a Markdown table and one JSON line.

Each pair runs two gunicorn servers (1 edgesync worker, 4 threads, the bench Flask app) at once on
core 0, each loaded by its own ``wrk -c8`` on core 1 (``bench/harness.py``: the two start together,
which one first alternates per round), for ``--seconds`` per round, on ``/hello`` and on ``/task``
(the view that hands a light task to ``wait_until``):

- ``otel``: off = no OpenTelemetry at all; on = the SDK with a ``BatchSpanProcessor`` (exporter that
  drops the spans) and ``edgesync.otel.instrument()`` (``bench/apps/observed.py``): a span per task.
- ``otel10``: the same with a ``TraceIdRatioBased(0.1)`` sampler: one task in ten recorded.
- ``otel100`` and ``otel0`` (not run by default): ``TraceIdRatioBased(0.01)`` and ``(0)``: one
  task span in a hundred recorded, and none (what a task span the sampler drops costs).
- ``prometheus``: off = no ``PROMETHEUS_MULTIPROC_DIR``; on = set to a fresh directory, so
  edgesync.prometheus mirrors the worker's figures at each heartbeat and compacts dead files.

The table shows, per pair and path, the median over rounds of on / off req/s and p99.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import Load, Server

APP = "bench.apps.observed:app"
PATHS = ("/hello", "/task")
OTEL_RATIOS = {"otel": "1", "otel10": "0.1", "otel100": "0.01", "otel0": "0"}


def pair(name: str, logdir: Path) -> List[Server]:
    off = Server(name + "-off", "edgesync.Worker", logdir, app=APP)
    if name.startswith("otel"):
        ratio = OTEL_RATIOS[name]
        on = Server(name + "-on", "edgesync.Worker", logdir, app=APP, env={"BENCH_OTEL": ratio})
    else:
        metrics = logdir / "prometheus-multiproc"
        metrics.mkdir()
        on = Server(name + "-on", "edgesync.Worker", logdir, app=APP,
                    env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)})
    return [off, on]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--pairs", default="otel,otel10,prometheus",
                        help="comma-separated: otel, otel10, otel100, otel0, prometheus")
    args = parser.parse_args()
    harness.ensure_wrk()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    results: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="edgesync-bench-obs-") as tmp:
            for name in args.pairs.split(","):
                servers = [s.start() for s in pair(name, Path(tmp))]
                results[name] = {}
                for path in PATHS:
                    cell: Dict[str, List[float]] = {"rps": [], "p99": [], "off_rps": []}
                    harness.side_by_side([Load("off", servers[0], path), Load("on", servers[1], path)],
                                         2, args.connections, 1)  # warm-up
                    for r in range(args.rounds):
                        off, on = harness.side_by_side(
                            [Load("off", servers[0], path), Load("on", servers[1], path)],
                            args.seconds, args.connections, 1, first=r % 2)
                        if off.failed or on.failed:
                            raise harness.BenchError("failed requests: off %s, on %s" % (off.brief(), on.brief()))
                        cell["rps"].append(on.rps / off.rps)
                        cell["p99"].append(on.p99 / off.p99)
                        cell["off_rps"].append(off.rps)
                        print("%s %s round %d: off %s | on %s" % (name, path, r + 1, off.brief(), on.brief()),
                              file=sys.stderr)
                    results[name][path] = cell
                for s in servers:
                    s.stop()
    finally:
        harness.cleanup()
    print("| extra | view | on / off req/s (median) | rounds | on / off p99 (median) | off req/s (median) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, by_path in results.items():
        for path, cell in by_path.items():
            rps, p99 = statistics.median(cell["rps"]), statistics.median(cell["p99"])
            print("| %s | %s | %.3fx | %s | %.2fx | %.0f |" % (
                name, path, rps, " ".join("%.3f" % x for x in cell["rps"]), p99, statistics.median(cell["off_rps"])))
            summary["%s %s" % (name, path)] = {"rps_ratio": round(rps, 4), "p99_ratio": round(p99, 3)}
    print()
    print("Machine: %s" % json.dumps(harness.machine()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
