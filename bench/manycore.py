"""The many-core comparison: N workers x 4 threads per server, each server on cores of its own.

    bench/manycore.sh                                   # 6 workers, wrk -c64, 3 rounds x 10 s: under 5 minutes
    bench/manycore.sh --workers 2 --seconds 3 --rounds 2  # a smoke run
    bench/manycore.sh --before /tmp/main                # also this tree against another checkout's edgesync

Side by side (bench/harness.py), each comparison with its two servers loaded at once:

1. ``/bg`` against ``/bg_tpe``: the same view handing a trivial task (``return n``) to
   ``edgesync.wait_until``, and to a plain ``ThreadPoolExecutor(8)``; both servers
   ``edgesync.Worker`` at gunicorn's default log level (``info``).
2. ``/hello``: ``edgesync.Worker`` against gunicorn's ``gthread``.
3. With ``--app-context``: ``/bg`` against ``/bg_tpe_app``, the executor's task inside
   ``app.app_context()`` (as Flask-Executor runs it, and as ``wait_until`` runs a task
   scheduled in a Flask request: ``edgesync._context``).
4. With ``--before TREE`` (a checkout holding ``edgesync/`` and ``bench/``): ``/bg`` of this
   tree against ``/bg`` of that one, and ``/hello`` likewise.

Cores: with at least 2 x workers + 2 cores, server A gets cores 0..w-1, server B
the next w, and the two wrk (``-t2`` each) the rest; with fewer (a 2-core
machine), both servers share core 0 and wrk runs on core 1 (``-t1``). It prints
every round and, last, one line per comparison: the median of the per-round
req/s, p50 and p99 ratios (A / B). Nothing is installed: ``$WRK`` names the wrk
binary (else ``wrk`` on PATH); the Python running this needs Flask, gunicorn and
psutil. Exit status 0 when every comparison ran, 2 on a setup error.

On a machine where nothing can be installed (tried here with a bare Python 3.12):
wheels of flask, gunicorn, blinker, itsdangerous, werkzeug, jinja2, markupsafe,
click, packaging and psutil installed with ``pip install --no-index --no-deps
--target DIR``, then ``PYTHON=python3 PYTHONPATH=DIR WRK=carried/wrk
bench/manycore.sh``, with ``libluajit-5.1.so.2`` carried beside that wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import BenchError, Cpus, Load, PairRound, Server, compare, median


def layout(workers: int) -> Tuple[Cpus, Cpus, Cpus, int, str]:
    """(server A's cores, server B's, wrk's, wrk threads, a description)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 * workers + 2:
        a, b, rest = cpus[:workers], cpus[workers:2 * workers], cpus[2 * workers:]
        join = ",".join
        return (join(map(str, a)), join(map(str, b)), join(map(str, rest)), min(2, len(rest)),
                "server A on cores %s, server B on %s, wrk on %s" % (join(map(str, a)), join(map(str, b)),
                                                                     join(map(str, rest))))
    if len(cpus) < 2:
        raise BenchError("this needs at least 2 cores (allowed: %s)" % cpus)
    return (cpus[0], cpus[0], cpus[1], 1,
            "%d cores only: both servers share core %d, wrk on core %d" % (len(cpus), cpus[0], cpus[1]))


def check_setup() -> None:
    missing = [m for m in ("flask", "gunicorn", "psutil") if not _importable(m)]
    if missing:
        raise BenchError("%s cannot import %s: run this with a Python that has them (bench/manycore.sh "
                         "uses $PYTHON, else .venv/bin/python)" % (sys.executable, ", ".join(missing)))
    wrk = shutil.which(harness.WRK)
    if wrk is None:
        raise BenchError("no wrk binary: set WRK=/path/to/wrk (its directory is added to LD_LIBRARY_PATH "
                         "by bench/manycore.sh, for a carried libluajit) or put wrk on PATH")
    probe = subprocess.run([wrk, "--version"], capture_output=True, text=True)
    if "wrk" not in probe.stdout + probe.stderr:
        raise BenchError("%s does not run here: %s" % (wrk, (probe.stdout + probe.stderr).strip()[:500]))
    if not shutil.which("taskset"):
        raise BenchError("taskset is missing (util-linux): the servers cannot be given their cores")
    pinned = subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0))), "true"], capture_output=True,
                            text=True)
    if pinned.returncode != 0:
        raise BenchError("taskset cannot pin a process here: %s" % (pinned.stderr.strip()[:500]))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def summary(label: str, rounds: List[PairRound]) -> str:
    rps = median([r.ratio("rps") for r in rounds])
    p50 = median([r.ratio("p50") for r in rounds])
    p99 = median([r.ratio("p99") for r in rounds])
    every = " ".join("%.3f" % r.ratio("rps") for r in rounds)
    a = median([r.a.rps for r in rounds])
    b = median([r.b.rps for r in rounds])
    return ("%-52s req/s %.3fx (rounds %s; %.0f vs %.0f req/s), p50 %.2fx, p99 %.2fx"
            % (label, rps, every, a, b, p50, p99))


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/manycore.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=6, help="gunicorn workers per server (default 6)")
    p.add_argument("--threads", type=int, default=4, help="gunicorn --threads (default 4)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections per server (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per comparison (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load per round (default 10)")
    p.add_argument("--before", type=Path, help="another checkout (edgesync/ and bench/) to compare against")
    p.add_argument("--only", choices=("bg", "hello"), help="run one comparison (and its --before twin)")
    p.add_argument("--app-context", action="store_true",
                   help="also /bg against /bg_tpe_app: the executor's task in app.app_context(), as "
                        "Flask-Executor runs it and as wait_until runs a task scheduled in a Flask request")
    a = p.parse_args(argv)
    if a.before is not None and not (a.before / "edgesync" / "__init__.py").exists():
        p.error("--before %s: no edgesync/__init__.py there" % a.before)
    if a.before is not None and not (a.before / "bench" / "apps" / "flask_app.py").exists():
        p.error("--before %s: no bench/apps/flask_app.py there (copy this tree's bench/ into it)" % a.before)
    logdir = Path(__file__).resolve().parent / "results" / ("manycore-" + time.strftime("%Y%m%d-%H%M%S"))
    logdir.mkdir(parents=True, exist_ok=True)
    lines: List[str] = []
    t0 = time.monotonic()
    try:
        check_setup()
        cpu_a, cpu_b, cpu_wrk, wrk_threads, where = layout(a.workers)
        print("manycore: %d workers x %d threads per server, wrk -t%d -c%d, %d rounds x %gs; %s"
              % (a.workers, a.threads, wrk_threads, a.connections, a.rounds, a.seconds, where), flush=True)
        for k, v in harness.machine().items():
            print("  %s: %s" % (k, v))
        print("  logs: %s" % logdir, flush=True)

        def server(name: str, cpu: Cpus, worker: str = "edgesync.Worker", root: Optional[Path] = None) -> Server:
            return Server(name, worker, logdir, threads=a.threads, workers=a.workers, cpu=cpu,
                          root=root or harness.REPO)

        def run(label: str, sa: Server, pa: str, sb: Server, pb: str) -> None:
            print("\n%s" % label, flush=True)
            try:
                sa.start()
                sb.start()
                rounds = compare(Load("A", sa, pa), Load("B", sb, pb), rounds=a.rounds, seconds=a.seconds,
                                 connections=a.connections, client_cpu=cpu_wrk, wrk_threads=wrk_threads,
                                 log=lambda s: print(s, flush=True))
            finally:
                sa.stop()
                sb.stop()
            lines.append(summary(label, rounds))

        if a.only in (None, "bg"):
            run("/bg: wait_until / ThreadPoolExecutor(8)", server("bg", cpu_a), "/bg",
                server("bg-tpe", cpu_b), "/bg_tpe")
        if a.app_context:
            run("/bg: wait_until / ThreadPoolExecutor(8) + app context", server("bg", cpu_a), "/bg",
                server("bg-tpe-app", cpu_b), "/bg_tpe_app")
        if a.only in (None, "hello"):
            run("/hello: edgesync.Worker / gthread", server("hello", cpu_a), "/hello",
                server("hello-gthread", cpu_b, "gthread"), "/hello")
        if a.before is not None:
            if a.only in (None, "bg"):
                run("/bg: this tree / --before tree", server("bg-after", cpu_a), "/bg",
                    server("bg-before", cpu_b, root=a.before), "/bg")
            if a.only in (None, "hello"):
                run("/hello: this tree / --before tree", server("hello-after", cpu_a), "/hello",
                    server("hello-before", cpu_b, root=a.before), "/hello")
    except BenchError as exc:
        print("manycore: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server", file=sys.stderr)
        return 130
    finally:
        harness.cleanup()
    print("\n== ratios, A / B: median of %d rounds (req/s higher is better; latency lower) ==" % a.rounds)
    for line in lines:
        print(line)
    print("(%.0f s)" % (time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
