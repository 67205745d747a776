"""Silent traps of issue 12 under real gunicorn: --preload (item 5), a foreign worker class (item 7),
and where the settings come from (item 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from .support import REPO, Server

APP = "tests.apps.traps:app"
FOREIGN_WORKER = "not edgesync.Worker"

pytestmark = pytest.mark.slow


def test_preload_refuses_work_in_the_master_and_the_master_fires_no_beforeunload(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--preload", "--workers", "2", app=APP,
                            env={"SCHEDULE_AT_IMPORT": "1", "METRICS_AT_IMPORT": "1"}, workers_ready=2)
    [refused] = server.wait_for_events("refused")
    master = server.proc.pid  # type: ignore[union-attr]
    assert refused["pid"] == master, "the app was imported in the master"
    assert "gunicorn master" in refused["message"] and "post_worker_init" in refused["message"]
    assert not [e for e in server.events("task_done") if e["id"] == "at-import"], "nothing ran in the master"
    # The workers, forked from that master, schedule work as usual.
    assert server.get("/task?id=from-worker")[0] == 200
    server.wait_for_events("task_done", where=lambda e: e["id"] == "from-worker")
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    fired = server.events("beforeunload")
    assert master not in {e["pid"] for e in fired}, "the master is not an instance: no beforeunload there"
    assert len({e["pid"] for e in fired}) == len(fired) == 2, "one termination per worker"
    assert {e["reason"] for e in fired} == {"termination"}
    assert FOREIGN_WORKER not in server.log


def test_preload_with_an_app_that_lets_the_refusal_raise_stops_at_boot(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "edgesync.Worker", "-b", "127.0.0.1:0", "--no-control-socket",
         "--pythonpath", str(REPO), "--preload", APP],
        cwd=tmp_path, env={**env, "SCHEDULE_AT_IMPORT": "raise"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it served instead of refusing: stop the whole group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=5)
    assert proc.returncode != 0
    # gunicorn prints the app's import error as "Error: <message>" and exits before listening.
    assert "Error: edgesync.wait_until() was called in the gunicorn master" in stderr, stderr
    assert "Listening at" not in stderr


@pytest.mark.parametrize("mold", ["false", "true"])
def test_without_preload_work_scheduled_at_import_runs_in_each_worker(server_factory: Callable[..., Server],
                                                                      mold: str) -> None:
    # task_log_interval_ms = 0: a success line per task at INFO, as before the summaries.
    server = server_factory(app=APP, env={"SCHEDULE_AT_IMPORT": "1", "EDGESYNC_TASK_LOG_INTERVAL_MS": "0",
                                          "EDGESYNC_MOLD": mold})
    [done] = server.wait_for_events("task_done", where=lambda e: e["id"] == "at-import")
    assert done["pid"] == int(server.get("/pid")[1])
    if mold == "false":
        assert not server.events("refused")
    else:
        # The mold imported the app first and refused the call, which the app caught; the mold gave up
        # (one warning), so the worker imported the app itself and its call was accepted.
        [refused] = server.events("refused")
        assert refused["pid"] != done["pid"] and "edgesync's mold" in refused["message"]
        assert server.log.count("the app's import calls edgesync.wait_until (") == 1
        assert "tests/apps/traps.py:" in server.log
    # The success line, in gunicorn's error log: name, duration, id.
    server.wait_for_log(r"worker %d: task tests\.apps\.traps\.task succeeded in \d+\.\d{3}s, id=%d-\d+$"
                        % (done["pid"], done["pid"]))
    # Item 4: the log says where it looked for edgesync.toml.
    assert "edgesync: settings from defaults (no %s)" % (server.workdir / "edgesync.toml") in server.log


def test_a_foreign_worker_class_warns_once_at_the_first_wait_until(server_factory: Callable[..., Server]) -> None:
    server = server_factory("-k", "gthread", "--threads", "2", app=APP)
    for n in range(3):
        assert server.get("/task?id=g%d" % n)[0] == 200
    server.wait_for_events("task_done", count=3)
    [line] = server.wait_for_log(FOREIGN_WORKER)
    assert "gunicorn.workers.gthread.ThreadWorker" in line and "gunicorn -k edgesync.Worker" in line
    assert server.log.count(FOREIGN_WORKER) == 1
