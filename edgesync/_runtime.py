"""The runtime of one instance: its state machine, its pool, its events, its counters.

Rule: this module owns every state transition (SERVING -> RETIRING -> UNLOADED)
and the once-per-reason bookkeeping of ``beforeunload``. The gunicorn worker and
the limits monitor ask for transitions through ``retire``/``terminate``/``unload``;
they never set ``state`` themselves.

Outside gunicorn a default runtime is created lazily by the first ``wait_until``;
it drains its tasks at interpreter exit (``atexit``), after firing
``beforeunload`` with reason ``termination``.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextvars import Context, copy_context
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from . import _events, _recovery
from ._config import Settings, load_settings
from ._events import BeforeUnloadEvent, TaskInfo, UnhandledRejectionEvent
from ._invocation import Tracker
from ._pool import Pool, Task, run_awaitable, task_name

log = logging.getLogger("edgesync")

SERVING = "serving"
RETIRING = "retiring"
UNLOADED = "unloaded"

#: How long the default runtime (outside gunicorn) waits for its tasks at exit.
EXIT_DRAIN_SECONDS = 30.0

#: ``hook(fn, context) -> (fn, context)``, applied in the caller's thread when
#: ``wait_until`` accepts a callable: framework integrations (edgesync.flask,
#: edgesync.django) use it to give the task its app context or its DB hygiene.
TaskHook = Callable[[Callable[..., Any], Context], Tuple[Callable[..., Any], Context]]
_task_hooks: List[TaskHook] = []


def add_task_hook(hook: TaskHook) -> None:
    """Apply ``hook`` to every task accepted from now on, in this process (idempotent)."""
    if hook not in _task_hooks:
        _task_hooks.append(hook)


def remove_task_hook(hook: TaskHook) -> None:
    if hook in _task_hooks:
        _task_hooks.remove(hook)


class StatsSink(Protocol):
    """Where counters and gauges go (gunicorn's statsd logger has this shape)."""

    def increment(self, name: str, value: int, sampling_rate: float = 1.0) -> None: ...

    def gauge(self, name: str, value: float) -> None: ...


_COUNTERS = ("completed", "failed", "abandoned", "cancelled")


class Runtime:
    """The state of one instance (one gunicorn worker process, or one plain process).

    ``on_retire(reason)`` and ``on_terminate(reason, message)`` are the owner's hooks
    (the gunicorn worker wakes its main loop); they may be called from any thread.
    """

    def __init__(self, settings: Settings, *, on_retire: Optional[Callable[[str], None]] = None,
                 on_terminate: Optional[Callable[[str, str], None]] = None):
        self.settings = settings
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.state = SERVING
        self.retire_reason: Optional[str] = None
        self.terminate_reason: Optional[str] = None
        self.tracker = Tracker()
        self.pool = Pool(settings.background_threads, settings.max_pending_tasks, self.tracker,
                         self._task_failed)
        self.rss_baseline: Optional[int] = None
        self._on_retire = on_retire
        self._on_terminate = on_terminate
        self._lock = threading.Lock()
        self._dispatched: List[str] = []
        self._events: queue.SimpleQueue[Optional[Tuple[BeforeUnloadEvent, threading.Event]]] = queue.SimpleQueue()
        self._event_thread: Optional[threading.Thread] = None
        self._process: Optional[_RssReader] = None  # created on first use (after fork)
        self.stats: Optional[StatsSink] = None
        self._stats_sent: Dict[str, int] = {}

    # -- background work -----------------------------------------------------

    def wait_until(self, obj: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Future[Any]:
        """See ``edgesync.wait_until``."""
        if isinstance(obj, Future):
            _no_arguments(obj, args, kwargs)
            self.pool.track(obj, "future %s" % task_name(obj))
            return obj
        if callable(obj):
            return self._submit(obj, args, kwargs)
        if inspect.isawaitable(obj):
            if asyncio.isfuture(obj):
                _no_arguments(obj, args, kwargs)
                future = _chain_asyncio_future(obj)
                self.pool.track(future, "asyncio future %r" % (obj,))
                return future
            try:
                _no_arguments(obj, args, kwargs)
                return self._submit(run_awaitable, (obj,), {})
            except BaseException:
                # The awaitable will never run: close it, or Python warns that a
                # coroutine was never awaited, far from the real cause.
                getattr(obj, "close", lambda: None)()
                raise
        raise TypeError(
            "wait_until() takes a callable (followed by its arguments), a "
            "concurrent.futures.Future or an awaitable such as a coroutine; got %r (%s)"
            % (obj, type(obj).__name__))

    def _submit(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Future[Any]:
        context = copy_context()
        named = args[0] if fn is run_awaitable else fn
        if _task_hooks:
            for hook in _task_hooks:
                fn, context = hook(fn, context)
        return self.pool.submit(fn, args, kwargs, context, named)

    def _task_failed(self, task: Task, exc: BaseException) -> None:
        event = UnhandledRejectionEvent(exc, task.future, task.name)
        _events.dispatch(event)
        if not event.default_prevented:
            log.error("worker %d: background task %s raised %s", self.pid, task.name,
                      type(exc).__name__, exc_info=exc)

    # -- events ----------------------------------------------------------------

    def dispatched(self) -> List[str]:
        """The ``beforeunload`` reasons dispatched so far, in order."""
        return list(self._dispatched)

    def beforeunload(self, reason: str, deadline: Optional[float]) -> Optional[threading.Event]:
        """Dispatch ``beforeunload`` with ``reason`` unless it was dispatched before.

        Listeners run on the runtime's event thread, so a slow listener never blocks
        a request or the worker's heartbeat. Returns an event set when every listener
        has returned, or None if ``reason`` had been dispatched already.
        """
        with self._lock:
            if reason in self._dispatched:
                return None
            self._dispatched.append(reason)
            if self._event_thread is None:
                self._event_thread = threading.Thread(target=_dispatch_events, args=(self._events,),
                                                      name="edgesync-events", daemon=True)
                self._event_thread.start()
        pending = tuple(self.pool.snapshot())
        event = BeforeUnloadEvent(reason, deadline, pending)
        left = event.time_remaining
        log.info("worker %d: beforeunload (reason=%s, %d tasks pending%s)", self.pid, reason,
                 len(pending), "" if left is None else ", %.1fs left" % left)
        self._increment("beforeunload." + reason)
        done = threading.Event()
        with self._lock:
            self._events.put((event, done))
            if self.state == UNLOADED and self._event_thread is not None:
                # Nothing will stop this thread later: let it exit after this event.
                self._events.put(None)
                self._event_thread = None
        return done

    # -- transitions -------------------------------------------------------------

    def retire(self, reason: str) -> bool:
        """SERVING -> RETIRING: stop taking new requests, finish, then exit.

        Returns False if the instance is already retiring or unloaded.
        """
        with self._lock:
            if self.state != SERVING:
                return False
            self.state = RETIRING
            self.retire_reason = reason
        log.info("worker %d: retiring (reason=%s)", self.pid, reason)
        self._increment("retirements." + reason)
        if self._on_retire is not None:
            self._on_retire(reason)
        return True

    def terminate(self, reason: str, message: str) -> bool:
        """A hard limit was reached: the instance must stop now. Once only."""
        with self._lock:
            if self.terminate_reason is not None or self.state == UNLOADED:
                return False
            self.terminate_reason = reason
            if self.state == SERVING:
                self.state = RETIRING
        log.warning("worker %d: terminating (reason=%s): %s", self.pid, reason, message)
        self._increment("terminations." + reason)
        if self._on_terminate is not None:
            self._on_terminate(reason, message)
        return True

    def unload(self, why: str) -> List[TaskInfo]:
        """-> UNLOADED: refuse new work; abandon what is pending and log each task."""
        with self._lock:
            self.state = UNLOADED
            if self._event_thread is not None:
                # After the events already queued, the thread reads this and exits.
                self._events.put(None)
                self._event_thread = None
        abandoned = self.pool.abandon(
            "edgesync: this instance is unloading (%s) and accepts no more background work; "
            "run the work inline, or schedule it before the instance unloads" % why)
        for info in abandoned:
            if info.running_for is None:
                log.warning("worker %d: abandoned task %s (%s, never started, waited %.2fs), reason=%s",
                            self.pid, info.name, info.state, info.age, why)
            else:
                log.warning("worker %d: abandoned task %s (running, ran %.2fs), reason=%s",
                            self.pid, info.name, info.running_for, why)
        # durable hook: durable tasks not done go to the hand-off target or stay in the journal.
        _recovery.unload(self, why)
        return abandoned

    # -- observability -------------------------------------------------------------

    def _increment(self, name: str) -> None:
        if self.stats is not None:
            try:
                self.stats.increment("edgesync." + name, 1)
            except Exception:  # statsd is best effort; gunicorn's logger logs its own errors
                log.debug("statsd increment failed", exc_info=True)

    def flush_stats(self) -> None:
        """Send counters (as increments since the last flush) and gauges to ``stats``."""
        if self.stats is None:
            return
        counts = self.pool.counts()
        _, requests_cancelled = self.tracker.totals()
        counts["cancelled"] += requests_cancelled
        try:
            for key in _COUNTERS:
                delta = counts[key] - self._stats_sent.get(key, 0)
                if delta:
                    self.stats.increment("edgesync.tasks.%s" % key if key != "cancelled"
                                         else "edgesync.invocations.cancelled", delta)
                    self._stats_sent[key] = counts[key]
            self.stats.gauge("edgesync.tasks.queued", counts["queued"])
            self.stats.gauge("edgesync.tasks.running", counts["running"])
        except Exception:  # statsd is best effort; never let it stop the monitor
            log.debug("statsd flush failed", exc_info=True)

    def rss(self) -> Optional[int]:
        """This process's resident set size in bytes (None if it cannot be read).

        On Linux it is one ``pread`` of ``/proc/self/statm``, kept open (2-3 us; the
        monitor reads it 20 times a second); elsewhere psutil's ``memory_info``.
        """
        try:
            if self._process is None:
                self._process = _RssReader()
            rss: int = self._process.read()
            return rss
        except Exception:  # psutil raises its own errors for vanished /proc entries
            return None

    def metrics(self) -> Dict[str, Any]:
        """A plain-data snapshot of this instance (see ``edgesync.runtime_metrics``)."""
        counts = self.pool.counts()
        requests, requests_cancelled = self.tracker.totals()
        return {
            "pid": self.pid,
            "state": self.state,
            "policy": self.settings.policy,
            "age_s": round(time.monotonic() - self.started, 3),
            "rss_bytes": self.rss(),
            "rss_baseline_bytes": self.rss_baseline,
            "requests": requests,
            "tasks": {k: counts[k] for k in ("queued", "running", "tracked", "completed",
                                              "failed", "abandoned")},
            "background_threads": counts["threads"],
            "invocations_cancelled": counts["cancelled"] + requests_cancelled,
            "retire_reason": self.retire_reason,
            "terminate_reason": self.terminate_reason,
            "beforeunload_dispatched": self.dispatched(),
            "durable": _recovery.metrics(self),  # durable hook: pending / re-run / given up
        }


class _RssReader:
    """Reads this process's RSS; opened after fork, so ``/proc/self`` is this process."""

    def __init__(self) -> None:
        self._fd: Optional[int] = None
        self._process: Any = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            import psutil
            self._process = psutil.Process()

    def read(self) -> int:
        if self._fd is not None:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        rss: int = self._process.memory_info().rss
        return rss


def _no_arguments(obj: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    if args or kwargs:
        raise TypeError("wait_until(%r) takes no further arguments: a future or awaitable is "
                        "already running; pass a callable to give it arguments" % (obj,))


def _chain_asyncio_future(afut: asyncio.Future[Any]) -> Future[Any]:
    """A concurrent future that settles like ``afut``, which lives on its own loop."""
    future: Future[Any] = Future()

    def settle(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            future.cancel()
        elif done.exception() is not None:
            future.set_exception(done.exception())
        else:
            future.set_result(done.result())

    # asyncio futures are not thread-safe: register the callback on their loop.
    afut.get_loop().call_soon_threadsafe(afut.add_done_callback, settle)
    return future


def _dispatch_events(events: queue.SimpleQueue[Optional[Tuple[BeforeUnloadEvent, threading.Event]]]) -> None:
    while True:
        item = events.get()
        if item is None:
            return
        event, done = item
        try:
            _events.dispatch(event)
        finally:
            done.set()


# -- the current runtime of this process ---------------------------------------------

_current: Optional[Runtime] = None
_default: Optional[Runtime] = None
_current_lock = threading.Lock()


def install(runtime: Optional[Runtime]) -> None:
    """Make ``runtime`` this process's runtime (the gunicorn worker does, after fork)."""
    global _current
    _current = runtime


def current() -> Runtime:
    """This process's runtime; outside gunicorn, the default one, created on first use."""
    rt = _current
    if rt is not None:
        return rt
    return _start_default()


def peek() -> Optional[Runtime]:
    """This process's runtime if one exists, without creating the default one."""
    return _current


def _start_default() -> Runtime:
    global _current, _default
    with _current_lock:
        if _current is None:
            _default = _current = Runtime(load_settings())
            atexit.register(_drain_default_at_exit, _default)
        return _current


def _drain_default_at_exit(rt: Runtime) -> None:
    if rt is not _default or rt.pid != os.getpid():
        return  # a forked child inherited the registration, not the runtime
    drain_default(rt, EXIT_DRAIN_SECONDS)


def drain_default(rt: Runtime, timeout: float) -> List[TaskInfo]:
    """Fire ``beforeunload`` (termination), wait up to ``timeout`` s for tasks and listeners."""
    deadline = time.monotonic() + timeout
    done = rt.beforeunload("termination", deadline)
    rt.pool.wait_idle(deadline)
    if done is not None:
        done.wait(max(0.0, deadline - time.monotonic()))
    return rt.unload("the process is exiting")


def _after_fork_in_child() -> None:
    # A runtime created before fork (a preloaded app that scheduled work at import)
    # belongs to the parent: its threads did not survive the fork.
    global _current, _default, _current_lock
    _current = _default = None
    _current_lock = threading.Lock()
    _events.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
