"""Test helpers for apps that use edgesync: run tasks in-process and wait for them.

The equivalent of Cloudflare's ``waitOnExecutionContext``::

    def test_signup_sends_email(client, edgesync_runtime):
        client.post("/signup", data={"email": "a@example.com"})
        edgesync_runtime.wait(timeout=5)          # every task scheduled so far is done
        assert outbox == ["a@example.com"]

    def test_progress_is_saved(edgesync_runtime):
        events = edgesync_runtime.record("beforeunload")
        edgesync_runtime.fire_beforeunload("wall_clock")
        assert [e.reason for e in events] == ["wall_clock"]

``edgesync_runtime`` is a pytest fixture (registered through the ``pytest11`` entry
point): each test gets a fresh runtime, installed as the process's runtime, that
is drained afterwards (by the same drain a worker runs); a test that ends with a
task still pending after ``TEARDOWN_TIMEOUT`` fails, naming the task, instead of
letting it run on into the next test. ``edgesync_eager`` runs every task inline,
in ``wait_until`` (Celery's ``task_always_eager``). Outside pytest use
``with edgesync.testing.runtime() as rt: ...`` (``runtime(eager=True)`` too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator, List, Optional

from . import _events, _runtime
from ._config import Settings
from ._events import TaskInfo
from ._lifecycle import Reason, State, Trigger
from ._pool import EagerPool
from ._runtime import Runtime, drain_default

__all__ = ["TaskTimeout", "TestRuntime", "edgesync_eager", "edgesync_runtime", "runtime"]

#: How long the ``edgesync_runtime`` fixture waits for pending tasks when a test ends.
TEARDOWN_TIMEOUT = 5.0


class TaskTimeout(AssertionError):
    """``TestRuntime.wait`` ran out of time; the message lists the tasks still pending."""


class TestRuntime:
    """A runtime for one test. Create it with ``runtime()`` or the fixture."""

    __test__ = False  # not a test class, whatever pytest's name matching thinks

    def __init__(self, settings: Optional[Settings] = None, *, eager: bool = False, **overrides: Any):
        base = settings if settings is not None else Settings()
        self.settings = dataclasses.replace(base, **overrides) if overrides else base
        self.runtime = Runtime(self.settings)
        if eager:
            # Every task runs inline in wait_until, which returns a done future.
            rt = self.runtime
            rt.pool = EagerPool(self.settings.background_threads, self.settings.max_pending_tasks,
                                rt.tracker, _runtime.report_rejection,
                                success_interval=self.settings.task_log_interval_ms / 1000.0)
        self._previous = _runtime.peek()
        self._recorders: List[Any] = []
        _runtime.install(self.runtime)

    def wait(self, timeout: float = 5.0) -> None:
        """Block until every task scheduled so far (and any they schedule) is done, and its bookkeeping written.

        A durable task's row is deleted from the journal by then (a worker batches those
        deletes). Raises ``TaskTimeout`` naming the tasks still pending after ``timeout`` s.
        """
        if not self.runtime.pool.wait_idle(time.monotonic() + timeout):
            pending = ", ".join("%s (%s)" % (t.name, t.state) for t in self.runtime.pool.snapshot())
            raise TaskTimeout("edgesync: tasks still pending after %.1fs: %s" % (timeout, pending))
        self.runtime.settle()

    def record(self, type: str) -> List[Any]:
        """A list that receives every ``type`` event from now until the test ends."""
        seen: List[Any] = []
        _events.add_event_listener(type, seen.append)
        self._recorders.append((type, seen.append))
        return seen

    def fire_beforeunload(self, reason: str, timeout: float = 5.0) -> None:
        """Dispatch ``beforeunload`` with ``reason`` and wait for its listeners.

        Raises ``ValueError`` for a reason edgesync never sends, and ``TaskTimeout``
        if the listeners do not return within ``timeout`` s.
        """
        if reason not in _events.REASONS:
            raise ValueError("unknown beforeunload reason %r: edgesync sends %s"
                             % (reason, ", ".join(_events.REASONS)))
        done = self.runtime.beforeunload(Reason(reason), time.monotonic() + timeout)
        if done is not None and not done.wait(timeout):
            raise TaskTimeout("edgesync: beforeunload listeners still running after %.1fs" % timeout)

    def metrics(self) -> dict[str, Any]:
        """``runtime_metrics()`` of this runtime."""
        return self.runtime.metrics()

    def close(self, timeout: float = 5.0) -> List[TaskInfo]:
        """Wait up to ``timeout`` s for pending tasks, then unload; returns what was abandoned.

        This is the production drain (the one a gunicorn worker and the exit drain
        run), with the ``close`` cause: no ``beforeunload``, tasks awaited.
        """
        try:
            if self.runtime.state is State.UNLOADED:
                return []
            return drain_default(self.runtime, timeout, Trigger.CLOSE)
        finally:
            self.runtime.pool.shutdown("the test ended")
            for type, listener in self._recorders:
                _events.remove_event_listener(type, listener)
            _runtime.install(self._previous)


@contextlib.contextmanager
def runtime(settings: Optional[Settings] = None, *, eager: bool = False,
            **overrides: Any) -> Iterator[TestRuntime]:
    """A ``TestRuntime`` installed for the ``with`` block, closed after it.

    ``eager=True`` runs every task inline, in ``wait_until`` (Celery's
    ``task_always_eager``, RQ's ``is_async=False``).
    """
    rt = TestRuntime(settings, eager=eager, **overrides)
    try:
        yield rt
    finally:
        rt.close()


try:
    import pytest
except ImportError:  # the helpers above work without pytest; only the fixture needs it
    pass
else:
    @pytest.fixture
    def edgesync_runtime() -> Iterator[TestRuntime]:
        """A fresh edgesync runtime for this test (see ``edgesync.testing``).

        Fails the test if tasks are still pending when it ends (after up to
        ``TEARDOWN_TIMEOUT`` s): a task that runs on into the next test is a bug in
        the test (call ``edgesync_runtime.wait()``) or in the task.
        """
        rt = TestRuntime()
        try:
            yield rt
        finally:
            abandoned = rt.close(TEARDOWN_TIMEOUT)
        if abandoned:
            pytest.fail("edgesync: %d task(s) still pending when the test ended (waited %.1fs): %s; "
                        "call edgesync_runtime.wait() in the test, or fix the task"
                        % (len(abandoned), TEARDOWN_TIMEOUT,
                           ", ".join("%s (%s, id=%s)" % (t.name, t.state, t.id) for t in abandoned)),
                        pytrace=False)

    @pytest.fixture
    def edgesync_eager() -> Iterator[TestRuntime]:
        """Like ``edgesync_runtime``, but every task runs inline, in ``wait_until``."""
        with runtime(eager=True) as rt:
            yield rt
