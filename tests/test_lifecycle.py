"""The lifecycle (one state machine, one drain) and the invocation boundary (the WSGI call).

Unit tests drive the transition table directly; the rest run real gunicorn workers
(``tests/apps/lifecycle.py``) over HTTP/1.1 and HTTP/2 and send real signals.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Tuple

import httpx
import pytest

from edgesync._lifecycle import (
    MASTER,
    RETIREES,
    SEAT_CODES,
    SEAT_TRANSITIONS,
    TRANSITIONS,
    WORKER,
    Lifecycle,
    LifecycleError,
    Seat,
    State,
    Trigger,
    seat_move,
    seat_of,
)

from .support import REPO, Server, wait_for

APP = "tests.apps.lifecycle:app"
LIMITS = """
[edge_runtime]
cpu_soft_limit_ms = 0
cpu_hard_limit_ms = 500
request_idle_timeout_ms = 1500
"""


# -- the transition table ------------------------------------------------------------------------


def test_a_drain_is_replaced_only_by_a_stronger_cause() -> None:
    seen = []
    lc = Lifecycle(on_change=seen.append)
    assert lc.request(Trigger.RETIRE, "wall_clock")
    assert (lc.state, lc.cause, lc.retire_reason) == (State.DRAINING, Trigger.RETIRE, "wall_clock")
    assert not lc.request(Trigger.RETIRE, "memory"), "a second retire changes nothing"
    assert lc.retire_reason == "wall_clock"
    assert lc.request(Trigger.STOP), "SIGTERM during a retire takes over"
    assert not lc.request(Trigger.STOP), "a HUP's repeated SIGTERM changes nothing"
    assert lc.request(Trigger.QUICK)
    assert not lc.request(Trigger.TERMINATE, "cpu"), "a quick drain is already the shortest"
    assert lc.request(Trigger.UNLOAD)
    assert seen == [Trigger.RETIRE, Trigger.STOP, Trigger.QUICK, Trigger.UNLOAD]
    assert not lc.request(Trigger.RETIRE), "a late monitor sample after the end changes nothing"


def test_an_illegal_transition_raises_with_the_state_it_was_raised_in() -> None:
    lc = Lifecycle()
    lc.request(Trigger.UNLOAD)
    with pytest.raises(LifecycleError, match="unloaded cannot unload") as info:
        lc.request(Trigger.UNLOAD)
    assert (info.value.state, info.value.trigger) == (State.UNLOADED, Trigger.UNLOAD)


def test_termination_overrides_any_drain_but_quick() -> None:
    for cause in (Trigger.RETIRE, Trigger.ONESHOT, Trigger.STOP, Trigger.EXIT, Trigger.CLOSE):
        lc = Lifecycle()
        lc.request(cause)
        assert lc.request(Trigger.TERMINATE, "memory", "RSS grew", warns=True), cause
        assert (lc.state, lc.terminate_reason, lc.terminate_warns) == (State.TERMINATING, "memory", True)
        assert not lc.request(Trigger.STOP) and not lc.request(Trigger.TERMINATE, "cpu")


def test_every_state_answers_every_trigger_or_refuses_it_loudly() -> None:
    for phase, row in TRANSITIONS.items():
        for trigger in Trigger:
            lc = Lifecycle()
            lc.state, lc.cause = phase
            if trigger in row:
                lc.request(trigger, "wall_clock" if trigger is Trigger.TERMINATE else None)
            else:
                with pytest.raises(LifecycleError):
                    lc.request(trigger)


def test_a_workers_seat_is_named_once_and_carried_by_two_fields_with_one_writer_each() -> None:
    # Every seat has its own code pair, and decodes back from it.
    assert set(SEAT_CODES) == set(Seat) == set(SEAT_TRANSITIONS)
    assert len(set(SEAT_CODES.values())) == len(Seat)
    assert all(seat_of(*SEAT_CODES[seat]) is seat for seat in Seat)
    assert seat_of(9, 0) is None and seat_of(SEAT_CODES[Seat.SERVING][0], 1) is Seat.SERVING
    # A worker's moves change only the state code; the master's only the released flag, except its
    # claims and frees of a record no live worker holds (BOOTING, FREE), which reset both.
    for now, row in SEAT_TRANSITIONS.items():
        for to, by in row.items():
            assert seat_move(now, to, by) and not seat_move(now, to, WORKER if by == MASTER else MASTER)
            (state_a, released_a), (state_b, released_b) = SEAT_CODES[now], SEAT_CODES[to]
            changed = {f for f, differs in (("state", state_a != state_b), ("released", released_a != released_b))
                       if differs}
            if to in (Seat.BOOTING, Seat.FREE):
                assert by == MASTER
            else:
                assert changed == ({"state"} if by == WORKER else {"released"}), (now, to, by)
    # The retire's two sub-states, in order: accepting until replaced, then released.
    assert seat_move(Seat.SERVING, Seat.RETIRING, WORKER) and seat_move(Seat.RETIRING, Seat.RELEASED, MASTER)
    assert not seat_move(Seat.SERVING, Seat.RELEASED, MASTER) and not seat_move(Seat.RETIRING, Seat.SERVING, WORKER)
    assert RETIREES == {Seat.RETIRING, Seat.RELEASED} and not seat_move(None, Seat.SERVING, WORKER)


def test_import_edgesync_does_not_import_gunicorn() -> None:
    code = "import edgesync, sys; print(sorted(m for m in sys.modules if m.startswith('gunicorn')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


# -- the drain, on real workers ------------------------------------------------------------------


def test_sigterm_drain_reads_draining_stop_from_listeners_and_tasks(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", app=APP)
    assert server.get("/slow_task?id=s&sleep=1")[0] == 200
    server.wait_for_events("task_start")
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    [unload] = server.events("beforeunload")
    assert (unload["reason"], unload["state"], unload["cause"]) == ("termination", "draining", "stop")
    [task] = server.events("task_state")
    assert (task["state"], task["cause"]) == ("draining", "stop"), task
    assert "draining (stop)" in server.log


def test_work_a_listener_schedules_during_a_sigterm_drain_runs(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", app=APP, env={"LISTENER_SCHEDULES": "1"})
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    assert server.events("listener_scheduled"), server.events()
    assert [e["id"] for e in server.events("task_done")] == ["from-listener"]
    assert "abandoned task" not in server.log


def test_work_an_early_drop_listener_schedules_runs_before_the_retiree_exits(
        server_factory: Callable[..., Server]) -> None:
    # early_drop fires at the end of a retire; what its listener schedules still runs, and the
    # drain waits for it (it is not refused and not lost).
    server = server_factory("--threads", "2", "--max-requests", "1", app=APP,
                            env={"LISTENER_SCHEDULES": "1"})
    server.get("/pid")
    server.wait_for_log(r"unloaded \(early_drop")
    assert [e["id"] for e in server.events("task_done")] == ["from-listener"]
    assert "abandoned task" not in server.log


# -- the invocation boundary -----------------------------------------------------------------------


def raw_get(server: Server, path: str, timeout: float = 10.0) -> Tuple[int, bytes, float]:
    started = time.monotonic()
    status, body = server.get(path, timeout=timeout)
    return status, body, time.monotonic() - started


@pytest.fixture
def limited(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--threads", "3", app=APP, toml=LIMITS)


@pytest.mark.parametrize("path", ["/stream_spin?s=3", "/lazy_spin?s=3"])
def test_a_streaming_body_over_its_cpu_limit_before_any_byte_gets_546(limited: Server, path: str) -> None:
    status, body, took = raw_get(limited, path)
    assert status == 546 and json.loads(body)["code"] == "WORKER_LIMIT", (status, body)
    assert took < 2.5
    name = path[1:].split("?")[0]
    wait_for(lambda: limited.events("closed"), 5, "the body to be closed")
    assert [e["name"] for e in limited.events("closed")] == [name], "close() exactly once"
    assert limited.get_json("/metrics")["invocations_cancelled"] == 1


def test_a_streaming_body_blocked_before_any_byte_gets_504(limited: Server) -> None:
    status, body, took = raw_get(limited, "/stream_sleep?s=4")
    assert status == 504 and json.loads(body)["code"] == "REQUEST_IDLE_TIMEOUT", (status, body)
    assert took < 3.5
    assert limited.get_json("/metrics")["invocations_cancelled"] == 1


def test_a_504_answered_from_outside_a_blocked_thread_is_counted(limited: Server) -> None:
    status, body, _ = raw_get(limited, "/csleep?s=3")
    assert status == 504, (status, body)
    limited.wait_for_log(r"answered request GET /csleep with 504 from outside")
    assert limited.get_json("/metrics")["invocations_cancelled"] == 1


def test_a_limit_after_the_first_byte_closes_the_connection_and_says_so(limited: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=10)
    conn.request("GET", "/stream_then_spin?s=3")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline() == b"first chunk\n"
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    limited.wait_for_log(r"request GET /stream_then_spin was cancelled \(reason=cpu\) after its "
                         r"response had started \(12 bytes sent\): closing the connection")
    wait_for(lambda: limited.events("closed"), 5, "the body to be closed")
    assert [e["name"] for e in limited.events("closed")] == ["stream_then_spin"]


def test_a_streaming_body_within_its_limits_is_closed_once(limited: Server) -> None:
    assert limited.get("/stream_ok") == (200, b"ab")
    wait_for(lambda: limited.events("closed"), 5, "the body to be closed")
    assert [e["name"] for e in limited.events("closed")] == ["stream_ok"]
    assert limited.get_json("/metrics")["invocations_cancelled"] == 0


@pytest.mark.parametrize("path, exc", [("/exit", "SystemExit"), ("/interrupt", "KeyboardInterrupt")])
def test_a_handler_raising_systemexit_gets_500_and_the_worker_lives_on(
        limited: Server, path: str, exc: str) -> None:
    pid = limited.get("/pid")[1]
    status, body = limited.get(path)
    assert (status, body) == (500, b"Internal Server Error")
    assert limited.get("/pid")[1] == pid, "the same worker answers after it"
    assert limited.log.count("request GET %s raised %s" % (path, exc)) == 1
    assert limited.log.count("Traceback") == 1


# -- HTTP/2 ----------------------------------------------------------------------------------------


@pytest.fixture
def h2server(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--threads", "3", "--http-protocols", "h2,h1", "--http2-cleartext",
                          "both", app=APP, toml=LIMITS)


def h2get(server: Server, path: str) -> Tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        resp = client.get("http://127.0.0.1:%d%s" % (server.port, path))
    return resp, time.monotonic() - started


def test_http2_requests_are_limited_and_counted(h2server: Server) -> None:
    resp, took = h2get(h2server, "/hog?s=3")
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 546 and resp.json()["code"] == "WORKER_LIMIT", resp.text
    assert took < 2.5
    resp, took = h2get(h2server, "/stream_spin?s=3")
    assert resp.status_code == 546 and took < 2.5
    metrics: Any = h2get(h2server, "/metrics")[0].json()
    # the readiness probe (HTTP/1.1), two HTTP/2 requests cancelled, and this one
    assert metrics["requests"] == 4 and metrics["invocations_cancelled"] == 2, metrics


def test_http2_blocked_request_is_answered_504_from_outside(h2server: Server) -> None:
    resp, took = h2get(h2server, "/csleep?s=4")
    assert resp.status_code == 504 and resp.json()["code"] == "REQUEST_IDLE_TIMEOUT", resp.text
    assert took < 3.5
    h2server.wait_for_log(r"answered request GET /csleep with 504 from outside")
    assert h2get(h2server, "/metrics")[0].json()["invocations_cancelled"] == 1
    assert os.path.exists(h2server.log_path)
