"""Instructions per background task, counted by valgrind: ``wait_until`` against ``ThreadPoolExecutor``.

    python bench/taskcost.py [--tasks 2000] [--flask] [--log-level info] [--durable]
    python bench/taskcost.py --tasks 10000 --batch 2000 --collect    # scenario 4's pattern

On a loaded machine time-based figures swing by 10-30%; an instruction count does not.
Each side runs in a fresh interpreter under ``valgrind --tool=callgrind`` (every thread
counted), once with no task and once with ``--tasks`` trivial tasks (``return n``),
submitted four at a time (``--batch``) and waited for, after a warm-up; the difference over the
number of tasks is that side's whole cost per task: submit, hand-off and wake-up, run,
completion, on every thread. ``--flask`` submits from inside a Flask request context
(edgesync then isolates the task from it, as in a view); ``--log-level`` sets the root
logger's level (``info`` is gunicorn's default: edgesync's per-task logging shows up).
``--batch 2000 --collect`` is scenario 4's pattern (``bench/micro.py throughput``): 2,000
submitted, then waited for, a ``gc.collect()`` before each batch; with most tasks queued
behind busy threads, a thread pool's idle bookkeeping runs less often than at 4. There the
count moves between runs of the same code by up to 20% (valgrind's scheduling of the
threads decides how often they idle and wake): compare several runs, not two figures.

``--durable`` counts a durable task (``@edgesync.durable``, with a journal) against a
plain ``wait_until`` instead: what the journal and its spool cost per task.

``python bench/taskcost.py --child es|tpe|durable N`` is the measured program itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def trivial(n: int) -> int:
    return n


def child(side: str, tasks: int, flask: bool, level: str, size: int = 4, collect: bool = False) -> None:
    logging.basicConfig(level=level.upper(), stream=open(os.devnull, "w"))
    import edgesync
    from edgesync import testing

    ctx: Any = contextlib.nullcontext()
    if flask:
        from flask import Flask

        ctx = Flask(__name__).test_request_context("/")
    settings: Dict[str, Any] = {"background_threads": 8, "max_pending_tasks": 10**7}
    if side == "durable":
        settings["durable_journal"] = os.path.join(tempfile.mkdtemp(), "journal.db")
    from bench.apps import durable_tasks

    with testing.runtime(**settings), ThreadPoolExecutor(8) as ex, ctx:
        calls: Dict[str, Callable[[], Future[Any]]] = {
            "es": lambda: edgesync.wait_until(trivial, 1), "tpe": lambda: ex.submit(trivial, 1),
            "durable": lambda: edgesync.wait_until(durable_tasks.send_email, "a@b.c", 1)}
        submit = calls[side]
        wait([submit() for _ in range(200)])  # warm-up: threads started, caches filled
        batch: List[Any] = []
        for _ in range(tasks):
            if collect and not batch:
                gc.collect()
            batch.append(submit())
            if len(batch) == size:
                wait(batch)
                batch = []
        wait(batch)


def count(side: str, tasks: int, flask: bool, level: str, size: int = 4, collect: bool = False) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out, sys.executable, __file__,
               "--child", side, str(tasks), "--log-level", level, "--batch", str(size)] + (
                   ["--flask"] if flask else []) + (["--collect"] if collect else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or not m:
            raise SystemExit("valgrind failed:\n%s" % proc.stderr[-3000:])
        return int(m.group(1))


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--flask", action="store_true", help="submit from inside a Flask request context")
    p.add_argument("--durable", action="store_true",
                   help="a durable task (with a journal) against a plain wait_until, instead of wait_until "
                        "against ThreadPoolExecutor")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"))
    p.add_argument("--batch", type=int, default=4, help="tasks submitted before waiting for them (default 4)")
    p.add_argument("--collect", action="store_true", help="gc.collect() before each batch")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child[0], int(a.child[1]), a.flask, a.log_level, a.batch, a.collect)
        return 0
    per = {}
    sides = ("durable", "es") if a.durable else ("es", "tpe")
    for side in sides:
        per[side] = (count(side, a.tasks, a.flask, a.log_level, a.batch, a.collect)
                     - count(side, 0, a.flask, a.log_level, a.batch, a.collect)) / a.tasks
    where = ", in a Flask request" if a.flask else ""
    if a.batch != 4 or a.collect:
        where += ", %d at a time%s" % (a.batch, ", collected before each" if a.collect else "")
    if a.durable:
        print("instructions per task (%d tasks%s, log level %s): durable wait_until (journal) %.0f, wait_until "
              "%.0f, ratio %.3fx" % (a.tasks, where, a.log_level, per["durable"], per["es"],
                                     per["durable"] / per["es"]))
    else:
        print("instructions per task (%d tasks%s, log level %s): wait_until %.0f, ThreadPoolExecutor %.0f, "
              "ratio %.3fx" % (a.tasks, where, a.log_level, per["es"], per["tpe"], per["es"] / per["tpe"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
