"""The limits monitor: one thread per instance that samples and decides.

design: every ``INTERVAL`` seconds the monitor reads the instance's age, its RSS
(through psutil) and, for every live invocation, that thread's own CPU clock
(``pthread_getcpuclockid`` taken on the thread itself). It compares them with the
settings and asks the runtime for the action of DESIGN.md section 4: a retire at a
soft limit, a ``beforeunload`` at a ratio, a cancellation or a termination at a
hard limit. It never takes a lock that a request thread holds for long, so it
never blocks requests, and requests never wait for it.

A thread stuck in C code that holds the GIL stops every Python thread, this one
included; for that case the monitor keeps ``faulthandler``'s C watchdog armed,
which dumps every thread's traceback and ends the process if the monitor has not
run for a while.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import sys
import threading
import time
from typing import Any, Optional

from ._invocation import REQUEST, Invocation, Slot, Verdict, raw_response
from ._runtime import Runtime

log = logging.getLogger("edgesync")

#: Seconds between two samples. Small enough that an action lands within ~2
#: intervals of its threshold; large enough that sampling costs well under 1% of a core.
INTERVAL = 0.05
#: Seconds a cancelled invocation has to unwind before the instance is terminated
#: (CPU) or its client is answered from outside its thread (idle timeout).
UNWIND_GRACE = 0.5
#: Seconds the worker's main thread has to carry out a termination before the
#: monitor ends the process itself.
TERMINATE_FALLBACK = 5.0
#: Seconds between two re-arms of the faulthandler watchdog. Each re-arm joins
#: faulthandler's old watchdog thread while holding the GIL and starts a new one:
#: measured at ~2% of hello-world throughput when done every second, so rarely.
WATCHDOG_REARM = 5.0
#: Seconds between two statsd flushes (when gunicorn's --statsd-host is set).
STATS_INTERVAL = 1.0
#: Exit status of a terminated instance (not 3 or 4, which halt gunicorn's master).
EXIT_TERMINATED = 1
#: The wall-clock soft limit retires each worker at its own point between 20% and
#: 50% of the limit, so that workers started together do not retire together:
#: ``stagger`` (the worker's place among its siblings, in [0, 1)) spreads them over
#: WALL_CLOCK_SPREAD of the limit, and a random jitter of up to WALL_CLOCK_JITTER
#: separates workers that share a place.
WALL_CLOCK_SOFT = 0.5
WALL_CLOCK_SPREAD = 0.25
WALL_CLOCK_JITTER = 0.05
MEMORY_SOFT = 0.5


class Monitor:
    """Samples one runtime's instance and enforces its limits (see the module doc)."""

    def __init__(self, runtime: Runtime, *, interval: float = INTERVAL, watchdog_file: Any = None,
                 stagger: Optional[float] = None):
        self.rt = runtime
        s = runtime.settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._terminate_requested_at: Optional[float] = None
        self._watchdog_file = watchdog_file if watchdog_file is not None else sys.stderr
        self._watchdog_armed_at = 0.0
        self._stats_at = 0.0
        self.samples = 0
        self.sample_seconds = 0.0  # CPU time the monitor spent sampling (its own cost)

        self.wall_limit = s.wall_clock_limit_ms / 1000.0
        if stagger is None:
            stagger = random.random()
        self.wall_soft = self.wall_limit * (WALL_CLOCK_SOFT - WALL_CLOCK_SPREAD * stagger
                                            - WALL_CLOCK_JITTER * random.random())
        self.wall_warn = self.wall_limit * s.beforeunload_wall_clock_ratio / 100.0
        self.mem_limit = s.memory_limit_mb * 1024 * 1024
        self.mem_soft = self.mem_limit * MEMORY_SOFT
        self.mem_warn = self.mem_limit * s.beforeunload_memory_ratio / 100.0
        self.cpu_hard = s.cpu_hard_limit_ms / 1000.0
        self.cpu_soft = s.cpu_soft_limit_ms / 1000.0
        self.cpu_warn = self.cpu_hard * s.beforeunload_cpu_ratio / 100.0
        self.idle_timeout = s.request_idle_timeout_ms / 1000.0
        # A C call holding the GIL for longer than `starved` cannot be a request
        # within its CPU limit. The watchdog fires when the monitor has not re-armed
        # it for `watchdog` seconds: re-armed every WATCHDOG_REARM s, it fires after
        # the monitor starved for between `starved` and `watchdog` seconds.
        starved = max(2.0 * self.cpu_hard, self.cpu_hard + 2.0)
        self.watchdog = starved + WATCHDOG_REARM if self.cpu_hard else 0.0

    @property
    def needed(self) -> bool:
        """Whether there is anything to sample: a limit, or statsd to feed."""
        return bool(self.wall_limit or self.mem_limit or self.cpu_hard or self.cpu_soft
                    or self.idle_timeout or self.rt.stats is not None)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgesync-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.watchdog:
            faulthandler.cancel_dump_traceback_later()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            t0 = time.thread_time()
            try:
                self.sample(time.monotonic())
            # why Exception: a bug in one sample must not end limit enforcement for
            # the worker's whole life; it is logged with its traceback each time.
            except Exception:
                log.exception("worker %d: limits monitor sample failed", self.rt.pid)
            self.sample_seconds += time.thread_time() - t0
            self.samples += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # we fell behind (a long GIL hold): do not burst to catch up
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    # -- one sample --------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Compare every measure with its limits once and act."""
        rt = self.rt
        if self.watchdog and now - self._watchdog_armed_at >= WATCHDOG_REARM:
            faulthandler.dump_traceback_later(self.watchdog, exit=True, file=self._watchdog_file)
            self._watchdog_armed_at = now
        if self._terminate_requested_at is not None:
            if now - self._terminate_requested_at > TERMINATE_FALLBACK:
                log.error("worker %d: termination did not complete in %.0fs; exiting now",
                          rt.pid, TERMINATE_FALLBACK)
                logging.shutdown()
                os._exit(EXIT_TERMINATED)
        if rt.stats is not None and now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            rt.flush_stats()
        self._check_wall_clock(now)
        self._check_memory()
        for slot, inv in rt.tracker.live():
            self._check_invocation(now, slot, inv)

    def _terminate(self, reason: str, message: str) -> None:
        if self.rt.terminate(reason, message):
            self._terminate_requested_at = time.monotonic()

    def _check_wall_clock(self, now: float) -> None:
        if not self.wall_limit:
            return
        rt = self.rt
        age = now - rt.started
        if self.wall_warn and age >= self.wall_warn:
            rt.beforeunload("wall_clock", rt.started + self.wall_limit)
        if age >= self.wall_limit:
            self._terminate("wall_clock", "instance age %.1fs reached wall_clock_limit_ms=%d"
                            % (age, rt.settings.wall_clock_limit_ms))
        elif age >= self.wall_soft:
            rt.retire("wall_clock")

    def _check_memory(self) -> None:
        rt = self.rt
        baseline = rt.rss_baseline
        if not self.mem_limit or baseline is None:
            return
        rss = rt.rss()
        if rss is None:
            return
        growth = rss - baseline
        if self.mem_warn and growth >= self.mem_warn:
            rt.beforeunload("memory", None)
        if growth >= self.mem_limit:
            self._terminate("memory", "RSS grew %.1f MB above its %.1f MB baseline, memory_limit_mb=%d"
                            % (growth / 2**20, baseline / 2**20, rt.settings.memory_limit_mb))
        elif growth >= self.mem_soft:
            rt.retire("memory")

    def _check_invocation(self, now: float, slot: Slot, inv: Invocation) -> None:
        rt = self.rt
        verdict = inv.verdict
        if verdict is not None:
            # Cancelled already: did it unwind in time?
            if now - verdict.at >= UNWIND_GRACE:
                if verdict.status == 504:
                    if slot.answer_from_outside(inv, raw_response(504, verdict.message)):
                        log.warning("worker %d: answered %s with 504 from outside its thread "
                                    "(the handler is blocked and cannot be interrupted)",
                                    rt.pid, describe(inv))
                else:
                    self._terminate("cpu", "%s did not unwind %.1fs after its cancellation "
                                    "(stuck in C code)" % (describe(inv), UNWIND_GRACE))
            return
        if self.cpu_hard or self.cpu_soft:
            cpu = slot.cpu_seconds(inv)
            if cpu is not None:
                if self.cpu_warn and cpu >= self.cpu_warn and not inv.warned:
                    inv.warned = True
                    rt.beforeunload("cpu", now + max(0.0, self.cpu_hard - cpu))
                if self.cpu_hard and cpu >= self.cpu_hard:
                    message = ("%s used %d ms of CPU time; cpu_hard_limit_ms=%d"
                               % (describe(inv), cpu * 1000, rt.settings.cpu_hard_limit_ms))
                    if slot.cancel(inv, Verdict("cpu", 546, message)):
                        log.warning("worker %d: cancelled %s (reason=cpu): %s", rt.pid,
                                    describe(inv), message)
                    return
                if self.cpu_soft and cpu >= self.cpu_soft and not inv.retire_sent:
                    inv.retire_sent = True
                    rt.retire("cpu")
        if (self.idle_timeout and inv.kind == REQUEST and not inv.response_started
                and now - inv.started >= self.idle_timeout):
            message = ("%s sent no response within request_idle_timeout_ms=%d"
                       % (describe(inv), rt.settings.request_idle_timeout_ms))
            if slot.cancel(inv, Verdict("request_idle_timeout", 504, message)):
                log.warning("worker %d: cancelled %s (reason=request_idle_timeout): %s",
                            rt.pid, describe(inv), message)


def describe(inv: Invocation) -> str:
    """``request GET /path`` or ``task module.fn``, for log lines."""
    label = inv.label
    if isinstance(getattr(label, "name", None), str):  # a pool Task
        return "%s %s" % (inv.kind, label.name)
    if inv.kind == REQUEST:
        method = getattr(label, "method", None)
        path = getattr(label, "path", None)
        if method is not None:
            return "request %s %s" % (method, path)
    return "%s %s" % (inv.kind, label)
