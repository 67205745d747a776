"""edgesync._recycle, the arbiter's side, against gunicorn's real manage_workers without forking.

The arbiter here is gunicorn's own ``Arbiter`` class with ``spawn_worker`` and ``kill_worker`` replaced
by in-memory doubles (no fork, no signal): ``manage_workers`` is gunicorn's code, run as is. The test
plays the workers' part by writing their records (READY, RETIRING) as a worker would. The fault suite
(tests/test_faults.py) runs the same cases with real processes and signals.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Dict, List, Tuple

from gunicorn.arbiter import Arbiter

from edgesync import _recycle


class _Tmp:
    def close(self) -> None:
        pass


class _Worker:
    def __init__(self, pid: int, age: int):
        self.pid, self.age, self.tmp = pid, age, _Tmp()


class _Cfg:
    enable_backlog_metric = False

    def __init__(self) -> None:
        self.changes: List[Tuple[int, Any]] = []

    def nworkers_changed(self, arbiter: Any, new: int, old: Any) -> None:
        self.changes.append((new, old))


class FakeArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's Arbiter, minus fork and signals."""

    def __init__(self, workers: int):  # no super().__init__: no app, no config file, no sockets
        self.WORKERS: Dict[int, _Worker] = {}
        self.cfg = _Cfg()
        self.log = logging.getLogger("test.arbiter")
        self._num_workers = None
        self._last_logged_active_worker_count = None
        self.LISTENERS: List[Any] = []
        self.worker_age = 0
        self.next_pid = 1000
        self.killed: List[Tuple[int, int]] = []
        self.num_workers = workers

    def spawn_worker(self) -> int:
        self.worker_age += 1
        self.next_pid += 1
        self.WORKERS[self.next_pid] = _Worker(self.next_pid, self.worker_age)
        return self.next_pid

    def kill_worker(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def exit(self, pid: int) -> None:
        """The worker exits and is reaped."""
        del self.WORKERS[pid]


def setup(workers: int = 2) -> Tuple[FakeArbiter, _recycle._Master]:
    arbiter = FakeArbiter(workers)
    master = _recycle._Master(arbiter, logging.getLogger("test.arbiter"))
    arbiter.manage_workers()
    for pid in arbiter.WORKERS:
        set_state(master, pid, _recycle.READY)
    return arbiter, master


def set_state(master: _recycle._Master, pid: int, state: int, at: float = 0.0) -> None:
    rec = master.records[master.slot_of[pid]]
    rec.state = state
    if state == _recycle.RETIRING:
        rec.announced = at


def released(master: _recycle._Master, pid: int) -> bool:
    return bool(master.records[master.slot_of[pid]].released)


def test_a_retiree_gets_a_replacement_and_is_released_when_it_serves() -> None:
    arbiter, master = setup()
    a, b = sorted(arbiter.WORKERS)
    set_state(master, a, _recycle.RETIRING)
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 3 and arbiter.killed == []
    (c,) = set(arbiter.WORKERS) - {a, b}
    assert not released(master, a)  # its replacement is still booting
    set_state(master, c, _recycle.READY)
    arbiter.manage_workers()
    assert released(master, a) and arbiter.killed == []
    arbiter.exit(a)
    arbiter.manage_workers()
    assert sorted(arbiter.WORKERS) == [b, c] and master.records[0].state == _recycle.FREE  # a's record is free


def test_every_worker_retiring_at_once_gets_its_own_replacement() -> None:
    arbiter, master = setup(3)
    first = sorted(arbiter.WORKERS)
    for i, pid in enumerate(first):
        set_state(master, pid, _recycle.RETIRING, at=float(i))
    arbiter.manage_workers()
    new = sorted(set(arbiter.WORKERS) - set(first))
    assert len(new) == 3 and arbiter.killed == []
    set_state(master, new[0], _recycle.READY)
    arbiter.manage_workers()
    # One replacement serves: the retiree that retired first may go, the others still cover.
    assert [released(master, p) for p in first] == [True, False, False]
    for pid in new[1:]:
        set_state(master, pid, _recycle.READY)
    arbiter.manage_workers()
    assert all(released(master, p) for p in first)


def test_ttin_then_ttou_while_a_worker_retires_stop_a_serving_worker_never_the_retiree() -> None:
    arbiter, master = setup()
    a, b = sorted(arbiter.WORKERS)
    set_state(master, a, _recycle.RETIRING)
    arbiter.manage_workers()  # a's replacement
    arbiter.num_workers += 1  # TTIN
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 4
    arbiter.num_workers -= 1  # TTOU: gunicorn stops its oldest worker that counts, b; a leaves anyway
    arbiter.manage_workers()
    assert [pid for pid, _ in arbiter.killed] == [b]
    assert arbiter.cfg.changes == [(2, None), (3, 2), (2, 3)]
    for pid in set(arbiter.WORKERS) - {a, b}:
        set_state(master, pid, _recycle.READY)
    arbiter.manage_workers()
    assert released(master, a)  # b was told to stop: it does not count as serving


def test_a_retiree_is_released_by_reap_workers_alone_as_during_a_reload() -> None:
    arbiter, master = setup()
    a, _ = sorted(arbiter.WORKERS)
    set_state(master, a, _recycle.RETIRING)
    arbiter.manage_workers()
    for pid in list(arbiter.WORKERS):
        if master.records[master.slot_of[pid]].state == _recycle.BOOTING:
            set_state(master, pid, _recycle.READY)
    # arbiter.reload waits for the old workers calling reap_workers only. (gunicorn's own reap_workers,
    # waitpid(-1), would reap this test process's children: the double reaps nothing.)
    master.orig["reap_workers"] = lambda: None
    arbiter.reap_workers()
    assert released(master, a)


def test_the_patched_methods_do_nothing_new_outside_the_master() -> None:
    arbiter, master = setup()
    a, _ = sorted(arbiter.WORKERS)
    set_state(master, a, _recycle.RETIRING)
    master.pid = -1  # as seen from a forked worker
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 2 and not released(master, a)


class ForkProbe(FakeArbiter):
    """Notes what the collector has frozen at each "fork"."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self.frozen_at_fork: List[int] = []

    def spawn_worker(self) -> int:
        self.frozen_at_fork.append(gc.get_freeze_count())
        return super().spawn_worker()


def test_the_master_freezes_what_it_holds_for_the_fork_only() -> None:
    # The child inherits a frozen heap (its collections never walk, nor copy, the
    # master's pages); the master's own garbage stays collectable.
    gc.unfreeze()
    arbiter = ForkProbe(2)
    _recycle._Master(arbiter, logging.getLogger("test.arbiter"))
    arbiter.manage_workers()
    assert len(arbiter.frozen_at_fork) == 2 and min(arbiter.frozen_at_fork) > 1000, arbiter.frozen_at_fork
    assert gc.get_freeze_count() == 0

