"""edgesync.testing: TestRuntime / runtime() / the ``edgesync_runtime`` fixture that app test suites use."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future
from typing import Any, List

import pytest

import edgesync
from edgesync import ConfigError, Settings, TaskInfo, testing
from edgesync._events import listeners
from edgesync._pool import task_name
from edgesync._runtime import peek
from edgesync.testing import TaskTimeout, TestRuntime

WAIT = 10.0


pytestmark = pytest.mark.usefixtures("registry_restored")


def slow_upload(release: threading.Event) -> str:
    assert release.wait(WAIT), "never released"
    return "uploaded"


def send_email() -> str:
    return "sent"


def boom() -> None:
    raise ValueError("boom")


# -- the fixture and runtime() ---------------------------------------------------------------------------


def test_fixture_installs_a_fresh_runtime(edgesync_runtime: TestRuntime) -> None:
    assert peek() is edgesync_runtime.runtime
    assert edgesync_runtime.settings == Settings()
    assert edgesync_runtime.metrics()["tasks"] == dict.fromkeys(
        ("queued", "running", "tracked", "completed", "failed", "abandoned"), 0)
    assert edgesync.wait_until(send_email).result(WAIT) == "sent"
    edgesync_runtime.wait()
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 1


def test_runtime_applies_setting_overrides() -> None:
    with testing.runtime(background_threads=1, max_pending_tasks=2, policy="oneshot") as rt:
        assert (rt.settings.background_threads, rt.settings.max_pending_tasks, rt.settings.policy) == (1, 2, "oneshot")
        assert rt.runtime.pool.max_threads == 1 and rt.runtime.pool.max_pending == 2
    base = dataclasses.replace(Settings(), max_pending_tasks=7)
    with testing.runtime(base, background_threads=3) as rt:
        assert (rt.settings.max_pending_tasks, rt.settings.background_threads) == (7, 3)


def test_invalid_overrides_fail_before_anything_is_installed() -> None:
    installed = peek()
    with pytest.raises(ConfigError, match="max_pending_tasks"):
        TestRuntime(max_pending_tasks=-1)
    with pytest.raises(TypeError):
        TestRuntime(no_such_setting=1)
    assert peek() is installed


def test_runtime_context_manager_closes_on_error() -> None:
    installed = peek()
    with pytest.raises(ZeroDivisionError):
        with testing.runtime() as rt:
            assert peek() is rt.runtime
            1 / 0  # noqa: B018
    assert peek() is installed and rt.runtime.state == "unloaded"


# -- wait() ------------------------------------------------------------------------------------------------


def test_wait_covers_tasks_scheduled_by_tasks() -> None:
    done: List[int] = []

    def step(n: int) -> None:
        if n < 20:
            edgesync.wait_until(step, n + 1)  # scheduled before this task counts as finished
        done.append(n)

    with testing.runtime(background_threads=1) as rt:
        edgesync.wait_until(step, 0)
        rt.wait(WAIT)
        assert sorted(done) == list(range(21))
        assert rt.metrics()["tasks"]["completed"] == 21


def test_wait_raises_task_timeout_naming_the_pending_task(
        edgesync_runtime: TestRuntime, release: threading.Event) -> None:
    edgesync.wait_until(slow_upload, release)
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        edgesync_runtime.wait(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    assert isinstance(info.value, AssertionError), "a failed wait fails the test like an assert"
    message = str(info.value)
    assert "0.2s" in message and "%s (" % task_name(slow_upload) in message, message
    assert "tests.test_testing_helpers.slow_upload" in message
    release.set()
    edgesync_runtime.wait(WAIT)


def test_wait_returns_after_the_rejection_listeners_ran(release: threading.Event) -> None:
    reported: List[BaseException] = []

    def report(event: edgesync.UnhandledRejectionEvent) -> None:
        release.wait(0.5)  # a listener doing I/O (e.g. sending the error to a tracker)
        reported.append(event.reason)
        event.prevent_default()

    edgesync.add_event_listener("unhandledrejection", report)
    try:
        with testing.runtime() as rt:
            fut = edgesync.wait_until(boom)
            rt.wait(WAIT)
            seen = list(reported)
            fut.exception(WAIT)
            release.set()
            deadline = time.monotonic() + WAIT
            while not reported and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        edgesync.remove_event_listener("unhandledrejection", report)
    assert seen == [fut.exception()], "wait() returned before the listener had run"


# -- record() -------------------------------------------------------------------------------------------------


def test_record_collects_events_until_close() -> None:
    rt = TestRuntime(background_threads=1)
    try:
        rejections = rt.record("unhandledrejection")
        unloads = rt.record("beforeunload")
        assert rejections == [] and unloads == []
        fut = edgesync.wait_until(boom)
        edgesync.wait_until(send_email).result(WAIT)  # one thread: boom, its event included, came first
        rt.fire_beforeunload("memory")
        assert [e.reason for e in rejections] == [fut.exception()]
        assert [e.reason for e in unloads] == ["memory"]
        assert rejections[0].default_prevented is False
    finally:
        rt.close()
    assert rejections.append not in listeners("unhandledrejection")
    assert unloads.append not in listeners("beforeunload")
    rt2 = TestRuntime()
    try:
        rt2.fire_beforeunload("memory")
    finally:
        rt2.close()
    assert [e.reason for e in unloads] == ["memory"], "a closed recorder receives nothing more"


def test_record_of_an_unknown_type_raises(edgesync_runtime: TestRuntime) -> None:
    with pytest.raises(ValueError, match="'beforeunload', 'unhandledrejection', 'unload'"):
        edgesync_runtime.record("rejection")


# -- fire_beforeunload() -------------------------------------------------------------------------------------


def test_fire_beforeunload_waits_for_the_listeners(edgesync_runtime: TestRuntime) -> None:
    saved: List[str] = []

    def save_progress(event: edgesync.BeforeUnloadEvent) -> None:
        threading.Event().wait(0.05)  # work that takes a while, off the caller's thread
        saved.append(event.reason)

    edgesync.add_event_listener("beforeunload", save_progress)
    try:
        edgesync_runtime.fire_beforeunload("wall_clock")
        assert saved == ["wall_clock"]
    finally:
        edgesync.remove_event_listener("beforeunload", save_progress)


@pytest.mark.parametrize("reason", ["shutdown", "WALL_CLOCK", "", "sigterm"])
def test_fire_beforeunload_with_an_unknown_reason_raises(edgesync_runtime: TestRuntime, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        edgesync_runtime.fire_beforeunload(reason)
    message = str(info.value)
    assert repr(reason) in message
    assert "wall_clock, cpu, memory, early_drop, termination" in message, message
    assert edgesync_runtime.runtime.dispatched() == [], "nothing was dispatched"


def test_fire_beforeunload_times_out_on_a_stuck_listener(
        edgesync_runtime: TestRuntime, release: threading.Event) -> None:
    def stuck(event: Any) -> None:
        release.wait(WAIT)

    edgesync.add_event_listener("beforeunload", stuck)
    try:
        with pytest.raises(TaskTimeout, match="beforeunload listeners still running after 0.1s"):
            edgesync_runtime.fire_beforeunload("cpu", timeout=0.1)
    finally:
        release.set()
        edgesync.remove_event_listener("beforeunload", stuck)


# -- close() -------------------------------------------------------------------------------------------------


def test_close_restores_the_previous_runtime_and_abandons_what_is_left(release: threading.Event) -> None:
    with testing.runtime() as outer:
        inner = TestRuntime(background_threads=1)
        assert peek() is inner.runtime
        running = edgesync.wait_until(slow_upload, release)
        queued = edgesync.wait_until(send_email)
        wait_for_running(inner)

        abandoned = inner.close(timeout=0.1)

        assert peek() is outer.runtime, "the previous runtime is back"
        assert [(t.name, t.state) for t in abandoned] == [
            (task_name(slow_upload), "running"), (task_name(send_email), "queued")]
        assert all(isinstance(t, TaskInfo) for t in abandoned)
        assert queued.cancelled() and not running.done()
        metrics = inner.metrics()
        assert metrics["state"] == "unloaded" and metrics["tasks"]["abandoned"] == 2
        with pytest.raises(RuntimeError, match="unloading"):
            inner.runtime.wait_until(send_email, (), {})

        assert edgesync.wait_until(send_email).result(WAIT) == "sent", "new work goes to the outer runtime"
        outer.wait(WAIT)
        assert outer.metrics()["tasks"]["completed"] == 1
        release.set()
        assert running.result(WAIT) == "uploaded", "an abandoned task that runs is not interrupted"


def wait_for_running(rt: TestRuntime) -> None:
    deadline = time.monotonic() + WAIT
    while rt.metrics()["tasks"]["running"] == 0:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.005)


def test_close_first_waits_for_pending_tasks() -> None:
    rt = TestRuntime()
    fut = edgesync.wait_until(threading.Event().wait, 0.2)  # a task that takes 0.2 s
    started = time.monotonic()
    assert rt.close(timeout=WAIT) == []
    assert time.monotonic() - started < WAIT / 2
    assert fut.result(0) is False and rt.metrics()["tasks"]["completed"] == 1


def test_metrics_is_the_runtime_snapshot(edgesync_runtime: TestRuntime) -> None:
    elsewhere: Future[None] = Future()
    edgesync.wait_until(elsewhere)
    metrics = edgesync_runtime.metrics()
    assert metrics["tasks"]["tracked"] == 1 and metrics["state"] == "serving"
    assert set(metrics) == set(edgesync.runtime_metrics())
    elsewhere.set_result(None)
    edgesync_runtime.wait(WAIT)
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 1
