"""Births: how workers are born and what their end means to the server (real gunicorn, real signals).

gunicorn halts the whole server when a worker exits with 3 (``WORKER_BOOT_ERROR``) or
4 (``APP_LOAD_ERROR``): meant for a worker that cannot boot. A worker that has served
exits with those codes for other reasons (a background task's ``os._exit(3)``): the
server lives and replaces it.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from typing import Callable, Dict, List, Tuple

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



def _keep_alive_client(port: int, requests: int, out: List[Tuple[int, str, int]], errors: List[str]) -> None:
    """One http.client connection object asking ``requests`` times; it reconnects after each close."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        for _ in range(requests):
            try:
                conn.request("GET", "/pid")
                resp = conn.getresponse()
                body = resp.read()
                out.append((resp.status, resp.getheader("Connection", ""), int(body)))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(repr(exc))
                conn.close()
    finally:
        conn.close()


@pytest.mark.slow
def test_oneshot_serves_exactly_one_request_per_instance_under_keep_alive(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", "--threads", "2", app=APP, workers_ready=2,
                            env={"EDGESYNC_POLICY": "oneshot"})
    probes = set(int(p) for p in re.findall(r"worker (\d+): retiring \(reason=oneshot\)", server.log))
    out: List[Tuple[int, str, int]] = []
    errors: List[str] = []
    clients = [threading.Thread(target=_keep_alive_client, args=(server.port, 3, out, errors))
               for _ in range(30)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert errors == [] and len(out) == 90, (errors, len(out))
    assert all(status == 200 for status, _, _ in out)
    # Every response closes its connection, and every instance answered one request.
    assert Counter(conn.lower() for _, conn, _ in out) == {"close": 90}
    per_pid: Dict[int, int] = Counter(pid for _, _, pid in out)
    assert max(per_pid.values()) == 1, [p for p, n in per_pid.items() if n > 1]
    assert not probes & set(per_pid)  # the readiness probes' instances served nothing else
    assert server.stop() == 0, server.log
