"""The end of every drain: the ``unload`` event, the exit drain outside gunicorn, and test helpers.

- ``unload`` fires once the drain is over, with the tasks actually abandoned (a SIGTERM
  drain's ``beforeunload`` fires at its start, so progress saved then is stale).
- Outside gunicorn the exit drain says at once what it waits for and for how long, its time
  is ``exit_drain_timeout_ms``, a second Ctrl-C abandons what is left (each task logged),
  and a development reloader's child never waits.
- ``edgesync_runtime`` fails a test that leaves a task pending; ``eager`` runs tasks inline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

import edgesync
from edgesync import testing

from .support import REPO, Server

SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    import edgesync

    out = os.environ["OUT"]
    def note(**kw):
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\\n")

    def job(step_file):
        for i in range(100):
            with open(step_file, "w") as f:
                f.write(str(i))
            time.sleep(0.1)

    edgesync.add_event_listener("unload", lambda ev: note(type="unload", reason=ev.reason,
        abandoned=[t.to_dict() for t in ev.abandoned_tasks]))
    fut = edgesync.wait_until(job, out + ".step")
    note(type="scheduled", id=edgesync.task_id(fut))
    while not os.path.exists(out + ".step"):
        time.sleep(0.01)
    print("ready", flush=True)
    if os.environ.get("BLOCK"):
        threading.Event().wait(60)   # Ctrl-C ends this with KeyboardInterrupt
    if os.environ.get("RELOAD_LOGGER"):   # what a reloader logs as it restarts its child
        import logging
        reloader = logging.getLogger(os.environ["RELOAD_LOGGER"])
        reloader.setLevel(logging.INFO)
        reloader.info(os.environ["RELOAD_LINE"], "app.py")
        sys.exit(3)
""")


def run_script(tmp_path: Path, env: Dict[str, str]) -> subprocess.Popen[str]:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESYNC_", "WERKZEUG", "RUN_MAIN"))}
    full.update({"OUT": str(tmp_path / "out.jsonl"), "PYTHONPATH": str(REPO)}, **env)
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # As from a terminal: SIGINT handled, whatever this process inherited.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def notes(tmp_path: Path) -> List[Dict[str, Any]]:
    path = tmp_path / "out.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_exit_drain_is_announced_and_a_second_ctrl_c_abandons_cleanly(tmp_path: Path) -> None:
    proc = run_script(tmp_path, {"BLOCK": "1"})
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the first Ctrl-C: KeyboardInterrupt, then the exit drain
    announced = ""
    while "press Ctrl-C again" not in announced:
        line = proc.stderr.readline()
        assert line, "the exit drain was not announced"
        announced += line
    assert "waiting up to 30s (exit_drain_timeout_ms) for 1 background task(s)" in announced
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C abandons the task
    _, err = proc.communicate(timeout=10)
    took = time.monotonic() - started
    assert took < 5, "the second Ctrl-C did not end the drain"
    assert "Traceback" not in err.split("KeyboardInterrupt", 1)[-1], err
    assert "Ctrl-C again: abandoning 1 background task(s)" in err
    scheduled = [n for n in notes(tmp_path) if n["type"] == "scheduled"][0]
    assert "abandoned task __main__.job (running" in err and "id=%s" % scheduled["id"] in err, err
    [unload] = [n for n in notes(tmp_path) if n["type"] == "unload"]
    assert unload["reason"] == "termination"
    assert [(t["id"], t["name"], t["state"]) for t in unload["abandoned"]] == [
        (scheduled["id"], "__main__.job", "running")]
    json.dumps(unload)  # plain data


def test_exit_drain_time_is_a_setting(tmp_path: Path) -> None:
    proc = run_script(tmp_path, {"EDGESYNC_EXIT_DRAIN_TIMEOUT_MS": "300"})
    started = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 5
    assert "waiting up to 0s (exit_drain_timeout_ms)" in err, err
    assert "abandoned task __main__.job (running" in err


@pytest.mark.parametrize("variable, logger, line", [
    ("WERKZEUG_RUN_MAIN", "werkzeug", " * Detected change in %r, reloading"),
    ("RUN_MAIN", "django.utils.autoreload", "%s changed, reloading.")])
def test_a_reloader_child_never_waits_to_restart(tmp_path: Path, variable: str, logger: str, line: str) -> None:
    # A quit (no restart line) drains as any exit: tests/test_exit_fidelity.py.
    proc = run_script(tmp_path, {variable: "true", "RELOAD_LOGGER": logger, "RELOAD_LINE": line})
    started = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 3, "the exit drain stalled the reloader"
    assert "the reloader restarts this process: abandoning 1 background task(s) now" in err, err


def test_unload_fires_after_a_sigterm_drain_with_what_was_abandoned(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", "--graceful-timeout", "2", app="tests.apps.lifecycle:app",
                            env={"UNLOAD_RECORDS": "1"})
    server.get("/slow_task?id=long&sleep=30")
    server.get("/slow_task?id=short&sleep=0.3")
    server.wait_for_events("task_start", count=2)
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    [unload] = server.events("unload")
    assert unload["reason"] == "termination"
    assert [t["name"] for t in unload["abandoned"]] == ["tests.apps.lifecycle.app.<locals>.slow"], unload
    kinds = [e["type"] for e in server.events() if e["type"] in ("beforeunload", "task_state", "unload")]
    assert kinds == ["beforeunload", "task_state", "unload"], "unload comes last, after the short task"


def test_unload_in_process_lists_nothing_when_every_task_finished(registry_restored: None) -> None:
    seen: List[Any] = []
    edgesync.add_event_listener("unload", seen.append)
    try:
        with testing.runtime() as rt:
            edgesync.wait_until(lambda: None)
            rt.wait()
    finally:
        edgesync.remove_event_listener("unload", seen.append)
    assert [(e.type, e.reason, e.abandoned_tasks) for e in seen] == [("unload", "close", ())]


def test_eager_runs_tasks_inline() -> None:
    events: List[Any] = []
    with testing.runtime(eager=True) as rt:
        rt.record("unhandledrejection")
        fut = edgesync.wait_until(lambda x: x * 2, 21)
        assert fut.done() and fut.result() == 42
        failed = edgesync.wait_until(_fail)
        assert failed.done() and isinstance(failed.exception(), ValueError)
        events = rt.record("beforeunload")
        m = rt.metrics()
        assert (m["tasks"]["completed"], m["tasks"]["failed"], m["background_threads_started"]) == (1, 1, 0)
    assert events == []


def _fail() -> None:
    raise ValueError("eager failure")


def test_the_fixture_fails_a_test_that_leaves_a_task_pending(tmp_path: Path) -> None:
    (tmp_path / "test_leak.py").write_text(textwrap.dedent("""
        import threading
        import edgesync
        import edgesync.testing
        edgesync.testing.TEARDOWN_TIMEOUT = 0.3
        gate = threading.Event()
        def stuck_job():
            gate.wait(10)
        def test_leaves_a_task(edgesync_runtime):
            edgesync.wait_until(stuck_job)
        def test_waits(edgesync_runtime):
            edgesync.wait_until(lambda: None)
            edgesync_runtime.wait()
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_leak.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "2 passed, 1 error" in proc.stdout, proc.stdout  # the test body passed; its teardown failed
    assert "1 task(s) still pending when the test ended" in proc.stdout
    assert "test_leak.stuck_job (running, id=" in proc.stdout
