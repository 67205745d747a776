"""edgesync events, in-process: the listener registry (DOM rules), dispatch, ``beforeunload`` and
``unhandledrejection``.

Each test removes the listeners it adds (``listen``); an autouse check fails a test that leaves the
process-wide registry changed, so no test needs ``clear_listeners``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

import edgesync
from edgesync import BeforeUnloadEvent, TaskInfo, UnhandledRejectionEvent, testing
from edgesync._events import EVENT_TYPES, REASONS, dispatch, listeners
from edgesync._pool import task_name

WAIT = 10.0
#: The README's beforeunload reasons, written out on purpose: the test must not read the module's own constant.
DESIGN_REASONS = ("wall_clock", "cpu", "memory", "early_drop", "termination")
EVENTS_THREAD = "edgesync-events"


pytestmark = pytest.mark.usefixtures("registry_restored")


@pytest.fixture
def listen() -> Iterator[Callable[[str, Callable[[Any], Any]], None]]:
    """``listen(type, listener)``: add a listener that is removed when the test ends."""
    added: List[Tuple[str, Callable[[Any], Any]]] = []

    def add(type: str, listener: Callable[[Any], Any]) -> None:
        edgesync.add_event_listener(type, listener)
        added.append((type, listener))

    yield add
    for type, listener in added:
        edgesync.remove_event_listener(type, listener)


def unload_event(reason: str = "termination") -> BeforeUnloadEvent:
    return BeforeUnloadEvent(reason, time.monotonic() + 5, ())


def boom() -> None:
    raise ValueError("boom from a task")


# -- the registry ------------------------------------------------------------------------------------------


def test_event_types_and_reasons_match_the_design() -> None:
    assert EVENT_TYPES == ("beforeunload", "unhandledrejection", "unload")
    assert REASONS == DESIGN_REASONS
    assert BeforeUnloadEvent.type == "beforeunload"
    assert UnhandledRejectionEvent.type == "unhandledrejection"


def test_same_listener_added_twice_is_called_once() -> None:
    calls: List[str] = []

    def listener(event: Any) -> None:
        calls.append(event.reason)

    edgesync.add_event_listener("beforeunload", listener)
    try:
        edgesync.add_event_listener("beforeunload", listener)
        assert listeners("beforeunload").count(listener) == 1
        dispatch(unload_event("cpu"))
        assert calls == ["cpu"]
    finally:
        edgesync.remove_event_listener("beforeunload", listener)
    assert listener not in listeners("beforeunload"), "one remove undoes the (single) registration"


def test_bound_methods_are_the_same_listener() -> None:
    class Saver:
        def __init__(self) -> None:
            self.saved: List[str] = []

        def on_unload(self, event: BeforeUnloadEvent) -> None:
            self.saved.append(event.reason)

    saver = Saver()
    edgesync.add_event_listener("beforeunload", saver.on_unload)
    edgesync.add_event_listener("beforeunload", saver.on_unload)  # a new bound-method object, equal
    dispatch(unload_event("memory"))
    assert saver.saved == ["memory"]
    edgesync.remove_event_listener("beforeunload", saver.on_unload)
    dispatch(unload_event("memory"))
    assert saver.saved == ["memory"]


def test_removing_an_unknown_listener_is_a_no_op(listen: Callable[..., None]) -> None:
    def registered(event: Any) -> None:
        pass

    def never_added(event: Any) -> None:
        pass

    listen("unhandledrejection", registered)
    edgesync.remove_event_listener("beforeunload", never_added)
    edgesync.remove_event_listener("beforeunload", registered)  # registered, but for the other type
    assert listeners("unhandledrejection")[-1] is registered


def test_listeners_run_in_registration_order(listen: Callable[..., None]) -> None:
    order: List[str] = []

    def make(name: str) -> Callable[[Any], None]:
        def listener(event: Any) -> None:
            order.append(name)
        return listener

    a, b, c = make("a"), make("b"), make("c")
    for listener in (a, b, c):
        listen("beforeunload", listener)
    listen("beforeunload", a)  # already there: keeps its place
    dispatch(unload_event())
    assert order == ["a", "b", "c"]

    order.clear()
    edgesync.remove_event_listener("beforeunload", a)
    edgesync.add_event_listener("beforeunload", a)  # re-added: now last
    dispatch(unload_event())
    assert order == ["b", "c", "a"]


@pytest.mark.parametrize("type", ["load", "BeforeUnload", "", "before_unload", None])
def test_unknown_event_type_raises_value_error_naming_accepted_types(type: Any) -> None:
    def listener(event: Any) -> None:
        pass

    for call in (edgesync.add_event_listener, edgesync.remove_event_listener):
        with pytest.raises(ValueError) as info:
            call(type, listener)
        message = str(info.value)
        assert repr(type) in message and "'beforeunload'" in message and "'unhandledrejection'" in message, message


def test_unhashable_event_type_gets_the_same_clear_error() -> None:
    with pytest.raises(ValueError, match="beforeunload"):
        edgesync.add_event_listener(["beforeunload"], print)  # type: ignore[arg-type]


@pytest.mark.parametrize("listener", [None, 42, "print", ["not", "callable"]], ids=repr)
def test_non_callable_listener_raises_type_error_naming_it(listener: Any) -> None:
    with pytest.raises(TypeError) as info:
        edgesync.add_event_listener("beforeunload", listener)
    assert repr(listener) in str(info.value) and "callable" in str(info.value)


@pytest.mark.parametrize("error", [RuntimeError("listener broke"), SystemExit(2)], ids=lambda e: type(e).__name__)
def test_raising_listener_is_logged_and_the_next_one_still_runs(
        listen: Callable[..., None], caplog: pytest.LogCaptureFixture, error: BaseException) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    seen: List[str] = []

    def broken(event: Any) -> None:
        raise error

    listen("beforeunload", broken)
    listen("beforeunload", lambda event: seen.append(event.reason))
    dispatch(unload_event("wall_clock"))

    assert seen == ["wall_clock"]
    [record] = [r for r in caplog.records if r.name == "edgesync"]
    assert record.levelno == logging.ERROR
    assert "beforeunload listener" in record.getMessage() and "broken" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is error


# -- beforeunload --------------------------------------------------------------------------------------------


def test_beforeunload_event_shape(listen: Callable[..., None]) -> None:
    got: List[Tuple[BeforeUnloadEvent, str]] = []
    listen("beforeunload", lambda event: got.append((event, threading.current_thread().name)))
    with testing.runtime() as rt:
        for reason in DESIGN_REASONS:
            before = time.monotonic()
            rt.fire_beforeunload(reason, timeout=3.0)
            event, thread = got[-1]
            assert isinstance(event, BeforeUnloadEvent)
            assert (event.type, event.reason, event.detail) == ("beforeunload", reason, {"reason": reason})
            assert event.deadline is not None and before + 3.0 <= event.deadline <= time.monotonic() + 3.0
            remaining = event.time_remaining
            assert remaining is not None and 0 < remaining <= 3.0
            assert thread == EVENTS_THREAD, "listeners run on the runtime's event thread"
        assert [e.reason for e, _ in got] == list(DESIGN_REASONS)


def test_detail_is_plain_data() -> None:
    event = unload_event("early_drop")
    assert json.loads(json.dumps(event.detail)) == {"reason": "early_drop"}


def test_beforeunload_once_per_reason_per_runtime(listen: Callable[..., None]) -> None:
    reasons: List[str] = []
    listen("beforeunload", lambda event: reasons.append(event.reason))
    with testing.runtime() as rt:
        rt.fire_beforeunload("wall_clock")
        rt.fire_beforeunload("wall_clock")
        rt.fire_beforeunload("termination")
        rt.fire_beforeunload("wall_clock")
        assert reasons == ["wall_clock", "termination"]
        assert rt.runtime.beforeunload("termination", None) is None, "already dispatched: nothing to wait for"
        assert rt.runtime.dispatched() == ["wall_clock", "termination"]
        assert rt.metrics()["beforeunload_dispatched"] == ["wall_clock", "termination"]

        with testing.runtime() as other:  # another instance has its own once-per-reason record
            other.fire_beforeunload("wall_clock")
        assert reasons == ["wall_clock", "termination", "wall_clock"]


def test_beforeunload_is_logged_with_pending_count_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    with testing.runtime() as rt:
        rt.fire_beforeunload("termination", timeout=4.0)
    lines = [r.getMessage() for r in caplog.records if "beforeunload" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("process %d: beforeunload (reason=termination, 0 tasks pending, " % os.getpid())
    left = re.search(r", (\d+\.\d)s left\)$", lines[0])
    assert left is not None and 2.0 <= float(left.group(1)) <= 4.0, lines[0]


def test_time_remaining_counts_down_and_is_never_negative() -> None:
    event = BeforeUnloadEvent("cpu", time.monotonic() + 0.2, ())
    first = event.time_remaining
    assert first is not None and 0 < first <= 0.2
    deadline = time.monotonic() + WAIT
    while (event.time_remaining or 0) >= first:
        assert time.monotonic() < deadline
    later = event.time_remaining
    assert later is not None and 0 <= later < first

    past = BeforeUnloadEvent("cpu", time.monotonic() - 3, ())
    assert past.time_remaining == 0.0
    assert BeforeUnloadEvent("memory", None, ()).time_remaining is None, "no known deadline"
    assert "reason='cpu'" in repr(event)


def test_pending_tasks_lists_unfinished_tasks(listen: Callable[..., None]) -> None:
    got: List[BeforeUnloadEvent] = []
    listen("beforeunload", got.append)
    entered, release = threading.Event(), threading.Event()

    def slow_upload() -> None:
        entered.set()
        assert release.wait(WAIT)

    def send_email() -> None:
        pass

    with testing.runtime(background_threads=1) as rt:
        edgesync.wait_until(send_email).result(WAIT)
        rt.wait()  # a finished task is not pending
        edgesync.wait_until(slow_upload)
        assert entered.wait(WAIT)
        edgesync.wait_until(send_email)  # queued behind slow_upload on the only thread
        elsewhere: Future[None] = Future()
        edgesync.wait_until(elsewhere)
        try:
            rt.fire_beforeunload("early_drop")
        finally:
            release.set()
            elsewhere.set_result(None)
        rt.wait()

    [event] = got
    pending = event.pending_tasks
    assert [(t.name, t.state) for t in pending[:2]] == [
        (task_name(slow_upload), "running"), (task_name(send_email), "queued")]
    assert pending[2].state == "tracked" and pending[2].name == "future concurrent.futures._base.Future object"
    assert all(isinstance(t, TaskInfo) for t in pending)
    assert pending[0].running_for is not None and pending[1].running_for is None
    assert isinstance(pending, tuple), "a snapshot taken at dispatch, not a live view"


def test_an_event_without_listeners_starts_no_thread() -> None:
    # A oneshot instance dispatches beforeunload at every birth, most often to no one.
    # (Listeners that apps imported by earlier tests registered are set aside meanwhile.)
    aside = {type: list(listeners(type)) for type in EVENT_TYPES}
    for type, registered in aside.items():
        for listener in registered:
            edgesync.remove_event_listener(type, listener)
    try:
        before = set(threading.enumerate())
        with testing.runtime() as rt:
            rt.fire_beforeunload("termination")
            assert rt.runtime.dispatched() == ["termination"]
            assert not {t for t in threading.enumerate() if t.name == EVENTS_THREAD} - before
    finally:
        for type, registered in aside.items():
            for listener in registered:
                edgesync.add_event_listener(type, listener)


def test_closing_a_runtime_stops_its_event_thread(listen: Callable[[str, Callable[[Any], Any]], None]) -> None:
    heard: List[str] = []
    listen("beforeunload", lambda e: heard.append(e.reason))
    before = {t for t in threading.enumerate() if t.name == EVENTS_THREAD}
    with testing.runtime() as rt:
        rt.fire_beforeunload("termination")
        assert heard == ["termination"]
        assert {t for t in threading.enumerate() if t.name == EVENTS_THREAD} - before, "the thread started"
    deadline = time.monotonic() + 1.0  # a stopped thread exits within milliseconds
    while ({t for t in threading.enumerate() if t.name == EVENTS_THREAD} - before
           and time.monotonic() < deadline):
        time.sleep(0.02)
    left = {t for t in threading.enumerate() if t.name == EVENTS_THREAD} - before
    assert not left, "%d edgesync-events thread(s) still alive after the runtime was closed" % len(left)


def new_event_threads(before: set[threading.Thread], timeout: float = 1.0) -> set[threading.Thread]:
    """``edgesync-events`` threads not in ``before`` that are still alive after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = {t for t in threading.enumerate() if t.name == EVENTS_THREAD and t.is_alive()} - before
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def test_beforeunload_after_unload_leaves_no_thread() -> None:
    rt = testing.TestRuntime()
    rt.close()
    before = set(threading.enumerate())
    rt.runtime.beforeunload("memory", None)  # e.g. the monitor sampling once more while the worker exits
    left = new_event_threads(before)
    assert not left, "an edgesync-events thread outlives the unloaded runtime"
    with pytest.raises(RuntimeError, match="unloaded cannot unload"):
        rt.runtime.unload("twice")  # the lifecycle refuses an illegal transition loudly


# -- unhandledrejection ----------------------------------------------------------------------------------------


def rejections(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edgesync" and "background task" in r.getMessage()]


def fail_then_drain(rt: testing.TestRuntime) -> Future[Any]:
    """Run ``boom`` and return its future once its failure has been fully handled.

    With one background thread, a task submitted after ``boom`` runs only once the thread has finished
    with ``boom``, including its ``unhandledrejection`` dispatch and log line.
    """
    assert rt.settings.background_threads == 1
    fut = edgesync.wait_until(boom)
    edgesync.wait_until(lambda: None).result(WAIT)
    return fut


def test_unhandledrejection_carries_reason_future_and_task_name(
        listen: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    got: List[Tuple[UnhandledRejectionEvent, str]] = []
    listen("unhandledrejection", lambda event: got.append((event, threading.current_thread().name)))
    with testing.runtime(background_threads=1) as rt:
        fut = fail_then_drain(rt)
        other = edgesync.wait_until(lambda: "unaffected")
        assert other.result(WAIT) == "unaffected"
        metrics = rt.metrics()

    [(event, thread)] = got
    assert isinstance(event, UnhandledRejectionEvent) and event.type == "unhandledrejection"
    assert event.future is fut
    assert event.reason is fut.exception() and isinstance(event.reason, ValueError)
    assert event.task_name == task_name(boom) == "tests.test_events.boom"
    assert event.default_prevented is False
    assert thread.startswith("edgesync-task-"), "dispatched on the task's own thread"
    assert (metrics["tasks"]["failed"], metrics["tasks"]["completed"]) == (1, 2)
    assert len(rejections(caplog)) == 1


def test_rejection_is_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    with testing.runtime(background_threads=1) as rt:
        fut = fail_then_drain(rt)
    [record] = rejections(caplog)
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "process %d: background task tests.test_events.boom raised ValueError, id=%s" % (
        os.getpid(), edgesync.task_id(fut))
    assert record.exc_info is not None and record.exc_info[1] is fut.exception()
    assert "Traceback (most recent call last)" in caplog.text
    assert 'raise ValueError("boom from a task")' in caplog.text


def test_prevent_default_suppresses_the_log_line(
        listen: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    handled: List[BaseException] = []

    def handle(event: UnhandledRejectionEvent) -> None:
        handled.append(event.reason)
        event.prevent_default()

    listen("unhandledrejection", handle)
    with testing.runtime(background_threads=1) as rt:
        fut = fail_then_drain(rt)
    assert handled == [fut.exception()]
    assert rejections(caplog) == []


def test_a_raising_rejection_listener_does_not_stop_the_default_log(
        listen: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")

    def broken(event: UnhandledRejectionEvent) -> None:
        raise KeyError("listener bug")

    listen("unhandledrejection", broken)
    with testing.runtime(background_threads=1) as rt:
        fut = fail_then_drain(rt)
        assert edgesync.wait_until(lambda: "still serving").result(WAIT) == "still serving"
    messages: Dict[str, int] = {}
    for r in caplog.records:
        if r.name == "edgesync" and r.levelno == logging.ERROR:
            key = "listener" if "unhandledrejection listener" in r.getMessage() else r.getMessage()
            messages[key] = messages.get(key, 0) + 1
    assert messages == {"listener": 1, "process %d: background task tests.test_events.boom raised ValueError, "
                        "id=%s" % (os.getpid(), edgesync.task_id(fut)): 1}
