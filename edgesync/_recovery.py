"""What a runtime does with durable tasks: record, mark done, re-run the dead's, hand off.

design: the runtime calls four functions of this module and nothing else:
``submit`` (``wait_until`` of a durable function), ``boot`` (a worker is ready:
start claiming), ``unload`` (the instance unloads: hand off or leave pending what
is not done) and ``metrics``. Per runtime there is one ``_Keeper``: the tasks this
process holds (in memory, and in the journal when ``durable_journal`` is set), its
counters, and one claimer thread (started after fork, by ``boot`` or by the first
durable task) that every ``CLAIM_INTERVAL`` claims the rows of dead owners and runs
them again, bounded by the free room of the pool.

Rule: a task that never started here may go to the hand-off target; a task that was
running here when the instance unloaded stays in the journal (when there is one) and
is re-run only after this process has exited, so no two processes run it at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Dict, Optional, Protocol

from ._config import Settings
from ._durable import DurableFunction, attempt_scope, resolve
from ._handoff import RQTarget
from ._journal import Entry, Journal
from ._lifecycle import State
from ._pool import QueueFull

log = logging.getLogger("edgesync")

#: Seconds between two claims of dead workers' journal rows (and statsd flushes).
CLAIM_INTERVAL = 1.0

_COUNTERS = ("recorded", "completed", "rerun", "given_up", "handed_off", "left_pending")


class _Runtime(Protocol):
    """What this module needs of ``edgesync._runtime.Runtime``."""

    settings: Settings
    pid: int
    stats: Any

    @property
    def state(self) -> State: ...

    def wait_until(self, obj: Any, args: Any, kwargs: Any) -> Future[Any]: ...

    @property
    def pool(self) -> Any: ...


class _Held:
    __slots__ = ("fn", "args", "attempt", "max_attempts", "started")

    def __init__(self, fn: str, args: str, attempt: int, max_attempts: int):
        self.fn = fn
        self.args = args
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.started = False


_journals: Dict[str, Journal] = {}
_journals_lock = threading.Lock()


def _journal(path: str) -> Journal:
    with _journals_lock:
        journal = _journals.get(path)
        if journal is None:
            journal = _journals[path] = Journal(path)
        return journal


class _Keeper:
    def __init__(self, rt: _Runtime):
        st = rt.settings
        self.rt_ref = weakref.ref(rt)
        self.pid = rt.pid
        self.max_attempts = st.durable_max_attempts
        self.journal: Optional[Journal] = None
        if st.durable_journal:
            self.journal = _journal(os.path.abspath(st.durable_journal))
            self.journal.open()
        self.target: Optional[RQTarget] = None
        if st.handoff == "rq":
            self.target = RQTarget(st.handoff_redis_url, st.handoff_queue)
        self.always = self.target is not None and st.handoff_on == "always"
        self.on_full = self.target is not None and st.handoff_on == "deadline_or_queue_full"
        self.held: Dict[str, _Held] = {}
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._sent = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False

    # -- accepting -------------------------------------------------------------------

    def submit(self, rt: _Runtime, fn: DurableFunction[Any, Any], args: Any, kwargs: Any) -> Future[Any]:
        payload = fn.encode(args, kwargs)
        max_attempts = fn.max_attempts or self.max_attempts
        task_id = os.urandom(9).hex()
        if self.always:
            assert self.target is not None
            self.target.enqueue(task_id, fn.path, payload, 1)
            return self._handed_off(1)
        if self.journal is not None:
            self.journal.record(task_id, fn.path, payload, max_attempts)
        elif not self._warned:
            self._warned = True
            log.warning("worker %d: durable task %s is kept in memory only: set durable_journal in "
                        "[edge_runtime] to survive the death of this process", self.pid, fn.path)
        held = _Held(fn.path, payload, 1, max_attempts)
        self.held[task_id] = held
        with self._lock:
            self.counts["recorded"] += 1
        if self._thread is None and self.journal is not None:
            self.start()  # the default runtime (outside gunicorn) claims from its first durable task on
        try:
            return rt.wait_until(self._runner(task_id, held, fn, args, kwargs), (), {})
        except QueueFull:
            if self.on_full:
                assert self.target is not None
                self.target.enqueue(task_id, fn.path, payload, 1)
                self._forget(task_id)
                return self._handed_off(1)
            self._forget(task_id)
            raise
        # why BaseException: the task was not accepted, whatever stopped it; its record goes, then the error.
        except BaseException:
            self._forget(task_id)
            raise

    def _handed_off(self, n: int) -> Future[Any]:
        with self._lock:
            self.counts["handed_off"] += n
        future: Future[Any] = Future()
        future.set_result(None)
        return future

    def _runner(self, task_id: str, held: _Held, fn: Any, args: Any, kwargs: Any) -> Any:
        keeper = self
        attempt = held.attempt
        target = fn.__wrapped__

        def run() -> Any:
            held.started = True
            try:
                with attempt_scope(attempt, held.args):
                    result = target(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = asyncio.run(_await(result))
                    return result
            finally:
                keeper._done(task_id)
        run.__module__, run.__qualname__, run.__name__ = fn.__module__, fn.__qualname__, fn.__name__
        return run

    def _done(self, task_id: str) -> None:
        if self.held.pop(task_id, None) is None:
            return  # handed off at unload: its record is gone already
        if self.journal is not None:
            self.journal.delete(task_id)
        with self._lock:
            self.counts["completed"] += 1

    def _forget(self, task_id: str) -> None:
        self.held.pop(task_id, None)
        with self._lock:
            self.counts["recorded"] -= 1
        if self.journal is not None:
            self.journal.delete(task_id)

    # -- re-running the tasks of dead workers ----------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self.journal is None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=_claim_loop, args=(self,), name="edgesync-journal",
                                            daemon=True)
        self._thread.start()

    def claim_once(self) -> int:
        """Claim and re-run what dead owners left; returns how many were claimed."""
        rt = self.rt_ref()
        if rt is None or rt.state is not State.SERVING or self.journal is None:
            return 0
        pool = rt.pool
        room = (pool.max_pending - pool.pending) // 2
        entries = self.journal.claim(room)
        by_owner: Dict[int, int] = {}
        for entry in entries:
            by_owner[entry.dead_pid] = by_owner.get(entry.dead_pid, 0) + 1
            self._rerun(rt, entry)
        for dead, n in by_owner.items():
            log.warning("worker %d: re-running %d durable task(s) of dead process %d from the journal",
                        self.pid, n, dead)
        return len(entries)

    def _rerun(self, rt: _Runtime, entry: Entry) -> None:
        assert self.journal is not None
        if entry.attempt > entry.max_attempts:
            self.journal.delete(entry.id)
            with self._lock:
                self.counts["given_up"] += 1
            # Names and ids only: arguments may hold personal data (they stay in the journal row).
            log.error("worker %d: gave up durable task %s (%s): its %d attempt(s) all ended with their "
                      "process", self.pid, entry.id, entry.fn, entry.max_attempts)
            return
        try:
            fn = resolve(entry.fn)
            positional, keywords = _decode(entry.args)
        except Exception:  # an app that no longer has the function: logged, the row is given up
            self.journal.delete(entry.id)
            with self._lock:
                self.counts["given_up"] += 1
            log.exception("worker %d: gave up durable task %s (%s): it cannot be loaded", self.pid,
                          entry.id, entry.fn)
            return
        held = _Held(entry.fn, entry.args, entry.attempt, entry.max_attempts)
        self.held[entry.id] = held
        try:
            rt.wait_until(self._runner(entry.id, held, fn, positional, keywords), (), {})
        except (QueueFull, RuntimeError):
            # No room, or the instance began to unload: give the row back for another claim.
            self.held.pop(entry.id, None)
            self.journal.release(entry.id)
            return
        with self._lock:
            self.counts["rerun"] += 1

    # -- unloading ------------------------------------------------------------------------------

    def unload(self, why: str) -> None:
        if self._stop.is_set():
            return  # unloaded already (an instance unloads once; a test runtime may be closed after)
        self._stop.set()
        held = list(self.held.items())
        handed = kept = 0
        for task_id, h in held:
            # Running here, with a journal: re-run after this process exits (never two at once).
            if self.target is None or (h.started and self.journal is not None):
                kept += 1
                continue
            attempt = h.attempt + 1 if h.started else h.attempt
            try:
                self.target.enqueue(task_id, h.fn, h.args, attempt)
            except Exception:  # Redis is down: the journal keeps it (if any); logged once with its traceback
                log.exception("worker %d: could not hand durable task %s (%s) to %s", self.pid, task_id,
                              h.fn, self.target.describe())
                kept += 1
                continue
            self.held.pop(task_id, None)
            if self.journal is not None:
                self.journal.delete(task_id)
            handed += 1
        with self._lock:
            self.counts["handed_off"] += handed
            self.counts["left_pending"] += kept
        if handed:
            log.warning("worker %d: handed %d durable task(s) to %s (reason=%s)", self.pid, handed,
                        self.target.describe() if self.target else "-", why)
        if kept:
            where = ("left in the journal for a live worker to re-run" if self.journal is not None
                     else "lost: set durable_journal or handoff to keep them")
            log.warning("worker %d: %d durable task(s) not done, %s (reason=%s)", self.pid, kept, where, why)
        self.flush_stats()

    # -- observing --------------------------------------------------------------------------------

    def metrics(self) -> Dict[str, Any]:
        with self._lock:
            out: Dict[str, Any] = dict(self.counts)
        out["pending"] = len(self.held)
        out["journal"] = self.journal.path if self.journal is not None else None
        out["handoff"] = self.target.describe() if self.target is not None else None
        out["journal_pending"] = self.journal.counts()["total"] if self.journal is not None else None
        return out

    def flush_stats(self) -> None:
        rt = self.rt_ref()
        stats = None if rt is None else rt.stats
        if stats is None:
            return
        try:
            with self._lock:
                counts = dict(self.counts)
            for key in ("rerun", "given_up", "handed_off", "left_pending"):
                delta = counts[key] - self._sent[key]
                if delta:
                    stats.increment("edgesync.durable." + key, delta)
                    self._sent[key] = counts[key]
            stats.gauge("edgesync.durable.pending", len(self.held))
        except Exception:  # statsd is best effort (gunicorn's statsd logger logs its own errors)
            log.debug("statsd flush failed", exc_info=True)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _decode(args: str) -> Any:
    positional, keywords = json.loads(args)[:2]
    return positional, keywords


def _claim_loop(keeper: _Keeper) -> None:
    while not keeper._stop.is_set():
        try:
            keeper.claim_once()
        except Exception:  # a locked or broken journal must not end claiming: logged, retried next tick
            log.exception("worker %d: claiming durable tasks from the journal failed", keeper.pid)
        keeper.flush_stats()
        keeper._stop.wait(CLAIM_INTERVAL)


# -- the runtime's calls ----------------------------------------------------------------------------

_keepers: weakref.WeakKeyDictionary[Any, _Keeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def _keeper(rt: _Runtime) -> _Keeper:
    keeper = _keepers.get(rt)
    if keeper is None:
        with _keepers_lock:
            keeper = _keepers.get(rt)
            if keeper is None:
                keeper = _keepers[rt] = _Keeper(rt)
    return keeper


def submit(rt: _Runtime, fn: DurableFunction[Any, Any], args: Any, kwargs: Any) -> Future[Any]:
    """``wait_until(fn, *args, **kwargs)`` of a durable function on ``rt``."""
    return _keeper(rt).submit(rt, fn, args, kwargs)


def boot(rt: _Runtime) -> None:
    """The instance is ready: claim dead workers' tasks now and every ``CLAIM_INTERVAL``."""
    if rt.settings.durable_journal or rt.settings.handoff:
        try:
            _keeper(rt).start()
        except Exception:  # an unusable journal must not crash the worker: a durable wait_until raises it
            log.exception("worker %d: durable tasks of dead workers will not be re-run by this worker", rt.pid)


def unload(rt: _Runtime, why: str) -> None:
    """The instance unloads: hand off what never started, leave the rest in the journal; stop claiming."""
    keeper = _keepers.get(rt)
    if keeper is not None:
        keeper.unload(why)


def metrics(rt: _Runtime) -> Optional[Dict[str, Any]]:
    """The ``durable`` part of ``runtime_metrics()``; None when durable tasks are off and unused."""
    if not (rt.settings.durable_journal or rt.settings.handoff or rt in _keepers):
        return None
    return _keeper(rt).metrics()


def _after_fork_in_child() -> None:
    # The parent's keepers and journals (their locks may be held by threads that did not survive the
    # fork, their connections belong to the parent) are not this process's.
    global _keepers_lock, _journals_lock, _journals
    _journals = {}
    _keepers.clear()
    _keepers_lock = threading.Lock()
    _journals_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

