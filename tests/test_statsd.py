"""edgesync's counters and gauges reach a real statsd socket through gunicorn's statsd logger."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from .support import Server, StatsdListener


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.mark.slow
def test_counters_gauges_and_reasons_arrive_with_gunicorns_prefix(
        statsd: StatsdListener, server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "2", "--statsd-host", "127.0.0.1:%d" % statsd.port,
                            "--statsd-prefix", "myapp", "--max-requests", "20",
                            env={"EDGESYNC_CPU_SOFT_LIMIT_MS": "0", "EDGESYNC_CPU_HARD_LIMIT_MS": "300",
                                 "PREVENT_DEFAULT": "1"})
    assert server.get("/task?id=s1&sleep=0.05")[0] == 200
    assert server.get("/fail")[0] == 200
    statsd.wait_for("myapp.edgesync.tasks.completed:1|c", "myapp.edgesync.tasks.failed:1|c",
                    "myapp.edgesync.tasks.queued:0|g", "myapp.edgesync.tasks.running:0|g")

    # A request over its CPU hard limit: cancelled (546), after beforeunload (cpu).
    assert server.get("/hog?s=10")[0] == 546
    statsd.wait_for("myapp.edgesync.invocations.cancelled:1|c", "myapp.edgesync.beforeunload.cpu:1|c")
    # gunicorn's own metrics share the socket and the prefix.
    assert any(line.startswith("myapp.gunicorn.requests:") for line in statsd.lines)

    # Reach max_requests: the worker retires, drains and fires beforeunload (early_drop).
    for _ in range(20):
        server.get("/pid")
        if "retiring (reason=max_requests)" in server.log:
            break
    statsd.wait_for("myapp.edgesync.retirements.max_requests:1|c",
                    "myapp.edgesync.beforeunload.early_drop:1|c")


@pytest.mark.slow
def test_a_task_that_ends_during_the_retire_drain_is_counted(
        statsd: StatsdListener, server_factory: Callable[..., Server]) -> None:
    # The first request (the fixture's readiness probe) is 1 of 2; this task's
    # request is the last one: the task finishes while the worker drains to exit.
    server = server_factory("--statsd-host", "127.0.0.1:%d" % statsd.port, "--statsd-prefix", "myapp",
                            "--max-requests", "2")
    assert server.get("/task?id=last&sleep=0.3")[0] == 200
    server.wait_for_log(r"unloaded \(early_drop")
    statsd.wait_for("myapp.edgesync.beforeunload.early_drop:1|c", "myapp.edgesync.tasks.completed:1|c",
                    timeout=5)
