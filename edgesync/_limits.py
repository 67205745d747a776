"""The limits monitor: one thread per instance that samples and decides.

design: every ``INTERVAL`` seconds the monitor reads the instance's age, its RSS
(one ``pread`` of ``/proc/self/statm``; psutil elsewhere) and, for every live
invocation, that thread's own CPU clock (``pthread_getcpuclockid`` taken on the
thread itself). It compares them with the settings and asks for the action of the
limits table of docs/model.md: a retire at a soft limit, a ``beforeunload`` at a ratio, a
cancellation or a termination at a hard limit. It never takes a lock that a
request thread holds for long, so it never blocks requests, and requests never
wait for it.

The instance-wide limits are declared once, in ``INSTANCE_LIMITS``: adding one is a
declaration (its settings keys, its soft point, its reason) plus its measurement.

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
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from ._invocation import REQUEST, Invocation, Slot, Verdict
from ._lifecycle import EXIT_TERMINATED, Reason
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
#: The wall-clock soft limit retires each worker at its own point between 20% and
#: 50% of the limit, so that workers do not retire together. When the siblings'
#: plans are known (``siblings``: the shared table of replace before retire), the
#: point is the latest one far enough from theirs (``spaced_retire``). Otherwise
#: ``stagger`` (the worker's place among its siblings, in [0, 1)) spreads workers
#: started together over WALL_CLOCK_SPREAD of the limit. Either way a random jitter
#: of up to WALL_CLOCK_JITTER separates workers that decide at the same moment.
WALL_CLOCK_SOFT = 0.5
WALL_CLOCK_SPREAD = 0.25
WALL_CLOCK_JITTER = 0.05
MEMORY_SOFT = 0.5


class Monitor:
    """Samples one runtime's instance and enforces its limits (see the module doc)."""

    def __init__(self, runtime: Runtime, *, stagger: Optional[float] = None, siblings: Sequence[float] = (),
                 workers: int = 1, boot: float = 0.0):
        self.rt = runtime
        s = runtime.settings
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._terminate_requested_at: Optional[float] = None
        self._watchdog_armed_at = 0.0
        self._stats_at = 0.0
        if stagger is None:
            stagger = random.random()
        self.instance = [_Watch(kind, s, stagger) for kind in INSTANCE_LIMITS]
        wall = self.instance[0]
        if wall.limit and siblings:
            wall.soft = spaced_retire(wall.limit, [t - runtime.started for t in siblings], workers, boot)
        self.wall_soft = wall.soft  # where this worker retires on its age
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
        return bool(any(w.limit for w in self.instance) or self.cpu_hard or self.cpu_soft
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
            try:
                self.sample(time.monotonic())
            # why Exception: a bug in one sample must not end limit enforcement for
            # the worker's whole life; it is logged with its traceback each time.
            except Exception:
                log.exception("worker %d: limits monitor sample failed", self.rt.pid)
            next_at += INTERVAL
            delay = next_at - time.monotonic()
            if delay < 0:  # we fell behind (a long GIL hold): do not burst to catch up
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    # -- one sample --------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Compare every measure with its limits once and act."""
        rt = self.rt
        if self.watchdog and now - self._watchdog_armed_at >= WATCHDOG_REARM:
            faulthandler.dump_traceback_later(self.watchdog, exit=True)
            self._watchdog_armed_at = now
        if self._terminate_requested_at is not None:
            if now - self._terminate_requested_at > TERMINATE_FALLBACK:
                log.error("worker %d: termination did not complete in %.0fs; exiting now",
                          rt.pid, TERMINATE_FALLBACK)
                logging.shutdown()
                os._exit(EXIT_TERMINATED)
        rt.pool.log_successes(now)  # a summary due is not held back by a pause in the work
        if rt.stats is not None and now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            rt.flush_stats()
        for watch in self.instance:
            self._check_instance(now, watch)
        for slot, inv in rt.tracker.live():
            self._check_invocation(now, slot, inv)

    def _terminate(self, reason: Reason, message: str, warns: bool) -> None:
        if self.rt.terminate(reason, message, warns):
            self._terminate_requested_at = time.monotonic()

    def _check_instance(self, now: float, watch: _Watch) -> None:
        if not watch.limit:
            return
        rt = self.rt
        value = watch.kind.measure(rt, now)
        if value is None:
            return
        kind = watch.kind
        if watch.warn and value >= watch.warn:
            rt.beforeunload(kind.reason, kind.deadline(rt, watch.limit))
        if value >= watch.limit:
            self._terminate(kind.reason, kind.describe(rt, value, watch.limit) + ", %s=%d" % (
                kind.limit_key, getattr(rt.settings, kind.limit_key)), bool(watch.warn))
        elif value >= watch.soft:
            rt.retire(kind.reason.value)

    def _check_invocation(self, now: float, slot: Slot, inv: Invocation) -> None:
        rt = self.rt
        verdict = inv.verdict
        if verdict is not None:
            # Cancelled already: did it unwind in time?
            if now - verdict.at >= UNWIND_GRACE:
                if verdict.status == 504:
                    if slot.answer_from_outside(inv, 504, verdict.message):
                        log.warning("worker %d: answered %s with 504 from outside its thread "
                                    "(the handler is blocked and cannot be interrupted)",
                                    rt.pid, inv.describe())
                else:
                    self._terminate(Reason.CPU, "%s did not unwind %.1fs after its cancellation "
                                    "(stuck in C code)" % (inv.describe(), UNWIND_GRACE),
                                    bool(self.cpu_warn))
            return
        if self.cpu_hard or self.cpu_soft:
            cpu = slot.cpu_seconds(inv)
            if cpu is not None:
                if self.cpu_warn and cpu >= self.cpu_warn and not inv.warned:
                    inv.warned = True
                    rt.beforeunload(Reason.CPU, now + max(0.0, self.cpu_hard - cpu))
                if self.cpu_hard and cpu >= self.cpu_hard:
                    message = ("%s used %d ms of CPU time; cpu_hard_limit_ms=%d"
                               % (inv.describe(), cpu * 1000, rt.settings.cpu_hard_limit_ms))
                    if slot.cancel(inv, Verdict("cpu", 546, message)):
                        task_id = getattr(inv.task, "id", None)  # a request has none
                        log.warning("worker %d: cancelled %s (reason=cpu): %s%s", rt.pid,
                                    inv.describe(), message, "" if task_id is None else ", id=%s" % task_id)
                    return
                if self.cpu_soft and cpu >= self.cpu_soft and not inv.retire_sent:
                    inv.retire_sent = True
                    rt.retire(Reason.CPU.value)
        if (self.idle_timeout and inv.kind == REQUEST and not inv.response_started
                and now - inv.started >= self.idle_timeout):
            message = ("%s sent no response within request_idle_timeout_ms=%d"
                       % (inv.describe(), rt.settings.request_idle_timeout_ms))
            if slot.cancel(inv, Verdict("request_idle_timeout", 504, message)):
                log.warning("worker %d: cancelled %s (reason=request_idle_timeout): %s",
                            rt.pid, inv.describe(), message)


def spaced_retire(limit: float, siblings: Sequence[float], workers: int, boot: float) -> float:
    """The age at which a worker retires on its wall clock, away from its siblings' retires.

    ``siblings`` are the ages (of this worker, maybe negative) at which its siblings
    retire or retired. Each worker's turn lasts about its life plus its replacement's
    boot, so ``workers`` retiring in turn are that over ``workers`` apart at best. The
    answer is the latest age of the retire window (20-50% of ``limit``), less a jitter,
    that far from every sibling's; where there is none, the age of the window farthest
    from the nearest one (a late one on a tie). A late retire costs the fewest boots.
    """
    lo = limit * (WALL_CLOCK_SOFT - WALL_CLOCK_SPREAD - WALL_CLOCK_JITTER)
    hi = limit * WALL_CLOCK_SOFT - limit * WALL_CLOCK_JITTER * random.random()
    spacing = (limit * WALL_CLOCK_SOFT + boot) / max(1, workers)

    def distance(age: float) -> float:
        return min(abs(age - t) for t in siblings)

    candidates = [hi, lo] + [t - spacing for t in siblings if lo <= t - spacing <= hi]
    spaced = [age for age in candidates if distance(age) >= spacing]
    if spaced:
        return max(spaced)
    # Nothing far enough: the window's ends and the middles between two siblings are
    # where the distance to the nearest one peaks.
    ordered = sorted(siblings)
    candidates += [(a + b) / 2 for a, b in zip(ordered, ordered[1:], strict=False) if lo <= (a + b) / 2 <= hi]
    return max(candidates, key=lambda age: (round(distance(age), 6), age))


@dataclass(frozen=True)
class InstanceLimit:
    """One instance-wide limit: retire at ``soft`` of it, warn at its ratio, terminate at 100%."""

    reason: Reason  # its beforeunload reason, and its name in logs and metrics
    limit_key: str  # the settings key of the limit (0 disables it)
    ratio_key: str  # the settings key of its beforeunload ratio, in percent
    scale: float  # limit units -> measured units
    soft: Callable[[float], float]  # stagger in [0, 1) -> the soft point as a fraction
    measure: Callable[[Runtime, float], Optional[float]]  # (runtime, now) -> value or None
    describe: Callable[[Runtime, float, float], str]  # (runtime, value, limit) -> message
    deadline: Callable[[Runtime, float], Optional[float]]  # when the hard limit lands, if known


def _rss_growth(rt: Runtime, now: float) -> Optional[float]:
    rss = rt.rss()
    return None if rss is None or rt.rss_baseline is None else float(rss - rt.rss_baseline)


INSTANCE_LIMITS: List[InstanceLimit] = [
    InstanceLimit(
        Reason.WALL_CLOCK, "wall_clock_limit_ms", "beforeunload_wall_clock_ratio", 1 / 1000,
        lambda stagger: (WALL_CLOCK_SOFT - WALL_CLOCK_SPREAD * stagger
                         - WALL_CLOCK_JITTER * random.random()),
        lambda rt, now: now - rt.started,
        lambda rt, age, limit: "instance age %.1fs reached its limit" % age,
        lambda rt, limit: rt.started + limit),
    InstanceLimit(
        Reason.MEMORY, "memory_limit_mb", "beforeunload_memory_ratio", 2**20,
        lambda stagger: MEMORY_SOFT,
        _rss_growth,
        lambda rt, growth, limit: "RSS grew %.1f MB above its %.1f MB baseline" % (
            growth / 2**20, (rt.rss_baseline or 0) / 2**20),
        lambda rt, limit: None),
]


class _Watch:
    """An ``InstanceLimit`` with this worker's thresholds, in measured units."""

    __slots__ = ("kind", "limit", "soft", "warn")

    def __init__(self, kind: InstanceLimit, settings: Any, stagger: float):
        self.kind = kind
        self.limit = getattr(settings, kind.limit_key) * kind.scale
        self.soft = self.limit * kind.soft(stagger)
        self.warn = self.limit * getattr(settings, kind.ratio_key) / 100.0
