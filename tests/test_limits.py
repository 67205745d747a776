"""The README's limits table, enforced in real gunicorn workers.

Each test also bounds how late the action came after its threshold: the monitor
samples every 50 ms, so on a loaded 2-core machine we allow a few hundred ms.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from typing import Callable, List, Tuple

import pytest

from edgesync import _limits, testing

from .support import Server, limits, require_wrk, wait_for

LATE = 0.4  # seconds an action may come after its threshold on a busy CI machine

def in_background(server: Server, path: str, timeout: float = 30) -> Tuple[threading.Thread, List[object]]:
    out: List[object] = []

    def run() -> None:
        try:
            out.append(server.get(path, timeout=timeout))
        except OSError as exc:
            out.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t, out


def cpu_used_ms(line: str) -> int:
    return int(re.search(r"used (\d+) ms of CPU time", line).group(1))  # type: ignore[union-attr]


def test_cpu_hard_limit_answers_546_and_spares_the_neighbour(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "4", env=limits(cpu_soft_limit_ms=300, cpu_hard_limit_ms=600))
    first = int(server.get("/pid")[1])
    neighbour, neighbour_out = in_background(server, "/sleep?s=1.5")
    status, body = server.get("/hog?s=60", timeout=20)
    neighbour.join(20)
    assert status == 546
    answer = json.loads(body)
    assert answer["code"] == "WORKER_LIMIT" and "cpu_hard_limit_ms=600" in answer["message"]
    assert neighbour_out == [(200, b"slept")]
    line = server.wait_for_log(r"cancelled request GET /hog \(reason=cpu\)")[0]
    assert 600 <= cpu_used_ms(line) <= 600 + LATE * 1000
    # The soft limit retired the worker; the arbiter replaced it.
    server.wait_for_log(r"worker %d: retiring \(reason=cpu\)" % first)
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % first)
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first
    reasons = [e["reason"] for e in server.events("beforeunload") if e["pid"] == first]
    assert reasons == ["cpu", "early_drop"]


def test_cpu_hard_limit_cancels_a_background_task(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env=limits(cpu_soft_limit_ms=300, cpu_hard_limit_ms=600))
    first = int(server.get("/pid")[1])
    assert server.get("/taskhog?id=h")[0] == 200
    line = server.wait_for_log(r"cancelled task tests\.apps\.core\.cpu_task \(reason=cpu\)")[0]
    assert 600 <= cpu_used_ms(line) <= 600 + LATE * 1000
    assert re.search(r", id=%d-\d+$" % first, line), "the task's id is in the line"
    rejection = server.wait_for_events("unhandledrejection")[0]
    assert rejection["error"].startswith("InvocationCancelled(") and "cpu_hard_limit_ms=600" in rejection["error"]
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % first)
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first
    metrics_line = server.wait_for_log(r"worker %d: unloaded" % first)[0]
    assert "0 tasks abandoned" in metrics_line


def test_cpu_burnt_inside_a_c_call_terminates_the_instance(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", env=limits(cpu_hard_limit_ms=500))
    first = int(server.get("/pid")[1])
    t0 = time.monotonic()
    status, body = server.get("/chog", timeout=20)
    took = time.monotonic() - t0
    assert status == 546 and json.loads(body)["code"] == "WORKER_LIMIT"
    assert took < 0.5 + _limits.UNWIND_GRACE + 1.5
    server.wait_for_log(r"worker %d: terminating \(reason=cpu\): request GET /chog did not unwind" % first)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code %d" % (first, _limits.EXIT_TERMINATED))
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first


@pytest.mark.slow
def test_a_c_call_holding_the_gil_is_ended_by_the_watchdog(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", env=limits(cpu_hard_limit_ms=500))
    first = int(server.get("/pid")[1])
    with pytest.raises(OSError):  # the worker dies mid-request: no answer can be written
        server.get("/gilhog", timeout=20)
    server.wait_for_log(r"Timeout \(0:00:0\d[.0-9]*\)!", timeout=15)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code 1" % first)
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first


def test_memory_growth_fires_beforeunload_memory_and_retires(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env=limits(memory_limit_mb=100))
    first = int(server.get("/pid")[1])
    assert server.get("/mem?mb=92")[0] == 200
    events = server.wait_for_events("beforeunload", count=2, where=lambda e: e["pid"] == first)
    assert [e["reason"] for e in events] == ["memory", "early_drop"]
    server.wait_for_log(r"worker %d: retiring \(reason=memory\)" % first)
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % first)
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first
    assert "terminating" not in server.log


def test_memory_hard_limit_terminates(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env=limits(memory_limit_mb=60))
    first = int(server.get("/pid")[1])
    server.get("/task?id=cut&sleep=60")
    # 200 if the monitor samples after the response, 546 if it catches the request still
    # touching its pages: an in-flight request of a terminated instance is answered 546.
    assert server.get("/mem?mb=80")[0] in (200, 546)
    line = server.wait_for_log(r"worker %d: terminating \(reason=memory\)" % first)[0]
    assert "memory_limit_mb=60" in line
    server.wait_for_log(r"worker %d: abandoned task tests\.apps\.core\.sleepy_task \(running" % first)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code %d" % (first, _limits.EXIT_TERMINATED))
    assert [e["reason"] for e in server.events("beforeunload") if e["pid"] == first] == ["memory"]
    server.wait_ready()


def test_wall_clock_warns_then_terminates_and_abandons_the_task(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--graceful-timeout", "30", env=limits(wall_clock_limit_ms=3000))
    first = int(server.get("/pid")[1])
    server.get("/task?id=long&sleep=60")
    warn = server.wait_for_events("beforeunload", where=lambda e: e["reason"] == "wall_clock")[0]
    # Dispatched at 90% of the limit: about 0.3 s were left.
    assert 0.3 - LATE <= warn["time_remaining"] <= 0.3
    assert warn["pending"] == ["tests.apps.core.sleepy_task"]
    line = server.wait_for_log(r"worker %d: terminating \(reason=wall_clock\)" % first)[0]
    age = float(re.search(r"instance age (\d+\.\d+)s", line).group(1))  # type: ignore[union-attr]
    assert 3.0 <= age <= 3.0 + LATE
    server.wait_for_log(r"worker %d: retiring \(reason=wall_clock\)" % first)
    server.wait_for_log(r"worker %d: abandoned task tests\.apps\.core\.sleepy_task \(running, ran" % first)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code %d" % (first, _limits.EXIT_TERMINATED))
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first


def test_request_idle_timeout_answers_504(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "4", env=limits(request_idle_timeout_ms=800))
    # A handler blocked in C (sleep) is answered from outside its thread ...
    t0 = time.monotonic()
    status, body = server.get("/sleep?s=5")
    took = time.monotonic() - t0
    assert status == 504 and json.loads(body)["code"] == "REQUEST_IDLE_TIMEOUT"
    assert 0.8 <= took <= 0.8 + _limits.UNWIND_GRACE + LATE
    # ... and a handler running Python code is interrupted and answers itself.
    t0 = time.monotonic()
    status, body = server.get("/hog?s=5")
    took = time.monotonic() - t0
    assert status == 504
    assert 0.8 <= took <= 0.8 + LATE
    assert server.get("/pid")[0] == 200  # the worker lives on


def test_limits_at_zero_are_disabled(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env=limits())
    assert server.get("/hog?s=1.2") == (200, b"survived")
    assert server.events("beforeunload") == []
    assert "cancelled" not in server.log


def test_wall_clock_soft_limits_are_spread_over_the_workers() -> None:
    with testing.runtime(wall_clock_limit_ms=10_000) as rt:
        # Two workers booted together: their retire points are far apart.
        first = [_limits.Monitor(rt.runtime, stagger=0.0).wall_soft for _ in range(20)]
        second = [_limits.Monitor(rt.runtime, stagger=0.5).wall_soft for _ in range(20)]
        jittered = {_limits.Monitor(rt.runtime).wall_soft for _ in range(20)}
    assert all(4.5 <= s <= 5.0 for s in first)
    assert all(3.25 <= s <= 3.75 for s in second)
    assert min(first) - max(second) >= 0.75  # 7.5% of the limit between them, at least
    assert len(jittered) > 1 and all(2.0 <= s <= 5.0 for s in jittered)


def test_a_wall_clock_retire_is_placed_away_from_the_siblings_retires() -> None:
    limit = 10.0  # window 2-5 s; 2 workers, no boot: retires 2.5 s apart at best
    # Siblings far off: the latest point of the window, less the jitter.
    assert 4.5 <= _limits.spaced_retire(limit, [-6.0, 12.0], 2, 0.0) <= 5.0
    # A sibling at the window's end: as late as the spacing allows.
    assert _limits.spaced_retire(limit, [5.0], 2, 0.0) == pytest.approx(2.5)
    # A replacement's boot lengthens each turn, so the spacing.
    assert _limits.spaced_retire(limit, [5.0], 2, 1.0) == pytest.approx(2.0)
    # Nowhere far enough: the point farthest from it, here an end of the window.
    assert 4.5 <= _limits.spaced_retire(limit, [3.2], 2, 0.0) <= 5.0
    assert _limits.spaced_retire(limit, [3.6], 2, 0.0) == pytest.approx(2.0)
    # Between two siblings: the middle, when it is farther than either end.
    assert _limits.spaced_retire(limit, [1.0, 4.0], 2, 0.0) == pytest.approx(2.5)
    # More workers, shorter spacing (1.25 s): the latest point that far from all three.
    assert _limits.spaced_retire(limit, [1.0, 4.0, 6.0], 4, 0.0) == pytest.approx(2.75)
    with testing.runtime(wall_clock_limit_ms=10_000) as rt:
        # A worker's own plan counts from its start; the siblings' are absolute times.
        monitor = _limits.Monitor(rt.runtime, stagger=0.0, siblings=[rt.runtime.started + 5.0], workers=2)
        assert monitor.wall_soft == pytest.approx(2.5)


@pytest.mark.slow
def test_no_request_fails_across_many_wall_clock_retirements(server_factory: Callable[..., Server]) -> None:
    wrk = require_wrk()
    server = server_factory("--workers", "2", "--threads", "4", workers_ready=2,
                            env=limits(wall_clock_limit_ms=3000, cpu_hard_limit_ms=2000))
    out = subprocess.run([wrk, "-t2", "-c16", "-d12s", "--timeout", "5s",
                          "http://127.0.0.1:%d/task?id=w&sleep=0" % server.port],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert requests > 1000, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    retirements = server.log.count("retiring (reason=wall_clock)")
    assert retirements >= 4, server.log
    wait_for(lambda: server.exited() is None, 1, "the master to be running")
