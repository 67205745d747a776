"""The runtime of one instance: its lifecycle, its pool, its events, its counters.

The state machine and the drain live in ``_lifecycle`` (its rule: it owns every
transition); this module holds what an instance has: the bounded pool, the
``beforeunload`` dispatch (each reason at most once, listeners on their own
thread), the counters, and the default runtime used outside gunicorn, which
drains at interpreter exit with the same routine as a gunicorn worker.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from contextvars import Context, copy_context
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from . import _events, _recovery
from ._config import Settings, load_settings
from ._context import _FLASK_GLOBALS, isolate
from ._events import BeforeUnloadEvent, TaskInfo, UnhandledRejectionEvent, UnloadEvent
from ._identity import task_name
from ._invocation import Kind, Outcome, Tracker
from ._lifecycle import Budget, Lifecycle, Reason, State, Trigger, drain
from ._pool import Pool, Task, run_awaitable

log = logging.getLogger("edgesync")
_modules = sys.modules


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
    """What one instance has (one gunicorn worker process, or one plain process).

    ``on_change(trigger)`` is the owner's hook, called after every lifecycle
    transition from whichever thread asked for it (the gunicorn worker wakes its
    main loop).
    """

    def __init__(self, settings: Settings, *, on_change: Optional[Callable[[Trigger], None]] = None):
        self.settings = settings
        self.pid = os.getpid()
        # The instance's age counts from here, or from ready() once the owner says
        # it serves (a gunicorn worker: after its app is loaded).
        self.started = time.monotonic()
        self._on_change = on_change
        self.lifecycle = Lifecycle(self._changed)
        self.tracker = Tracker()
        # The pool's threads keep what they are given: a module function, not a
        # bound method, so that they never hold this runtime.
        self.pool = Pool(settings.background_threads, settings.max_pending_tasks, self.tracker,
                         report_rejection, success_interval=settings.task_log_interval_ms / 1000.0)
        self.rss_baseline: Optional[int] = None
        self.boot_cpu: Optional[float] = None  # CPU seconds before ready() (see there)
        self.unload_done: Optional[threading.Event] = None  # the unload event's listeners returned
        self.posted: List[threading.Event] = []  # one per event queued, set once dispatched
        self._lock = threading.Lock()
        self._dispatched: List[Reason] = []
        self._events: queue.SimpleQueue[Optional[Tuple[_events.Event, threading.Event]]] = queue.SimpleQueue()
        self._event_thread: Optional[threading.Thread] = None
        self._process: Optional[_RssReader] = None  # created on first use (after fork)
        self.stats: Optional[StatsSink] = None
        self._stats_sent: Dict[str, int] = {}

    # -- background work -----------------------------------------------------

    def wait_until(self, obj: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Future[Any]:
        """See ``edgesync.wait_until``."""
        # A callable first: the common case (a Future is not callable).
        if callable(obj):
            return self._submit(obj, args, kwargs)
        if isinstance(obj, Future):
            _no_arguments(obj, args, kwargs)
            self.pool.track(obj, "future %s" % task_name(obj))
            return obj
        if inspect.isawaitable(obj):
            if asyncio.isfuture(obj):
                _no_arguments(obj, args, kwargs)
                future = _chain_asyncio_future(obj)
                self.pool.track(future, "asyncio future %s" % task_name(obj))
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
        if _FLASK_GLOBALS in _modules:  # (checked here: one dict lookup on every submit)
            fn, context = isolate(fn, context)  # no framework request state (edgesync._context)
        if _task_hooks:
            for hook in _task_hooks:
                fn, context = hook(fn, context)
        return self.pool.submit(fn, args, kwargs, context, named)

    # -- events ----------------------------------------------------------------

    def dispatched(self) -> List[str]:
        """The ``beforeunload`` reasons dispatched so far, in order."""
        return [r.value for r in self._dispatched]

    @property
    def state(self) -> State:
        return self.lifecycle.state

    def beforeunload(self, reason: Reason, deadline: Optional[float]) -> Optional[threading.Event]:
        """Dispatch ``beforeunload`` with ``reason`` unless it was dispatched before.

        Listeners run on the runtime's event thread, so a slow listener never blocks
        a request or the worker's heartbeat. Returns an event set when every listener
        has returned, or None if ``reason`` had been dispatched already.
        """
        reason = Reason(reason)
        with self._lock:
            if reason in self._dispatched:
                return None
            self._dispatched.append(reason)
        pending = tuple(self.pool.snapshot())
        event = BeforeUnloadEvent(reason.value, deadline, pending)
        left = event.time_remaining
        log.info("worker %d: beforeunload (reason=%s, %d tasks pending%s)", self.pid, reason,
                 len(pending), "" if left is None else ", %.1fs left" % left)
        self._increment("beforeunload." + reason)
        return self._post(event)

    def _post(self, event: _events.Event) -> threading.Event:
        """Queue ``event`` for the events thread (started on first use); set when dispatched."""
        done = threading.Event()
        with self._lock:
            self.posted.append(done)
            if self._event_thread is None:
                self._event_thread = threading.Thread(target=_dispatch_events, args=(self._events,),
                                                      name="edgesync-events", daemon=True)
                self._event_thread.start()
            self._events.put((event, done))
            if self.lifecycle.state is State.UNLOADED:
                # Nothing will stop this thread later: let it exit after this event.
                self._events.put(None)
                self._event_thread = None
        return done

    # -- transitions -------------------------------------------------------------

    def retire(self, reason: str, trigger: Trigger = Trigger.RETIRE) -> bool:
        """Ask the instance to retire (``reason``: the soft limit or other cause).

        Returns False when it is draining or unloaded already (nothing to do).
        """
        return self.lifecycle.request(trigger, reason)

    def terminate(self, reason: Reason, message: str, warns: bool) -> bool:
        """A hard limit was reached: the instance must stop now. Once only.

        ``warns``: the limit's ``beforeunload`` ratio is on, so its event is due.
        """
        return self.lifecycle.request(Trigger.TERMINATE, reason.value, message, warns)

    def _changed(self, trigger: Trigger) -> None:
        # Logged before the owner hears of it: once woken, the worker may drain and
        # exit before the thread that asked (the monitor) runs again.
        lc = self.lifecycle
        if trigger in (Trigger.RETIRE, Trigger.ONESHOT):
            log.info("worker %d: retiring (reason=%s)", self.pid, lc.retire_reason)
            self._increment("retirements.%s" % lc.retire_reason)
        elif trigger is Trigger.TERMINATE:
            log.warning("worker %d: terminating (reason=%s): %s", self.pid, lc.terminate_reason,
                        lc.terminate_message)
            self._increment("terminations.%s" % lc.terminate_reason)
        if self._on_change is not None:
            self._on_change(trigger)

    def unload(self, why: str) -> List[TaskInfo]:
        """-> UNLOADED: refuse new work; abandon what is pending and log each task.

        Called by the drain (``_lifecycle.drain``) once it is over; raises
        ``LifecycleError`` if the instance is unloaded already.
        """
        self.lifecycle.request(Trigger.UNLOAD)
        abandoned = self.pool.abandon(
            "edgesync: this instance is unloading (%s) and accepts no more background work; "
            "run the work inline, or schedule it before the instance unloads" % why)
        for info in abandoned:
            if info.running_for is None:
                log.warning("worker %d: abandoned task %s (%s, never started, waited %.2fs), id=%s, reason=%s",
                            self.pid, info.name, info.state, info.age, info.id, why)
            else:
                log.warning("worker %d: abandoned task %s (running, ran %.2fs), id=%s, reason=%s",
                            self.pid, info.name, info.running_for, info.id, why)
        now = time.monotonic()
        requests = [inv for _, inv in self.tracker.live() if inv.kind is Kind.REQUEST]
        for inv in requests:
            log.warning("worker %d: abandoned %s (running, ran %.2fs), reason=%s", self.pid,
                        inv.describe(), now - inv.started, why)
        self.tracker.record(Kind.REQUEST, Outcome.ABANDONED, len(requests))
        # Durable tasks not done go to the hand-off target or stay in the journal.
        _recovery.unload(self, why)
        self.pool.log_successes()  # the last summary, before the line that ends the instance
        log.info("worker %d: unloaded (%s; %d requests served, %d tasks abandoned)", self.pid,
                 why, self.tracker.requests(), len(abandoned))
        self.flush_stats()
        if _events.listeners(_events.UNLOAD):
            # The last event; the events thread exits after it (see _post).
            self.unload_done = self._post(UnloadEvent(why, tuple(abandoned)))
        else:
            with self._lock:
                if self._event_thread is not None:
                    # After the events already queued, the thread reads this and exits.
                    self._events.put(None)
                    self._event_thread = None
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
        counts["cancelled"] = self.tracker.cancelled()
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

    def ready(self) -> None:
        """The instance serves from now: its age and its memory growth count from here.

        A worker's boot (importing the app) is not part of its life: counted in, a
        slow boot would shorten the life it serves, and every retire costs a boot.
        That boot's CPU, the process's CPU time so far (a forked worker's counts from
        its fork), is ``boot_cpu``: what each recycle costs the machine.
        """
        self.started = time.monotonic()
        self.boot_cpu = time.process_time()
        self.rss_baseline = self.rss()

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
        lc = self.lifecycle
        return {
            "pid": self.pid,
            "state": lc.state.value,
            "cause": None if lc.cause is None else lc.cause.value,
            "policy": self.settings.policy,
            "age_s": round(time.monotonic() - self.started, 3),
            "boot_cpu_s": None if self.boot_cpu is None else round(self.boot_cpu, 3),
            "rss_bytes": self.rss(),
            "rss_baseline_bytes": self.rss_baseline,
            "requests": self.tracker.requests(),
            "tasks": {k: counts[k] for k in ("queued", "running", "tracked", "completed",
                                              "failed", "abandoned")},
            # The setting, as the worker's "serving" line shows it; and how many started.
            "background_threads": self.settings.background_threads,
            "background_threads_started": counts["threads"],
            "invocations_cancelled": self.tracker.cancelled(),
            "retire_reason": lc.retire_reason,
            "terminate_reason": None if lc.terminate_reason is None else lc.terminate_reason.value,
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


def report_rejection(task: Task, exc: BaseException) -> None:
    """A task raised: dispatch ``unhandledrejection``, and log it unless a listener prevented that."""
    event = UnhandledRejectionEvent(exc, task.future, task.name)
    _events.dispatch(event)
    if not event.default_prevented:
        log.error("worker %d: background task %s raised %s, id=%s", os.getpid(), task.name,
                  type(exc).__name__, task.id, exc_info=exc)


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


def _dispatch_events(events: queue.SimpleQueue[Optional[Tuple[_events.Event, threading.Event]]]) -> None:
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
    timeout = rt.settings.exit_drain_timeout_ms / 1000.0
    # Before anything is said: a Ctrl-C answering the announcement must find it.
    host = ProcessHost(rt, timeout, catch_ctrl_c=True)
    pending = rt.pool.pending
    reloading = any(os.environ.get(name) == "true" for name in _RELOADER_CHILD)
    if reloading:
        host.timeout = 0.0
        if pending:
            log.warning("edgesync: the reloader restarts this process: abandoning %d background "
                        "task(s) now", pending)
    elif pending:
        # Said at once, at WARNING so that it shows without any logging set up.
        log.warning("edgesync: the process is exiting: waiting up to %.0fs (exit_drain_timeout_ms) "
                    "for %d background task(s); press Ctrl-C again to abandon them", timeout, pending)
    drain_default(rt, timeout, host=host)


class ProcessHost:
    """The drain's host outside gunicorn: no requests, no heartbeat, a fixed budget.

    With ``catch_ctrl_c`` (the exit drain, on the main thread) a Ctrl-C during the
    drain does not raise into it: it turns the drain into a quick one, which
    abandons what is left at once, each task logged.
    """

    def __init__(self, rt: Runtime, timeout: float, catch_ctrl_c: bool = False):
        self.rt = rt
        self.timeout = timeout
        self._never = threading.Event()
        self._interrupted = False
        self._previous: Any = None
        if catch_ctrl_c and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, sig: int, frame: Any) -> None:
        self._interrupted = True  # only a flag: the handler may run inside a lock holder
        self._never.set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def replace(self, keep_accepting: bool) -> None:
        """Nothing replaces a plain process."""

    def stop_accepting(self) -> None:
        """Nothing to stop: there is no listening socket."""

    def requests_busy(self, terminating: bool) -> bool:
        return False

    def answer_requests(self, status: int, message: str) -> None:
        """Nothing to answer: there are no requests."""

    def poll(self) -> None:
        if self._interrupted and self.rt.lifecycle.request(Trigger.QUICK):
            log.warning("edgesync: Ctrl-C again: abandoning %d background task(s)", self.rt.pool.pending)

    def tick(self, timeout: float) -> None:
        self._never.wait(timeout)

    def heartbeat(self) -> None:
        """Nobody watches a plain process."""

    def budget(self, budget: Budget, since: float) -> float:
        return since if budget is Budget.QUICK else since + self.timeout


def drain_default(rt: Runtime, timeout: float, trigger: Trigger = Trigger.EXIT,
                  host: Optional[ProcessHost] = None) -> List[TaskInfo]:
    """Drain ``rt`` (a runtime outside gunicorn) within ``timeout`` s and unload it.

    ``Trigger.EXIT`` fires ``beforeunload`` (termination) first, and a Ctrl-C during
    it abandons what is left; ``Trigger.CLOSE`` fires nothing. The drain is
    ``_lifecycle.drain``, the one a gunicorn worker runs.
    """
    rt.lifecycle.request(trigger)
    if host is None:
        host = ProcessHost(rt, timeout, catch_ctrl_c=trigger is Trigger.EXIT)
    try:
        _plan, abandoned = drain(rt, host)
    finally:
        host.restore()
    return abandoned


#: Set in the child process of a development reloader (Werkzeug's, Django's
#: runserver): it exits to be restarted on every code change, and must not wait.
_RELOADER_CHILD = ("WERKZEUG_RUN_MAIN", "RUN_MAIN")


def _after_fork_in_child() -> None:
    # A runtime created before fork (a preloaded app that scheduled work at import)
    # belongs to the parent: its threads did not survive the fork.
    global _current, _default, _current_lock
    _current = _default = None
    _current_lock = threading.Lock()
    _events.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
