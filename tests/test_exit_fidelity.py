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
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .conftest import REPO, wait_for

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


FLASK_APP = textwrap.dedent("""
    import json, os, time
    from flask import Flask
    import edgesync

    app = Flask(__name__)
    out = os.environ["OUT"]

    def note(**kw):
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\\n")

    def job(seconds):
        time.sleep(seconds)
        note(type="ran", pid=os.getpid())

    def on_beforeunload(ev):
        time.sleep(0.2)  # a listener that takes a moment, as one that saves progress does
        note(type="beforeunload", reason=ev.reason, pid=os.getpid())

    edgesync.add_event_listener("beforeunload", on_beforeunload)

    @app.get("/task/<float:seconds>")
    def task(seconds):
        edgesync.wait_until(job, seconds)
        return str(os.getpid())
""")

RESTART_LINE = "the reloader restarts this process: abandoning 1 background task(s) now"


class FlaskRun:
    """``flask run --debug`` in its own process group, as a terminal runs it."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        (tmp_path / "app.py").write_text(FLASK_APP)
        self.log_path = tmp_path / "flask.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESYNC_", "WERKZEUG", "RUN_MAIN"))}
        env.update({"OUT": str(tmp_path / "out.jsonl"), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "app", "run", "--debug", "--port", "0"],
                cwd=tmp_path, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                # As a terminal starts it: SIGINT handled (a shell's background job inherits it ignored).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        def listening() -> Any:
            assert self.proc.poll() is None, self.log
            return re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.log)
        self.port = int(wait_for(listening, 30, "flask run to listen").group(1))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def schedule(self, seconds: float) -> int:
        """Schedule a task in the reloader's child; its pid."""
        import http.client

        def answered() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/task/%s" % seconds)
                resp = conn.getresponse()
                return int(resp.read()) if resp.status == 200 else 0
            except OSError:
                return 0
            finally:
                conn.close()
        return int(wait_for(answered, 30, "the app to answer"))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def test_flask_run_debug_ctrl_c_to_the_child_drains_as_any_exit(tmp_path: Path) -> None:
    run = FlaskRun(tmp_path)
    try:
        child = run.schedule(1.0)
        os.kill(child, signal.SIGINT)
        assert run.proc.wait(30) == 0, run.log
        got = notes(tmp_path)
        assert [n["type"] for n in got] == ["beforeunload", "ran"], (got, run.log)
        assert got[0]["reason"] == "termination" and got[0]["pid"] == child
        assert "the process is exiting: waiting up to 30s" in run.log, run.log
        assert "reloader restarts" not in run.log, run.log
    finally:
        run.close()


def test_flask_run_debug_ctrl_c_in_the_terminal_is_a_quit_not_a_restart(tmp_path: Path) -> None:
    # The terminal sends SIGINT to the whole group; werkzeug's reloader process then waits
    # 0.25 s for its child (subprocess.call) and kills it: the child drains meanwhile.
    run = FlaskRun(tmp_path)
    try:
        run.schedule(5.0)
        os.killpg(run.proc.pid, signal.SIGINT)
        run.proc.wait(30)
        assert "reloader restarts" not in run.log, run.log
        assert "kills this process 0.25s from now; to let the tasks finish, quit with: kill -INT" in run.log, run.log
    finally:
        run.close()


def test_flask_run_debug_code_change_restarts_at_once(tmp_path: Path) -> None:
    run = FlaskRun(tmp_path)
    try:
        child = run.schedule(30.0)
        app = tmp_path / "app.py"
        app.write_text(app.read_text() + "\n# changed\n")
        wait_for(lambda: RESTART_LINE in run.log, 30, "the restart to abandon the task")
        assert run.schedule(0.0) != child, "the reloader did not restart its child"
        assert "abandoned task app.job (running" in run.log, run.log
        assert "the process is exiting" not in run.log, run.log
    finally:
        run.close()
