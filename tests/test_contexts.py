"""Each request runs in a fresh contextvars context: no value crosses from one request to the next.

gthread reuses its request threads and nothing resets their context, so a ContextVar a request
set is what the next request on that thread starts with (and what the tasks it schedules see).
"""

from __future__ import annotations

import http.client
from typing import Callable

from .support import Server

N = 200


def test_no_request_or_task_sees_another_requests_context(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "4", app="tests.apps.contexts:app")
    keepalive = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for i in range(N):
        path = "/?r=r%d%s" % (i, "&set=t%d" % i if i % 3 == 0 else "")
        if i % 2:  # half on one kept-alive connection, half on new connections
            keepalive.request("GET", path)
            resp = keepalive.getresponse()
            assert resp.status == 200
            resp.read()
        else:
            assert server.get(path)[0] == 200
    keepalive.close()
    # (the server's readiness probe is request "?")
    tasks = [e for e in server.wait_for_events("task", count=N + 1) if e["request"] != "?"]
    requests = [e for e in server.events("request") if e["request"] != "?"]
    leaked_into_requests = [e for e in requests if e["at_start"] != "-"]
    leaked_into_tasks = [e for e in tasks if e["seen"] != e["expected"]]
    assert len(requests) == N
    assert leaked_into_requests == [], "%d of %d requests started with another request's value" % (
        len(leaked_into_requests), N)
    assert leaked_into_tasks == [], "%d tasks saw another request's value" % len(leaked_into_tasks)
    # What the app set at import stays visible to every request and task.
    assert {e["app"] for e in requests} | {e["app"] for e in tasks} == {"contexts-app"}


def test_a_streaming_body_is_produced_in_its_requests_context(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", app="tests.apps.contexts:app")
    assert server.get("/?r=s1&set=mine&stream=1") == (200, b"mine")
    assert server.get("/?r=s2&stream=1") == (200, b"-")
    tasks = server.wait_for_events("task", count=3, where=lambda e: True)
    assert {e["request"]: e["seen"] for e in tasks if e["request"] != "?"} == {"s1": "mine", "s2": "-"}
