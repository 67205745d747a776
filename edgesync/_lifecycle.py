"""The lifecycle of one instance: its states, what moves it between them, how it drains.

Rule: this module owns every state transition and every drain. ``Lifecycle.request``
is the only code that changes the state, and only as ``TRANSITIONS`` says; ``drain``
is the only routine that takes an instance from serving to unloaded, whoever asks
(the gunicorn worker, the default runtime at interpreter exit, a test runtime's
``close``). What differs between causes is data: the ``PLANS`` table. A gunicorn
worker's seat in replace before retire (booting, serving, retiring: accepting until
replaced, released) and who moves it are named here too (``Seat``,
``SEAT_TRANSITIONS``); the table the master shares with its workers only carries
them (``SEAT_CODES``).

::

    SERVING ──retire/oneshot/stop/quick/exit/close──▶ DRAINING(cause) ──▶ UNLOADED
       │                                                   │  ▲ (a stronger cause
       └──────────── a hard limit ──────▶ TERMINATING ◀────┘  │  replaces a weaker)
                                               └──────────────┴──▶ UNLOADED
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Tuple, Union

if TYPE_CHECKING:
    from ._events import TaskInfo
    from ._runtime import Runtime

log = logging.getLogger("edgesync")


class _Named(str, enum.Enum):
    """A string enum that prints, formats and serialises as its bare value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class State(_Named):
    """What the instance is doing (``runtime_metrics()["state"]``)."""

    SERVING = "serving"
    DRAINING = "draining"
    TERMINATING = "terminating"
    UNLOADED = "unloaded"


class Trigger(_Named):
    """What asks the instance to change state. The drain causes come first."""

    RETIRE = "retire"  # a soft limit, max_requests, the master went away
    ONESHOT = "oneshot"  # the oneshot policy: one request per instance
    STOP = "stop"  # SIGTERM: gunicorn stops, reloads, or a HUP replaces the worker
    QUICK = "quick"  # SIGINT / SIGQUIT: a quick shutdown
    EXIT = "exit"  # outside gunicorn: the interpreter is exiting
    CLOSE = "close"  # the owner closes the runtime (edgesync.testing, an embedding)
    TERMINATE = "terminate"  # a hard limit: stop now
    UNLOAD = "unload"  # the drain is over


class Reason(_Named):
    """The reasons a ``beforeunload`` event carries (docs/model.md, "Events")."""

    WALL_CLOCK = "wall_clock"
    CPU = "cpu"
    MEMORY = "memory"
    EARLY_DROP = "early_drop"
    TERMINATION = "termination"


class Policy(_Named):
    """``[edge_runtime] policy``."""

    PER_WORKER = "per_worker"
    ONESHOT = "oneshot"


class LifecycleError(RuntimeError):
    """A transition the lifecycle does not allow; carries the state it was raised in."""

    def __init__(self, state: State, cause: Optional[Trigger], trigger: Trigger):
        self.state, self.cause, self.trigger = state, cause, trigger
        where = state.value if cause is None else "%s(%s)" % (state.value, cause.value)
        super().__init__("edgesync: an instance that is %s cannot %s" % (where, trigger.value))


Phase = Tuple[State, Optional[Trigger]]
_IGNORE = "ignore"  # asked again, or overtaken by something stronger: nothing to do

S, D, T, U = State.SERVING, State.DRAINING, State.TERMINATING, State.UNLOADED
_DRAIN_CAUSES = (Trigger.RETIRE, Trigger.ONESHOT, Trigger.STOP, Trigger.QUICK, Trigger.EXIT,
                 Trigger.CLOSE)
# How strongly a cause asks to stop: a drain under way is replaced only by a stronger one
# (a SIGTERM during a retire fires `termination` at once; a SIGINT cuts either short).
_STRENGTH = {Trigger.RETIRE: 0, Trigger.ONESHOT: 0, Trigger.CLOSE: 1, Trigger.EXIT: 1,
             Trigger.STOP: 1, Trigger.QUICK: 2}


def _draining_row(cause: Trigger) -> Dict[Trigger, Union[Phase, str]]:
    row: Dict[Trigger, Union[Phase, str]] = {
        other: (D, other) if _STRENGTH[other] > _STRENGTH[cause] else _IGNORE
        for other in _DRAIN_CAUSES}
    row[Trigger.TERMINATE] = _IGNORE if cause is Trigger.QUICK else (T, None)
    row[Trigger.UNLOAD] = (U, None)
    return row


#: (state, cause) -> {trigger: next (state, cause), or ignored}. A trigger missing
#: from a row is illegal there and raises ``LifecycleError``.
TRANSITIONS: Dict[Phase, Dict[Trigger, Union[Phase, str]]] = {
    (S, None): {**{c: (D, c) for c in _DRAIN_CAUSES}, Trigger.TERMINATE: (T, None),
                Trigger.UNLOAD: (U, None)},
    **{(D, c): _draining_row(c) for c in _DRAIN_CAUSES},
    (T, None): {**{c: _IGNORE for c in _DRAIN_CAUSES}, Trigger.TERMINATE: _IGNORE,
                Trigger.UNLOAD: (U, None)},
    # Late requests (a monitor sample, a signal) after the end change nothing.
    (U, None): {c: _IGNORE for c in (*_DRAIN_CAUSES, Trigger.TERMINATE)},
}


class Lifecycle:
    """The state of one instance and the why of it. Thread-safe.

    ``on_change(trigger)`` is called (outside the lock, on the requesting thread)
    after every transition that happened, so the owner can wake its main loop.
    """

    def __init__(self, on_change: Optional[Callable[[Trigger], None]] = None):
        self.state = State.SERVING
        self.cause: Optional[Trigger] = None  # why it drains, while DRAINING
        self.retire_reason: Optional[str] = None  # e.g. "wall_clock", "max_requests"
        self.terminate_reason: Optional[Reason] = None
        self.terminate_message = ""
        self.terminate_warns = False  # the limit's beforeunload ratio is on
        self.on_change = on_change
        self._lock = threading.Lock()

    @property
    def serving(self) -> bool:
        return self.state is State.SERVING

    def request(self, trigger: Trigger, reason: Optional[str] = None, message: str = "",
                warns: bool = False) -> bool:
        """Apply ``trigger``; True if the state changed, False if it was ignored.

        ``reason`` says why a retire or a termination was asked for; for a termination,
        ``message`` says what happened and ``warns`` whether the limit's ``beforeunload``
        is due (its ratio is on). Raises
        ``LifecycleError`` for a transition the table does not allow.
        """
        with self._lock:
            target = TRANSITIONS[(self.state, self.cause)].get(trigger)
            if target is None:
                raise LifecycleError(self.state, self.cause, trigger)
            if target == _IGNORE:
                return False
            assert isinstance(target, tuple)
            self.state, self.cause = target
            if trigger in (Trigger.RETIRE, Trigger.ONESHOT):
                self.retire_reason = reason or trigger.value
            elif trigger is Trigger.TERMINATE:
                self.terminate_reason = Reason(reason)
                self.terminate_message = message
                self.terminate_warns = warns
        if self.on_change is not None:
            self.on_change(trigger)
        return True

    def describe(self) -> str:
        if self.state is State.DRAINING and self.cause is not None:
            return "%s (%s)" % (self.state.value, self.cause.value)
        return self.state.value


# -- a gunicorn worker's seat: replace before retire -----------------------------------


class Seat(_Named):
    """Where a gunicorn worker stands in replace before retire (``server_metrics()``'s ``state``).

    A retiring instance (DRAINING(retire)) goes through two seats: RETIRING, accepting
    until its replacement serves, then RELEASED, when it stops accepting and drains.
    """

    FREE = "free"  # no worker holds the record
    BOOTING = "booting"  # forked, not serving yet
    SERVING = "serving"
    RETIRING = "retiring"  # accepting until replaced: its replacement is forked and boots
    RELEASED = "released"  # replaced: a replacement serves, so it stops accepting and drains


#: Who moves a seat: the master (it forks and reaps, and counts who serves) or the worker itself.
MASTER, WORKER = "master", "worker"

#: seat -> {next seat: who moves it there}. A seat missing from a row cannot follow it.
#: The master claims a record for each fork (FREE -> BOOTING) and frees it once the worker
#: is reaped (-> FREE); a claim overwrites a record that no live worker holds.
SEAT_TRANSITIONS: Dict[Seat, Dict[Seat, str]] = {
    Seat.FREE: {Seat.BOOTING: MASTER},
    Seat.BOOTING: {Seat.SERVING: WORKER, Seat.RETIRING: WORKER, Seat.FREE: MASTER},
    Seat.SERVING: {Seat.RETIRING: WORKER, Seat.FREE: MASTER},
    Seat.RETIRING: {Seat.RELEASED: MASTER, Seat.FREE: MASTER},
    Seat.RELEASED: {Seat.FREE: MASTER},
}

#: The seats gunicorn's arbiter does not count as serving: it forks a replacement for each.
RETIREES = frozenset({Seat.RETIRING, Seat.RELEASED})

#: How the table shared with the master (``_recycle``) carries a seat: (``state``,
#: ``released``), two fields with one writer each, so that no lock is needed. The worker
#: writes the ``state`` codes of the seats it moves to (SERVING, RETIRING); the master
#: writes BOOTING's and FREE's (no live worker then holds the record) and ``released``.
SEAT_CODES: Dict[Seat, Tuple[int, int]] = {
    Seat.FREE: (0, 0),
    Seat.BOOTING: (1, 0),
    Seat.SERVING: (2, 0),
    Seat.RETIRING: (3, 0),
    Seat.RELEASED: (3, 1),
}
_RETIRING_CODE = SEAT_CODES[Seat.RETIRING][0]
_SEAT_OF_CODES = {codes: seat for seat, codes in SEAT_CODES.items()}


def seat_of(state: int, released: int) -> Optional[Seat]:
    """The seat a shared record's two fields say; None for a code no seat has."""
    # ``released`` means something only to a retiree (the master sets it only then).
    return _SEAT_OF_CODES.get((state, 1 if released and state == _RETIRING_CODE else 0))


def seat_move(now: Optional[Seat], to: Seat, by: str) -> bool:
    """Whether ``by`` (MASTER or WORKER) may move a worker from seat ``now`` to ``to``."""
    return now is not None and SEAT_TRANSITIONS[now].get(to) == by


# -- the drain ---------------------------------------------------------------------------


class Budget(_Named):
    """Where a drain's time limit comes from."""

    GRACEFUL = "graceful"  # gunicorn's graceful_timeout, minus a safety margin
    QUICK = "quick"  # QUICK_BUDGET: the arbiter allows little after a SIGQUIT
    LIMIT = "limit"  # LIMIT_BUDGET: a hard limit was reached
    OWNER = "owner"  # what the owner passes: the exit drain, a test's close


@dataclass(frozen=True)
class Plan:
    """How one cause drains."""

    at_start: Optional[Reason]  # beforeunload dispatched when the drain begins
    at_end: Optional[Reason]  # dispatched once requests and tasks are done
    await_requests: bool  # let requests in flight finish
    await_tasks: bool  # let background tasks finish (else they are abandoned)
    budget: Budget
    exit_status: int = 0
    # Have the arbiter fork a replacement at once (docs/operations.md, "Recycling"): None no;
    # False yes, and stop accepting now; True yes, and keep accepting until it serves.
    replace: Optional[bool] = None


#: Exit status of a worker terminated by a hard limit (never 3 or 4: those halt gunicorn).
EXIT_TERMINATED = 1
QUICK_BUDGET = 1.0
LIMIT_BUDGET = 1.0
#: Part of gunicorn's graceful_timeout kept back from draining, because the arbiter
#: SIGKILLs at that deadline: time to log what is abandoned and to exit.
MAX_SAFETY_MARGIN = 1.0
#: The least time ``at_end`` listeners get, even when the drain used its whole budget.
AT_END_MINIMUM = 1.0
#: How long ``unload`` listeners have, together, once the drain is over.
UNLOAD_BUDGET = 0.5
#: The longest a drain waits between two looks at its host (heartbeat, signals).
DRAIN_TICK = 0.05

#: The drain of each cause (docs/model.md, "The lifecycle of an instance"). The limit's own reason is the
#: ``at_start`` event of TERMINATE (when its ratio is on); it is filled in by ``drain``.
PLANS: Dict[Trigger, Plan] = {
    Trigger.RETIRE: Plan(None, Reason.EARLY_DROP, True, True, Budget.GRACEFUL, replace=True),
    # oneshot: "background work cut off" once the one response is out; no second connection.
    Trigger.ONESHOT: Plan(None, Reason.EARLY_DROP, True, False, Budget.GRACEFUL, replace=False),
    # termination fires at once, so the app gets the whole window.
    Trigger.STOP: Plan(Reason.TERMINATION, None, True, True, Budget.GRACEFUL),
    Trigger.QUICK: Plan(Reason.TERMINATION, None, False, False, Budget.QUICK),
    Trigger.EXIT: Plan(Reason.TERMINATION, None, False, True, Budget.OWNER),
    Trigger.CLOSE: Plan(None, None, False, True, Budget.OWNER),
    Trigger.TERMINATE: Plan(None, None, True, False, Budget.LIMIT, EXIT_TERMINATED),
}


class Handoff(Protocol):
    """A retiree waiting for its replacement to serve."""

    def done(self) -> bool:
        """True once the replacement serves, or the wait is over (then it says why)."""


class Host(Protocol):
    """What the drain needs from whoever runs the instance."""

    def replace(self, keep_accepting: bool) -> Optional[Handoff]:
        """Have a replacement started now; a ``Handoff`` if this instance should serve on until it does."""

    def stop_accepting(self) -> None:
        """Take no new connections (idempotent)."""

    def requests_busy(self, terminating: bool) -> bool:
        """Whether requests are still in flight (``terminating``: responses under way)."""

    def answer_requests(self, status: int, message: str) -> None:
        """Answer every request whose response has not started (a hard limit)."""

    def poll(self) -> None:
        """Apply triggers that arrived through signals (on the draining thread)."""

    def tick(self, timeout: float) -> None:
        """Wait up to ``timeout`` s doing the host's work (heartbeat, I/O)."""

    def heartbeat(self) -> object:
        """Tell whoever watches the instance that it is alive (gunicorn's arbiter), if due."""

    def budget(self, budget: Budget, since: float) -> float:
        """The deadline (``time.monotonic()``) a drain of ``budget`` kind begun at ``since`` has."""


class Drain:
    """One drain in progress; ``run`` takes the instance to UNLOADED."""

    def __init__(self, rt: Runtime, host: Host):
        self.rt = rt
        self.host = host
        self.lc = rt.lifecycle
        self.deadline = float("inf")
        self.plan: Optional[Plan] = None
        self.phase: Optional[Phase] = None
        self._end_fired = False
        self._waits: List[Tuple[threading.Event, float]] = []
        self.handoff: Optional[Handoff] = None  # serving on until the replacement serves

    def run(self) -> Tuple[Plan, List[TaskInfo]]:
        """Drain until quiet or the deadline; unload; return the plan that ended it and the
        tasks abandoned."""
        rt, host = self.rt, self.host
        while True:
            host.poll()
            if self.lc.state is State.SERVING:
                raise LifecycleError(State.SERVING, None, Trigger.UNLOAD)
            if (self.lc.state, self.lc.cause) != self.phase:
                self._enter()
            plan = self.plan
            assert plan is not None
            if self.handoff is not None:
                if not self.handoff.done():
                    host.tick(DRAIN_TICK)  # serving on: accepting, answering, heartbeat
                    continue
                # The drain proper starts now, with its whole budget.
                self.handoff = None
                host.stop_accepting()
                self.deadline = host.budget(plan.budget, time.monotonic())
            terminating = self.lc.state is State.TERMINATING
            work_done = (not (plan.await_requests and host.requests_busy(terminating))
                         and not (plan.await_tasks and rt.pool.pending))
            # Every event dispatched so far, by the drain or earlier (a limit's warning the
            # monitor sent just before it terminated the instance), must reach its listeners.
            waiting = [done for done in rt.posted if not done.is_set()]
            now = time.monotonic()
            if work_done and not waiting and plan.at_end is not None and not self._end_fired:
                # The end event may schedule work of its own: drain again after it.
                self._end_fired = True
                self._fire(plan.at_end, max(self.deadline, now + AT_END_MINIMUM))
                continue
            if (work_done and not waiting) or now >= self._wait_deadline():
                break
            timeout = min(DRAIN_TICK, max(0.0, self._wait_deadline() - now))
            if work_done:
                # Only listeners are left: wait for them, not for I/O, keeping the heartbeat.
                waiting[0].wait(timeout)
                host.heartbeat()
            else:
                host.tick(timeout)
        return plan, self._unload(plan)

    def _enter(self) -> None:
        """Begin the drain of the current phase (or switch to a stronger one)."""
        lc, rt = self.lc, self.rt
        self.phase = (lc.state, lc.cause)
        trigger = Trigger.TERMINATE if lc.state is State.TERMINATING else lc.cause
        assert trigger is not None
        plan = self.plan = PLANS[trigger]
        now = time.monotonic()
        self.deadline = min(self.deadline, self.host.budget(plan.budget, now))
        log.info("%s: %s", rt.who, lc.describe())
        # A stronger cause does not wait for a replacement that is still booting.
        self.handoff = None if plan.replace is None else self.host.replace(plan.replace)
        if self.handoff is None:
            self.host.stop_accepting()
        if trigger is Trigger.TERMINATE:
            reason = lc.terminate_reason
            assert reason is not None
            # Answer first: the clients have waited, and listeners may be slow.
            self.host.answer_requests(546, "the instance was terminated: " + lc.terminate_message)
            if lc.terminate_warns:
                self._fire(reason, self.deadline)
        elif plan.at_start is not None:
            self._fire(plan.at_start, self.deadline)

    def _fire(self, reason: Reason, deadline: float) -> None:
        done = self.rt.beforeunload(reason, deadline)
        if done is not None:
            self._waits.append((done, deadline))

    def _listeners_done(self) -> bool:
        return all(done.is_set() for done in self.rt.posted)

    def _wait_deadline(self) -> float:
        # Listeners keep their own deadline (an at_end event gets AT_END_MINIMUM).
        return max([self.deadline] + [d for done, d in self._waits if not done.is_set()])

    def _unload(self, plan: Plan) -> List[TaskInfo]:
        rt = self.rt
        if not self._listeners_done():
            log.warning("%s: beforeunload listeners still running at their deadline; "
                        "unloading without them", rt.who)
        # Logged in the words of the event that announced it: early_drop, termination,
        # or the limit that terminated the instance.
        lc = self.lc
        announced = (lc.terminate_reason if lc.state is State.TERMINATING
                     else plan.at_start or plan.at_end)
        why = announced.value if announced is not None else (lc.cause or Trigger.UNLOAD).value
        abandoned = rt.unload(why)
        done = rt.unload_done
        if done is not None:
            # The unload listeners run in the safety margin before the process exits.
            until = time.monotonic() + UNLOAD_BUDGET
            while not done.wait(min(DRAIN_TICK, max(0.0, until - time.monotonic()))):
                self.host.heartbeat()
                if time.monotonic() >= until:
                    log.warning("%s: unload listeners still running after %.1fs; exiting "
                                "without them", rt.who, UNLOAD_BUDGET)
                    break
        return abandoned


def drain(rt: Runtime, host: Host) -> Tuple[Plan, List[TaskInfo]]:
    """Take ``rt`` from DRAINING or TERMINATING to UNLOADED, by the plan of its cause.

    In order: stop accepting; dispatch the plan's ``at_start`` event; wait, with the
    host's heartbeat, until the requests, tasks and listeners the plan waits for are
    done or the deadline passes (a stronger cause arriving meanwhile takes over, with
    the earlier of the two deadlines); dispatch ``at_end`` and wait for what it
    scheduled; then close the pool, so later work is refused with a RuntimeError, and
    unload: every task still pending is abandoned and logged, and the ``unload``
    event lists them (its listeners get ``UNLOAD_BUDGET``). Nothing accepted is
    dropped without a log line. Returns the plan that ended the drain (its
    ``exit_status``) and the tasks abandoned.
    """
    return Drain(rt, host).run()
