"""Every way a plain process ends runs its pending tasks, on every supported Python.

- A script (or a management command) that schedules a task and returns: the exit
  drain runs the task and the ``beforeunload`` listeners, with no traceback. CPython
  3.12 refuses to start a thread once the interpreter is shutting down, even in
  ``threading``'s own exit hooks: the drain must not need a new one. CI runs this
  file on 3.10, 3.11, 3.12 and 3.13 (.ci/run).
- A ``multiprocessing`` child that schedules a task and returns: the child ends with
  ``os._exit`` (no ``atexit``), so the drain hooks multiprocessing's own exit.
- A development reloader's child (``flask run --debug``): a code change restarts it at
  once (tasks abandoned, each logged), a Ctrl-C quits it, and a quit drains as any
  exit does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import edgesync

    out = os.environ["OUT"]
    def note(**kw):
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\\n")

    def job(tag):
        time.sleep(0.3)
        note(type="ran", tag=tag, pid=os.getpid())

    edgesync.add_event_listener("beforeunload", lambda ev: note(type="beforeunload", reason=ev.reason,
        pending=len(ev.pending_tasks), pid=os.getpid()))
""")

MAIN = SCRIPT + textwrap.dedent("""
    edgesync.wait_until(job, "main")
""")

CHILD = SCRIPT + textwrap.dedent("""
    import multiprocessing

    def child():
        edgesync.wait_until(job, "child")

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(os.environ["START"])
        p = ctx.Process(target=child)
        p.start()
        p.join(30)
        note(type="child_exit", code=p.exitcode)
""")


def run(tmp_path: Path, source: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(source)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESYNC_", "WERKZEUG", "RUN_MAIN"))}
    full.update({"OUT": str(tmp_path / "out.jsonl"), "PYTHONPATH": str(REPO)}, **env)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=full, text=True,
                          capture_output=True, timeout=60)


def notes(tmp_path: Path) -> List[Dict[str, Any]]:
    path = tmp_path / "out.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_script_that_schedules_a_task_and_returns_runs_it(tmp_path: Path) -> None:
    done = run(tmp_path, MAIN)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    got = notes(tmp_path)
    assert [n["type"] for n in got] == ["beforeunload", "ran"], (got, done.stderr)
    assert got[0]["reason"] == "termination" and got[0]["pending"] == 1
    assert "waiting up to 30s (exit_drain_timeout_ms) for 1 background task(s)" in done.stderr


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_multiprocessing_child_that_schedules_a_task_and_returns_runs_it(tmp_path: Path, start: str) -> None:
    done = run(tmp_path, CHILD, START=start)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    got = notes(tmp_path)
    assert [n["type"] for n in got] == ["beforeunload", "ran", "child_exit"], (got, done.stderr)
    assert got[0]["pid"] == got[1]["pid"] != os.getpid()
    assert got[1]["tag"] == "child" and got[2]["code"] == 0
    assert "waiting up to 30s (exit_drain_timeout_ms) for 1 background task(s)" in done.stderr


def test_a_task_a_listener_schedules_at_exit_runs(tmp_path: Path) -> None:
    # On 3.12 the pool cannot start a second thread at exit: the one running `main` takes it.
    done = run(tmp_path, MAIN + textwrap.dedent("""
        edgesync.add_event_listener("beforeunload", lambda ev: edgesync.wait_until(job, "listener"))
    """))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    ran = sorted(n["tag"] for n in notes(tmp_path) if n["type"] == "ran")
    assert ran == ["listener", "main"], (notes(tmp_path), done.stderr)
