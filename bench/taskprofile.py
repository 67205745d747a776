"""Where scenario 4's task throughput goes, for one side: context switches, CPU, or a cProfile.

    python bench/taskprofile.py rusage es|tpe [--runs 30] [--no-collect]   # per task: context switches, CPU
    python bench/taskprofile.py cprofile es|tpe [--tasks 20000] [--top 14]

The same work as ``bench/micro.py throughput`` (runs of 2,000 no-op tasks submitted then
waited for, 8 pool threads), one side per process, so that nothing of the other side runs:

- ``rusage``: after a warm-up, ``--runs`` runs, each after a ``gc.collect()`` (unless
  ``--no-collect``, as scenario 4 was before it collected); prints the median tasks per
  second and, per task, the process's voluntary and involuntary context switches and its
  CPU time (user + system, every thread). A pool whose threads block on a lock shows in
  the voluntary switches.
- ``cprofile``: a ``cProfile`` of every thread (the pool's threads are started under
  ``threading.setprofile``, which hands each its own profiler), summed with ``pstats``;
  prints the top functions by own time and the calls per task. Times of blocking calls
  (``SimpleQueue.get``, lock acquires) move with the machine's load; call counts do not.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import statistics
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgesync
from bench import micro
from edgesync import testing

TASKS = 2000


def _sides(ex: ThreadPoolExecutor) -> Any:
    wait_until = edgesync.wait_until
    return {"es": lambda: wait_until(micro._noop), "tpe": lambda: ex.submit(micro._noop)}


def rusage(side: str, runs: int, collect: bool) -> None:
    with testing.runtime(background_threads=8, max_pending_tasks=micro.BIG), ThreadPoolExecutor(8) as ex:
        submit: Callable[[], Future[Any]] = _sides(ex)[side]
        micro._drain(submit, TASKS)  # warm-up: every thread started
        rates = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(runs):
            if collect:
                gc.collect()
            rates.append(micro._drain(submit, TASKS))
        after = resource.getrusage(resource.RUSAGE_SELF)
    n = TASKS * runs
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
    print("%s: %.0f tasks/s (median of %d runs); per task: %.3f voluntary and %.3f involuntary context "
          "switches, %.2f us CPU" % (side, statistics.median(rates), runs, (after.ru_nvcsw - before.ru_nvcsw) / n,
                                     (after.ru_nivcsw - before.ru_nivcsw) / n, cpu * 1e6))


def profile(side: str, tasks: int, top: int) -> None:
    # Imported here, once this directory is off sys.path: its profile.py would shadow the
    # standard library's, which cProfile imports.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]
    import cProfile
    import pstats

    profiles: List[cProfile.Profile] = []
    lock = threading.Lock()

    def start(frame: Any, event: str, arg: Any) -> None:  # the first event of each new thread
        p = cProfile.Profile()
        with lock:
            profiles.append(p)
        p.enable()  # replaces this function as the thread's profiler

    main = cProfile.Profile()
    threading.setprofile(start)
    try:
        with testing.runtime(background_threads=8, max_pending_tasks=micro.BIG), ThreadPoolExecutor(8) as ex:
            submit: Callable[[], Future[Any]] = _sides(ex)[side]
            micro._drain(submit, TASKS)  # warm-up (the pool threads' profiles include it)
            main.enable()
            for _ in range(tasks // TASKS):
                micro._drain(submit, TASKS)
            main.disable()
    finally:
        threading.setprofile(None)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, p in enumerate(profiles + [main]):
            files.append(os.path.join(tmp, "%d.prof" % i))
            p.dump_stats(files[-1])
        out = io.StringIO()
        stats = pstats.Stats(*files, stream=out)
        calls = stats.total_calls  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(top)
    ran = tasks // TASKS * TASKS + TASKS
    print("%s: %d calls for %d tasks (warm-up included), %.1f per task" % (side, calls, ran, calls / ran))
    text = out.getvalue()
    print(text[text.index("function calls"):].split("\n", 1)[1].strip("\n"))  # (not the files' lines)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("rusage", "cprofile"))
    p.add_argument("side", choices=("es", "tpe"))
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-collect", action="store_true", help="no gc.collect() before each run")
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--top", type=int, default=14)
    a = p.parse_args(argv)
    if a.what == "rusage":
        rusage(a.side, a.runs, not a.no_collect)
    else:
        profile(a.side, a.tasks, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
