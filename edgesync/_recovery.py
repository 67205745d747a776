"""The durable-task layer: record, mark done, re-run the dead's, retry, hand off.

design: this is a layer of the runtime (``_runtime.register_layer``): ``wait_until`` of
a durable function (or of a ``functools.partial`` of one) comes here (``submit``), and
the runtime calls the layer when it is ready (start claiming), when it unloads (hand
off or keep what is not done, and say where each task went) and for its metrics and
statsd counters. Per runtime there is one ``_Keeper``: the tasks this process holds
(in memory, and in the journal when ``durable_journal`` is set), its counters, and one
claimer thread (started after fork, by ``ready`` or by the first durable task) that
every ``CLAIM_INTERVAL`` renews this process's lease, checks that the journal's file is
still there, claims the rows of dead owners and runs them again, bounded by the free
room of the pool. A run is counted in the journal when it starts; a claimed task that
had ``max_attempts`` runs, or can no longer be loaded, or whose retries are spent, is
given up through ``_Keeper.give_up``: kept in the journal, counted, logged (never its
arguments).

One id: a durable task's id is made here, once, at acceptance; it is the journal row,
the RQ job or Celery task id, ``edgesync.task_id(future)`` and the id in every log line about
the task in every process that runs it (the attempt number is separate).

Accepted or refused: ``wait_until`` returns only once the task is kept somewhere (the
journal, the hand-off target, or this process's memory without a journal) and raises
only when nothing was kept. A hand-off that fails with a journal keeps the task in the
journal and runs it here (or, when the queue is full, in a later claim); without one it
raises.

Rule: a task that never started here may go to the hand-off target; a task that was
running here when the instance unloaded stays in the journal (when there is one) and
is re-run only after this process has exited (or its lease expired), so no two
processes run it at once.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Deque, Dict, Optional, Tuple

from . import _runtime
from ._config import Settings
from ._context import load_app, process_app_path
from ._durable import DurableFunction, resolve, unwrap
from ._handoff import Handed, Target, target_for
from ._journal import SPOOL_DELAY_S, Entry, Journal, check
from ._lifecycle import State
from ._pool import QueueFull
from ._runtime import Runtime

log = logging.getLogger("edgesync")

#: Seconds between two claims of dead workers' journal rows.
CLAIM_INTERVAL = 1.0

#: After a hand-off failed, for this long a task that the journal can keep goes there without trying
#: Redis again: a Redis that does not answer costs each view its timeout (2 s) and one traceback.
TARGET_DOWN_S = 5.0

_COUNTERS = ("recorded", "completed", "rerun", "given_up", "handed_off", "left_pending", "retried")
_STATSD = ("rerun", "given_up", "handed_off", "left_pending", "retried")


_ids: Deque[str] = collections.deque()
_ids_lock = threading.Lock()


def new_id() -> str:
    """A new durable task id: 9 random bytes in hex, read from ``os.urandom`` 256 ids at a time.

    A system call per id released the GIL in every durable ``wait_until`` (another thread
    then ran before the view went on); the bytes are as random either way. A forked child
    starts with none (see ``_after_fork_in_child``): parent and child never share one.
    """
    while True:
        try:
            return _ids.popleft()  # atomic: two threads never get the same id
        except IndexError:
            with _ids_lock:
                if not _ids:
                    raw = os.urandom(9 * 256).hex()
                    _ids.extend(raw[i:i + 18] for i in range(0, len(raw), 18))


class _Held:
    __slots__ = ("fn", "args", "runs", "max_attempts", "started", "app", "given_up", "marked")

    def __init__(self, fn: str, args: str, runs: int, max_attempts: int, app: Optional[str]):
        self.fn = fn
        self.args = args
        self.runs = runs  # runs started so far, anywhere (this one included once it started)
        self.max_attempts = max_attempts
        self.app = app  # the import path of the app it runs in (see _context)
        self.started = False  # whether it started in this process
        self.given_up = False
        self.marked = False  # its run is counted by its mark in the journal's spool (see _journal)


class _Run:
    """One run of a durable task on the pool (one object: a task's bookkeeping stays small)."""

    __slots__ = ("keeper", "task_id", "held", "fn", "args", "kwargs")

    def __init__(self, keeper: _Keeper, task_id: str, held: _Held, fn: DurableFunction[Any, Any], args: Any,
                 kwargs: Any):
        self.keeper = keeper
        self.task_id = task_id
        self.held = held
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        held, fn = self.held, self.fn
        attempt = self.keeper._begin(self.task_id, held)
        if attempt is None:
            return None
        try:
            return fn.run(self.args, self.kwargs, attempt, held.max_attempts, load_app(held.app),
                          self.retrying, held.args)
        except fn.retry_on:  # its retries are spent: given up
            held.given_up = True
            raise
        finally:
            self.keeper._done(self.task_id)

    def retrying(self, failed: int, exc: BaseException, delay: float) -> None:
        self.keeper._retrying(self.task_id, self.held, self.fn.path, failed, exc, delay)


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
    def __init__(self, rt: Runtime):
        st = rt.settings
        self.rt_ref = weakref.ref(rt)
        self.who = rt.who
        self.max_attempts = st.durable_max_attempts
        self.journal: Optional[Journal] = None
        if st.durable_journal:
            self.journal = _journal(os.path.abspath(st.durable_journal), st.durable_lease_ms / 1000)
            self.journal.open()
        self.target: Optional[Target] = target_for(st)
        self.always = self.target is not None and st.handoff_on == "always"
        self.on_full = self.target is not None and st.handoff_on == "deadline_or_queue_full"
        self.held: Dict[str, _Held] = {}
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False
        self._target_down_until = 0.0  # see TARGET_DOWN_S

    # -- accepting -------------------------------------------------------------------

    def submit(self, rt: Runtime, fn: DurableFunction[Any, Any], args: Any, kwargs: Any) -> Future[Any]:
        payload = fn.encode(args, kwargs)
        max_attempts = fn.attempts_allowed(self.max_attempts)
        task_id = new_id()
        app = process_app_path()
        if self.always and self._target_up():
            assert self.target is not None
            try:
                self.target.send(Handed(task_id, fn.path, payload, 1, max_attempts, app))
                return self._handed_off(task_id)
            except Exception:  # the target is down: with a journal the task is kept and runs here; else raised
                if self.journal is None:
                    raise  # nothing was kept
                self._could_not_hand(task_id, fn.path, "kept in the journal and run here")
        held = _Held(fn.path, payload, 0, max_attempts, app)
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
            log.warning("%s: durable task %s is kept in memory only: set durable_journal in "
                        "[edge_runtime] to survive the death of this process", self.who, fn.path)
        with self._lock:
            self.counts["recorded"] += 1
        if self._thread is None and self.journal is not None:
            self.start()  # the default runtime (outside gunicorn) claims from its first durable task on
        try:
            return rt.run_task(self._runner(task_id, held, fn, args, kwargs), fn.name or fn, task_id)
        except QueueFull:
            if not self.on_full:
                self._forget(task_id)
                raise
            assert self.target is not None
            try:
                if not self._target_up():
                    raise ConnectionError("it failed less than %.0fs ago" % TARGET_DOWN_S)
                self.target.send(Handed(task_id, fn.path, payload, 1, max_attempts, app))
            except Exception as exc:  # Redis down: kept in the journal for a later claim, else refused
                if self.journal is None:
                    self._forget(task_id)  # nothing is kept: refused, as a full queue is
                    raise QueueFull("edgesync: the background queue is full and the hand-off to %s failed "
                                    "(%s: %s): the durable task was not accepted"
                                    % (self.target.describe(), type(exc).__name__, exc)) from exc
                self.held.pop(task_id, None)
                self.journal.release(task_id)  # any live worker's next claim with room runs it
                self._could_not_hand(task_id, fn.path, "kept in the journal for a later claim")
                return self._marked(task_id)
            self._forget(task_id)
            return self._handed_off(task_id)
        # why BaseException: the task was not accepted, whatever stopped it; its record goes, then the error.
        except BaseException:
            self._forget(task_id)
            raise

    def _target_up(self) -> bool:
        """False for TARGET_DOWN_S after a failed hand-off, when the journal can keep the task instead."""
        return self.journal is None or time.monotonic() >= self._target_down_until

    def _could_not_hand(self, task_id: str, fn: str, instead: str) -> None:
        assert self.target is not None
        self._target_down_until = time.monotonic() + TARGET_DOWN_S
        # With its traceback: the cause (connection refused, timeout) is Redis's. Once per TARGET_DOWN_S.
        log.warning("%s: could not hand durable task %s to %s; %s, id=%s (for %.0fs the next ones are kept "
                    "without trying it)", self.who, fn, self.target.describe(), instead, task_id, TARGET_DOWN_S,
                    exc_info=True)

    def _handed_off(self, task_id: str) -> Future[Any]:
        with self._lock:
            self.counts["handed_off"] += 1
        return self._marked(task_id)

    def _marked(self, task_id: str) -> Future[Any]:
        """A done future for a task kept elsewhere: ``task_id(future)`` is its durable id."""
        future: Future[Any] = Future()
        future._edgesync_task_seq = task_id  # type: ignore[attr-defined]  # _identity.FUTURE_ATTR
        future.set_result(None)
        return future

    def _runner(self, task_id: str, held: _Held, fn: DurableFunction[Any, Any], args: Any,
                kwargs: Any) -> _Run:
        return _Run(self, task_id, held, fn, args, kwargs)

    def _retrying(self, task_id: str, held: _Held, fn: str, failed: int, exc: BaseException, delay: float) -> None:
        log.warning("%s: durable task %s raised %s on attempt %d; retrying in %.1fs as attempt %d, id=%s",
                    self.who, fn, type(exc).__name__, failed, delay, failed + 1, task_id)
        with self._lock:
            self.counts["retried"] += 1
        time.sleep(delay)  # on the task's thread, as its run would hold it (see @durable's docstring)
        # The retry is the next run: counted when it starts, as every run is (a death during the
        # wait above re-runs it elsewhere as this same attempt number).
        held.runs = failed + 1
        if self.journal is not None:
            try:
                if held.marked:
                    self.journal.set_attempt(task_id, failed)  # the runs that ended; the mark counts this one
                else:
                    self.journal.start(task_id)
            except Exception:  # the journal failed: the retry runs anyway (at least once), uncounted
                log.exception("%s: could not count the retry of durable task %s in the journal, id=%s",
                              self.who, fn, task_id)

    def _begin(self, task_id: str, held: _Held) -> Optional[int]:
        """Count this run before it starts (an attempt is a run); its number, None if it must not run here."""
        runs: Optional[int] = held.runs + 1
        if self.journal is not None:
            try:
                held.marked = self.journal.mark(task_id)
                if not held.marked:  # not markable now: counted in SQLite, which checks the row is still ours
                    runs = self.journal.start(task_id)
            except Exception:  # the journal failed: run it anyway (at least once), uncounted; logged once here
                log.exception("%s: could not count the start of durable task %s in the journal, id=%s",
                              self.who, held.fn, task_id)
            if runs is None:
                # Its row is another process's now (this process's lease lapsed and a server that shares
                # the journal claimed it): running it here too would run it twice at once.
                self.held.pop(task_id, None)
                log.warning("%s: durable task %s is held by another process now; not run here, id=%s",
                            self.who, held.fn, task_id)
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
        log.error("%s: gave up durable task %s (%s) after %d run(s): %s; %s", self.who, task_id, fn,
                  runs, why, where)

    def _done(self, task_id: str) -> None:
        held = self.held.pop(task_id, None)
        if held is None:
            return  # handed off at unload: its record is gone already
        if held.given_up:
            self.give_up(task_id, held.fn, held.runs, "its retries were spent")
            return
        if self.journal is not None:
            self.journal.end(task_id)
            if self._stop.is_set():
                self.journal.flush()  # unloaded: the journal's thread writes no more
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
                log.exception("%s: durable task %s could not be re-run, id=%s", self.who, entry.fn, entry.id)
                self.give_up(entry.id, entry.fn, entry.runs, "its re-run failed: %s: %s" % (type(exc).__name__, exc))
                rerun = False
            if rerun:  # the line counts what runs again, not what is given up
                by_owner[entry.dead_owner] = by_owner.get(entry.dead_owner, 0) + 1
        for owner, n in by_owner.items():
            log.warning("%s: re-running %d durable task(s) of %s from the journal", self.who, n, owner)
        return len(entries)

    def _rerun(self, rt: Runtime, entry: Entry) -> bool:
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
            log.exception("%s: durable task %s cannot be loaded, id=%s", self.who, entry.fn, entry.id)
            self.give_up(entry.id, entry.fn, entry.runs, "it cannot be loaded: %s: %s" % (type(exc).__name__, exc))
            return False
        if not isinstance(fn, DurableFunction):  # a deploy removed @durable: it is no longer a durable task
            self.give_up(entry.id, entry.fn, entry.runs, "%s is no longer a @durable function (found %s)"
                         % (entry.fn, _short(repr(fn))))
            return False
        # app None: it runs in this process's app (a journal belongs to one app).
        held = _Held(entry.fn, entry.args, entry.runs, entry.max_attempts, None)
        self.held[entry.id] = held
        try:
            rt.run_task(self._runner(entry.id, held, fn, positional, keywords), fn, entry.id)
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
                log.error("%s: this process's lease on its durable tasks in %s expired before it was "
                          "renewed (was the process stopped?): a server sharing the journal from another "
                          "container or host may run them too", self.who, self.journal.path)
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
            # A marked run is counted by its mark (which is still there), not in the row.
            self.journal.record(task_id, h.fn, h.args, h.max_attempts, h.runs - h.marked)
        log.error("%s: the durable journal %s was %s while this process was writing it: it opened the "
                  "file at that path (creating it if needed) and recorded its %d pending durable task(s) there "
                  "again. Tasks that only the old file held (of processes that died before they could record "
                  "theirs again) are lost: never delete or replace a journal while its server runs", self.who,
                  self.journal.path, what, len(held))

    # -- the runtime's calls (a _runtime.Layer) ---------------------------------------------------

    def ready(self) -> None:
        """The instance serves: claim dead workers' tasks now and every ``CLAIM_INTERVAL``."""
        self.start()

    def unload(self, why: str) -> Dict[str, str]:
        """Hand off what never started, keep the rest in the journal; say where each went; stop claiming."""
        if self._stop.is_set():
            return {}  # unloaded already (an instance unloads once; a test runtime may be closed after)
        self._stop.set()
        if self.journal is not None:
            self.journal.dirty.set()  # wakes the journal's thread, which sees the stop and ends
        placed: Dict[str, str] = {}
        handed = kept = 0
        for task_id, h in list(self.held.items()):
            # Running here, with a journal: re-run after this process exits (never two at once).
            if self.target is None or (h.started and self.journal is not None):
                if self.journal is not None:
                    placed[task_id] = "kept in the journal for a live worker to re-run"
                kept += 1
                continue
            attempt = h.runs + 1
            try:
                self.target.send(Handed(task_id, h.fn, h.args, attempt, h.max_attempts, h.app or process_app_path()))
            except Exception:  # Redis is down: the journal keeps it (if any); logged with its traceback
                log.exception("%s: could not hand durable task %s to %s, id=%s", self.who, h.fn,
                              self.target.describe(), task_id)
                if self.journal is not None:
                    placed[task_id] = "kept in the journal for a live worker to re-run (the hand-off failed)"
                kept += 1
                continue
            self.held.pop(task_id, None)
            if self.journal is not None:
                self.journal.delete(task_id)
            placed[task_id] = self.target.where(task_id)
            handed += 1
        if self.journal is not None:
            try:
                self.journal.close()  # the spool is written to SQLite (and goes when nothing is left in it)
            except Exception:  # their rows stay: the tasks run again after this process (at least once)
                log.exception("%s: could not write the spool of durable tasks to the journal", self.who)
        with self._lock:
            self.counts["handed_off"] += handed
            self.counts["left_pending"] += kept
        if handed:
            log.warning("%s: handed %d durable task(s) to %s (reason=%s)", self.who, handed,
                        self.target.describe() if self.target else "-", why)
        if kept:
            where = ("left in the journal for a live worker to re-run" if self.journal is not None
                     else "lost: set durable_journal or handoff to keep them")
            log.warning("%s: %d durable task(s) not done, %s (reason=%s)", self.who, kept, where, why)
        return placed

    def settle(self) -> None:
        if self.journal is not None:
            self.journal.flush()

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

    def counters(self) -> Tuple[Dict[str, int], Dict[str, float]]:
        with self._lock:
            totals = {key: self.counts[key] for key in _STATSD}
        gauges: Dict[str, float] = {"pending": len(self.held)}
        if self.journal is not None:
            gauges["journal_given_up"] = self.journal.counts()["given_up"]
        return totals, gauges


def _short(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _decode(args: str) -> Any:
    positional, keywords = json.loads(args)[:2]
    return positional, keywords


def _claim_loop(keeper: _Keeper) -> None:
    journal = keeper.journal
    assert journal is not None
    next_tick = 0.0
    while not keeper._stop.is_set():
        if time.monotonic() >= next_tick:
            next_tick = time.monotonic() + CLAIM_INTERVAL
            try:
                keeper.tick()
            except Exception:  # a locked or broken journal must not end claiming: logged, retried next tick
                log.exception("%s: claiming durable tasks from the journal failed", keeper.who)
        # Woken when the spool holds something for SQLite (or by unload), which then collects SPOOL_DELAY_S.
        if journal.dirty.wait(max(0.0, next_tick - time.monotonic())) and not keeper._stop.wait(SPOOL_DELAY_S):
            try:
                journal.flush()
            except Exception:  # the rows stay (their tasks would run again): logged, retried next time
                log.exception("%s: writing the spool of durable tasks to the journal failed", keeper.who)
                keeper._stop.wait(SPOOL_DELAY_S)


# -- the layer's registration ------------------------------------------------------------------------


def _layer(rt: Runtime, needed: bool) -> Optional[_Keeper]:
    if needed:
        return _Keeper(rt)  # a durable wait_until: an unusable journal is its error
    if not (rt.settings.durable_journal or rt.settings.handoff):
        return None
    try:
        return _Keeper(rt)
    except Exception:  # an unusable journal must not crash the worker: a durable wait_until raises it
        log.exception("%s: durable tasks of dead workers will not be re-run here", rt.who)
        return None


def _keeper(rt: Runtime) -> _Keeper:
    """``rt``'s durable layer, created on first use."""
    keeper = rt.layer("durable")
    assert isinstance(keeper, _Keeper)
    return keeper


def submit(rt: Runtime, fn: DurableFunction[Any, Any], args: Any, kwargs: Any) -> Future[Any]:
    """``wait_until(fn, *args, **kwargs)`` of a durable function on ``rt``."""
    return _keeper(rt).submit(rt, fn, args, kwargs)


def _submit_partial(rt: Runtime, fn: functools.partial[Any], args: Any, kwargs: Any) -> Future[Any]:
    # A partial of a durable function stays durable, with the partial's arguments recorded too.
    found = unwrap(fn, args, kwargs)
    if found is None:
        return rt.wait_until(fn, args, kwargs)
    return _keeper(rt).submit(rt, *found)


def boot(rt: Runtime) -> None:
    """What ``Runtime.ready`` does for this layer (tests call it on a test runtime)."""
    _keeper(rt).ready()


_runtime.register_layer("durable", _layer, {DurableFunction: submit, functools.partial: _submit_partial})


def _after_fork_in_child() -> None:
    # The parent's journals (their locks may be held by threads that did not survive the fork, their
    # connections belong to the parent) are not this process's. (A runtime, and its keeper, is
    # created after fork: see _runtime.)
    global _journals_lock, _journals, _ids_lock
    _journals = {}
    _journals_lock = threading.Lock()
    _ids.clear()  # the parent's: the child draws its own
    _ids_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

