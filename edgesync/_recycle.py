"""Replace before retire: a retiring worker's replacement serves before it stops accepting.

design: gunicorn's arbiter forks a replacement only when a worker has exited, so
a retire (soft limit, ``max_requests``, ``oneshot``) costs the server one worker
for the retiree's drain plus the replacement's boot. Instead the retiree says
"retiring" in memory shared with the arbiter and keeps accepting; the arbiter,
which does not count a retiree as serving, forks its replacement at once; when
the replacement serves, the arbiter releases the retiree, which then stops
accepting and drains as before. One record per worker, in an anonymous shared
mapping created in the master before any fork (``Table``, made by
``edgesync._gunicorn.arbiter`` from the worker class's ``check_config``) and
inherited by every worker.

Rule: the seats a record can be in (booting, serving, retiring, released), their
transitions and who makes each are ``_lifecycle``'s (``Seat``,
``SEAT_TRANSITIONS``, ``SEAT_CODES``); this module only stores them. Each field
of a record has one writer: the master writes ``token``, ``owner``, the BOOTING and FREE
codes of ``state`` (before the fork, and after the reap) and ``released``; the
worker writes the SERVING and RETIRING codes of ``state`` and its times. So no
lock is needed, and a worker that dies mid-write blocks nobody.

How the table meets gunicorn is ``edgesync._gunicorn.arbiter``'s: it tells
``Table`` of every fork, reap and stop signal, hides retirees from gunicorn's
``manage_workers`` (which then spawns one replacement per retiree and, when
there are too many workers (TTOU, HUP), SIGTERMs the oldest *serving* worker,
never a retiree that is leaving anyway), and releases retirees from
``Table.release``.

The table is there whatever ``replace_before_retire`` says (a retiree announces
itself only with it on): it is also how the master knows which workers served.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ._lifecycle import MASTER, RETIREES, SEAT_CODES, WORKER, Seat, seat_move, seat_of
from ._runtime import Runtime

log = logging.getLogger("edgesync")

#: Workers (serving, booting and retiring) the shared table holds. A worker forked
#: while every record is taken retires the old way (it is counted as serving).
SLOTS = 1024
#: Longest wait for a replacement. A retiree also stops waiting at
#: WAIT_LIFE_FRACTION of its wall-clock limit, so that its drain ends before the
#: hard limit terminates it.
MAX_WAIT = 30.0
WAIT_LIFE_FRACTION = 0.75


class _Record(ctypes.Structure):
    _fields_ = [
        ("token", ctypes.c_uint64),  # which spawn owns the record; 0 when free
        ("state", ctypes.c_int32),  # with ``released``: the worker's seat (_lifecycle.SEAT_CODES)
        ("released", ctypes.c_int32),  # 1: the retiree may stop accepting
        ("announced", ctypes.c_double),  # time.monotonic() of the retire (system-wide clock)
        ("ready", ctypes.c_double),  # time.monotonic() the worker started serving
        ("forked", ctypes.c_double),  # time.monotonic() just before the fork (the master's)
        ("retire_at", ctypes.c_double),  # time.monotonic() the worker plans to retire on its age; 0: none
        ("owner", ctypes.c_int32),  # the pid the master recorded in WORKERS for this record; 0: none yet
        # The worker's own figures, for edgesync.server_metrics() (written by the worker,
        # at each heartbeat; read by any worker).
        ("pid", ctypes.c_int32),
        ("pending", ctypes.c_int32),  # tasks queued, running or tracked
        ("requests", ctypes.c_uint64),
        ("completed", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("cancelled", ctypes.c_uint64),  # invocations a limit cancelled
        ("published", ctypes.c_double),  # time.monotonic() of these figures
    ]


class Table:
    """The master's side of the shared table: which record each worker has, and who may stop accepting.

    Created in the master before any fork (``edgesync._gunicorn.arbiter``, which feeds it
    what the arbiter does: forks, reaps, stop signals); every worker forked later
    shares its pages.
    """

    def __init__(self, glog: Any):
        self.glog = glog
        self.pid = os.getpid()
        # MAP_SHARED | MAP_ANONYMOUS: the same pages in the master and every worker forked later.
        self.mem = mmap.mmap(-1, ctypes.sizeof(_Record) * SLOTS)
        self.records = (_Record * SLOTS).from_buffer(self.mem)
        self.slot_of: Dict[int, int] = {}  # worker pid -> record index
        self.stopping: Set[int] = set()  # pids the arbiter told to stop
        self.spawned = 0
        self.full_warned = False

    def in_master(self) -> bool:
        return os.getpid() == self.pid

    def claim(self) -> Optional[int]:
        """A free record for the worker about to be forked (BOOTING), or None if every one is taken."""
        used = set(self.slot_of.values())
        for i in range(SLOTS):
            if i not in used:
                self.spawned += 1
                rec = self.records[i]
                rec.token = self.spawned
                rec.owner = 0
                rec.forked = time.monotonic()
                _clear(rec)
                return i
        if not self.full_warned:
            self.full_warned = True
            self.glog.warning("edgesync: more than %d workers alive; the ones beyond retire without "
                              "a replacement serving first", SLOTS)
        return None

    def assign(self, pid: int, slot: Optional[int]) -> None:
        """The worker forked with record ``slot`` has ``pid`` (the arbiter has it in ``WORKERS`` now)."""
        if slot is not None:
            self.slot_of[pid] = slot
            self.records[slot].owner = pid

    def refork(self, slot: Optional[int]) -> None:
        """The worker about to be forked for ``slot`` again (its mold died on the way): what a first one
        wrote there, before the master recorded its replacement's pid, goes (``stranger``)."""
        if slot is not None:
            _clear(self.records[slot])

    def free(self, slot: int) -> None:
        rec = self.records[slot]
        _put(rec, Seat.FREE)
        rec.token = 0

    def seat(self, pid: int) -> Optional[Seat]:
        """``pid``'s seat; SERVING for a worker without a record (it retires the old way)."""
        slot = self.slot_of.get(pid)
        return Seat.SERVING if slot is None else _seat(self.records[slot])

    def served(self, pid: int) -> bool:
        """Whether ``pid`` has a record and reached its serving loop."""
        slot = self.slot_of.get(pid)
        return slot is not None and bool(self.records[slot].ready)

    def stopped(self, pid: int) -> None:
        """The arbiter told ``pid`` to stop: it no longer counts as serving, even while it drains."""
        self.stopping.add(pid)

    def forget_gone(self, alive: Set[int]) -> None:
        """Free the records of workers no longer among ``alive`` (the arbiter reaped them)."""
        for pid in [p for p in self.slot_of if p not in alive]:
            self.free(self.slot_of.pop(pid))
        self.stopping &= alive

    def release(self, workers: List[int], num_workers: int) -> None:
        """Release as many retirees of ``workers``, oldest retire first, as serving workers allow.

        A retiree covers for one missing serving worker: it is released once enough
        workers that are not retiring and were not told to stop are SERVING.
        """
        waiting: List[Tuple[float, int]] = []
        ready = 0
        for pid in workers:
            slot = self.slot_of.get(pid)
            if slot is None:
                ready += pid not in self.stopping
                continue
            rec = self.records[slot]
            seat = _seat(rec)
            if seat is Seat.RETIRING:
                waiting.append((rec.announced, slot))
            elif seat is Seat.SERVING and pid not in self.stopping:
                ready += 1
        if not waiting:
            return
        still_needed = max(0, num_workers - ready)
        waiting.sort()
        for _, slot in waiting[:max(0, len(waiting) - still_needed)]:
            _move(self.records[slot], Seat.RELEASED, MASTER)


def _seat(rec: _Record) -> Optional[Seat]:
    return seat_of(int(rec.state), int(rec.released))


def _clear(rec: _Record) -> None:
    """The master's reset of what a worker writes, before a fork: BOOTING, no times, no figures."""
    rec.announced = rec.ready = rec.published = rec.retire_at = 0.0
    rec.pid = rec.pending = 0
    rec.requests = rec.completed = rec.failed = rec.cancelled = 0
    _put(rec, Seat.BOOTING)


def _put(rec: _Record, seat: Seat) -> None:
    """The master's reset of a record no live worker holds (a claim, a free): both fields."""
    rec.state, rec.released = SEAT_CODES[seat]


def _move(rec: _Record, to: Seat, by: str) -> bool:
    """Move ``rec`` to seat ``to`` if ``by`` may (``SEAT_TRANSITIONS``), writing only ``by``'s field."""
    if not seat_move(_seat(rec), to, by):
        return False
    state, released = SEAT_CODES[to]
    if by == WORKER:
        rec.state = state
    else:
        rec.released = released
    return True


_master: Optional[Table] = None
#: In a worker: the index of its own record (set by the master just before the fork).
_own: Optional[int] = None


def share(table: Table) -> None:
    """In gunicorn's master, before the first fork: the table every worker forked from now on shares."""
    global _master
    _master = table


def _slot_record() -> Optional[_Record]:
    """The record this worker was forked for, if it has one and its master is its parent."""
    m = _master
    if m is None or _own is None or m.in_master() or os.getppid() != m.pid:
        return None
    return m.records[_own]


def _record() -> Optional[_Record]:
    """This worker's own record: the one it was forked for, unless the master recorded another pid for it
    (``stranger``)."""
    rec = _slot_record()
    return rec if rec is not None and rec.owner in (0, os.getpid()) else None


def _wake_master() -> None:
    # SIGCHLD only wakes the arbiter's loop: handle_chld reaps (nothing), then
    # manage_workers runs, which spawns or releases.
    m = _master
    if m is not None and os.getppid() == m.pid:
        try:
            os.kill(m.pid, signal.SIGCHLD)
        except OSError:  # the master is gone: the worker's parent check ends it
            log.debug("could not wake the arbiter", exc_info=True)


def adopt(slot: Optional[int]) -> None:
    """The record of the worker about to be forked (in the master, None once forked), or its own (in a
    worker a mold forked: the master claimed it before asking the mold)."""
    global _own
    _own = slot


def ready() -> None:
    """In a worker entering its serving loop: seat it SERVING, so the arbiter can release a retiree."""
    rec = _record()
    if rec is None or not seat_move(_seat(rec), Seat.SERVING, WORKER):  # a retire announced stays announced
        return
    rec.ready = time.monotonic()
    _move(rec, Seat.SERVING, WORKER)
    _wake_master()


def stranger() -> Optional[int]:
    """In a worker: the pid its master recorded for its record instead of this one, or None.

    A mold that dies between forking a worker and telling the master its pid leaves
    that worker running as the master's child, but missing from ``WORKERS``: nothing
    counts it, times it out or stops it, and the master forks a replacement for the
    same record (``Table.refork``), whose pid it records there. From then on the
    record is the replacement's (``_record`` is None here), and the worker retires
    at its next heartbeat, when it asks this.
    """
    rec = _slot_record()
    owner = 0 if rec is None else int(rec.owner)
    return None if owner in (0, os.getpid()) else owner


def boot_seconds() -> Optional[float]:
    """In a ready worker: the seconds from just before its fork to serving; None without a record."""
    rec = _record()
    if rec is None or not rec.ready or not rec.forked:
        return None
    return max(0.0, float(rec.ready - rec.forked))


def _owned(m: Table) -> List[int]:
    """The indices of the records a spawn owns (token set).

    Read from the tokens in the table's memory: a ctypes record object per slot, over
    the 1024 slots, took a birth 0.2 ms of CPU (mostly free slots).
    """
    tokens = memoryview(m.mem).cast("Q")[_Record.token.offset // 8::ctypes.sizeof(_Record) // 8]
    return [i for i, token in enumerate(tokens) if token]


def retire_plans() -> Optional[List[float]]:
    """In a worker: when its siblings retire on their age (``time.monotonic()``); None without a table.

    A serving sibling's planned moment, or the moment a retiring one announced its
    retire (its exit follows by about a boot). Only ``plan_retire``'s moments are
    planned: a limit other than the wall clock is not predictable.
    """
    if _record() is None:
        return None
    assert _master is not None
    plans = []
    for i in _owned(_master):
        if i != _own:
            rec = _master.records[i]
            seat = _seat(rec)
            if seat in RETIREES and rec.announced:
                plans.append(rec.announced)
            elif seat is Seat.SERVING and rec.retire_at:
                plans.append(rec.retire_at)
    return plans


def plan_retire(at: float) -> None:
    """In a worker: say when it will retire on its age, for its siblings' ``retire_plans``."""
    rec = _record()
    if rec is not None:
        rec.retire_at = at


class Handoff:
    """A retiree waiting for its replacement: ``done()`` says when to stop accepting."""

    def __init__(self, rec: _Record, pid: int, started: float, deadline: float):
        self._rec = rec
        self._pid = pid
        self.started = started
        self.deadline = deadline
        self._master_pid = _master.pid if _master is not None else 0

    def done(self) -> bool:
        """True once a replacement serves, the wait ran out (logged) or the master is gone."""
        now = time.monotonic()
        if _seat(self._rec) is Seat.RELEASED:
            log.info("worker %d: a replacement serves (%.2fs after the retire); no longer accepting",
                     self._pid, now - self.started)
            return True
        if os.getppid() != self._master_pid:
            return True  # the worker's parent check logs it and ends the worker
        if now >= self.deadline:
            log.warning("worker %d: no replacement serving %.1fs after the retire; no longer accepting "
                        "anyway", self._pid, now - self.started)
            return True
        return False


def announce(runtime: Runtime, keep_accepting: bool = True) -> Optional[Handoff]:
    """In a worker that starts to retire: have the arbiter fork its replacement now.

    Returns a ``Handoff`` when the worker should keep accepting until its
    replacement serves, or None when it should stop accepting now (the feature is
    off, no shared table, the master is gone, or ``keep_accepting`` is False: the
    replacement is then still forked early).
    """
    if not runtime.settings.replace_before_retire:
        return None
    rec = _record()
    if rec is None:
        return None
    now = time.monotonic()
    rec.announced = now
    _move(rec, Seat.RETIRING, WORKER)  # the drain announces a retire once
    _wake_master()
    if not keep_accepting:
        return None
    deadline = now + MAX_WAIT
    wall = runtime.settings.wall_clock_limit_ms / 1000.0
    if wall:
        deadline = min(deadline, runtime.started + wall * WAIT_LIFE_FRACTION)
    if deadline <= now:
        return None
    log.info("worker %d: accepting until a replacement serves (at most %.1fs)", runtime.pid, deadline - now)
    return Handoff(rec, runtime.pid, now, deadline)


def publish(runtime: Runtime) -> None:
    """In a worker: write its figures to its record (cheap: a few stores; called at each heartbeat)."""
    rec = _record()
    if rec is None:
        return
    counts = runtime.pool.counts()
    rec.pid = runtime.pid
    rec.pending = counts["queued"] + counts["running"] + counts["tracked"]
    rec.requests = runtime.tracker.requests()
    rec.completed = counts["completed"]
    rec.failed = counts["failed"]
    rec.cancelled = runtime.tracker.cancelled()
    rec.published = time.monotonic()


def server_metrics(runtime: Runtime) -> Optional[Dict[str, Any]]:
    """Every live worker's figures from the shared table, and their totals; None without a table."""
    if _record() is None:
        return None
    publish(runtime)  # this worker's own figures, fresh
    m = _master
    assert m is not None
    now = time.monotonic()
    workers = []
    for rec in (m.records[i] for i in _owned(m)):
        seat = _seat(rec)
        if rec.published and seat not in (None, Seat.FREE):
            # A released retiree is still "retiring" to the reader (docs: booting, serving, retiring).
            name = Seat.RETIRING if seat is Seat.RELEASED else seat
            workers.append({"pid": rec.pid, "state": name.value, "requests": rec.requests,
                            "tasks_completed": rec.completed, "tasks_failed": rec.failed,
                            "tasks_pending": rec.pending, "invocations_cancelled": rec.cancelled,
                            "figures_age_s": round(now - rec.published, 3)})
    workers.sort(key=lambda w: w["pid"])
    keys = ("requests", "tasks_completed", "tasks_failed", "tasks_pending", "invocations_cancelled")
    return {"master_pid": m.pid, "workers": workers,
            "totals": {k: sum(w[k] for w in workers) for k in keys}}


def _after_fork_in_child() -> None:
    # A process forked by a worker (the app's own subprocesses) is not a worker.
    global _own
    if _master is not None and os.getppid() != _master.pid:
        _own = None


os.register_at_fork(after_in_child=_after_fork_in_child)
