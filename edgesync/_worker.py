"""``edgesync.Worker``: gunicorn's threaded worker with the edgesync runtime wired in.

design: HTTP handling is gthread's, unchanged. Around it, the worker owns one
``Runtime`` (created after fork, in ``init_process``), its limits ``Monitor``,
and its own request threads (daemon threads with a slot each, so the monitor can
read their CPU clocks and a stuck one never blocks the process's exit). Every way
out of the main loop goes through ``_shutdown``: a retire (soft limit,
``max_requests``, ``oneshot``), a graceful stop (SIGTERM: stop, reload, HUP), or a
termination (hard limit); SIGINT/SIGQUIT unwind the main thread to
``_quick_shutdown``. All of them keep calling ``notify()`` while they wait, and
none exits with status 3 or 4 (gunicorn halts the whole server on those).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any, Callable, ClassVar, Iterable, List, Optional, Tuple

from gunicorn.http.body import LengthReader
from gunicorn.workers import gthread

from . import _recycle, _runtime
from ._config import ConfigError, Settings, describe_source, load_settings
from ._invocation import REQUEST, InvocationCancelled, Tracker, raw_response, worker_limit_response
from ._limits import EXIT_TERMINATED, Monitor, describe
from ._runtime import SERVING, Runtime

log = logging.getLogger("edgesync")

#: Part of gunicorn's ``graceful_timeout`` kept back from draining, because the
#: arbiter SIGKILLs at that deadline: time to log what is abandoned and to exit.
MAX_SAFETY_MARGIN = 1.0
#: How long ``beforeunload`` listeners may run on SIGINT/SIGQUIT (a quick shutdown:
#: the arbiter allows 2 s after a SIGQUIT that follows a SIGTERM).
QUICK_LISTENER_BUDGET = 1.0
#: How long listeners, and responses already under way, have when a hard limit
#: terminates the instance.
TERMINATE_LISTENER_BUDGET = 1.0
#: How often the drain loops look at the pool and the heartbeat.
DRAIN_TICK = 0.05


class _QuickExit(SystemExit):
    """Raised from the SIGINT/SIGQUIT handler to unwind the main loop, as gunicorn does."""


class _Done:
    """What ``finish_request`` needs of a finished request: gthread calls ``result()``."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Any, error: Optional[BaseException] = None):
        self._value = value
        self._error = error

    def cancelled(self) -> bool:
        return False

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _RequestThreads:
    """The threads that run gthread's ``handle(conn)``.

    Unlike gthread's ``ThreadPoolExecutor`` these are daemon threads with a slot
    each, and a request costs one queue put, no ``Future`` and no done-callback.
    """

    def __init__(self, worker: Worker, count: int, tracker: Tracker):
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, args=(worker, tracker),
                                          name="edgesync-request-%d" % i, daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def put(self, conn: Any) -> None:
        self._queue.put(conn)

    def shutdown(self, wait: bool = False) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _work(self, worker: Worker, tracker: Tracker) -> None:
        tracker.register_thread()
        get, defer, handle, finish = (self._queue.get, worker.method_queue.defer, worker.handle,
                                      worker.finish_request)
        while True:
            conn = get()
            if conn is None:
                return
            try:
                done = _Done(handle(conn))
            except InvocationCancelled:
                done = _Done(False)  # a cancellation that landed after the request's end
            # why BaseException: gthread's main loop expects a result it can read; an
            # escaping error becomes a closed connection there, not a dead thread.
            except BaseException as exc:
                log.exception("worker %d: request thread error", worker.runtime.pid)
                done = _Done(None, RuntimeError(repr(exc)))
            defer(finish, conn, done)


class _Guard:
    """The WSGI app as gunicorn calls it: answers a cancelled invocation with 546/504."""

    def __init__(self, app: Callable[..., Iterable[bytes]], tracker: Tracker):
        self.app = app
        self.tracker = tracker

    def __call__(self, environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
        inv = self.tracker.current()
        if inv is None:
            return self.app(environ, start_response)
        inv.start_response = start_response
        try:
            return self.app(environ, inv.gated_start_response)
        except InvocationCancelled:
            verdict = inv.verdict
            if verdict is None or inv.answered:
                raise
            status, headers, body = worker_limit_response(verdict.status, verdict.message)
            # exc_info lets WSGI replace a status the app had set; if the headers are
            # on the wire already this re-raises, and the connection is closed.
            start_response(status, headers, sys.exc_info())
            inv.slot.cancelled += 1
            return [body]


# gunicorn ships no type information: its classes are Any to mypy.
class Worker(gthread.ThreadWorker):  # type: ignore[misc]
    """The gunicorn worker class: ``gunicorn -k edgesync.Worker app:app``.

    Each worker process is one edgesync instance: ``wait_until`` work runs on its
    bounded pool, its limits are enforced by a monitor thread, and it fires
    ``beforeunload`` before it exits. See DESIGN.md section 3 for the lifecycle.
    """

    # The last settings that validated, in the master: a HUP that brings a broken
    # edgesync.toml keeps serving with these instead of failing every new worker.
    _settings: ClassVar[Optional[Settings]] = None
    max_requests: int  # gunicorn's Worker.__init__ sets it (cfg.max_requests plus its jitter)

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Validate edgesync's settings in the master, before any worker forks.

        Raises ``ConfigError`` (a ``RuntimeError``: gunicorn prints it and exits 1).
        """
        super().check_config(cfg, log)
        cls._settings = load_settings()
        log.info("edgesync: settings from %s", describe_source())
        # [recycle 1/6] share the retire table with the workers, patch the arbiter.
        if cls._settings.replace_before_retire:
            _recycle.install(log)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Runs in the master, before fork: read the settings (a reload may have
        # changed them), and keep nothing with threads or OS handles.
        try:
            settings = type(self)._settings = load_settings()
        except ConfigError as exc:
            previous = type(self)._settings
            if previous is None:
                raise
            self.log.error("edgesync: %s; keeping the previous settings", exc)
            settings = previous
        self.settings: Settings = settings
        self.runtime: Runtime = None  # type: ignore[assignment]  # set in init_process
        self.monitor: Optional[Monitor] = None
        self._stop_at: Optional[float] = None
        self._terminating: Optional[Tuple[str, str]] = None
        self._in_run = False
        self._quitting = False
        self._listener_waits: List[Tuple[threading.Event, float]] = []
        # [recycle] set while retiring and still accepting until the replacement serves.
        self._handoff: Optional[_recycle.Handoff] = None

    # -- set-up, after fork -----------------------------------------------------

    def init_process(self) -> None:
        self.runtime = Runtime(self.settings, on_retire=self._wake_for_retire,
                               on_terminate=self._wake_for_terminate)
        _runtime.install(self.runtime)
        if self.cfg.statsd_host and hasattr(self.log, "gauge"):
            # gunicorn swapped in its statsd logger: send our metrics through it,
            # so they get gunicorn's prefix, socket and dogstatsd tags.
            self.runtime.stats = self.log
        self._attach_logging()
        super().init_process()

    def _attach_logging(self) -> None:
        # Unless the user configured the edgesync logger, its lines go where
        # gunicorn's error log goes, in the same format.
        lg = logging.getLogger("edgesync")
        if lg.handlers or self.cfg.logconfig_dict or self.cfg.logconfig_json:
            return
        error_log = logging.getLogger("gunicorn.error")
        for handler in error_log.handlers:
            lg.addHandler(handler)
        lg.setLevel(error_log.level)
        lg.propagate = False

    def get_thread_pool(self) -> Any:
        return _RequestThreads(self, self.cfg.threads, self.runtime.tracker)

    def enqueue_req(self, conn: Any) -> None:
        self.tpool.put(conn)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi: Any = _Guard(self.wsgi, self.runtime.tracker)

    def accept(self, listener: Any) -> None:
        super().accept(listener)
        if self.settings.policy == "oneshot" and self.nr_conns:
            # One request per instance: take no second connection.
            self.runtime.retire("oneshot")

    # -- requests ---------------------------------------------------------------

    def handle_request(self, req: Any, conn: Any) -> bool:
        slot = self.runtime.tracker.slot()
        slot.requests += 1
        inv = slot.begin(REQUEST, req, sock=conn.sock)
        try:
            keepalive: bool = super().handle_request(req, conn)
            return keepalive
        except InvocationCancelled:
            # Landed outside the app (in gunicorn's response code): the response may
            # be half written, so the connection cannot be reused.
            return False
        finally:
            slot.end_surely(inv)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gthread drains an unread body before reusing the connection, under a
        # socket timeout (two ioctl calls) even when there is nothing to drain.
        # A Content-Length body read to its end (a GET has length 0) leaves no
        # byte of this message on the socket: skip the drain.
        if keepalive:
            body = getattr(conn.parser.mesg, "body", None)
            reader = getattr(body, "reader", None)
            if type(reader) is LengthReader and reader.length == 0 and not body.failed:  # type: ignore[union-attr]
                return True
        result: bool = super()._keepalive_after(conn, keepalive)
        return result

    # -- signals and wake-ups ---------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        # SIGTERM (stop, reload, HUP). A HUP sends it more than once: the drain
        # deadline counts from the first.
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.alive = False
        self.method_queue.defer(_nothing)

    def handle_quit(self, sig: int, frame: Any) -> None:
        if not self._in_run:
            super().handle_quit(sig, frame)  # still booting: gunicorn's own behaviour
            return
        if self._quitting:
            # Ctrl-C reaches the worker as SIGINT and, through the master, as SIGQUIT:
            # the quick shutdown under way (bounded by QUICK_LISTENER_BUDGET) is what
            # both ask for. Unwinding it again would skip its listeners and logs.
            return
        self._quitting = True
        self.alive = False
        raise _QuickExit(0)

    def _wake_for_retire(self, reason: str) -> None:
        # [recycle 2/6] have the arbiter fork the replacement now; unless this is a
        # oneshot instance (one request, no second connection), serve on until the
        # replacement serves.
        if self._stop_at is None and self._terminating is None:
            self._handoff = _recycle.announce(self.runtime, keep_accepting=self.settings.policy != "oneshot")
        if self._handoff is None:
            self.alive = False
        self.method_queue.defer(_nothing)

    def _serving_on(self) -> bool:
        """[recycle 3/6] The main loop's condition once ``alive`` is False: serve on while handing off.

        gthread ends the loop at ``max_requests`` by clearing ``alive`` from a
        request thread: that becomes a retire like any other.
        """
        if self._stop_at is not None or self._terminating is not None:
            return False
        if self.runtime.state == SERVING and self.nr >= self.max_requests:
            self.runtime.retire("max_requests")
            if self._handoff is not None:
                self.max_requests = sys.maxsize  # or gthread clears `alive` after every request
        if self._handoff is None:
            return False
        self.alive = True
        # A SIGTERM that landed since the first check (handlers run between bytecodes).
        return self._stop_at is None and self._terminating is None

    def _wake_for_terminate(self, reason: str, message: str) -> None:
        self._terminating = (reason, message)
        self.alive = False
        self.method_queue.defer(_nothing)

    # -- the main loop ------------------------------------------------------------

    def run(self) -> None:
        rt = self.runtime
        # Memory is counted from here: the app is loaded and the worker is ready.
        rt.rss_baseline = rt.rss()
        # [recycle 4/6] ready: a retiree waiting for a replacement may now stop accepting. Before the
        # monitor starts, whose retire (already due if the boot was slow) must come after it.
        _recycle.ready()
        # Workers booted together take different places in the retire window.
        workers = max(1, int(self.cfg.workers))
        self.monitor = Monitor(rt, stagger=(self.age % workers) / workers)
        if self.monitor.needed:
            self.monitor.start()
        self._in_run = True
        st = self.settings
        log.info("worker %d: serving (policy=%s, wall_clock_limit_ms=%d, cpu_soft/hard_limit_ms=%d/%d, "
                 "memory_limit_mb=%d above %.1f MB, request_idle_timeout_ms=%d, background_threads=%d)",
                 rt.pid, st.policy, st.wall_clock_limit_ms, st.cpu_soft_limit_ms, st.cpu_hard_limit_ms,
                 st.memory_limit_mb, (rt.rss_baseline or 0) / 2**20, st.request_idle_timeout_ms,
                 st.background_threads)
        try:
            self._serve()
            self._shutdown()
        except _QuickExit:
            self._quick_shutdown()

    def _serve(self) -> None:
        # gthread's loop, except that a retiring worker does not take connections,
        # and the heartbeat and the parent check run about once per `beat` seconds
        # instead of on every turn (every finished request wakes this loop; each
        # of them is a system call gthread makes per request).
        self.poller.register(self.method_queue.fileno(), gthread.selectors.EVENT_READ,
                             self.method_queue.run_callbacks)
        self.set_accept_enabled(True)
        # The arbiter kills a worker silent for cfg.timeout (= 2 * self.timeout).
        beat = min(0.5, self.timeout / 2) if self.timeout else 0.5
        next_beat = 0.0
        while self.alive or self._serving_on():  # [recycle 3/6]
            now = time.monotonic()
            beat_due = now >= next_beat
            if beat_due:
                self.notify()
                next_beat = now + beat
            if self._handoff is not None and self._handoff.done():  # [recycle 5/6]
                self._handoff = None
                self.alive = False
                break
            can_accept = self.nr_conns < self.worker_connections and (
                self.runtime.state == SERVING or self._handoff is not None)  # [recycle 5/6]
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            # [recycle 5/6] a retiree looks for its replacement every HANDOFF_POLL seconds.
            self.wait_for_and_dispatch_events(timeout=beat if self._handoff is None else _recycle.HANDOFF_POLL)
            if beat_due and not self.is_parent_alive():
                break
            self.murder_keepalived()
            self.murder_pending()

    def _graceful_deadline(self, start: float) -> float:
        grace = float(self.cfg.graceful_timeout)
        return start + grace - min(MAX_SAFETY_MARGIN, grace * 0.1)

    def _shutdown(self) -> None:
        rt = self.runtime
        self.set_accept_enabled(False)
        _recycle.close_listeners(self)  # [recycle 6/6] reuse_port: the kernel routes to open sockets
        self._cap_keepalive(time.monotonic() + gthread.STOP_KEEPALIVE_LINGER)
        if rt.state == SERVING and self._stop_at is None and self._terminating is None:
            rt.retire("max_requests" if self.nr >= self.max_requests else "parent_exited")
        retire_deadline = self._graceful_deadline(time.monotonic())
        wait_tasks = self.settings.policy != "oneshot"
        while True:
            self.notify()
            if self._terminating is not None:
                self._terminate()
                return
            if self._stop_at is not None:
                self._fire("termination", self._graceful_deadline(self._stop_at))
            deadline = min(retire_deadline, self._graceful_deadline(self._stop_at)
                           if self._stop_at is not None else retire_deadline)
            busy = self.nr_conns > 0 or (wait_tasks and rt.pool.pending > 0)
            if not busy or time.monotonic() >= deadline:
                break
            self.wait_for_and_dispatch_events(timeout=DRAIN_TICK)
            self.murder_keepalived()
            self.murder_pending()
        if self._stop_at is None:
            self._fire("early_drop", max(deadline, time.monotonic() + 1.0))
        self._wait_for_listeners()
        if self._terminating is not None:
            self._terminate()
            return
        why = "termination" if self._stop_at is not None else "early_drop"
        self._finish(why)

    def _quick_shutdown(self) -> None:
        self._fire("termination", time.monotonic() + QUICK_LISTENER_BUDGET)
        self._wait_for_listeners()
        self._finish("termination")
        self.cfg.worker_int(self)
        raise SystemExit(0)

    def _terminate(self) -> None:
        assert self._terminating is not None
        reason, message = self._terminating
        rt = self.runtime
        deadline = time.monotonic() + TERMINATE_LISTENER_BUDGET
        # Answer first: the clients have waited, and listeners may be slow.
        for slot, inv in rt.tracker.live():
            if inv.kind == REQUEST and slot.answer_from_outside(
                    inv, raw_response(546, "the instance was terminated: " + message)):
                slot.cancelled += 1
        ratio = {"wall_clock": self.settings.beforeunload_wall_clock_ratio,
                 "cpu": self.settings.beforeunload_cpu_ratio,
                 "memory": self.settings.beforeunload_memory_ratio}.get(reason, 0)
        if ratio:
            self._fire(reason, deadline)
        # A response already under way cannot be replaced by a 546: give it the
        # listeners' short window to finish, instead of cutting it off mid-body.
        while time.monotonic() < deadline and any(
                inv.kind == REQUEST and not inv.answered for _, inv in rt.tracker.live()):
            self.notify()
            self.wait_for_and_dispatch_events(timeout=DRAIN_TICK)
        self._wait_for_listeners()
        self._finish(reason)
        raise SystemExit(EXIT_TERMINATED)

    def _fire(self, reason: str, deadline: float) -> None:
        done = self.runtime.beforeunload(reason, deadline)
        if done is not None:
            self._listener_waits.append((done, deadline))

    def _wait_for_listeners(self) -> None:
        """Wait for every dispatched ``beforeunload`` to finish, each by its deadline."""
        for done, deadline in self._listener_waits:
            while not done.wait(min(DRAIN_TICK * 2, max(0.0, deadline - time.monotonic()))):
                self.notify()
                if time.monotonic() >= deadline:
                    log.warning("worker %d: beforeunload listeners still running at their "
                                "deadline; unloading without them", self.runtime.pid)
                    break
        self._listener_waits = []

    def _finish(self, why: str) -> None:
        rt = self.runtime
        abandoned = rt.unload(why)
        for _slot, inv in rt.tracker.live():
            if inv.kind == REQUEST:
                log.warning("worker %d: abandoned %s (running, ran %.2fs), reason=%s", rt.pid,
                            describe(inv), time.monotonic() - inv.started, why)
        log.info("worker %d: unloaded (%s; %d requests served, %d tasks abandoned)", rt.pid,
                 why, rt.tracker.totals()[0], len(abandoned))
        rt.flush_stats()
        self.murder_keepalived(force=True)
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for s in self.sockets:
            s.close()


def _nothing() -> None:
    """A callback whose only purpose is to wake the main loop."""
