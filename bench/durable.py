"""The cost in the view of handing work off: plain ``wait_until``, durable ``wait_until``, RQ, Celery.

``python bench/durable.py [--calls 2000] [--rounds 7]`` prints a Markdown table and one JSON line.

Each side is timed in this process, on the request path only: ``perf_counter_ns`` around one call,
``calls`` calls per round, the sides interleaved round by round (the order rotates), and the median
per-call time of every round kept; the table shows the median over rounds. Before each timed loop
every background thread is blocked on a gate, so the loop measures what the view pays (for a
durable task: the JSON check and the record in the spool) and not the tasks themselves competing for
the GIL; the gate opens and everything drains (durable rows deleted) between rounds.

- ``plain``: ``edgesync.wait_until(send_email_plain, "a@b.c", n)``.
- ``durable``: the same call on ``@edgesync.durable send_email`` with ``durable_journal`` set (the
  view records the task in its worker's spool; the journal's thread writes SQLite, WAL,
  ``synchronous=NORMAL``, on the local disk). With ``--calls`` over about 1,000 the spool's slots
  are taken by the blocked tasks and the rest are written to SQLite in the view (its fallback).
- ``rq_enqueue``: ``rq.Queue.enqueue("bench.apps.durable_tasks.send_email_plain", "a@b.c", n)`` to a
  redis-server started here on 127.0.0.1 (a free port, no persistence).
- ``handoff_always``: the durable call with ``handoff = "rq"``, ``handoff_on = "always"`` (durable -> RQ).
- ``handoff_celery``: the durable call with ``handoff = "celery"``, ``handoff_on = "always"`` (durable ->
  Celery: ``send_task("edgesync.run_durable", ...)`` to the same Redis), if Celery is installed.
- ``celery_delay``: ``send.delay("a@b.c", n)`` to the same Redis, if Celery is installed.

Every queue is emptied after each side's loop (nothing consumes them).

``--connections`` measures the journal's concurrency choice instead: 8 threads recording and
deleting at once through one connection under a lock, against one connection per thread.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgesync
from bench.apps import durable_tasks
from bench.harness import free_port
from edgesync import testing
from edgesync._journal import Journal

BIG = 10_000_000


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--logfile", os.path.join(workdir, "redis.log")], cwd=workdir)
    import redis
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.close()
    return proc, "redis://127.0.0.1:%d/0" % port


def timed(call: Callable[[int], Any], calls: int) -> float:
    """Median ns of one ``call(i)``."""
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        call(i)
        samples.append(clock() - t0)
    return float(statistics.median(samples))


def blocked(rt: testing.TestRuntime, threads: int) -> threading.Event:
    """Occupy every background thread of ``rt`` until the returned gate is set."""
    gate = threading.Event()
    started = threading.Semaphore(0)

    def block() -> None:
        started.release()
        gate.wait(60)
    for _ in range(threads):
        rt.runtime.wait_until(block, (), {})
    for _ in range(threads):
        started.acquire(timeout=30)
    return gate


def edgesync_side(name: str, calls: int, fn: Any, **settings: Any) -> Callable[[], float]:
    def run() -> float:
        with testing.runtime(background_threads=8, max_pending_tasks=BIG, **settings) as rt:
            gate = blocked(rt, 8)
            try:
                return timed(lambda i: edgesync.wait_until(fn, "a@b.c", i), calls)
            finally:
                gate.set()
                rt.wait(60)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--connections", action="store_true", help="the journal's connection choice instead")
    opts = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="edgesync-bench-durable-")
    if opts.connections:
        print(json.dumps(connections(workdir, opts.rounds)))
        return
    redis_proc, url = start_redis(workdir)
    try:
        import redis
        import rq
        queue = rq.Queue("bench", connection=redis.Redis.from_url(url))
        queue2 = rq.Queue("bench2", connection=queue.connection)  # handoff_always's
        sides: Dict[str, Callable[[], float]] = {
            "plain": edgesync_side("plain", opts.calls, durable_tasks.send_email_plain),
            "durable": edgesync_side("durable", opts.calls, durable_tasks.send_email,
                                     durable_journal=os.path.join(workdir, "journal.db")),
            "handoff_always": edgesync_side("handoff_always", opts.calls, durable_tasks.send_email, handoff="rq",
                                            handoff_on="always", handoff_redis_url=url, handoff_queue="bench2"),
            "rq_enqueue": lambda: timed(lambda i: queue.enqueue("bench.apps.durable_tasks.send_email_plain",
                                                               "a@b.c", i), opts.calls),
        }
        try:
            celery = importlib.import_module("celery")  # optional: the row is left out without it
            app = celery.Celery("bench", broker=url, backend=None)
            send = app.task(name="bench.send_email")(durable_tasks.send_email_plain)
            sides["celery_delay"] = lambda: timed(lambda i: send.delay("a@b.c", i), opts.calls)
            sides["handoff_celery"] = edgesync_side("handoff_celery", opts.calls, durable_tasks.send_email,
                                                    handoff="celery", handoff_on="always", handoff_broker_url=url,
                                                    handoff_queue="bench3")
        except ImportError:
            pass
        for side in sides.values():  # warm up: imports, connections, the journal file
            side()
        results: Dict[str, List[float]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(opts.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                results[name].append(sides[name]())
                queue.empty()  # type: ignore[no-untyped-call]  # rq's
                queue2.empty()  # type: ignore[no-untyped-call]
                queue.connection.delete("celery", "bench3")  # Celery's queues: lists of messages
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(v) / 1000 for k, v in results.items()}
    print("| side | per call in the view (p50, us) | / plain | / rq_enqueue |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print("| %s | %.1f | %.1fx | %.2fx |" % (k, v, v / med["plain"], v / med["rq_enqueue"]))
    print()
    print("targets: durable < rq_enqueue: %s (%.2fx); plain at least 5x less than rq_enqueue: %s (%.1fx)" % (
        "pass" if med["durable"] < med["rq_enqueue"] else "MISS", med["durable"] / med["rq_enqueue"],
        "pass" if med["rq_enqueue"] >= 5 * med["plain"] else "MISS", med["rq_enqueue"] / med["plain"]))
    print(json.dumps({"calls": opts.calls, "rounds": opts.rounds, "p50_us": med,
                      "rounds_us": {k: [round(x / 1000, 2) for x in v] for k, v in results.items()}}))


def _same(journal: Journal) -> Journal:
    return journal


def connections(workdir: str, rounds: int, threads: int = 8, per_thread: int = 500) -> Dict[str, Any]:
    """8 threads record and delete ``per_thread`` rows each: one shared connection vs one per thread.

    Reports the wall time per record+delete, and the p50 and p99 of one ``record`` (what the view
    waits for): with a connection per thread, SQLite's own busy handler, which sleeps, arbitrates.
    """
    out: Dict[str, Dict[str, List[float]]] = {}
    for r in range(rounds):
        for name in ("one_connection_locked", "connection_per_thread"):
            path = os.path.join(workdir, "%s-%d.db" % (name, r))
            shared = Journal(path)
            shared.open()
            journal_for_thread: Callable[[], Journal] = (
                functools.partial(_same, shared) if name == "one_connection_locked"
                else functools.partial(Journal, path))
            samples: List[int] = []
            t0 = time.perf_counter()
            _churn_threads(journal_for_thread, threads, per_thread, samples)
            wall = (time.perf_counter() - t0) / (threads * per_thread) * 1e6
            samples.sort()
            row = out.setdefault(name, {"wall_us": [], "record_p50_us": [], "record_p99_us": []})
            row["wall_us"].append(wall)
            row["record_p50_us"].append(samples[len(samples) // 2] / 1000)
            row["record_p99_us"].append(samples[len(samples) * 99 // 100] / 1000)
    return {name: {k: round(statistics.median(v), 1) for k, v in row.items()} for name, row in out.items()}


def _churn_threads(journal_for_thread: Callable[[], Journal], threads: int, per_thread: int,
                   samples: List[int]) -> None:
    def churn(t: int) -> None:
        journal = journal_for_thread()
        mine = []
        clock = time.perf_counter_ns
        for i in range(per_thread):
            task_id = "%d-%d" % (t, i)
            t0 = clock()
            journal.record(task_id, "m:f", "[[],{}]", 3)
            mine.append(clock() - t0)
            journal.delete(task_id)
        samples.extend(mine)
    workers = [threading.Thread(target=churn, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
