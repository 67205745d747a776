"""edgesync.Worker under real gunicorn masters: tasks, context, every way a worker ends."""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from .support import REPO, Server, wait_for


def test_a_worker_takes_no_more_connections_than_it_has_free_threads(
        server_factory: Callable[..., Server]) -> None:
    # gthread accepts up to worker_connections: a worker could take every connection
    # and serve them one thread at a time while its sibling idled (kept-alive
    # connections never move). Here four connections wait in the kernel's queue
    # before any request: each worker (one thread) must take one at a time.
    server = server_factory("--workers", "2", "--threads", "1", workers_ready=2)
    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(4)]
    for c in conns:
        c.connect()
    for c in conns:
        c.request("GET", "/sleep?s=0.5&pid=1")
    answers = [c.getresponse().read().decode() for c in conns]
    for c in conns:
        c.close()
    per_worker = collections.Counter(a.split()[1] for a in answers)
    assert sorted(per_worker.values()) == [2, 2], answers


def test_response_returns_before_its_task_finishes(server: Server) -> None:
    t0 = time.monotonic()
    status, body = server.get("/task?id=t1&sleep=1.5")
    answered_in = time.monotonic() - t0
    assert (status, body) == (200, b"scheduled t1")
    assert answered_in < 1.0, "the response waited for its task (%.2fs)" % answered_in
    assert not server.events("task_done")
    done = server.wait_for_events("task_done", timeout=10)
    assert done[0]["id"] == "t1"


def test_coroutines_run_to_completion(server: Server) -> None:
    assert server.get("/async?id=a1")[0] == 200
    assert server.wait_for_events("task_done")[0]["id"] == "a1"


def test_contextvars_reach_their_task_and_never_cross(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--threads", "8", "--backlog", "2048",
                            env={"EDGESYNC_BACKGROUND_THREADS": "16"})
    ids = [str(i) for i in range(300)]
    with ThreadPoolExecutor(16) as clients:
        statuses = list(clients.map(lambda i: server.get("/ctx?id=" + i)[0], ids))
    assert statuses == [200] * len(ids)
    seen = server.wait_for_events("ctx", count=len(ids), timeout=30)
    assert sorted(e["expected"] for e in seen) == sorted(ids)
    crossed = [e for e in seen if e["seen"] != e["expected"]]
    assert crossed == []


def test_queue_full_at_exactly_the_bound(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"EDGESYNC_MAX_PENDING_TASKS": "10", "EDGESYNC_BACKGROUND_THREADS": "2"})
    result = server.get_json("/burst?n=15&sleep=1")
    assert (result["accepted"], result["refused"]) == (10, 5)
    assert "max_pending_tasks" in result["message"]
    # Nothing accepted is dropped: all ten complete.
    server.wait_for_events("task_done", count=10, timeout=15)


def test_failing_task_dispatches_rejection_and_worker_keeps_serving(server: Server) -> None:
    pid = server.get("/pid")[1]
    assert server.get("/fail")[0] == 200
    event = server.wait_for_events("unhandledrejection")[0]
    assert "boom from a background task" in event["error"]
    assert event["task"] == "tests.apps.core.failing_task"
    server.wait_for_log(r"background task tests.apps.core.failing_task raised ValueError")
    assert server.get("/pid") == (200, pid)
    server.stop()
    assert server.log.count("ValueError: boom from a background task") == 1


def test_prevent_default_silences_the_rejection_log(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"PREVENT_DEFAULT": "1"})
    server.get("/fail")
    server.wait_for_events("unhandledrejection")
    server.stop()
    assert "boom from a background task" not in server.log


def test_sigterm_fires_termination_then_lets_a_short_task_finish(server: Server) -> None:
    server.get("/task?id=short&sleep=1")
    server.wait_for_events("task_start")
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    events = server.events()
    kinds = [(e["type"], e.get("reason") or e.get("id")) for e in events if e["type"] != "task_start"]
    assert kinds == [("beforeunload", "termination"), ("task_done", "short")]
    assert events[1]["pending"] == ["tests.apps.core.sleepy_task"]
    assert 0 < events[1]["time_remaining"] <= 5
    assert "abandoned task" not in server.log
    assert "unloaded (termination; 2 requests served, 0 tasks abandoned)" in server.log


def test_sigterm_abandons_and_logs_a_task_that_does_not_fit(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--graceful-timeout", "2")
    server.get("/task?id=long&sleep=60")
    server.wait_for_events("task_start")
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    assert time.monotonic() - t0 < 2.0 + 1.0
    assert [e["reason"] for e in server.events("beforeunload")] == ["termination"]
    server.wait_for_log(r"abandoned task tests\.apps\.core\.sleepy_task \(running, ran \d+\.\d+s\)")
    assert not server.events("task_done")
    assert "was sent SIGKILL" not in server.log


def test_hup_reload_drains_the_old_worker_and_serves_from_a_new_one(server: Server) -> None:
    old_pid = int(server.get("/pid")[1])
    server.get("/task?id=across-reload&sleep=1")
    server.wait_for_events("task_start")
    server.signal(signal.SIGHUP)
    server.wait_for_events("beforeunload", where=lambda e: e["pid"] == old_pid)
    server.wait_for_events("task_done", where=lambda e: e["pid"] == old_pid)
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % old_pid)
    new_pid = int(server.get("/pid")[1])
    assert new_pid != old_pid
    assert [e["reason"] for e in server.events("beforeunload")] == ["termination"]


def test_sigquit_still_fires_termination_and_logs_abandoned_work(server: Server) -> None:
    server.get("/task?id=cut&sleep=60")
    server.wait_for_events("task_start")
    server.signal(signal.SIGQUIT)
    server.stop()
    assert [e["reason"] for e in server.events("beforeunload")] == ["termination"]
    assert "abandoned task tests.apps.core.sleepy_task (running" in server.log


def test_ctrl_c_fires_termination_in_every_worker(server_factory: Callable[..., Server]) -> None:
    # Ctrl-C in a terminal sends SIGINT to the whole process group: master and workers.
    server = server_factory("--workers", "2", workers_ready=2)
    server.wait_for_log(r"worker \d+: serving \(policy=per_worker", count=2)
    server.get("/task?id=cut&sleep=60")
    server.wait_for_events("task_start")
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGINT)
    assert wait_for(lambda: server.exited() is not None, 15, "gunicorn to exit") is not None
    pids = set(server.worker_pids()) | {e["pid"] for e in server.events("beforeunload")}
    reasons = {e["pid"]: e["reason"] for e in server.events("beforeunload")}
    assert len(reasons) == 2 and set(reasons.values()) == {"termination"}, (pids, reasons)
    assert "abandoned task tests.apps.core.sleepy_task (running" in server.log


def test_max_requests_retires_after_pending_tasks_finish(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--max-requests", "3")
    first = int(server.get("/pid")[1])  # the readiness probe was request 1
    server.get("/task?id=before-retire&sleep=1")  # request 3: retire after it
    early = server.wait_for_events("beforeunload", where=lambda e: e["pid"] == first)
    assert early[0]["reason"] == "early_drop"
    done = server.events("task_done")
    assert [e["id"] for e in done] == ["before-retire"]
    assert done[0]["t"] <= early[0]["t"]
    server.wait_for_log(r"worker %d: retiring \(reason=max_requests\)" % first)
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % first)
    server.wait_ready()
    assert int(server.get("/pid")[1]) != first
    assert "exited with code" not in server.log


def test_oneshot_retires_after_each_response_and_cuts_background_work(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"EDGESYNC_POLICY": "oneshot"})
    first_pids = {e for e in server.worker_pids()}
    status, _ = server.get("/task?id=cut-off&sleep=30")
    assert status == 200
    # The readiness probe had its own one-shot worker; this is the /task one.
    early = server.wait_for_events("beforeunload", where=lambda e: bool(e["pending"]))
    assert early[0]["reason"] == "early_drop"
    assert early[0]["pending"] == ["tests.apps.core.sleepy_task"]
    server.wait_for_log(r"abandoned task tests\.apps\.core\.sleepy_task")
    pid = early[0]["pid"]
    # Only the /task request schedules a task, so this is the /task worker; it may have been
    # forked before the request (it replaced the readiness probe's), but it served no other.
    server.wait_for_log(r"worker %d: unloaded \(early_drop; 1 requests served, 1 tasks abandoned\)" % pid)
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % pid)
    server.wait_ready()
    # wait_ready's own request retired a worker too, and under oneshot there is a
    # moment with no live worker (one logged its exit, the next not yet its boot):
    # wait for a newcomer rather than sample the log once.
    wait_for(lambda: set(server.worker_pids()) - first_pids - {pid}, 10, "a worker born after the /task one")
    assert not server.events("task_done")


def test_listeners_registered_at_import_work_with_preload(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--preload")
    server.get("/task?id=p&sleep=0.2")
    server.wait_for_events("task_done")
    server.stop()
    assert [e["reason"] for e in server.events("beforeunload")] == ["termination"]


def test_metrics_describe_the_instance(server: Server) -> None:
    server.get("/task?id=m&sleep=0")
    server.wait_for_events("task_done")
    m = wait_for(lambda: (lambda m: m if m["tasks"]["completed"] == 1 else None)(server.get_json("/metrics")),
                 5, "the completed task to be counted")
    assert m["state"] == "serving"
    assert m["requests"] >= 3
    assert m["rss_bytes"] >= m["rss_baseline_bytes"] > 0
    assert m["beforeunload_dispatched"] == []


@pytest.mark.parametrize(("preload", "mold"), [(False, "false"), (True, "false"), (False, "true")],
                         ids=["import-in-worker", "preload", "mold"])
def test_a_worker_says_what_its_boot_cost(server_factory: Callable[..., Server], preload: bool, mold: str) -> None:
    # What each recycle costs: the serving line and runtime_metrics() give the CPU the
    # worker spent before it served, its app's import included unless the master or a mold did it.
    server = server_factory(*(["--preload"] if preload else []),
                            env={"BOOT_CPU_MS": "300", "EDGESYNC_MOLD": mold})
    pattern = r"worker (\d+): serving \(.*; booted in ([\d.]+)s, (\d+) ms of CPU\)"
    line = re.search(pattern, server.wait_for_log(pattern)[0])
    assert line is not None
    pid, boot_s, boot_cpu_ms = int(line.group(1)), float(line.group(2)), int(line.group(3))
    m = server.get_json("/metrics")
    assert m["pid"] == pid and m["boot_cpu_s"] == pytest.approx(boot_cpu_ms / 1000, abs=0.001)
    if preload or mold == "true":
        assert boot_cpu_ms < 300, "the master or the mold imported the app: %d ms" % boot_cpu_ms
    else:
        assert boot_cpu_ms >= 300 and boot_s >= 0.3, (boot_s, boot_cpu_ms)


BAD_CONFIGS = [
    ("[edge_runtime]\ncpu_hard_limit_ms = \"fast\"\n", "cpu_hard_limit_ms", "'fast'"),
    ("[edge_runtime]\nwall_clock_limit_ms = -5\n", "wall_clock_limit_ms", "-5"),
    ("[edge_runtime]\ncpu_hard_limt_ms = 10\n", "cpu_hard_limt_ms", "cpu_hard_limit_ms"),
    ("[edge_runtime\npolicy = 'oneshot'\n", "edgesync.toml", "line"),
]


@pytest.mark.parametrize("toml,key,detail", BAD_CONFIGS, ids=["type", "negative", "unknown", "broken"])
def test_bad_config_stops_startup_before_any_worker(server_factory: Callable[..., Server], toml: str,
                                                    key: str, detail: str) -> None:
    server = server_factory(toml=toml, start=False)
    server.start(workers_ready=0)
    code = wait_for(lambda: server.exited(), 15, "gunicorn to exit")
    assert code != 0
    log = server.log
    assert "edgesync.toml" in log and key in log and detail in log, log
    assert "Booting worker" not in log


def test_script_outside_gunicorn_drains_at_exit(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import time, edgesync\n"
        "edgesync.add_event_listener('beforeunload', lambda ev: print('beforeunload', ev.reason, "
        "[t.name for t in ev.pending_tasks], flush=True))\n"
        "def work():\n"
        "    time.sleep(0.5)\n"
        "    print('task done', flush=True)\n"
        "edgesync.wait_until(work)\n"
        "print('main done', flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["main done", "beforeunload termination ['__main__.work']",
                                       "task done"]


def test_metrics_json_is_plain_data(server: Server) -> None:
    m = server.get_json("/metrics")
    assert json.loads(json.dumps(m)) == m
