"""The public API in-process: ``wait_until``, ``runtime_metrics`` and the API misuse table (issue 6).

Every test runs against its own runtime (the ``edgesync_runtime`` fixture or ``edgesync.testing.runtime``),
so no task or state crosses tests.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import json
import os
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Coroutine, Generator, Iterator, List, Tuple

import pytest

import edgesync
from edgesync import BeforeUnloadEvent, QueueFull, testing
from edgesync._events import dispatch, listeners
from edgesync.testing import TestRuntime

WAIT = 10.0
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST_ID", default="none")


pytestmark = pytest.mark.usefixtures("registry_restored")


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


class Ready:
    """An awaitable that is not a coroutine (it has ``__await__``)."""

    def __await__(self) -> Generator[Any, None, str]:
        yield from asyncio.sleep(0).__await__()
        return "awaited"


# -- what wait_until accepts ----------------------------------------------------------------------------------


def test_callable_with_args_and_kwargs(edgesync_runtime: TestRuntime) -> None:
    def collect(*args: Any, **kwargs: Any) -> Tuple[Any, ...]:
        return args, kwargs

    fut = edgesync.wait_until(collect, 1, "two", three=3)
    assert isinstance(fut, Future)
    assert fut.result(WAIT) == ((1, "two"), {"three": 3})
    # ``fn`` is positional-only: keyword arguments named like it reach the task.
    assert edgesync.wait_until(collect, fn="f", args="a").result(WAIT) == ((), {"fn": "f", "args": "a"})


def test_wait_until_returns_before_the_task_finishes(edgesync_runtime: TestRuntime,
                                                     release: threading.Event) -> None:
    started = time.monotonic()
    fut = edgesync.wait_until(release.wait, WAIT)
    assert time.monotonic() - started < WAIT / 2 and not fut.done()
    release.set()
    assert fut.result(WAIT) is True


def test_existing_future_is_tracked_and_returned_as_is(edgesync_runtime: TestRuntime) -> None:
    fut: Future[str] = Future()
    assert edgesync.wait_until(fut) is fut
    assert edgesync_runtime.metrics()["tasks"]["tracked"] == 1
    with pytest.raises(testing.TaskTimeout):
        edgesync_runtime.wait(timeout=0.05)
    fut.set_result("done elsewhere")
    edgesync_runtime.wait(WAIT)
    tasks = edgesync_runtime.metrics()["tasks"]
    assert (tasks["tracked"], tasks["completed"]) == (0, 1)


def test_coroutine_coroutine_function_and_awaitable_run_to_completion(edgesync_runtime: TestRuntime) -> None:
    assert edgesync.wait_until(double(21)).result(WAIT) == 42
    assert edgesync.wait_until(double, 5).result(WAIT) == 10
    assert edgesync.wait_until(Ready()).result(WAIT) == "awaited"
    edgesync_runtime.wait(WAIT)
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 3


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def asyncio_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    async def make() -> asyncio.Future[Any]:
        return loop.create_future()
    return asyncio.run_coroutine_threadsafe(make(), loop).result(WAIT)


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_asyncio_future_of_a_loop_in_another_thread_is_tracked(
        edgesync_runtime: TestRuntime, loop_in_thread: asyncio.AbstractEventLoop, outcome: str) -> None:
    afut = asyncio_future(loop_in_thread)
    fut = edgesync.wait_until(afut)
    assert isinstance(fut, Future) and not fut.done()
    assert edgesync_runtime.metrics()["tasks"]["tracked"] == 1
    error = ValueError("failed on the loop")
    if outcome == "result":
        loop_in_thread.call_soon_threadsafe(afut.set_result, 42)
        assert fut.result(WAIT) == 42
    elif outcome == "exception":
        loop_in_thread.call_soon_threadsafe(afut.set_exception, error)
        assert fut.exception(WAIT) is error
    else:
        loop_in_thread.call_soon_threadsafe(afut.cancel)
        edgesync_runtime.wait(WAIT)
        assert fut.cancelled()
    edgesync_runtime.wait(WAIT)
    assert edgesync_runtime.metrics()["tasks"]["tracked"] == 0


@pytest.mark.parametrize("value", [None, 42, "send_email", [print], b"bytes", 3.5], ids=repr)
def test_non_callables_raise_type_error_naming_value_and_what_is_accepted(
        edgesync_runtime: TestRuntime, value: Any) -> None:
    with pytest.raises(TypeError) as info:
        edgesync.wait_until(value)
    message = str(info.value)
    assert repr(value) in message and type(value).__name__ in message, message
    for accepted in ("callable", "concurrent.futures.Future", "awaitable"):
        assert accepted in message, message
    assert edgesync_runtime.runtime.pool.pending == 0


def test_extra_arguments_with_a_future_raise_type_error(edgesync_runtime: TestRuntime) -> None:
    fut: Future[None] = Future()
    with pytest.raises(TypeError) as info:
        edgesync.wait_until(fut, "extra")  # type: ignore[call-overload]
    assert repr(fut) in str(info.value) and "no further arguments" in str(info.value)
    with pytest.raises(TypeError):
        edgesync.wait_until(fut, key="extra")  # type: ignore[call-overload]
    assert edgesync_runtime.runtime.pool.pending == 0, "a refused future is not tracked"


def test_extra_arguments_with_a_coroutine_raise_type_error(edgesync_runtime: TestRuntime) -> None:
    coro = double(1)
    try:
        with pytest.raises(TypeError, match="no further arguments"):
            edgesync.wait_until(coro, 2)  # type: ignore[call-overload]
        assert edgesync_runtime.runtime.pool.pending == 0
    finally:
        coro.close()


def test_coroutine_refused_for_extra_arguments_is_closed(edgesync_runtime: TestRuntime) -> None:
    coro = double(1)
    try:
        with pytest.raises(TypeError):
            edgesync.wait_until(coro, 2)  # type: ignore[call-overload]
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    finally:
        coro.close()


def assert_closed_without_warning(coro: Coroutine[Any, Any, Any]) -> None:
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del coro
        gc.collect()
    assert [w for w in caught if "never awaited" in str(w.message)] == []


def test_coroutine_refused_by_a_full_queue_is_closed(release: threading.Event) -> None:
    with testing.runtime(background_threads=1, max_pending_tasks=1) as rt:
        edgesync.wait_until(release.wait, WAIT)
        coro = double(1)
        with pytest.raises(QueueFull):
            edgesync.wait_until(coro)
        assert_closed_without_warning(coro)
        release.set()
        rt.wait(WAIT)


def test_queue_full_at_exactly_max_pending_tasks(release: threading.Event) -> None:
    with testing.runtime(background_threads=2, max_pending_tasks=3) as rt:
        accepted = [edgesync.wait_until(release.wait, WAIT), edgesync.wait_until(Future()),
                    edgesync.wait_until(release.wait, WAIT)]
        for refused in (lambda: None, Future(), double):
            with pytest.raises(QueueFull) as info:
                edgesync.wait_until(refused)
            assert isinstance(info.value, RuntimeError) and "max_pending_tasks" in str(info.value)
        tasks = rt.metrics()["tasks"]
        assert (tasks["queued"] + tasks["running"], tasks["tracked"]) == (2, 1), "refused work is not counted"
        release.set()
        accepted[1].set_result(None)
        rt.wait(WAIT)
        assert edgesync.wait_until(lambda: "room again").result(WAIT) == "room again"


# -- contextvars ----------------------------------------------------------------------------------------------


def test_context_is_copied_at_call_time(edgesync_runtime: TestRuntime, release: threading.Event) -> None:
    def read_later() -> str:
        assert release.wait(WAIT)
        seen = REQUEST_ID.get()
        REQUEST_ID.set("changed by the task")
        return seen

    token = REQUEST_ID.set("request-1")
    try:
        fut = edgesync.wait_until(read_later)
        REQUEST_ID.set("changed by the caller after wait_until")
        release.set()
        assert fut.result(WAIT) == "request-1", "the task sees the context of the wait_until call"
        assert REQUEST_ID.get() == "changed by the caller after wait_until", "the task's change stays in the task"
    finally:
        REQUEST_ID.reset(token)


def test_no_task_sees_another_callers_context(edgesync_runtime: TestRuntime) -> None:
    results: List[Tuple[str, List[Future[str]]]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def request(n: int) -> None:
        REQUEST_ID.set("request-%d" % n)  # each thread starts with its own empty context
        barrier.wait(WAIT)
        futures = [edgesync.wait_until(REQUEST_ID.get) for _ in range(5)]
        with lock:
            results.append(("request-%d" % n, futures))

    threads = [threading.Thread(target=request, args=(n,), name="caller-%d" % n) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 20
    for expected, futures in results:
        assert [f.result(WAIT) for f in futures] == [expected] * 5


# -- after unloading ----------------------------------------------------------------------------------------


def test_after_unload_wait_until_raises_runtime_error_saying_so(edgesync_runtime: TestRuntime) -> None:
    edgesync_runtime.runtime.unload("the test unloads it")
    coro = double(1)
    for offered in (lambda: None, Future(), coro):
        with pytest.raises(RuntimeError) as info:
            edgesync.wait_until(offered)
        assert type(info.value) is RuntimeError, "not QueueFull, not a concurrent.futures error"
        assert "unloading" in str(info.value) and "the test unloads it" in str(info.value), info.value
    assert_closed_without_warning(coro)


# -- the API misuse table (issue 6) ----------------------------------------------------------------------------


def _listener(event: Any) -> None:
    pass


def _unload_then_wait_until(rt: TestRuntime) -> None:
    rt.runtime.unload("misuse table")
    edgesync.wait_until(_listener, None)


MISUSE: List[Any] = [
    # (what the app does, exception, fragments the message must contain)
    pytest.param(lambda rt: edgesync.wait_until(None), TypeError, ["None", "callable"], id="wait_until(None)"),
    pytest.param(lambda rt: edgesync.wait_until(42), TypeError, ["42", "int", "awaitable"], id="wait_until(42)"),
    pytest.param(lambda rt: edgesync.wait_until("job"), TypeError, ["'job'", "str"], id="wait_until(str)"),
    pytest.param(lambda rt: edgesync.wait_until(_listener(None)), TypeError, ["None"], id="wait_until(fn())"),
    pytest.param(lambda rt: edgesync.wait_until(Future(), 1), TypeError, ["no further arguments"],
                 id="wait_until(future, extra)"),
    pytest.param(_unload_then_wait_until, RuntimeError, ["unloading"], id="wait_until-after-unload"),
    pytest.param(lambda rt: edgesync.add_event_listener("load", _listener), ValueError,
                 ["'load'", "'beforeunload'", "'unhandledrejection'"], id="add-unknown-type"),
    pytest.param(lambda rt: edgesync.remove_event_listener("pagehide", _listener), ValueError,
                 ["'pagehide'", "'beforeunload'", "'unload'"], id="remove-unknown-type"),
    pytest.param(lambda rt: edgesync.add_event_listener("beforeunload", None), TypeError,
                 ["None", "callable"], id="add-non-callable"),
    pytest.param(lambda rt: edgesync.add_event_listener(["beforeunload"], _listener), ValueError,
                 ["'beforeunload'", "'unhandledrejection'"], id="add-unhashable-type"),
]


@pytest.mark.parametrize("action, error, fragments", MISUSE)
def test_misuse_raises_a_clear_error(edgesync_runtime: TestRuntime, action: Callable[[TestRuntime], Any], error: type,
                                     fragments: List[str]) -> None:
    with pytest.raises(error) as info:
        action(edgesync_runtime)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert edgesync_runtime.runtime.pool.pending == 0, "nothing was accepted"


def test_misuse_same_listener_twice_runs_once() -> None:
    calls: List[str] = []

    def listener(event: Any) -> None:
        calls.append(event.reason)

    edgesync.add_event_listener("beforeunload", listener)
    edgesync.add_event_listener("beforeunload", listener)
    try:
        dispatch(BeforeUnloadEvent("early_drop", None, ()))
    finally:
        edgesync.remove_event_listener("beforeunload", listener)
    assert calls == ["early_drop"]


def test_misuse_removing_an_unknown_listener_does_nothing() -> None:
    before = list(listeners("beforeunload"))
    edgesync.remove_event_listener("beforeunload", _listener)
    edgesync.remove_event_listener("unhandledrejection", lambda event: None)
    assert listeners("beforeunload") == before


# -- runtime_metrics ----------------------------------------------------------------------------------------


METRIC_KEYS = {"pid", "state", "cause", "policy", "age_s", "boot_cpu_s", "rss_bytes", "rss_baseline_bytes",
               "requests", "tasks", "background_threads", "background_threads_started", "invocations_cancelled",
               "retire_reason", "terminate_reason", "beforeunload_dispatched", "durable"}
TASK_KEYS = {"queued", "running", "tracked", "completed", "failed", "abandoned"}


def test_runtime_metrics_keys_and_plain_data(release: threading.Event) -> None:
    with testing.runtime(background_threads=2) as rt:
        fresh = edgesync.runtime_metrics()
        assert set(fresh) == METRIC_KEYS and set(fresh["tasks"]) == TASK_KEYS
        assert fresh["tasks"] == dict.fromkeys(TASK_KEYS, 0) and fresh["background_threads_started"] == 0
        assert fresh["background_threads"] == 2, "the setting, as the serving line shows it"
        assert (fresh["pid"], fresh["state"], fresh["policy"]) == (os.getpid(), "serving", "per_worker")
        assert fresh["beforeunload_dispatched"] == [] and fresh["invocations_cancelled"] == 0
        assert fresh["retire_reason"] is None and fresh["terminate_reason"] is None
        assert isinstance(fresh["rss_bytes"], int) and fresh["rss_bytes"] > 0
        assert isinstance(fresh["age_s"], float) and fresh["age_s"] >= 0

        def fail() -> None:
            raise ValueError("counted")

        def quiet(event: edgesync.UnhandledRejectionEvent) -> None:
            event.prevent_default()

        edgesync.add_event_listener("unhandledrejection", quiet)
        try:
            edgesync.wait_until(lambda: None).result(WAIT)
            edgesync.wait_until(fail).exception(WAIT)
            rt.wait(WAIT)
            edgesync.wait_until(release.wait, WAIT)
            elsewhere: Future[None] = Future()
            edgesync.wait_until(elsewhere)
            snapshot = edgesync.runtime_metrics()
        finally:
            edgesync.remove_event_listener("unhandledrejection", quiet)
            release.set()
            elsewhere.set_result(None)

        assert json.loads(json.dumps(snapshot)) == snapshot, "plain data only"
        assert set(snapshot) == METRIC_KEYS
        tasks = snapshot["tasks"]
        assert (tasks["completed"], tasks["failed"], tasks["tracked"], tasks["abandoned"]) == (1, 1, 1, 0)
        assert tasks["queued"] + tasks["running"] == 1
        assert 1 <= snapshot["background_threads_started"] <= 2
        assert snapshot["age_s"] >= fresh["age_s"]

    closed = rt.metrics()
    assert closed["state"] == "unloaded"
    assert (closed["tasks"]["completed"], closed["tasks"]["abandoned"]) == (3, 0)


def test_runtime_metrics_reflects_the_installed_runtime() -> None:
    with testing.runtime(policy="oneshot") as rt:
        assert edgesync.runtime_metrics()["policy"] == "oneshot"
        rt.runtime.retire("max_requests")
        assert (edgesync.runtime_metrics()["state"], edgesync.runtime_metrics()["cause"]) == (
            "draining", "retire")
        assert edgesync.runtime_metrics()["retire_reason"] == "max_requests"
