"""In-process microbenchmarks (scenarios 4 and 5b), run in a child process by bench/run.py.

``python bench/micro.py submit|throughput|monitor [options]`` prints one JSON
object. Each runs in a fresh interpreter so that no thread or runtime of another
measurement is alive, and the runner pins it to the server core.

- ``submit``: the cost of one ``edgesync.wait_until(fn)`` against one
  ``ThreadPoolExecutor.submit(fn)`` with the same number of threads. The pools'
  threads are first all blocked on a gate (one blocker task each), so the timed
  loops measure the submit path alone, not the tasks competing for the GIL;
  small batches of the sides are interleaved and each side's median batch is
  kept (see ``bench_submit``); then the gates open and everything drains before
  the next repeat. A third column, ``tpe_ctx``, submits ``copy_context().run``
  to the executor: the same work ``wait_until`` does (it runs each task in a
  copy of the caller's context), for reference.
- ``throughput``: N tiny tasks submitted and waited for, end to end (submit,
  hand-off, run, result), tasks per second; short runs, many pairs, each run
  from a just-collected heap (see ``bench_throughput``).
- ``monitor``: the limits monitor (``edgesync._limits.Monitor``, default
  interval, default limits) running on a runtime with K live invocations
  (threads that each begin one invocation and block); reports the monitor's
  CPU time per sample and its share of one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextvars import copy_context
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgesync
from edgesync import testing

BIG = 10_000_000


def _noop() -> None:
    return None


def _blocker(gate: threading.Event, started: threading.Semaphore) -> None:
    started.release()
    gate.wait(60)


def _block_all(threads: int, block: Callable[..., Any], gate: threading.Event) -> List[Any]:
    """Occupy every pool thread with a task that waits for ``gate``."""
    started = threading.Semaphore(0)
    blockers = [block(_blocker, gate, started) for _ in range(threads)]
    for _ in range(threads):
        if not started.acquire(timeout=30):
            raise RuntimeError("the pool's threads did not all start")
    return blockers


def bench_submit(threads: int, batch: int, batches: int, repeats: int) -> Dict[str, Any]:
    """Per repeat: block every thread of both pools, then time ``batches`` small batches of
    ``batch`` submits per side, interleaved (the order alternates), and take each side's
    median per-submit time. A small batch that another process preempted is an outlier
    the median ignores; a long one would include a preemption nearly every time.
    """
    names = ["edgesync", "tpe", "tpe_ctx"]
    out: Dict[str, List[float]] = {k: [] for k in names}
    with testing.runtime(background_threads=threads, max_pending_tasks=BIG) as _rt, \
            ThreadPoolExecutor(max_workers=threads) as ex:
        wait_until = edgesync.wait_until
        submits: Dict[str, Callable[[], Future[Any]]] = {
            "edgesync": lambda: wait_until(_noop),
            "tpe": lambda: ex.submit(_noop),
            "tpe_ctx": lambda: ex.submit(copy_context().run, _noop),
        }
        perf = time.perf_counter
        for r in range(repeats + 1):  # the first repeat warms up and is not counted
            gates = (threading.Event(), threading.Event())
            futures: List[Any] = _block_all(threads, lambda fn, *a: wait_until(fn, *a), gates[0])
            futures += _block_all(threads, ex.submit, gates[1])
            times: Dict[str, List[float]] = {k: [] for k in names}
            gc.collect()
            gc.disable()
            try:
                for i in range(batches):
                    k = (i + r) % len(names)
                    for name in names[k:] + names[:k]:
                        submit = submits[name]
                        t0 = perf()
                        for _ in range(batch):
                            futures.append(submit())
                        times[name].append((perf() - t0) / batch)
            finally:
                gc.enable()
            for g in gates:
                g.set()
            wait(futures, timeout=300)
            if r:
                for name in names:
                    out[name].append(statistics.median(times[name]))
    return {"threads": threads, "batch": batch, "batches": batches, "repeats": repeats,
            "us_per_submit": {k: [v * 1e6 for v in vs] for k, vs in out.items()},
            "median_us": {k: statistics.median(vs) * 1e6 for k, vs in out.items()}}


def _drain(submit: Callable[[], Future[Any]], n: int) -> float:
    t0 = time.perf_counter()
    futures = [submit() for _ in range(n)]
    wait(futures, timeout=300)
    elapsed = time.perf_counter() - t0
    if not all(f.done() and f.exception() is None for f in futures):
        raise RuntimeError("some tasks did not complete")
    return n / elapsed


def bench_throughput(threads: int, tasks: int, repeats: int) -> Dict[str, Any]:
    """``repeats`` pairs of runs of ``tasks`` no-op tasks each, alternating which side goes first.

    Each run starts right after a ``gc.collect()`` (outside its time), on both sides: a
    run then pays for the young collections its own allocations trigger, and for
    nothing the other side allocated. Without it a full collection (11-16 ms here,
    twice a whole run's time) fell every third run or so, when the two sides'
    allocations together crossed its threshold: on whichever side ran then, in a
    pattern fixed by the order, so the pairs read 0.5x or 2x and the medians moved
    with where that pattern put the slow runs.
    """
    out: Dict[str, List[float]] = {"edgesync": [], "tpe": []}
    with testing.runtime(background_threads=threads, max_pending_tasks=BIG) as _rt, \
            ThreadPoolExecutor(max_workers=threads) as ex:
        wait_until = edgesync.wait_until
        sides: Dict[str, Callable[[], Future[Any]]] = {
            "edgesync": lambda: wait_until(_noop),
            "tpe": lambda: ex.submit(_noop),
        }
        for submit in sides.values():
            _drain(submit, tasks)  # warm-up: every thread started
        gc.collect()
        for r in range(repeats):
            order = ["edgesync", "tpe"] if r % 2 == 0 else ["tpe", "edgesync"]
            for name in order:
                gc.collect()
                out[name].append(_drain(sides[name], tasks))
    return {"threads": threads, "tasks": tasks, "repeats": repeats, "tasks_per_s": out,
            "median_tasks_per_s": {k: statistics.median(v) for k, v in out.items()}}


def bench_monitor(live_counts: List[int], seconds: float) -> Dict[str, Any]:
    from edgesync._invocation import TASK
    from edgesync._limits import INTERVAL, Monitor

    results = []
    for k in live_counts:
        with testing.runtime() as tr:
            rt = tr.runtime
            rt.rss_baseline = rt.rss()  # as the worker does when it is ready: memory is checked too
            release = threading.Event()
            ready = threading.Semaphore(0)

            def live(rt: Any = rt, ready: threading.Semaphore = ready, release: threading.Event = release) -> None:
                slot = rt.tracker.register_thread()
                inv = slot.begin(TASK, "bench.live")
                ready.release()
                release.wait(120)
                slot.end_surely(inv)
                rt.tracker.unregister_thread(slot)

            threads = [threading.Thread(target=live, name="live-%d" % i, daemon=True) for i in range(k)]
            for t in threads:
                t.start()
            for _ in threads:
                ready.acquire(timeout=30)
            assert len(rt.tracker.live()) == k, (len(rt.tracker.live()), k)
            monitor = Monitor(rt)
            monitor.start()
            assert monitor._thread is not None and monitor._thread.ident is not None
            clock = time.pthread_getcpuclockid(monitor._thread.ident)
            time.sleep(0.2)  # let it start sampling
            # Measured from outside, on the monitor thread's own CPU clock: the monitor keeps
            # no counters of its own for the benchmark's sake.
            c0, w0 = time.clock_gettime(clock), time.monotonic()
            time.sleep(seconds)
            c1, w1 = time.clock_gettime(clock), time.monotonic()
            monitor.stop()
            monitor._thread.join(5)
            release.set()
            for t in threads:
                t.join(5)
        samples = (w1 - w0) / INTERVAL  # the monitor samples once per interval
        results.append({
            "live": k, "samples": samples, "wall_s": w1 - w0,
            "thread_cpu_pct": (c1 - c0) / (w1 - w0) * 100,  # sampling plus the loop around it
            "us_per_sample": (c1 - c0) / samples * 1e6,
        })
    return {"interval_s": INTERVAL, "results": results}


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--threads", type=int, default=8)
    s.add_argument("--batch", type=int, default=50)
    s.add_argument("--batches", type=int, default=100)
    s.add_argument("--repeats", type=int, default=9)
    t = sub.add_parser("throughput")
    t.add_argument("--threads", type=int, default=8)
    t.add_argument("--tasks", type=int, default=2000)
    t.add_argument("--repeats", type=int, default=30)
    m = sub.add_parser("monitor")
    m.add_argument("--live", type=int, nargs="+", default=[1, 8, 64])
    m.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    if a.what == "submit":
        result = bench_submit(a.threads, a.batch, a.batches, a.repeats)
    elif a.what == "throughput":
        result = bench_throughput(a.threads, a.tasks, a.repeats)
    else:
        result = bench_monitor(a.live, a.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
