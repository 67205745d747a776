"""edgesync.django under real gunicorn: ORM writes from tasks, and no connection left open.

Django closes a request thread's database connections through its request
signals; background threads serve no request, so edgesync.django runs
``close_old_connections()`` around each task. The control case (the integration
left out) shows the leak it prevents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from .support import REPO, Server, wait_for

SETTINGS = "tests.apps.djangosite.settings"


def migrate(env: Dict[str, str]) -> None:
    env = {**os.environ, **env}
    subprocess.run([sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0",
                    "--settings", SETTINGS, "--pythonpath", str(REPO)],
                   env=env, check=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("hygiene", ["on", "off"])
def test_tasks_write_rows_and_close_their_connections(
        server_factory: Callable[..., Server], tmp_path: Path, hygiene: str) -> None:
    env = {"DJANGO_DB": str(tmp_path / "db.sqlite3"), "DJANGOSITE_HYGIENE": hygiene,
           "EDGESYNC_BACKGROUND_THREADS": "2"}
    migrate(env)
    server = server_factory("--threads", "2", app="tests.apps.djangosite.wsgi", env=env)
    for i in range(6):
        assert server.get("/write?label=r%d" % i) == (200, b"scheduled")

    def all_done() -> Any:
        # "completed" is counted once a task has returned, hook included, so the
        # connections are in their final state.
        report = server.get_json("/check")
        return report["tasks_completed"] == 6 and report
    report = wait_for(all_done, 15, "six background tasks to complete")
    assert report["rows"] == 6
    assert 1 <= report["task_threads"] <= 2
    if hygiene == "on":
        # Every task closed its connection when it ended (CONN_MAX_AGE = 0), so no
        # idle background thread holds one, and each task opened a fresh one.
        assert report["open_in_task_threads"] == 0, json.dumps(report)
        assert report["opened_in_tasks"] == 6, report
    else:
        # Without it, each background thread keeps its connection open for ever
        # and every later task on that thread reuses it, however old it is.
        assert report["open_in_task_threads"] == report["task_threads"], report
        assert report["opened_in_tasks"] == report["task_threads"], report
