"""Births: how workers are born and what their end means to the server (real gunicorn, real signals).

gunicorn halts the whole server when a worker exits with 3 (``WORKER_BOOT_ERROR``) or
4 (``APP_LOAD_ERROR``): meant for a worker that cannot boot. A worker that has served
exits with those codes for other reasons (a background task's ``os._exit(3)``): the
server lives and replaces it.
"""

from __future__ import annotations

from typing import Callable

import pytest

from .conftest import Server, wait_for

APP = "tests.apps.births:app"


@pytest.mark.parametrize("code", [3, 4])
@pytest.mark.parametrize("handoff", ["true", "false"])
def test_a_worker_that_served_never_halts_the_server_by_its_exit_code(
        server_factory: Callable[..., Server], code: int, handoff: str) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={"EDGESYNC_REPLACE_BEFORE_RETIRE": handoff})
    status, body = server.get("/exit_later?code=%d&delay=0.2" % code)
    assert status == 200
    pid = int(body)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code %d" % (pid, code))
    server.wait_for_log(r"worker %d exited with code %d after serving: not a boot error" % (pid, code))
    # A replacement is born, and the server keeps serving.
    wait_for(lambda: len(server.worker_pids()) == 2 and pid not in server.worker_pids(), 15,
             "a replacement for the worker that exited")
    for _ in range(10):
        status, body = server.get("/pid")
        assert status == 200 and int(body) != pid
    assert server.exited() is None, server.log
    assert "Worker failed to boot" not in server.log and "App failed to load" not in server.log
    assert server.stop() == 0, server.log

