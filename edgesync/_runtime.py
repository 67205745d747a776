"""The runtime of one instance: its lifecycle, its pool, its events, its counters.

The state machine and the drain live in ``_lifecycle`` (its rule: it owns every
transition); this module holds what an instance has: the bounded pool, the
``beforeunload`` dispatch (each reason at most once, listeners on their own
thread), the counters, and the default runtime used outside gunicorn, which
drains at interpreter exit with the same routine as a gunicorn worker.

Layers (durable tasks: ``_recovery``) sit on top of the core through one extension
point, ``register_layer``: ``wait_until`` hands the callables of the types a layer
claims to that layer (one dict test per call), and the runtime calls each layer at
ready, at unload (the layer says where the tasks it kept went, so they are not
counted abandoned), for ``runtime_metrics()`` and for statsd. This module knows
no journal and no queue.
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

from . import _events, _identity
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


#: Called with the runtime at each heartbeat of a gunicorn worker (about twice a
#: second, on its main loop) when set: edgesync.prometheus mirrors the figures there.
on_heartbeat: Optional[Callable[[Runtime], None]] = None


class Layer(Protocol):
    """What the runtime calls on a layer (see the module docstring); one instance per runtime."""

    def ready(self) -> None:
        """The instance serves (a gunicorn worker loaded its app)."""

    def unload(self, why: str) -> Dict[str, str]:
        """The instance unloads, its pool abandoned already: place what the layer holds.

        Returns where each task the layer kept went (``task id -> "handed to ..."`` or
        ``"kept in the journal ..."``): those are not abandoned. A task the layer holds
        outside the pool and loses, it logs as abandoned itself.
        """

    def settle(self) -> None:
        """Write down now what the layer batches for its ended tasks (the journal's deletes)."""

    def metrics(self) -> Dict[str, Any]:
        """Its part of ``runtime_metrics()``, as plain data."""

    def counters(self) -> Tuple[Dict[str, int], Dict[str, float]]:
        """Counters (totals since start) and gauges for statsd, under ``edgesync.<layer>.``."""


#: ``accept(runtime, fn, args, kwargs) -> Future``: ``wait_until`` of a callable whose type a layer claims.
Accept = Callable[["Runtime", Any, Tuple[Any, ...], Dict[str, Any]], "Future[Any]"]
#: ``factory(runtime, needed)``: the layer of ``runtime``; with ``needed`` False, None unless configured.
LayerFactory = Callable[["Runtime", bool], Optional[Layer]]

#: type -> accept: read by ``edgesync.wait_until`` on every call (``type(fn) in accepts``).
accepts: Dict[type, Accept] = {}
_layer_factories: Dict[str, LayerFactory] = {}


def register_layer(name: str, factory: LayerFactory, claims: Dict[type, Accept]) -> None:
    """Add a layer: ``factory`` makes it per runtime; ``claims`` routes ``wait_until`` of those types to it."""
    _layer_factories[name] = factory
    accepts.update(claims)


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
        self.who = _identity.who()  # "worker <pid>" or "process <pid>", as log lines say
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
        self._stats_lock = threading.Lock()
        self.layers: Dict[str, Layer] = {}  # created by layer() (see register_layer)

    def layer(self, name: str, needed: bool = True) -> Optional[Layer]:
        """This runtime's layer ``name``; with ``needed`` False, None unless its settings configure it."""
        found = self.layers.get(name)
        if found is None:
            with self._lock:
                found = self.layers.get(name)
                if found is None:
                    found = _layer_factories[name](self, needed)
                    if found is not None:
                        self.layers[name] = found
        return found

    # -- background work -----------------------------------------------------

    def wait_until(self, obj: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], named: Any = None,
                   task_id: Optional[str] = None) -> Future[Any]:
        """See ``edgesync.wait_until``. ``named``: what reports name a callable's task after
        (by default the callable); ``task_id``: a layer's own id for it, else a new one."""
        # A callable first: the common case (a Future is not callable), here rather than
        # in a function of its own, which would cost every task a Python call.
        if callable(obj):
            fn, context = obj, copy_context()
            if _FLASK_GLOBALS in _modules:  # (checked here: one dict lookup on every submit)
                fn, context = isolate(fn, context)  # no framework request state (edgesync._context)
            if _task_hooks:
                for hook in _task_hooks:
                    fn, context = hook(fn, context)
            return self.pool.submit(fn, args, kwargs, context, obj if named is None else named, task_id)
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
                return self.wait_until(run_awaitable, (obj,), {}, obj)
            except BaseException:
                # The awaitable will never run: close it, or Python warns that a
                # coroutine was never awaited, far from the real cause.
                getattr(obj, "close", lambda: None)()
                raise
        raise TypeError(
            "wait_until() takes a callable (followed by its arguments), a "
            "concurrent.futures.Future or an awaitable such as a coroutine; got %r (%s)"
            % (obj, type(obj).__name__))

    def run_task(self, fn: Callable[..., Any], named: Any, task_id: str) -> Future[Any]:
        """A layer's task: ``fn()`` on the pool as any task is (context, framework setup, limits),
        reported under ``named`` and ``task_id``. Raises what ``wait_until`` raises."""
        return self.wait_until(fn, (), {}, named, task_id)

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
        log.info("%s: beforeunload (reason=%s, %d tasks pending%s)", self.who, reason,
                 len(pending), "" if left is None else ", %.1fs left" % left)
        self._increment("beforeunload." + reason)
        return self._post(event)

    def _post(self, event: _events.Event) -> threading.Event:
        """Queue ``event`` for the events thread (started on first use); set when dispatched."""
        done = threading.Event()
        with self._lock:
            self.posted.append(done)
            # No listener and no thread yet (most instances: a oneshot one, every time): nothing
            # to run, so no thread to start for it. With a thread, the event queues behind the
            # earlier ones, whose listeners may add listeners for this one.
            inline = (self._event_thread is None and not _events.listeners(event.type)) or not self._start_events()
            if not inline:
                self._events.put((event, done))
                if self.lifecycle.state is State.UNLOADED:
                    # Nothing will stop this thread later: let it exit after this event.
                    self._events.put(None)
                    self._event_thread = None
        if inline:
            # No thread to be had (see start_events): the listeners run here, and the
            # drain waits for them past its deadline, but they run.
            try:
                _events.dispatch(event)
            finally:
                done.set()
        return done

    def start_events(self) -> None:
        """Start the events thread now, not on the first event.

        The default runtime does when it is created: it drains at interpreter exit,
        where CPython 3.12 refuses to start any thread ("can't create new thread at
        interpreter shutdown"), ``threading``'s own exit hooks included.
        """
        with self._lock:
            self._start_events()

    def _start_events(self) -> bool:
        """Have the events thread running; False if Python refuses a new thread. Holds ``_lock``."""
        if self._event_thread is None:
            thread = threading.Thread(target=_dispatch_events, args=(self._events,),
                                      name="edgesync-events", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown (CPython 3.12)
                return False
            self._event_thread = thread
        return True

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
            log.info("%s: retiring (reason=%s)", self.who, lc.retire_reason)
            self._increment("retirements.%s" % lc.retire_reason)
        elif trigger is Trigger.TERMINATE:
            log.warning("%s: terminating (reason=%s): %s", self.who, lc.terminate_reason,
                        lc.terminate_message)
            self._increment("terminations.%s" % lc.terminate_reason)
        if self._on_change is not None:
            self._on_change(trigger)

    def settle(self) -> None:
        """What the layers batch for ended tasks is written now (see ``Layer.settle``)."""
        for layer in list(self.layers.values()):
            layer.settle()

    def unload(self, why: str) -> List[TaskInfo]:
        """-> UNLOADED: refuse new work; abandon what is pending and log each task.

        A task a layer placed (a durable task handed to RQ or kept in the journal) is
        logged with where it went, and is not counted abandoned. Called by the drain
        (``_lifecycle.drain``) once it is over; raises ``LifecycleError`` if the
        instance is unloaded already.
        """
        self.lifecycle.request(Trigger.UNLOAD)
        pending = self.pool.abandon(
            "edgesync: this instance is unloading (%s) and accepts no more background work; "
            "run the work inline, or schedule it before the instance unloads" % why)
        placed: Dict[str, str] = {}
        for layer in list(self.layers.values()):
            placed.update(layer.unload(why))
        abandoned = []
        for info in pending:
            where = placed.get(info.id)
            state = ("%s, never started, waited %.2fs" % (info.state, info.age) if info.running_for is None
                     else "running, ran %.2fs" % info.running_for)
            if where is not None:
                log.warning("%s: task %s (%s) %s, id=%s, reason=%s", self.who, info.name, state, where,
                            info.id, why)
                continue
            abandoned.append(info)
            log.warning("%s: abandoned task %s (%s), id=%s, reason=%s", self.who, info.name, state, info.id, why)
        # The pool counted every pending task abandoned: those placed elsewhere were not.
        self.tracker.record(Kind.TASK, Outcome.ABANDONED, len(abandoned) - len(pending))
        now = time.monotonic()
        requests = [inv for _, inv in self.tracker.live() if inv.kind is Kind.REQUEST]
        for inv in requests:
            log.warning("%s: abandoned %s (running, ran %.2fs), reason=%s", self.who,
                        inv.describe(), now - inv.started, why)
        self.tracker.record(Kind.REQUEST, Outcome.ABANDONED, len(requests))
        self.pool.log_successes()  # the last summary, before the line that ends the instance
        log.info("%s: unloaded (%s; %d requests served, %d tasks abandoned)", self.who,
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
        """Send counters (as increments since the last flush) and gauges to ``stats``, the layers' too."""
        stats = self.stats
        if stats is None:
            return
        counts = self.pool.counts()
        totals = {"edgesync.tasks.%s" % key: counts[key] for key in _COUNTERS if key != "cancelled"}
        totals["edgesync.invocations.cancelled"] = self.tracker.cancelled()
        gauges: Dict[str, float] = {"edgesync.tasks.queued": counts["queued"],
                                    "edgesync.tasks.running": counts["running"]}
        try:
            for name, layer in list(self.layers.items()):
                layer_totals, layer_gauges = layer.counters()
                totals.update(("edgesync.%s.%s" % (name, k), v) for k, v in layer_totals.items())
                gauges.update(("edgesync.%s.%s" % (name, k), v) for k, v in layer_gauges.items())
            with self._stats_lock:  # the monitor flushes, and the unload
                for key, total in totals.items():
                    delta = total - self._stats_sent.get(key, 0)
                    if delta:
                        stats.increment(key, delta)
                        self._stats_sent[key] = total
                for key, value in gauges.items():
                    stats.gauge(key, value)
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
        for name in _layer_factories:
            layer = self.layer(name, needed=False)
            if layer is not None:
                layer.ready()

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
            **self._layer_metrics(),
        }

    def _layer_metrics(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name in _layer_factories:
            layer = self.layer(name, needed=False)
            out[name] = None if layer is None else layer.metrics()
        return out


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
        log.error("%s: background task %s raised %s, id=%s", _identity.who(), task.name,
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
            rt = Runtime(load_settings())
            rt.start_events()  # the exit drain may not be able to (see start_events)
            _default = _current = rt
            atexit.register(_drain_default_at_exit, rt)
            _drain_at_multiprocessing_exit(rt)
            _watch_for_restart()
        return _current


def _drain_at_multiprocessing_exit(rt: Runtime) -> None:
    """In a ``multiprocessing`` child, drain ``rt`` when the child's target returns.

    A forked child ends with ``os._exit`` once its target returns (popen_fork.py,
    ``_launch``): ``atexit`` never runs there. Every child, forked or spawned, runs
    multiprocessing's own exit (``util._exit_function``, from ``Process._bootstrap``)
    first: the drain goes there too, ahead of the finalizers that close the queues
    and pools its tasks may use (the highest ``exitpriority`` runs first).
    """
    process = sys.modules.get("multiprocessing.process")
    if process is None or process.parent_process() is None:
        return  # not a multiprocessing child
    from multiprocessing import util

    util.Finalize(None, _drain_default_at_exit, args=(rt,), exitpriority=100)


def _drain_default_at_exit(rt: Runtime) -> None:
    if rt is not _default or rt.pid != os.getpid():
        return  # a forked child inherited the registration, not the runtime
    if not rt.lifecycle.serving:
        return  # drained already (a spawned child runs multiprocessing's exit, then atexit)
    timeout = rt.settings.exit_drain_timeout_ms / 1000.0
    # Before anything is said: a Ctrl-C answering the announcement must find it.
    host = ProcessHost(rt, timeout, catch_ctrl_c=True)
    pending = rt.pool.pending
    if _restart_watch is not None and _restart_watch.restarting:
        host.timeout = 0.0
        if pending:
            log.warning("edgesync: the reloader restarts this process: abandoning %d background "
                        "task(s) now", pending)
    elif pending:
        # Said at once, at WARNING so that it shows without any logging set up.
        log.warning("edgesync: the process is exiting: waiting up to %.0fs (exit_drain_timeout_ms) "
                    "for %d background task(s); press Ctrl-C again to abandon them", timeout, pending)
        if _restart_watch is not None:
            # werkzeug's and Django's reloaders wait 0.25 s for their child after a Ctrl-C
            # of their own (subprocess.call / run), then kill it.
            log.warning("edgesync: if the Ctrl-C reached the reloader process too (a terminal sends it to "
                        "both), it kills this process 0.25s from now; to let the tasks finish, quit with: "
                        "kill -INT %d", rt.pid)
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
#: runserver). It exits to be restarted on every code change, and must not wait
#: then; it also exits when the user quits (Ctrl-C), and drains then as any exit.
_RELOADER_CHILD = ("WERKZEUG_RUN_MAIN", "RUN_MAIN")
#: Where those reloaders say that a code change restarts the child, just before it
#: exits with status 3 (the status never reaches an exit hook, the line does):
#: werkzeug/_reloader.py ``log_reload`` (" * Detected change in '...', reloading"),
#: django/utils/autoreload.py ``trigger_reload`` ("%s changed, reloading.").
_RELOADER_LOGGERS = ("werkzeug", "django.utils.autoreload")


class _RestartWatch(logging.Filter):
    """Notes the reloader's restart line as it passes (a filter that drops nothing)."""

    restarting = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg.rstrip(". ").endswith("reloading"):
            self.restarting = True
        return True


_restart_watch: Optional[_RestartWatch] = None


def _watch_for_restart() -> None:
    """In a reloader's child, start noting whether the reloader restarts it (idempotent)."""
    global _restart_watch
    if _restart_watch is not None or not any(os.environ.get(n) == "true" for n in _RELOADER_CHILD):
        return
    _restart_watch = _RestartWatch()
    for name in _RELOADER_LOGGERS:
        logging.getLogger(name).addFilter(_restart_watch)


def _after_fork_in_child() -> None:
    # A runtime created before fork (a preloaded app that scheduled work at import)
    # belongs to the parent: its threads did not survive the fork.
    global _current, _default, _current_lock
    _current = _default = None
    _current_lock = threading.Lock()
    _events.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
