"""``edgesync.server_metrics()``: every worker of the server, whichever worker answers."""

from __future__ import annotations

from typing import Any, Callable, Dict

import edgesync

from .support import Server, wait_for


def test_outside_gunicorn_there_is_no_server_view() -> None:
    assert edgesync.server_metrics() is None


def test_every_worker_answers_with_the_whole_server(server_factory: Callable[..., Server]) -> None:
    server = server_factory("-w", "2", "--threads", "2", workers_ready=2)
    for i in range(20):
        assert server.get("/task?id=t%d&sleep=0" % i)[0] == 200
    pids = set(server.worker_pids())
    assert len(pids) == 2

    def whole() -> Dict[str, Any]:
        view: Dict[str, Any] = server.get_json("/server_metrics")
        serving = {w["pid"] for w in view["workers"] if w["state"] == "serving"}
        done = view["totals"]["tasks_completed"] >= 20 and serving == pids
        return view if done else {}
    view = wait_for(whole, 10, "both workers' figures, all 20 tasks completed")
    assert view["totals"]["requests"] >= 21  # the readiness probes, the 20 requests, this one
    assert view["totals"]["requests"] == sum(w["requests"] for w in view["workers"])
    # Each worker's own runtime_metrics agrees with its line in the server's view.
    own = server.get_json("/metrics")
    [line] = [w for w in view["workers"] if w["pid"] == own["pid"]]
    assert line["tasks_completed"] <= own["tasks"]["completed"]
    assert max(w["figures_age_s"] for w in view["workers"]) < 5
