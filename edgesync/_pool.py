"""The bounded background thread pool that runs ``wait_until`` work.

design: at most ``max_pending`` tasks are accepted (queued + running + tracked
futures, the set ``_tasks``); past that ``submit`` raises ``QueueFull`` at once,
it never blocks and never drops. An accepted task goes on one unbounded
``SimpleQueue`` (the bound is the set's); threads start lazily, one per task
that could run now, up to ``max_threads``, as daemon threads: the pool is
drained by its owner, which polls ``pending`` with a deadline and a heartbeat
(``_lifecycle.drain``; tests use ``wait_idle``), never by the interpreter's
exit-time joins. A thread runs each task as an invocation of its ``Slot`` (so
the limits monitor sees its CPU), settles its future, reports a failure through
``on_failure`` and counts the task out. Shutdown is a flag set under the lock
plus one ``None`` sentinel that each exiting thread passes on (as in CPython's
``concurrent.futures.thread``). Threads hold the pool, its queue and its
tracker, never the pool's owner: ``on_failure`` is a plain function, so a
dropped runtime is collected while its threads idle.

Rule: a task that returned is counted out without a lock. Its thread accounts
its success for the summary line (``_identity.Successes``, lock-free) and counts
it in its own slot, then takes it out of ``_tasks`` with one ``set.remove`` (a C
call: the set is never seen half-changed, and the load of ``_tasks`` and the
removal are one step, so ``abandon``, which swaps in a new set under the lock,
either sees the task gone or has it already: then the count is taken back),
then wakes ``wait_idle`` only if a waiter counted itself in first. Whoever finds
the pool idle finds every outcome counted. Everything else that changes
``_tasks`` holds the lock, and counts the task before it takes it out. A
lock shared by every completion was the pool's costliest part under load: a
thread that lost the GIL while holding it made every other one block on it
(0.2-0.4 voluntary context switches per task, against a thread pool's 0.01).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextvars import Context
from typing import Any, Callable, Dict, List, Optional, Set, Union

from ._events import TaskInfo
from ._identity import Successes, format_id, log_success, log_summary, mark, next_seq, task_log, task_name
from ._invocation import INDEX, TASK, Invocation, InvocationCancelled, Outcome, Slot, Tracker

log = logging.getLogger("edgesync")

_monotonic = time.monotonic
_isawaitable = inspect.isawaitable
#: Results that are surely not awaitable: one set lookup spares ``inspect.isawaitable``
#: (an ABC check) for what tasks return most.
NOT_AWAITABLE: Set[type] = {int, str, bool, float, bytes, dict, list, tuple}


#: Where a task's own thread counts a completed task (``Slot.counts``).
_COMPLETED = INDEX[TASK, Outcome.COMPLETED]


class QueueFull(RuntimeError):
    """``wait_until`` was offered more work than ``max_pending_tasks`` allows."""


class Task(Invocation):
    """One unit of background work and its bookkeeping; while a thread runs it, that thread's invocation.

    The limits monitor sees a running task in its thread's ``slot.current`` as it
    sees a request; a task is that invocation itself rather than a second object
    made per run. The fields only a request changes are constants here.
    """

    __slots__ = ("future", "fn", "args", "kwargs", "context", "named", "accepted", "tracked", "seq")

    kind = TASK
    answer = None  # nobody waits on a task's connection: it is never answered from outside
    response_started = False
    answered = False
    start_response = None

    def __init__(self, future: Future[Any], fn: Optional[Callable[..., Any]], args: Any,
                 kwargs: Any, context: Optional[Context], named: Any, tracked: bool = False,
                 task_id: Optional[str] = None):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = context
        # Its name, or what task_name names it after: formatted only when something
        # reports the task (most never are), and kept then.
        self.named = named
        self.accepted = _monotonic()
        self.started: Optional[float] = None  # type: ignore[assignment]  # set when a thread runs it
        self.tracked = tracked
        # What the limits monitor writes while the task runs (see Invocation).
        self.cpu_start = None
        self.verdict = None
        self.retire_sent = self.warned = False
        # See _identity: a number, formatted only when reported; a durable task's own id as is.
        seq: Union[int, str] = next_seq() if task_id is None else task_id
        self.seq = seq
        if tracked:
            mark(future, seq)  # the caller's own Future: any subclass
        else:
            future._edgesync_task_seq = seq  # type: ignore[attr-defined]  # _identity.FUTURE_ATTR

    @property
    def task(self) -> Task:
        return self

    @property
    def label(self) -> Task:  # (read-only: a task is its own label)
        return self

    def describe(self) -> str:
        return "task %s" % self.name

    @property
    def id(self) -> str:
        """``<pid>-<n>`` (or a durable id): what ``edgesync.task_id(future)`` returns and every log line shows."""
        return format_id(self.seq)

    @property
    def name(self) -> str:
        """``module.qualname`` of what the task runs (or a description of a tracked future)."""
        named = self.named
        if isinstance(named, str):
            return named
        name = self.named = task_name(named)
        return name

    def info(self, now: float) -> TaskInfo:
        if self.tracked:
            return TaskInfo(self.name, "tracked", now - self.accepted, None, self.id)
        if self.started is None:
            return TaskInfo(self.name, "queued", now - self.accepted, None, self.id)
        return TaskInfo(self.name, "running", now - self.accepted, now - self.started, self.id)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_awaitable(awaitable: Any) -> Any:
    """Run a coroutine or other awaitable to completion on a fresh event loop."""
    coro = awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
    return asyncio.run(coro)


class Pool:
    """A bounded pool; see the module docstring for its rules.

    ``on_failure(task, exc)`` is called on the task's thread when a task raises
    (the runtime turns it into an ``unhandledrejection`` event); the threads keep
    it, so it must not hold the pool's owner. ``success_interval``: seconds
    between two success summaries (``_identity.Successes``; 0: a line per task).
    """

    def __init__(self, max_threads: int, max_pending: int, tracker: Tracker,
                 on_failure: Callable[[Task, BaseException], None], name: str = "edgesync-task",
                 success_interval: float = 60.0):
        self.max_threads = max_threads
        self.max_pending = max_pending
        self._tracker = tracker
        self._on_failure = on_failure
        self._name = name
        self._queue: queue.SimpleQueue[Optional[Task]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiters = 0
        self._threads: List[threading.Thread] = []
        self._tasks: Set[Task] = set()
        self._closed: Optional[str] = None  # why submit is refused, once closed
        self._tracked = 0  # tracked futures among self._tasks
        self._successes = Successes(success_interval)  # lock-free (see its rule)
        self._summarise = success_interval > 0
        # Each success's own line: DEBUG under a summary, else INFO (Celery's habit).
        self._each_level = logging.DEBUG if self._summarise else logging.INFO

    # -- accepting work ------------------------------------------------------

    def _accept(self, task: Task) -> None:
        """Count ``task`` in, or raise; the caller holds ``self._lock``."""
        if self._closed is not None:
            raise RuntimeError(self._closed)
        if len(self._tasks) >= self.max_pending:
            raise QueueFull(
                "edgesync: the background queue is full (%d tasks pending, the limit set by "
                "max_pending_tasks): the task was not accepted. Raise max_pending_tasks or "
                "background_threads, or shed load." % len(self._tasks))
        self._tasks.add(task)

    def submit(self, fn: Callable[..., Any], args: Any, kwargs: Any, context: Context,
               named: Any = None, task_id: Optional[str] = None) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` inside ``context``; never blocks.

        ``named`` is what the task is named after in reports (a string, or an object
        whose ``module.qualname`` is used); by default ``fn``. ``task_id``: the task's
        id if it has one already (a durable task's), else a new ``<pid>-<n>``.
        """
        task = Task(Future(), fn, args, kwargs, context, fn if named is None else named, False, task_id)
        with self._lock:
            tasks = self._tasks
            if self._closed is not None or len(tasks) >= self.max_pending:
                self._accept(task)  # raises the error that says why
            tasks.add(task)
            # One thread per task that could be running now (tracked futures run
            # elsewhere), up to max_threads.
            nthreads = len(self._threads)
            start_thread = nthreads < self.max_threads and len(tasks) - self._tracked > nthreads
            if start_thread:
                t = threading.Thread(target=_work, args=(self, self._queue, self._tracker),
                                     name="%s-%d" % (self._name, len(self._threads)), daemon=True)
                self._threads.append(t)
        if start_thread:
            try:
                t.start()
            except RuntimeError as exc:
                # CPython 3.12 refuses new threads at interpreter shutdown. The threads
                # already running take the task from the queue; with none, nothing would.
                with self._lock:
                    self._threads.remove(t)
                    if not self._threads:
                        self._tasks.discard(task)
                        raise RuntimeError(
                            "edgesync: Python refused a thread for the background task (%s; CPython "
                            "3.12 does at interpreter exit) and this pool has none to run it: run "
                            "the work inline, or schedule it before the interpreter exits" % exc) from exc
        self._queue.put(task)
        return task.future

    def track(self, future: Future[Any], name: str) -> None:
        """Count a future that runs elsewhere as pending work until it is done."""
        task = Task(future, None, (), {}, None, name, tracked=True)
        with self._lock:
            self._accept(task)
            self._tracked += 1

        def done(f: Future[Any]) -> None:
            error = None if f.cancelled() else f.exception()
            try:
                if error is not None:
                    self._on_failure(task, error)
            finally:
                self._finish(task, error is None)
        future.add_done_callback(done)

    # -- running work (on the pool's threads) --------------------------------

    def _run(self, task: Task, slot: Slot) -> None:
        future = task.future
        if not future.set_running_or_notify_cancel():
            self._finish(task, None, slot=slot)  # its caller cancelled it before it started
            return
        task.started = started = _monotonic()
        slot.current = task  # the limits monitor watches it from here (Slot.end_surely ends that)
        error: Optional[BaseException] = None
        try:
            try:
                if task.kwargs:
                    result = task.context.run(task.fn, *task.args, **task.kwargs)  # type: ignore[union-attr, arg-type]
                else:  # (no empty dict to copy: most tasks take no keyword)
                    result = task.context.run(task.fn, *task.args)  # type: ignore[union-attr, arg-type]
                if result is not None and type(result) not in NOT_AWAITABLE and _isawaitable(result):
                    result = task.context.run(run_awaitable, result)  # type: ignore[union-attr]
            # why BaseException: whatever the task raises belongs to its future and its
            # unhandledrejection event; it must not end this thread or reach other tasks.
            except BaseException as exc:
                error = exc
        except InvocationCancelled as exc:
            # At most one cancellation is ever sent per invocation; this catches it
            # when it lands inside the handler above instead of inside the task.
            error = exc
        finally:
            # end_surely retries when a cancellation lands inside it; one that the monitor
            # sent in the instant the task returned may also be delivered as end_surely is
            # entered, before that retry: it is caught here, or the task stays pending for good.
            while True:
                try:
                    slot.end_surely(task)
                    break
                except InvocationCancelled:
                    continue
        if error is None:
            # (The task and what it holds are dropped when this returns, as a thread
            # pool's work item is: nothing to clear first.)
            ended = _monotonic()
            if task_log.isEnabledFor(self._each_level):  # a cached lookup when the level is off
                log_success(self._each_level, task.name, task.seq, ended - started)
            future.set_result(result)
            # Counted out without a lock (the module's rule), and without a call of its
            # own: the common case. The success is accounted and counted first, so that
            # whoever finds the pool idle (a drain, then its last summary and counters)
            # finds them.
            summary = self._successes.add(ended - started, task.seq, task.named, ended) if self._summarise else None
            counts = slot.counts  # (only this thread writes them)
            counts[_COMPLETED] += 1
            try:
                self._tasks.remove(task)
            except KeyError:
                # Abandoned while it ran, and counted so there (its success is still
                # logged, as each success's own line is).
                counts[_COMPLETED] -= 1
            else:
                if self._waiters and not self._tasks:
                    self._wake_waiters()
            if summary is not None:
                log_summary(summary)
            return
        task.fn = task.args = task.kwargs = task.context = None  # not held while the listeners run
        if isinstance(error, InvocationCancelled) and task.verdict is not None:
            error = InvocationCancelled(task.verdict.message)
        task.name  # noqa: B018  (format the name before what it names is dropped)
        future.set_exception(error)
        # Report before counting the task finished: whoever waits for the pool
        # to be idle (a drain, a test) also waits for the rejection's listeners.
        try:
            self._on_failure(task, error)
        finally:
            self._finish(task, False, cancelled=task.verdict is not None, slot=slot)
        del error

    def _wake_waiters(self) -> None:
        with self._lock:
            self._idle.notify_all()

    def _finish(self, task: Task, ok: Optional[bool], cancelled: bool = False,
                slot: Optional[Slot] = None) -> None:
        """Count ``task`` out, unless it returned here (``_run`` does): ``ok`` True completed
        (a tracked future), False failed (``cancelled``: by a limit), None cancelled by its
        caller. ``slot``: the calling thread's own, which counts the outcome (see ``_invocation``)."""
        outcome = (Outcome.COMPLETED if ok else Outcome.CALLER_CANCELLED if ok is None
                   else Outcome.CANCELLED if cancelled else Outcome.FAILED)
        with self._lock:
            # Counted before it leaves _tasks, as in _run. Under the lock nothing but
            # this thread takes this task out (abandon swaps the set under it).
            if task not in self._tasks:
                return  # abandoned at shutdown and counted there
            if slot is not None:
                slot.counts[INDEX[TASK, outcome]] += 1
            else:
                self._tracker.record(TASK, outcome)
            self._tasks.remove(task)
            if task.tracked:
                self._tracked -= 1
            if self._waiters and not self._tasks:
                self._idle.notify_all()

    def log_successes(self, now: Optional[float] = None) -> None:
        """Log the success summary now if its interval is over; with no ``now``, whatever it holds.

        The monitor calls it at each sample, so that a summary is not held back by
        a pause in the work; the runtime calls it when it unloads.
        """
        if not self._summarise or (now is not None and now < self._successes.due):
            return  # (a cheap early out: take checks again)
        summary = self._successes.take(_monotonic(), due=now is not None)
        if summary is not None:
            log_summary(summary)

    # -- draining and shutdown -----------------------------------------------

    @property
    def pending(self) -> int:
        """Tasks accepted and not finished (queued + running + tracked)."""
        return len(self._tasks)

    def snapshot(self) -> List[TaskInfo]:
        """Every pending task, oldest first."""
        now = time.monotonic()
        with self._lock:
            tasks = sorted(self._tasks, key=lambda t: t.accepted)
        return [t.info(now) for t in tasks]

    def counts(self) -> Dict[str, int]:
        with self._lock:
            tasks = list(self._tasks)  # (a copy in one C call: completions change the set without the lock)
        running = sum(1 for t in tasks if t.started is not None)
        tracked = sum(1 for t in tasks if t.tracked)
        pending = len(tasks)
        count = self._tracker.count
        return {"queued": pending - running - tracked, "running": running, "tracked": tracked,
                "completed": count(TASK, Outcome.COMPLETED),
                # a task a limit cancelled failed too, as its future says
                "failed": count(TASK, Outcome.FAILED) + count(TASK, Outcome.CANCELLED),
                "cancelled": count(TASK, Outcome.CANCELLED),
                "abandoned": count(TASK, Outcome.ABANDONED), "threads": len(self._threads)}

    def wait_idle(self, deadline: float) -> bool:
        """Wait until no task is pending or ``time.monotonic()`` passes ``deadline``.

        Returns True when the pool became idle (``edgesync.testing`` waits with it).
        """
        with self._lock:
            # Counted in before _tasks is read: a completion (which takes no lock) removes
            # its task, then reads _waiters. Either it sees this waiter and notifies under
            # the lock, which this thread holds until it waits, or it read _waiters before
            # this line, and its removal is seen below.
            self._waiters += 1
            try:
                while self._tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(remaining)
                return True
            finally:
                self._waiters -= 1

    def close(self, reason: str) -> None:
        """Refuse new work from now on with ``RuntimeError(reason)``."""
        with self._lock:
            if self._closed is None:
                self._closed = reason

    def abandon(self, reason: str) -> List[TaskInfo]:
        """Close the pool and give up every pending task; return what was given up.

        Queued tasks are cancelled (their futures say so); running ones go on until
        the process exits, but no longer count. Each is logged by the caller.
        """
        now = time.monotonic()
        fresh: Set[Task] = set()
        with self._lock:
            if self._closed is None:
                self._closed = reason
            # A new set, not a clear(): a completion removes its task from whichever set
            # _tasks is when it does (the module's rule), so none leaves this one after it
            # is swapped out, and each task is either completed or abandoned, never both.
            gone = self._tasks
            self._tasks = fresh
            self._tracked = 0
            self._idle.notify_all()
        tasks = sorted(gone, key=lambda t: t.accepted)
        self._tracker.record(TASK, Outcome.ABANDONED, len(tasks))
        for t in tasks:
            if t.started is None and not t.tracked:
                t.future.cancel()
        self._queue.put(None)
        return [t.info(now) for t in tasks]

    def shutdown(self, reason: str) -> None:
        """Close, and let idle threads exit (running tasks are not waited for)."""
        self.close(reason)
        self._queue.put(None)


class EagerPool(Pool):
    """A pool that runs each task inline, in ``submit`` (Celery's ``task_always_eager``).

    For an app's tests (``edgesync.testing.runtime(eager=True)``): the task runs on
    the caller's thread, in its copied context, through the same path as a pooled
    task (name, id, limits' bookkeeping, ``unhandledrejection``, counts), and its
    future is done when ``wait_until`` returns.
    """

    def submit(self, fn: Callable[..., Any], args: Any, kwargs: Any, context: Context,
               named: Any = None, task_id: Optional[str] = None) -> Future[Any]:
        task = Task(Future(), fn, args, kwargs, context, fn if named is None else named, False, task_id)
        with self._lock:
            self._accept(task)
        slot = self._tracker.slot()
        outer = slot.current  # wait_until from inside a request or a task: restored below
        try:
            self._run(task, slot)
        finally:
            slot.current = outer
        return task.future


def _work(pool: Pool, work_queue: queue.SimpleQueue[Optional[Task]], tracker: Tracker) -> None:
    slot = tracker.register_thread()
    try:
        while True:
            task = work_queue.get()
            if task is None:
                work_queue.put(None)  # pass the sentinel on to the next thread
                return
            try:
                pool._run(task, slot)
            except InvocationCancelled:
                # Delivered after the task's own handlers ran (a cancellation racing
                # the task's end): the task is already accounted for.
                continue
            del task
    finally:
        tracker.unregister_thread(slot)
