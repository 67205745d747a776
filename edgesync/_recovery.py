"""What a runtime does with durable tasks: record, mark done, re-run the dead's, hand off.

design: the runtime calls four functions of this module and nothing else:
``submit`` (``wait_until`` of a durable function), ``boot`` (a worker is ready:
start claiming), ``unload`` (the instance unloads: hand off or leave pending what
is not done) and ``metrics``. Per runtime there is one ``_Keeper``: the tasks this
process holds (in memory, and in the journal when ``durable_journal`` is set), its
counters, and one claimer thread (started after fork, by ``boot`` or by the first
durable task) that every ``CLAIM_INTERVAL`` renews this process's lease, checks that
the journal's file is still there, claims the rows of dead owners and runs them again,
bounded by the free room of the pool. A run is counted in the journal when it starts;
a claimed task that had ``max_attempts`` runs, or can no longer be loaded, is given up
through ``_Keeper.give_up``: kept in the journal, counted, logged (never its arguments).

Rule: a task that never started here may go to the hand-off target; a task that was
running here when the instance unloaded stays in the journal (when there is one) and
is re-run only after this process has exited (or its lease expired), so no two
processes run it at once.
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
from ._journal import Entry, Journal, check
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
    __slots__ = ("fn", "args", "runs", "max_attempts", "started")

    def __init__(self, fn: str, args: str, runs: int, max_attempts: int):
        self.fn = fn
        self.args = args
        self.runs = runs  # runs started so far, anywhere (this one included once it started)
        self.max_attempts = max_attempts
        self.started = False  # whether it started in this process


#: The app this server serves (gunicorn's app, ``module:variable``), set in the master before fork:
#: the journal records it and refuses another app. None outside gunicorn (nothing checked).
app: Optional[str] = None

_journals: Dict[str, Journal] = {}
_journals_lock = threading.Lock()


def _journal(path: str, lease_s: float) -> Journal:
    with _journals_lock:
        journal = _journals.get(path)
        if journal is None:
            journal = _journals[path] = Journal(path, app, lease_s)
        return journal


def check_journal(settings: Settings, app_uri: Optional[str]) -> Optional[Dict[str, int]]:
    """In the master, before fork: open, verify and migrate ``durable_journal``; its counts, or None if off.

    Raises ``JournalError`` naming the file, the cause and the fix. ``app_uri`` becomes
    the journal's owner (a new file) or must be its owner (an existing one).
    """
    global app
    app = app_uri
    if not settings.durable_journal:
        return None
    return check(os.path.abspath(settings.durable_journal), app)


class _Keeper:
    def __init__(self, rt: _Runtime):
        st = rt.settings
        self.rt_ref = weakref.ref(rt)
        self.pid = rt.pid
        self.max_attempts = st.durable_max_attempts
        self.journal: Optional[Journal] = None
        if st.durable_journal:
            self.journal = _journal(os.path.abspath(st.durable_journal), st.durable_lease_ms / 1000)
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
        held = _Held(fn.path, payload, 0, max_attempts)
        # Held before it is recorded: a journal found deleted meanwhile gets every held task again.
        self.held[task_id] = held
        if self.journal is not None:
            try:
                self.journal.record(task_id, fn.path, payload, max_attempts)
            # why BaseException: not recorded, whatever stopped it: not held either, then the error.
            except BaseException:
                self.held.pop(task_id, None)
                raise
        elif not self._warned:
            self._warned = True
            log.warning("worker %d: durable task %s is kept in memory only: set durable_journal in "
                        "[edge_runtime] to survive the death of this process", self.pid, fn.path)
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
        target = fn.__wrapped__

        def run() -> Any:
            attempt = keeper._begin(task_id, held)
            if attempt is None:
                return None
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

    def _begin(self, task_id: str, held: _Held) -> Optional[int]:
        """Count this run before it starts (an attempt is a run); its number, None if it must not run here."""
        runs: Optional[int] = held.runs + 1
        if self.journal is not None:
            try:
                runs = self.journal.start(task_id)
            except Exception:  # the journal failed: run it anyway (at least once), uncounted; logged once here
                log.exception("worker %d: could not count the start of durable task %s (%s) in the journal",
                              self.pid, task_id, held.fn)
            if runs is None:
                # Its row is another process's now (this process's lease lapsed and a server that shares
                # the journal claimed it): running it here too would run it twice at once.
                self.held.pop(task_id, None)
                log.warning("worker %d: durable task %s (%s) is held by another process now; not run here",
                            self.pid, task_id, held.fn)
                return None
        assert runs is not None
        held.runs, held.started = runs, True
        return runs

    def give_up(self, task_id: str, fn: str, runs: int, why: str) -> None:
        """Give a task up: kept in the journal (with ``why``) for an operator, counted, logged; never re-run.

        Names and ids only in the log: the arguments may hold personal data (they stay in
        the journal row, where ``python -m edgesync durable requeue`` finds them).
        """
        self.held.pop(task_id, None)
        where = "not kept (no durable_journal)"
        if self.journal is not None:
            self.journal.give_up(task_id, why)
            where = "kept in %s: see `python -m edgesync durable list`" % self.journal.path
        with self._lock:
            self.counts["given_up"] += 1
        log.error("worker %d: gave up durable task %s (%s) after %d run(s): %s; %s", self.pid, task_id, fn,
                  runs, why, where)

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
        # Half the free room, so that requests keep room for their own tasks; but at least one task
        # while there is room at all (max_pending_tasks = 1 must still re-run the dead's tasks).
        room = (pool.max_pending - pool.pending + 1) // 2
        entries = self.journal.claim(room)
        by_owner: Dict[str, int] = {}
        for entry in entries:
            try:
                rerun = self._rerun(rt, entry)
            except Exception as exc:  # one task that cannot be re-run must not stop the batch: given up, kept
                log.exception("worker %d: durable task %s (%s) could not be re-run", self.pid, entry.id, entry.fn)
                self.give_up(entry.id, entry.fn, entry.runs, "its re-run failed: %s: %s" % (type(exc).__name__, exc))
                rerun = False
            if rerun:
                by_owner[entry.dead_owner] = by_owner.get(entry.dead_owner, 0) + 1
        for owner, n in by_owner.items():
            log.warning("worker %d: re-running %d durable task(s) of %s from the journal", self.pid, n, owner)
        return len(entries)

    def _rerun(self, rt: _Runtime, entry: Entry) -> bool:
        """Run a claimed row again, give it up, or give it back; whether it will run here."""
        assert self.journal is not None
        if entry.runs >= entry.max_attempts:
            self.give_up(entry.id, entry.fn, entry.runs, "its %d run(s) all ended with their process (%s)"
                         % (entry.runs, entry.dead_owner))
            return False
        try:
            fn = resolve(entry.fn)
            positional, keywords = _decode(entry.args)
        except Exception as exc:  # an app that no longer has the function: logged, given up (kept)
            log.exception("worker %d: durable task %s (%s) cannot be loaded", self.pid, entry.id, entry.fn)
            self.give_up(entry.id, entry.fn, entry.runs, "it cannot be loaded: %s: %s" % (type(exc).__name__, exc))
            return False
        if not isinstance(fn, DurableFunction):  # a deploy removed @durable: it is no longer a durable task
            self.give_up(entry.id, entry.fn, entry.runs, "%s is no longer a @durable function (found %s)"
                         % (entry.fn, _short(repr(fn))))
            return False
        held = _Held(entry.fn, entry.args, entry.runs, entry.max_attempts)
        self.held[entry.id] = held
        try:
            rt.wait_until(self._runner(entry.id, held, fn, positional, keywords), (), {})
        except (QueueFull, RuntimeError):
            # No room, or the instance began to unload: give the row back for another claim.
            self.held.pop(entry.id, None)
            self.journal.release(entry.id)
            return False
        with self._lock:
            self.counts["rerun"] += 1
        return True

    def tick(self) -> None:
        """Every ``CLAIM_INTERVAL``: renew this process's lease, check the file is still there, claim."""
        if self.journal is not None:
            if self.journal.renew():
                log.error("worker %d: this process's lease on its durable tasks in %s expired before it was "
                          "renewed (was the process stopped?): a server sharing the journal from another "
                          "container or host may run them too", self.pid, self.journal.path)
            what = self.journal.replaced()
            if what is not None:
                self._recreate(what)
        self.claim_once()

    def _recreate(self, what: str) -> None:
        """The journal's file was deleted or replaced while this process wrote it: write into a new one."""
        assert self.journal is not None
        self.journal.reopen()
        # After the new file is open: a task recorded into the old one was held before (see submit).
        held = list(self.held.items())
        for task_id, h in held:
            self.journal.record(task_id, h.fn, h.args, h.max_attempts, h.runs)
        log.error("worker %d: the durable journal %s was %s while this process was writing it: it opened the "
                  "file at that path (creating it if needed) and recorded its %d pending durable task(s) there "
                  "again. Tasks that only the old file held (of processes that died before they could record "
                  "theirs again) are lost: never delete or replace a journal while its server runs", self.pid,
                  self.journal.path, what, len(held))

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
            attempt = h.runs + 1
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
        counts = self.journal.counts() if self.journal is not None else None
        out["journal_pending"] = counts["total"] if counts is not None else None
        out["journal_given_up"] = counts["given_up"] if counts is not None else None
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
            if self.journal is not None:
                stats.gauge("edgesync.durable.journal_given_up", self.journal.counts()["given_up"])
        except Exception:  # statsd is best effort (gunicorn's statsd logger logs its own errors)
            log.debug("statsd flush failed", exc_info=True)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _short(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _decode(args: str) -> Any:
    positional, keywords = json.loads(args)[:2]
    return positional, keywords


def _claim_loop(keeper: _Keeper) -> None:
    while not keeper._stop.is_set():
        try:
            keeper.tick()
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

