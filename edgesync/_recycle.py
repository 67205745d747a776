"""Replace before retire: a retiring worker's replacement serves before it stops accepting.

design: gunicorn's arbiter forks a replacement only when a worker has exited, so
a retire (soft limit, ``max_requests``, ``oneshot``) costs the server one worker
for the retiree's drain plus the replacement's boot. Instead the retiree says
"retiring" in memory shared with the arbiter and keeps accepting; the arbiter,
which does not count a retiree as serving, forks its replacement at once; when
the replacement serves, the arbiter releases the retiree, which then stops
accepting and drains as before. One record per worker, in an anonymous shared
mapping created in the master before any fork (``install``, from the worker
class's ``check_config``) and inherited by every worker.

Rule: each field of a record has one writer. The master writes ``token``,
``state`` = BOOTING/FREE (before the fork, and after the reap) and
``released``; the worker writes ``state`` = READY/RETIRING and its times. So no
lock is needed, and a worker that dies mid-write blocks nobody.

The arbiter is patched on its instance, in the master only (every patched
method checks that it runs in the master: the same object is copied into every
forked worker). gunicorn's own ``manage_workers`` still decides everything; it
just does not see retirees, so it spawns one replacement per retiree and, when
there are too many workers (TTOU, HUP), SIGTERMs the oldest *serving* worker,
never a retiree that is leaving anyway.

The table is there whatever ``replace_before_retire`` says (a retiree announces
itself only with it on): it is also how the master knows which workers served.
Two more patched methods make births cheaper and safer: ``spawn_workers`` forks
without gunicorn's random sleep after each birth, and ``reap_workers`` keeps
gunicorn's halt on exit codes 3 and 4 for workers that never served.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import _mold
from ._process import running_arbiter
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

FREE, BOOTING, READY, RETIRING = 0, 1, 2, 3
#: Signals with which the arbiter stops a worker (its kill_worker): a worker it
#: signalled so no longer counts as serving, even while it drains.
_STOPPING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL, signal.SIGABRT})


class _Record(ctypes.Structure):
    _fields_ = [
        ("token", ctypes.c_uint64),  # which spawn owns the record; 0 when free
        ("state", ctypes.c_int32),
        ("released", ctypes.c_int32),  # 1: the retiree may stop accepting
        ("announced", ctypes.c_double),  # time.monotonic() of the retire (system-wide clock)
        ("ready", ctypes.c_double),  # time.monotonic() the worker started serving
        ("forked", ctypes.c_double),  # time.monotonic() just before the fork (the master's)
        ("retire_at", ctypes.c_double),  # time.monotonic() the worker plans to retire on its age; 0: none
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


class _Master:
    """The arbiter's side: which record each worker has, and the patched methods."""

    def __init__(self, arbiter: Any, glog: Any, mold: bool = False, code_generations: bool = False,
                 before_mold: Optional[Callable[[], object]] = None):
        self.arbiter = arbiter
        self.molds = _mold.Molds(arbiter, mold, glog, code_generations, before_mold)
        self.glog = glog
        self.pid = os.getpid()
        # MAP_SHARED | MAP_ANONYMOUS: the same pages in the master and every worker forked later.
        self.mem = mmap.mmap(-1, ctypes.sizeof(_Record) * SLOTS)
        self.records = (_Record * SLOTS).from_buffer(self.mem)
        self.slot_of: Dict[int, int] = {}  # worker pid -> record index
        self.stopping: Set[int] = set()  # pids the arbiter told to stop
        self.hidden: Dict[int, Any] = {}  # retirees taken out of WORKERS during manage_workers
        self.spawned = 0
        self.full_warned = False
        self.orig: Dict[str, Callable[..., Any]] = {}
        for name in ("spawn_worker", "spawn_workers", "manage_workers", "reap_workers", "kill_worker"):
            self.orig[name] = getattr(arbiter, name)
            setattr(arbiter, name, getattr(self, name))

    def in_master(self) -> bool:
        return os.getpid() == self.pid

    # -- the patched arbiter methods ----------------------------------------------

    def spawn_worker(self) -> Any:
        if not self.in_master():
            return self.orig["spawn_worker"]()
        if self.molds.get() is not None:
            return self._spawn_from_mold()
        global _own
        # Python's advice for fork without exec (gc docs, gc.freeze): what the master
        # holds (with --preload, the whole app) goes to the permanent generation, so
        # the worker's collections neither walk it nor touch its pages, which would
        # copy them (copy-on-write). Measured: without it a fresh worker's first
        # full collections cost a recycling server ~15% of its throughput. The
        # master unfreezes after the fork: its own garbage stays collectable.
        gc.freeze()
        slot = self._claim()
        _own = slot  # copied into the child by the fork below: its own record
        workers = self.arbiter.WORKERS
        # The child closes its siblings' heartbeat files (arbiter.py spawn_worker):
        # let it see the retirees hidden by manage_workers too.
        workers.update(self.hidden)
        try:
            pid = self.orig["spawn_worker"]()
        except BaseException:
            # why BaseException: in the master a failed fork, whatever it raised, must
            # give its record back. A child passes through untouched (its normal end
            # never gets here: _exit.leave ends it inside the call).
            if self.in_master() and slot is not None:
                self._free(slot)
            raise
        finally:
            if self.in_master():
                gc.unfreeze()
                _own = None
                for hidden in self.hidden:
                    workers.pop(hidden, None)
        if slot is not None:
            self.slot_of[pid] = slot
        return pid

    def _spawn_from_mold(self) -> int:
        """gunicorn's ``spawn_worker`` (arbiter.py, 27.0.x), with the fork done by the generation's mold.

        The master's half is gunicorn's: the ``Worker`` object, ``pre_fork``, the worker
        in ``WORKERS``. If the mold and its successor fail, the master forks this worker
        itself, as gunicorn would have.
        """
        arbiter = self.arbiter
        slot = self._claim()
        arbiter.worker_age += 1
        worker = arbiter.worker_class(arbiter.worker_age, arbiter.pid, arbiter.LISTENERS, arbiter.app,
                                      arbiter.timeout / 2.0, arbiter.cfg, arbiter.log)
        # pre_fork sees every worker of the arbiter, the retirees manage_workers hides included
        # (as in spawn_worker; a worker forked here closes their heartbeat files too).
        workers = arbiter.WORKERS
        workers.update(self.hidden)
        try:
            arbiter.cfg.pre_fork(arbiter, worker)
            pid = self.molds.fork(worker, slot)
            if pid is None:
                pid = self._fork_here(worker, slot)
        finally:
            if self.in_master():
                for hidden in self.hidden:
                    workers.pop(hidden, None)
        worker.pid = pid
        arbiter.WORKERS[pid] = worker
        stats = getattr(arbiter, "_stats", None)
        if isinstance(stats, dict):
            stats["workers_spawned"] = stats.get("workers_spawned", 0) + 1
        if slot is not None:
            self.slot_of[pid] = slot
        return pid

    def _fork_here(self, worker: Any, slot: Optional[int]) -> int:
        global _own
        gc.freeze()
        try:
            pid = os.fork()
        finally:
            if os.getpid() == self.pid:
                gc.unfreeze()
        if pid:
            return pid
        _own = slot
        for sibling in self.arbiter.WORKERS.values():
            sibling.tmp.close()
        _mold.run_worker(self.arbiter, worker)

    def spawn_workers(self) -> None:
        """gunicorn's ``spawn_workers`` without its ``time.sleep(0.1 * random())`` after each fork.

        That sleep (arbiter.py ``spawn_workers``) caps births near 14 a second per
        server whatever the cores, and every replacement of a retiree waits for it.
        """
        if not self.in_master():
            self.orig["spawn_workers"]()
            return
        arbiter = self.arbiter
        for _ in range(int(arbiter.num_workers) - len(arbiter.WORKERS)):
            arbiter.spawn_worker()

    def manage_workers(self) -> Any:
        if not self.in_master():
            return self.orig["manage_workers"]()
        self._forget_gone()
        workers = self.arbiter.WORKERS
        self.hidden = {pid: w for pid, w in workers.items() if self._state(pid) == RETIRING}
        for pid in self.hidden:
            del workers[pid]
        try:
            result = self.orig["manage_workers"]()
        finally:
            workers.update(self.hidden)
            self.hidden = {}
        self._release()
        return result

    def reap_workers(self) -> Any:
        if self.in_master():
            self._reap_served_boot_codes()
        result = self.orig["reap_workers"]()
        if self.in_master():
            # arbiter.reload waits for the old workers with reap_workers alone: a
            # retiree must be released from here too, or the reload waits for it.
            self._forget_gone()
            self._release()
        return result

    def kill_worker(self, pid: int, sig: int) -> Any:
        if self.in_master() and sig in _STOPPING_SIGNALS:
            self.stopping.add(pid)
        return self.orig["kill_worker"](pid, sig)

    def _reap_served_boot_codes(self) -> None:
        """Reap, before gunicorn does, each worker that served and then exited with 3 or 4.

        gunicorn halts the whole server on those codes (arbiter.py ``reap_workers``):
        its rule for a worker that could not boot. A worker that reached its serving
        loop did boot; its exit status is then another process's business (a
        library's ``os._exit(3)`` in a background thread), so it is handled as any
        other worker's exit: logged, ``child_exit`` called, a replacement forked by
        the next ``manage_workers``. Only workers with a record are looked at
        (``waitid`` with ``WNOWAIT`` peeks without reaping); the rest, and every
        worker that never served, keep gunicorn's rule. A served worker that exits in
        the few system calls between this look and gunicorn's ``waitpid`` is still
        gunicorn's to judge: the window is that narrow, not closed.
        """
        arbiter = self.arbiter
        boot_codes = (int(arbiter.WORKER_BOOT_ERROR), int(arbiter.APP_LOAD_ERROR))
        for pid, worker in list(arbiter.WORKERS.items()):
            slot = self.slot_of.get(pid)
            if slot is None or not self.records[slot].ready:
                continue  # never served: gunicorn's rule
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is None or info.si_code != os.CLD_EXITED or info.si_status not in boot_codes:
                continue
            os.waitpid(pid, 0)  # a zombie: returns at once
            arbiter.WORKERS.pop(pid, None)
            # What gunicorn's reap_workers does for any other exit status.
            self.glog.error("Worker (pid:%s) exited with code %s.", pid, info.si_status)
            self.glog.warning("edgesync: worker %d exited with code %d after serving: not a boot error, so "
                              "the server goes on and replaces it (gunicorn halts on %d and %d only for a "
                              "worker that never served)", pid, info.si_status, *boot_codes)
            worker.tmp.close()
            arbiter.cfg.child_exit(arbiter, worker)

    # -- records ----------------------------------------------------------------------

    def _claim(self) -> Optional[int]:
        used = set(self.slot_of.values())
        for i in range(SLOTS):
            if i not in used:
                self.spawned += 1
                rec = self.records[i]
                rec.token = self.spawned
                rec.released = 0
                rec.announced = rec.ready = rec.published = rec.retire_at = 0.0
                rec.forked = time.monotonic()
                rec.pid = rec.pending = 0
                rec.requests = rec.completed = rec.failed = rec.cancelled = 0
                rec.state = BOOTING
                return i
        if not self.full_warned:
            self.full_warned = True
            self.glog.warning("edgesync: more than %d workers alive; the ones beyond retire without "
                              "a replacement serving first", SLOTS)
        return None

    def _free(self, slot: int) -> None:
        rec = self.records[slot]
        rec.state = FREE
        rec.token = 0

    def _state(self, pid: int) -> int:
        slot = self.slot_of.get(pid)
        return READY if slot is None else int(self.records[slot].state)

    def _forget_gone(self) -> None:
        alive = self.arbiter.WORKERS
        for pid in [p for p in self.slot_of if p not in alive and p not in self.hidden]:
            self._free(self.slot_of.pop(pid))
        self.stopping &= set(alive) | set(self.hidden)

    def _release(self) -> None:
        """Release as many retirees, oldest retire first, as serving workers allow.

        A retiree covers for one missing serving worker: it is released once enough
        workers that are not retiring and were not told to stop are READY.
        """
        workers = self.arbiter.WORKERS
        waiting: List[Tuple[float, int]] = []
        ready = 0
        for pid in workers:
            slot = self.slot_of.get(pid)
            if slot is None:
                ready += pid not in self.stopping
                continue
            rec = self.records[slot]
            if rec.state == RETIRING:
                if not rec.released:
                    waiting.append((rec.announced, slot))
            elif rec.state == READY and pid not in self.stopping:
                ready += 1
        if not waiting:
            return
        still_needed = max(0, int(self.arbiter.num_workers) - ready)
        waiting.sort()
        for _, slot in waiting[:max(0, len(waiting) - still_needed)]:
            self.records[slot].released = 1


_master: Optional[_Master] = None
#: In a worker: the index of its own record (set by the master just before the fork).
_own: Optional[int] = None


def install(glog: Any, mold: bool = False, code_generations: bool = False,
            before_mold: Optional[Callable[[], object]] = None) -> bool:
    """In gunicorn's master, before the first fork: share the table and patch the arbiter.

    Returns False (and changes nothing) outside a running gunicorn arbiter, e.g.
    ``gunicorn --check-config``. Idempotent.
    """
    global _master
    arbiter = running_arbiter()
    if _master is not None and _master.arbiter is arbiter and _master.in_master():
        return True
    if arbiter is None:
        glog.debug("edgesync: no running gunicorn arbiter in this process; workers retire without a "
                   "replacement serving first")
        return False
    _master = _Master(arbiter, glog, mold, code_generations, before_mold)
    return True


def _record() -> Optional[_Record]:
    """This worker's own record, if it has one and its master is its parent."""
    m = _master
    if m is None or _own is None or m.in_master() or os.getppid() != m.pid:
        return None
    return m.records[_own]


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
    """In a worker a mold forked: its own record (the master claimed it before asking the mold)."""
    global _own
    _own = slot


def ready() -> None:
    """In a worker entering its serving loop: mark it READY, so the arbiter can release a retiree."""
    rec = _record()
    if rec is None or rec.state != BOOTING:  # a retire already announced stays announced
        return
    rec.ready = time.monotonic()
    rec.state = READY
    _wake_master()


def boot_seconds() -> Optional[float]:
    """In a ready worker: the seconds from just before its fork to serving; None without a record."""
    rec = _record()
    if rec is None or not rec.ready or not rec.forked:
        return None
    return max(0.0, float(rec.ready - rec.forked))


def _owned(m: _Master) -> List[int]:
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
        rec = _master.records[i]
        if i != _own:
            if rec.state == RETIRING and rec.announced:
                plans.append(rec.announced)
            elif rec.state == READY and rec.retire_at:
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
        if self._rec.released:
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
    rec.state = RETIRING
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


_STATE_NAMES = {BOOTING: "booting", READY: "serving", RETIRING: "retiring"}


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
        if rec.published and rec.state in _STATE_NAMES:
            workers.append({"pid": rec.pid, "state": _STATE_NAMES[rec.state], "requests": rec.requests,
                            "tasks_completed": rec.completed, "tasks_failed": rec.failed,
                            "tasks_pending": rec.pending, "invocations_cancelled": rec.cancelled,
                            "figures_age_s": round(now - rec.published, 3)})
    workers.sort(key=lambda w: w["pid"])
    keys = ("requests", "tasks_completed", "tasks_failed", "tasks_pending", "invocations_cancelled")
    return {"master_pid": m.pid, "workers": workers,
            "totals": {k: sum(w[k] for w in workers) for k in keys}}


def close_listeners(worker: Any) -> None:
    """With ``reuse_port``, close this worker's own listening sockets once it stops accepting.

    Each worker then has its own socket (arbiter.py spawn_worker), and the kernel
    keeps routing new connections to it until it is closed; connections still in
    its queue when it closes are reset. So: take every queued connection first
    (they are served like any other), then close.
    """
    if not worker.cfg.reuse_port:
        return
    for listener in worker.sockets:
        listener.setblocking(False)
        while True:
            before = worker.nr_conns
            worker.accept(listener)  # gthread's accept: one connection, or nothing on EAGAIN
            if worker.nr_conns == before:
                break
        listener.close()


def _after_fork_in_child() -> None:
    # A process forked by a worker (the app's own subprocesses) is not a worker.
    global _own
    if _master is not None and os.getppid() != _master.pid:
        _own = None


os.register_at_fork(after_in_child=_after_fork_in_child)
