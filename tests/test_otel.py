"""``edgesync.otel``: task spans linked to their caller, in a real gunicorn worker, with the real SDK.

The test app (tests/apps/otel.py) exports every span through the SDK to a JSON-lines
file that these tests read; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

pytest.importorskip("opentelemetry.sdk")

from .support import NO_LIMITS, QUEUE, Redis, RQWorker, Server, limits, wait_for


def spans(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def wait_span(path: Path, predicate: Callable[[Dict[str, Any]], bool], what: str,
              timeout: float = 15) -> Dict[str, Any]:
    def found() -> Any:
        got = [s for s in spans(path) if predicate(s)]
        return got[0] if got else None
    span: Dict[str, Any] = wait_for(found, timeout, what)
    return span


def start(server_factory: Callable[..., Server], tmp_path: Path, *args: str,
          env: Dict[str, str] = NO_LIMITS, workers_ready: int = 1) -> Server:
    return server_factory(*args, app="tests.apps.otel:app", workers_ready=workers_ready,
                          env=dict(env, SPANS_FILE=str(tmp_path / "spans.jsonl")))


def test_a_task_span_links_to_the_request_span_and_is_not_its_child(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = start(server_factory, tmp_path, "--threads", "2")
    path = tmp_path / "spans.jsonl"
    status, body = server.get("/bg?id=one&sleep=0.3")
    assert status == 200
    task_id = body.decode()
    request = wait_span(path, lambda s: s["name"] == "GET /bg", "the request span")
    task = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.work", "the task span")
    inner = wait_span(path, lambda s: s["name"] == "inner one", "the task's own span")
    # A root span in a trace of its own, linked to the span that called wait_until...
    assert task["parent"] is None and task["trace_id"] != request["trace_id"]
    assert task["links"] == [{"trace_id": request["trace_id"], "span_id": request["span_id"],
                              "attributes": {"edgesync.link": "wait_until"}}]
    # ...which had ended before the task did (the response went first).
    assert request["end"] < task["end"]
    # The task's own spans are its children.
    assert inner["parent"] == task["span_id"] and inner["trace_id"] == task["trace_id"]
    assert task["kind"] == "CONSUMER" and task["status"] == "UNSET"
    attrs = task["attributes"]
    assert attrs["edgesync.task.name"] == "tests.apps.otel.work"
    assert attrs["edgesync.task.id"] == task_id
    assert attrs["edgesync.task.attempt"] == 1 and attrs["edgesync.task.outcome"] == "completed"
    assert attrs["messaging.system"] == "edgesync" and attrs["edgesync.task.queued_s"] >= 0


def test_a_task_span_the_sampler_drops_still_parents_the_tasks_own_spans(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    # Sampled out, the task span records nothing, yet it is the task's current span: the task's
    # own spans follow its decision (ParentBased) instead of joining the finished request's trace.
    server = start(server_factory, tmp_path, "--threads", "2", env=dict(NO_LIMITS, OTEL_TEST_DROP_TASKS="1"))
    path = tmp_path / "spans.jsonl"
    assert server.get("/bg?id=one&sleep=0")[0] == 200
    server.wait_for_events("task_done", where=lambda e: e["id"] == "one")
    request = wait_span(path, lambda s: s["name"] == "GET /bg", "the request span")
    # SimpleSpanProcessor exports as each span ends: "inner one" would be there before task_done.
    assert [s["name"] for s in spans(path) if s["name"] != "GET /pid"] == [request["name"]]  # (/pid: readiness)


def test_a_durable_task_whose_span_the_sampler_drops_gets_no_second_span(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    # The durable trace's own span is for a run outside an edgesync task (an RQ job); on a worker the
    # task hook's span is the run's span, recorded or not. (The test app's sampler would record a
    # second span: it drops only task spans started without a link.)
    env = dict(NO_LIMITS, OTEL_TEST_DROP_TASKS="1", EDGESYNC_DURABLE_JOURNAL=str(tmp_path / "journal.db"))
    server = start(server_factory, tmp_path, "--threads", "2", env=env)
    path = tmp_path / "spans.jsonl"
    assert server.get("/durable?id=d1&sleep=0")[0] == 200
    server.wait_for_events("durable_done", where=lambda e: e["id"] == "d1")
    # A request after the task returned: its span is exported after the task span would have been.
    assert server.get("/hello?id=after")[0] == 200
    wait_span(path, lambda s: s["attributes"].get("test.id") == "after", "the later request's span")
    assert [s["name"] for s in spans(path) if s["name"].startswith("edgesync.task")] == []


def test_a_failed_task_and_a_task_a_limit_cancelled(server_factory: Callable[..., Server],
                                                    tmp_path: Path) -> None:
    server = start(server_factory, tmp_path, "--threads", "2",
                   env=limits(cpu_soft_limit_ms=0, cpu_hard_limit_ms=300))
    path = tmp_path / "spans.jsonl"
    assert server.get("/fail?id=f")[0] == 200
    failed = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.fail", "the failed task")
    assert failed["attributes"]["edgesync.task.outcome"] == "failed" and failed["status"] == "ERROR"
    [exc] = [e for e in failed["events"] if e["name"] == "exception"]
    assert exc["attributes"]["exception.type"] == "ValueError"

    assert server.get("/burn?id=b")[0] == 200
    burnt = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.burn", "the cancelled task")
    assert burnt["attributes"]["edgesync.task.outcome"] == "cancelled"
    assert burnt["attributes"]["edgesync.task.cancelled_by"] == "cpu" and burnt["status"] == "ERROR"
    [cancelled] = [e for e in burnt["events"] if e["name"] == "edgesync.cancelled"]
    assert cancelled["attributes"]["edgesync.reason"] == "cpu"
    assert "cpu_hard_limit_ms=300" in cancelled["attributes"]["exception.message"]


def test_a_stop_marks_the_running_task_and_the_worker_span(server_factory: Callable[..., Server],
                                                           tmp_path: Path) -> None:
    server = start(server_factory, tmp_path, "--threads", "2")
    path = tmp_path / "spans.jsonl"
    pid = int(server.get("/pid")[1])
    assert server.get("/bg?id=slow&sleep=1.5")[0] == 200
    server.wait_for_events("task_start")
    server.signal(signal.SIGTERM)
    assert server.proc is not None and server.proc.wait(20) == 0
    task = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.work", "the task span", 5)
    # It finished inside the drain: told of the stop while it ran, then completed.
    assert [e["attributes"]["edgesync.reason"] for e in task["events"]
            if e["name"] == "edgesync.beforeunload"] == ["termination"]
    assert task["attributes"]["edgesync.task.outcome"] == "completed"
    worker = wait_span(path, lambda s: s["name"] == "edgesync.worker", "the worker span", 5)
    assert worker["pid"] == pid and worker["attributes"]["process.pid"] == pid
    assert [(e["name"], e["attributes"]["edgesync.reason"]) for e in worker["events"]] == [
        ("edgesync.beforeunload", "termination"), ("edgesync.unload", "termination")]
    assert worker["attributes"]["edgesync.requests"] >= 2
    assert worker["start"] < task["start"] < task["end"] <= worker["end"]


def test_an_abandoned_task_span_still_reaches_the_exporter(server_factory: Callable[..., Server],
                                                           tmp_path: Path) -> None:
    server = start(server_factory, tmp_path, "--threads", "2", "--graceful-timeout", "1")
    path = tmp_path / "spans.jsonl"
    assert server.get("/bg?id=long&sleep=30")[0] == 200
    server.signal(signal.SIGTERM)
    assert server.proc is not None and server.proc.wait(20) == 0
    task = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.work", "the task span", 5)
    assert task["attributes"]["edgesync.task.outcome"] == "abandoned" and task["status"] == "ERROR"
    assert [e["name"] for e in task["events"]] == ["edgesync.beforeunload", "edgesync.unload"]
    worker = wait_span(path, lambda s: s["name"] == "edgesync.worker", "the worker span", 5)
    [unload] = [e for e in worker["events"] if e["name"] == "edgesync.unload"]
    assert unload["attributes"]["edgesync.abandoned_tasks"] == 1
    assert unload["attributes"]["edgesync.abandoned_task_ids"] == [task["attributes"]["edgesync.task.id"]]


def test_a_durable_task_rerun_after_its_worker_died_links_to_the_original_trace(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    env = dict(NO_LIMITS, EDGESYNC_DURABLE_JOURNAL=str(tmp_path / "journal.db"))
    server = start(server_factory, tmp_path, "-w", "2", "--threads", "2", env=env, workers_ready=2)
    path = tmp_path / "spans.jsonl"
    assert server.get("/durable?id=d1&sleep=60")[0] == 200
    [first] = server.wait_for_events("durable_start", where=lambda e: e["attempt"] == 1)
    request = wait_span(path, lambda s: s["name"] == "GET /durable", "the request span")
    os.kill(first["pid"], signal.SIGKILL)  # the task's span dies with it, never exported
    server.wait_for_events("durable_start", where=lambda e: e["attempt"] == 2, timeout=30)
    rerun = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.durable_work"
                      and s["attributes"]["edgesync.task.attempt"] == 2, "the re-run's span")
    assert rerun["pid"] != first["pid"] and rerun["parent"] is None
    assert rerun["links"] == [{"trace_id": request["trace_id"], "span_id": request["span_id"],
                               "attributes": {"edgesync.link": "durable_origin"}}]
    assert rerun["attributes"]["edgesync.task.outcome"] == "completed"


def test_a_durable_task_handed_to_rq_links_to_the_original_trace(
        server_factory: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        redis_server: Redis, rq_workers: Callable[[Redis, Server], RQWorker]) -> None:
    env = dict(NO_LIMITS, EDGESYNC_HANDOFF="rq", EDGESYNC_HANDOFF_ON="always",
               EDGESYNC_HANDOFF_REDIS_URL=redis_server.url, EDGESYNC_HANDOFF_QUEUE=QUEUE)
    server = start(server_factory, tmp_path, "--threads", "2", env=env)
    path = tmp_path / "spans.jsonl"
    assert server.get("/durable?id=r1")[0] == 200
    request = wait_span(path, lambda s: s["name"] == "GET /durable", "the request span")
    monkeypatch.setenv("SPANS_FILE", str(path))  # the RQ worker imports tests.apps.otel, which traces
    rq_workers(redis_server, server)
    job = wait_span(path, lambda s: s["name"] == "edgesync.task tests.apps.otel.durable_work", "the job's span", 30)
    [ran] = server.wait_for_events("durable_start")
    assert job["pid"] == ran["pid"] != server.worker_pids()[0]
    assert job["parent"] is None and job["links"] == [
        {"trace_id": request["trace_id"], "span_id": request["span_id"],
         "attributes": {"edgesync.link": "durable_origin"}}]
    assert job["attributes"]["edgesync.task.attempt"] == 1
