"""``edgesync.Worker``: gunicorn's threaded worker with the edgesync runtime wired in.

design: HTTP handling is gthread's, unchanged. Around it the worker owns one
``Runtime`` (created after fork, in ``init_process``), its limits ``Monitor``, and
its own request threads (daemon threads with a slot each, so the monitor can read
their CPU clocks and a stuck one never blocks the process's exit). The WSGI app is
wrapped in the invocation ``Boundary`` (``_wsgi``), which every protocol gunicorn
serves goes through. Signals and the monitor only ask the lifecycle for a
transition and wake the main loop; the main loop then runs the one drain
(``_lifecycle.drain``), with this worker as its host: heartbeat, I/O, sockets.
None of it exits with status 3 or 4 (gunicorn halts the whole server on those).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import queue
import selectors
import sys
import threading
import time
from typing import Any, ClassVar, Dict, List, Optional

from gunicorn.http.body import LengthReader
from gunicorn.workers import gthread

from .. import _births, _context, _identity, _logging, _mold, _recycle, _runtime
from .._config import ConfigError, Settings, describe_source, load_settings
from .._invocation import REQUEST, InvocationCancelled, Tracker
from .._journal import JournalError
from .._lifecycle import (
    LIMIT_BUDGET,
    MAX_SAFETY_MARGIN,
    QUICK_BUDGET,
    Budget,
    Policy,
    State,
    Trigger,
    drain,
)
from .._limits import Monitor
from .._runtime import Runtime
from .._wsgi import Boundary
from . import arbiter

log = logging.getLogger("edgesync")


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
        slot = tracker.register_thread()
        get, defer, handle, finish = (self._queue.get, worker.method_queue.defer, worker.handle,
                                      worker.finish_request)
        while True:
            conn = get()
            if conn is None:
                return
            slot.handling = True
            try:
                done = _Done(handle(conn))
            except InvocationCancelled:
                # A cancelled response that had started (the boundary logged it), or a
                # cancellation that landed in gunicorn's own code: close the connection.
                done = _Done(False)
            # why BaseException: gthread's main loop expects a result it can read; an
            # escaping error becomes a closed connection there, not a dead thread.
            except BaseException as exc:
                log.exception("worker %d: request thread error", worker.runtime.pid)
                done = _Done(None, RuntimeError(repr(exc)))
            slot.handling = False
            defer(finish, conn, done)


# gunicorn ships no type information: its classes are Any to mypy.
class Worker(gthread.ThreadWorker):  # type: ignore[misc]
    """The gunicorn worker class: ``gunicorn -k edgesync.Worker app:app``.

    Each worker process is one edgesync instance: ``wait_until`` work runs on its
    bounded pool, its limits are enforced by a monitor thread, and it fires
    ``beforeunload`` before it exits. docs/model.md tells how.
    """

    # design: settings are gunicorn's kind of settings: read once in the master
    # (check_config), validated, inherited by every worker through fork, re-read on
    # reload (HUP) only. A worker replacing one that died never reads the file.
    # The settings that validated last, in the master: a HUP that brings a broken
    # edgesync.toml keeps serving with these instead of failing every new worker.
    _settings: ClassVar[Optional[Settings]] = None
    _reread: ClassVar[bool] = False  # a reload asked for the settings to be read again
    max_requests: int  # gunicorn's Worker.__init__ sets it (cfg.max_requests plus its jitter)

    @classmethod
    def setup(cls) -> None:
        """gunicorn resolved the worker class, in the master: at start, and on every reload (HUP).

        gunicorn calls it from ``Config.worker_class`` (``Arbiter.setup``), before
        ``--preload`` imports the app and before the reload applies its ``raw_env``: the
        next worker constructed reads the settings (in the master, before it forks).

        With ``PROMETHEUS_MULTIPROC_DIR`` set and prometheus_client installed, every
        metric of the server must use edgesync.prometheus's process identifier, from
        the first one made: it is turned on here (see that module).
        """
        cls._reread = True
        # The variable without the client: nothing writes metrics, nothing to do.
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and importlib.util.find_spec("prometheus_client"):
            from .. import prometheus
            prometheus.install()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Validate edgesync's settings in the master, before any worker forks.

        Raises ``ConfigError`` (a ``RuntimeError``: gunicorn prints it on stderr and
        exits 1), logged first in gunicorn's error log (``--error-logfile``: with
        ``--daemon`` there is no stderr).
        """
        super().check_config(cfg, log)
        try:
            cls._settings = load_settings()
        except ConfigError as exc:
            log.error("edgesync: %s", exc)
            raise
        cls._reread = False
        log.info("edgesync: settings from %s", describe_source())
        # Share the workers' table with the workers to come and patch the arbiter's
        # births, reaping and counting (a retiree announces itself there only with
        # replace_before_retire on); each worker ends without Python's teardown of its
        # modules (see _exit).
        arbiter.install(log, mold=cls._settings.mold, code_generations=cls._settings.policy == Policy.ONESHOT,
                        before_mold=lambda: cls.current_settings(log),
                        immortal_heap=cls._settings.mold_immortal_heap)
        if cfg.preload_app:  # the master imported the app: it warms it before its forks
            try:
                _births.warm()
            except Exception:
                log.exception("edgesync: the app's warm-up raised in the master (--preload)")
                raise
        _check_journal(cfg, cls._settings, log)

    @classmethod
    def current_settings(cls, log: Any) -> Settings:
        """In the master: the settings for the next worker, read again if a reload asked for it.

        Called for each worker built, and before a new mold is forked (``_mold``), so that
        the mold's workers start from what the master read.
        """
        if cls._reread or cls._settings is None:
            cls._reread = False
            try:
                cls._settings = load_settings()
                log.info("edgesync: settings from %s", describe_source())
            except ConfigError as exc:
                if cls._settings is None:
                    raise
                log.error("edgesync: %s; keeping the previous settings", exc)
        return cls._settings

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Runs in the master, before fork: keep nothing with threads or OS handles.
        self.settings: Settings = type(self).current_settings(self.log)
        self.runtime: Runtime = None  # type: ignore[assignment]  # set in init_process
        self.monitor: Optional[Monitor] = None
        self._stop_at: Optional[float] = None  # when the first SIGTERM came
        self._signalled: List[Trigger] = []  # what signal handlers asked for (see poll)
        self._in_run = False
        self._stopped_accepting = False
        self._oneshot = self.settings.policy == Policy.ONESHOT
        # The arbiter kills a worker silent for cfg.timeout (= 2 * self.timeout); one
        # notify() per beat is enough, where gthread makes one per loop turn (a system
        # call per finished request: each one wakes the loop).
        self._beat = min(0.5, self.timeout / 2) if self.timeout else 0.5
        self._next_beat = 0.0

    # -- set-up, after fork -----------------------------------------------------

    def init_process(self) -> None:
        _identity.set_role("worker")  # log lines say "worker <pid>" (elsewhere: "process <pid>")
        self.runtime = Runtime(self.settings, on_change=self._wake)
        _runtime.install(self.runtime)
        if self.cfg.statsd_host and hasattr(self.log, "gauge"):
            # gunicorn swapped in its statsd logger: send our metrics through it,
            # so they get gunicorn's prefix, socket and dogstatsd tags.
            self.runtime.stats = self.log
        self._attach_logging()
        try:
            super().init_process()
        finally:
            # The freeze (load_wsgi) lasts the worker's serving life. Frozen objects are
            # invisible to gc.get_objects() and never collected: the exit (_exit.leave)
            # would not find a file the app opened at import and never closed, and
            # Python's teardown, where it still runs, would not free it. Unfreezing is
            # one list splice.
            gc.unfreeze()

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
        # A oneshot instance serves one request: one thread, not cfg.threads started at each birth.
        return _RequestThreads(self, 1 if self._oneshot else self.cfg.threads, self.runtime.tracker)

    def enqueue_req(self, conn: Any) -> None:
        if self._oneshot:
            self._take_the_one_request()
        self.tpool.put(conn)

    def _take_the_one_request(self) -> None:
        # One request per instance: before a request thread can see the connection,
        # `alive` goes off, so gthread's handle_request answers "Connection: close"
        # (gthread.py handle_request) and finish_request never keeps it alive; and
        # the listeners go, so this worker takes no second connection.
        self.alive = False
        self.set_accept_enabled(False)
        self.runtime.retire(Policy.ONESHOT.value, Trigger.ONESHOT)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        _mold.app_loaded()  # a mold's worker: the loggers as the app's import configured them
        # The app's warm-up (if this worker imported the app itself), then its after-fork
        # functions: before post_worker_init, as the freeze below.
        _births.warm()
        _births.forked()
        # A durable task records the app's import path, so that every run, here, in another
        # worker or on an RQ worker, runs in this app (see _context).
        _context.set_process_app(getattr(self.app, "app_uri", None), self.wsgi)
        # The app's logging configuration (Django's LOGGING) may have disabled edgesync's loggers.
        _logging.keep_enabled()
        # Built on the main thread once the app is imported (and after post_fork): its
        # context is every request's starting point.
        self.wsgi: Any = Boundary(self.wsgi, self.runtime.tracker, self.runtime.pid)
        # What the boot made lives as long as the worker: out of the collector's way
        # (arbiter.Master.spawn_worker does the same in the master before each fork).
        # A worker's collections then walk only what its requests made, and never write
        # to (so never copy) the pages it shares with the master. Undone when its life
        # ends (init_process). Before post_worker_init, so that the user's hook can undo
        # it (gc.unfreeze).
        gc.freeze()

    def accept(self, listener: Any) -> None:
        if self._oneshot and not self.alive:
            # A second listener readable in the same poll as the first connection's.
            return
        super().accept(listener)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # Mirrors gthread.ThreadWorker._keepalive_after (gthread.py 580-591), which
        # drains an unread body under a socket timeout (two ioctl calls) even when
        # there is nothing to drain. A Content-Length body read to its end (a GET has
        # length 0) leaves no byte of this message on the socket: skip the drain.
        if keepalive:
            body = getattr(conn.parser.mesg, "body", None)
            reader = getattr(body, "reader", None)
            if type(reader) is LengthReader and reader.length == 0 and not body.failed:  # type: ignore[union-attr]
                return True
        result: bool = super()._keepalive_after(conn, keepalive)
        return result

    # -- signals and wake-ups ---------------------------------------------------
    # A signal handler runs on the main thread between two bytecodes, possibly while
    # it holds the lifecycle's lock: it only notes what was asked and wakes the main
    # loop, which applies it (``poll``).

    def handle_exit(self, sig: int, frame: Any) -> None:
        # SIGTERM (stop, reload, HUP). A HUP sends it more than once: the drain
        # deadline counts from the first.
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._signalled.append(Trigger.STOP)
        self._wake()

    def handle_quit(self, sig: int, frame: Any) -> None:
        if not self._in_run:
            super().handle_quit(sig, frame)  # still booting: gunicorn's own behaviour
            return
        # Ctrl-C reaches the worker as SIGINT and, through the master, as SIGQUIT:
        # both ask for the same quick drain, which the second one does not cut short.
        self._signalled.append(Trigger.QUICK)
        self._wake()

    def _wake(self, trigger: Optional[Trigger] = None) -> None:
        # A retiree may serve on until its replacement serves (the drain decides), and
        # gthread closes connections and HTTP/2 streams once `alive` is off.
        if trigger not in (Trigger.RETIRE, Trigger.ONESHOT):
            self.alive = False
        self.method_queue.defer(_nothing)

    # -- the main loop ------------------------------------------------------------

    def run(self) -> None:
        rt = self.runtime
        created = rt.started  # init_process's moment, until ready() restarts the clock
        # The app is loaded: the instance's age and memory count from here, and its layers
        # start (durable tasks: re-run dead workers' tasks, now and every second).
        rt.ready()
        # Ready, so a retiree waiting for this worker may stop accepting. Before the
        # monitor starts: a retire it decides must come after (a record READY first).
        _recycle.ready()
        # Retire on its age away from the siblings' retires (their plans, from the table
        # replace before retire shares); without it, workers booted together take
        # different places in the retire window.
        workers = max(1, int(self.cfg.workers))
        # Fork to serving, from the master's fork time in the table; without it, from init_process.
        boot = _recycle.boot_seconds()
        boot = rt.started - created if boot is None else boot
        self.monitor = Monitor(rt, stagger=(self.age % workers) / workers, siblings=_recycle.retire_plans() or (),
                               workers=workers, boot=boot)
        if self.monitor.wall_soft:  # 0 with the wall clock off
            _recycle.plan_retire(rt.started + self.monitor.wall_soft)
        if self.monitor.needed:
            self.monitor.start()
        self._in_run = True
        st = self.settings
        log.info("worker %d: serving (policy=%s, wall_clock_limit_ms=%d, cpu_soft/hard_limit_ms=%d/%d, "
                 "memory_limit_mb=%d above %.1f MB, request_idle_timeout_ms=%d, background_threads=%d; "
                 "booted in %.2fs, %d ms of CPU)",
                 rt.pid, st.policy, st.wall_clock_limit_ms, st.cpu_soft_limit_ms, st.cpu_hard_limit_ms,
                 st.memory_limit_mb, (rt.rss_baseline or 0) / 2**20, st.request_idle_timeout_ms,
                 st.background_threads, boot, round((rt.boot_cpu or 0.0) * 1000))
        left = self._serve()
        self.poll()
        if rt.lifecycle.serving:
            # gunicorn's handle_request turned `alive` off after max_requests, or the
            # master went away, or never knew this worker.
            rt.retire(left or "max_requests")
        plan, _abandoned = drain(rt, self)
        self._close()
        if rt.lifecycle.cause is Trigger.QUICK:
            self.cfg.worker_int(self)
        if plan.exit_status:
            raise SystemExit(plan.exit_status)

    def _serve(self) -> Optional[str]:
        """Serve until asked to stop; the reason to retire if the master went away or does not know this worker.

        Mirrors gthread.ThreadWorker.run's serving loop (gthread.py 406-441), except
        that a worker that is no longer serving takes no connections, one takes a
        connection only when a thread is free (``_can_accept``), and the heartbeat
        and the parent check run once per beat instead of on every turn.
        """
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ,
                             self.method_queue.run_callbacks)
        self.set_accept_enabled(True)
        lifecycle = self.runtime.lifecycle
        while self.alive and lifecycle.state is State.SERVING:
            beat_due = self.heartbeat()
            self.set_accept_enabled(self._can_accept())
            self.wait_for_and_dispatch_events(timeout=self._beat)
            if beat_due:
                if not self.is_parent_alive():
                    return "parent_exited"
                if self._stranger():
                    return "unregistered"
            self.murder_keepalived()
            self.murder_pending()
        return None

    def _stranger(self) -> bool:
        """Whether the master recorded another pid for this worker (``_recycle.stranger``): its mold died
        before saying which pid it forked, and the master forked a replacement."""
        owner = _recycle.stranger()
        if owner is None:
            return False
        log.warning("worker %d: the master does not know this worker (it recorded pid %d in its place: the mold "
                    "that forked it ended before saying so); retiring", self.pid, owner)
        return True

    def _can_accept(self) -> bool:
        """Take a new connection only if a request thread is free to serve it now.

        gthread accepts up to ``worker_connections``: one worker may take every
        connection in the listen queue and serve them a thread at a time while a
        sibling idles, and a kept-alive connection never moves to another worker.
        Left in the kernel's queue, a connection goes to whichever worker has a free
        thread. Kept-alive and deferred connections hold no thread, so they do not
        count (gthread.py: ``keepalived_conns``, ``pending_conns``).
        """
        active: int = self.nr_conns - len(self.keepalived_conns) - len(self.pending_conns)
        return active < int(self.cfg.threads) and self.nr_conns < int(self.worker_connections)

    # -- the drain's host (see _lifecycle.Host) -----------------------------------

    def poll(self) -> None:
        while self._signalled:
            self.runtime.lifecycle.request(self._signalled.pop(0))

    def replace(self, keep_accepting: bool) -> Optional[_recycle.Handoff]:
        handoff = _recycle.announce(self.runtime, keep_accepting=keep_accepting)
        if handoff is not None:
            # Serve on as before: gthread ended the serving loop at max_requests by
            # turning `alive` off, and would close every connection after that.
            self.alive = True
            self.max_requests = sys.maxsize
        return handoff

    def stop_accepting(self) -> None:
        self.alive = False
        if self._stopped_accepting:
            return
        self._stopped_accepting = True
        self.set_accept_enabled(False)
        self._close_listeners()  # reuse_port: the kernel routes to open sockets
        # As gthread's run does when it stops (gthread.py 443-449): kept-alive
        # connections stay open for STOP_KEEPALIVE_LINGER at most, and a request
        # arriving on one meanwhile is answered with "Connection: close".
        self._cap_keepalive(time.monotonic() + gthread.STOP_KEEPALIVE_LINGER)

    def _close_listeners(self) -> None:
        """With ``reuse_port``, close this worker's own listening sockets once it stops accepting.

        Each worker then has its own socket (arbiter.py spawn_worker), and the kernel
        keeps routing new connections to it until it is closed; connections still in
        its queue when it closes are reset. So: take every queued connection first
        (they are served like any other), then close.
        """
        if not self.cfg.reuse_port:
            return
        for listener in self.sockets:
            listener.setblocking(False)
            while True:
                before = self.nr_conns
                self.accept(listener)  # gthread's accept: one connection, or nothing on EAGAIN
                if self.nr_conns == before:
                    break
            listener.close()

    def requests_busy(self, terminating: bool) -> bool:
        if terminating:
            # Responses already under way (a 546 cannot replace them) may finish,
            # including those gunicorn writes after the app returned.
            return self.runtime.tracker.writing()
        return bool(self.nr_conns)

    def answer_requests(self, status: int, message: str) -> None:
        for slot, inv in self.runtime.tracker.live():
            if inv.kind is REQUEST:
                slot.answer_from_outside(inv, status, message)

    def heartbeat(self) -> bool:
        """``notify()`` if a beat is due (see ``_beat``); True if it was."""
        now = time.monotonic()
        if now < self._next_beat:
            return False
        self._next_beat = now + self._beat
        self.notify()
        return True

    def notify(self) -> None:
        super().notify()
        # At each heartbeat, this worker's figures go to the table edgesync.server_metrics() reads.
        _recycle.publish(self.runtime)
        if _runtime.on_heartbeat is not None:
            _runtime.on_heartbeat(self.runtime)

    def tick(self, timeout: float) -> None:
        self.heartbeat()
        if not self._stopped_accepting:  # a retiree serving on until its replacement serves
            self.set_accept_enabled(self._can_accept())
        self.wait_for_and_dispatch_events(timeout=timeout)
        self.murder_keepalived()
        self.murder_pending()

    def budget(self, budget: Budget, since: float) -> float:
        if budget is Budget.QUICK:
            return since + QUICK_BUDGET
        if budget is Budget.LIMIT:
            return since + LIMIT_BUDGET
        # The arbiter SIGKILLs at graceful_timeout after its SIGTERM: keep a margin
        # to log what is abandoned and to exit.
        if self._stop_at is not None:
            since = min(since, self._stop_at)
        grace = float(self.cfg.graceful_timeout)
        return since + grace - min(MAX_SAFETY_MARGIN, grace * 0.1)

    def _close(self) -> None:
        if self.monitor is not None:
            # The faulthandler watchdog must not fire while the process exits.
            self.monitor.stop()
        self.murder_keepalived(force=True)
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for s in self.sockets:
            s.close()


def _nothing() -> None:
    """A callback whose only purpose is to wake the main loop."""


def _check_journal(cfg: Any, settings: Settings, log: Any) -> None:
    """In the master, before any fork: the workers will be able to use ``durable_journal``, or the server stops.

    Checked as the user and group the workers run as (gunicorn's ``--user``/``--group``): a
    master running as root can write where its workers cannot, and a journal it created
    would be root's. ``JournalError`` (a ``RuntimeError``) names the file, the cause and the fix.
    """
    from .. import _recovery  # the durable layer, only where the server checks a journal

    app = cfg.wsgi_app or cfg.settings["default_proc_name"].get()
    if cfg.uid == os.geteuid() and cfg.gid == os.getegid():
        counts = _recovery.check_journal(settings, app)
    else:
        counts = _check_journal_as(cfg, settings, app)
    if counts is None:
        return
    log.info("edgesync: durable journal %s (app %s): %d pending, %d given up", settings.durable_journal, app,
             counts["total"], counts["given_up"])
    if counts["given_up"]:
        log.warning("edgesync: the durable journal %s keeps %d given-up task(s): `python -m edgesync durable list` "
                    "shows them, `requeue` runs them again, `purge` deletes them", settings.durable_journal,
                    counts["given_up"])


def _check_journal_as(cfg: Any, settings: Settings, app: str) -> Optional[Dict[str, int]]:
    """``_recovery.check_journal`` in a child process that runs as the workers' user and group."""
    from gunicorn import util

    from .. import _recovery

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer on the pipe, exit without running the master's teardown
        code = 1
        try:
            os.close(read_end)
            util.set_owner_process(cfg.uid, cfg.gid, initgroups=cfg.initgroups)
            os.write(write_end, json.dumps({"counts": _recovery.check_journal(settings, app)}).encode())
            code = 0
        # why BaseException: whatever failed goes back to the master as text; the child must exit here.
        except BaseException as exc:
            os.write(write_end, json.dumps({"error": str(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    _recovery.app = app  # the child set it for itself; the workers inherit the master's
    try:
        reply = json.loads(text)
    except ValueError:
        raise JournalError("durable_journal %s: the check as uid %d died without an answer" % (
            settings.durable_journal, cfg.uid)) from None
    if "error" in reply:
        raise JournalError(reply["error"])
    counts: Optional[Dict[str, int]] = reply["counts"]
    return counts
