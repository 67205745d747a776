"""edgesync._recycle: the arbiter's side against gunicorn's real manage_workers, then the same cases for real.

First, without forking: the arbiter is gunicorn's own ``Arbiter`` class with ``spawn_worker`` and
``kill_worker`` replaced by in-memory doubles (no fork, no signal), patched by edgesync
(``edgesync._gunicorn.arbiter.Master``): ``manage_workers`` is gunicorn's code, run as is. The test
plays the workers' part by moving their seats (SERVING, RETIRING) in the shared table as a worker
would.

Then the same cases with real gunicorn masters, real signals and wrk's load (marked slow), each
ending with the fault suite's reconciliation (fault_suite.py): no failed request, every accepted
task completed.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

import psutil
import pytest
from gunicorn.arbiter import Arbiter

from edgesync import _recycle
from edgesync._gunicorn.arbiter import Master
from edgesync._lifecycle import WORKER, Seat

from .fault_suite import APP, TASKS, Tally, check_log, reconcile, start, stop_and_reconcile, stop_cleanly
from .support import TCP_MIGRATE_REQ, Server, Wrk, WrkResult, background, free_port, missing, wait_for, workers_of


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


def setup(workers: int = 2) -> Tuple[FakeArbiter, Master]:
    arbiter = FakeArbiter(workers)
    master = Master(arbiter, logging.getLogger("test.arbiter"))
    arbiter.manage_workers()
    for pid in arbiter.WORKERS:
        set_state(master, pid, Seat.SERVING)
    return arbiter, master


def set_state(master: Master, pid: int, seat: Seat, at: float = 0.0) -> None:
    """The worker ``pid`` moves to ``seat``, as its own process would (a move it may make)."""
    rec = master.table.records[master.table.slot_of[pid]]
    if seat is Seat.RETIRING:
        rec.announced = at
    assert _recycle._move(rec, seat, WORKER), (master.table.seat(pid), seat)


def released(master: Master, pid: int) -> bool:
    return master.table.seat(pid) is Seat.RELEASED


def test_a_retiree_gets_a_replacement_and_is_released_when_it_serves() -> None:
    arbiter, master = setup()
    a, b = sorted(arbiter.WORKERS)
    set_state(master, a, Seat.RETIRING)
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 3 and arbiter.killed == []
    (c,) = set(arbiter.WORKERS) - {a, b}
    assert not released(master, a)  # its replacement is still booting
    set_state(master, c, Seat.SERVING)
    arbiter.manage_workers()
    assert released(master, a) and arbiter.killed == []
    arbiter.exit(a)
    arbiter.manage_workers()
    assert sorted(arbiter.WORKERS) == [b, c] and _recycle._seat(master.table.records[0]) is Seat.FREE  # a's is free


def test_every_worker_retiring_at_once_gets_its_own_replacement() -> None:
    arbiter, master = setup(3)
    first = sorted(arbiter.WORKERS)
    for i, pid in enumerate(first):
        set_state(master, pid, Seat.RETIRING, at=float(i))
    arbiter.manage_workers()
    new = sorted(set(arbiter.WORKERS) - set(first))
    assert len(new) == 3 and arbiter.killed == []
    set_state(master, new[0], Seat.SERVING)
    arbiter.manage_workers()
    # One replacement serves: the retiree that retired first may go, the others still cover.
    assert [released(master, p) for p in first] == [True, False, False]
    for pid in new[1:]:
        set_state(master, pid, Seat.SERVING)
    arbiter.manage_workers()
    assert all(released(master, p) for p in first)


def test_ttin_then_ttou_while_a_worker_retires_stop_a_serving_worker_never_the_retiree() -> None:
    arbiter, master = setup()
    a, b = sorted(arbiter.WORKERS)
    set_state(master, a, Seat.RETIRING)
    arbiter.manage_workers()  # a's replacement
    arbiter.num_workers += 1  # TTIN
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 4
    arbiter.num_workers -= 1  # TTOU: gunicorn stops its oldest worker that counts, b; a leaves anyway
    arbiter.manage_workers()
    assert [pid for pid, _ in arbiter.killed] == [b]
    assert arbiter.cfg.changes == [(2, None), (3, 2), (2, 3)]
    for pid in set(arbiter.WORKERS) - {a, b}:
        set_state(master, pid, Seat.SERVING)
    arbiter.manage_workers()
    assert released(master, a)  # b was told to stop: it does not count as serving


def test_a_retiree_is_released_by_reap_workers_alone_as_during_a_reload() -> None:
    arbiter, master = setup()
    a, _ = sorted(arbiter.WORKERS)
    set_state(master, a, Seat.RETIRING)
    arbiter.manage_workers()
    for pid in list(arbiter.WORKERS):
        if master.table.seat(pid) is Seat.BOOTING:
            set_state(master, pid, Seat.SERVING)
    # arbiter.reload waits for the old workers calling reap_workers only. (gunicorn's own reap_workers,
    # waitpid(-1), would reap this test process's children: the double reaps nothing.)
    master.orig["reap_workers"] = lambda: None
    arbiter.reap_workers()
    assert released(master, a)


def test_the_patched_methods_do_nothing_new_outside_the_master() -> None:
    arbiter, master = setup()
    a, _ = sorted(arbiter.WORKERS)
    set_state(master, a, Seat.RETIRING)
    master.table.pid = -1  # as seen from a forked worker
    arbiter.manage_workers()
    assert len(arbiter.WORKERS) == 2 and not released(master, a)


def test_each_arbiter_method_is_replaced_once_over_gunicorns_own() -> None:
    # One patch in one place: the replaced methods are the Master's, and each calls the
    # arbiter's own method (spawn_worker was wrapped twice before, by _recycle and _exit).
    arbiter, master = setup()
    for name in ("spawn_worker", "spawn_workers", "manage_workers", "reap_workers", "kill_worker"):
        assert getattr(arbiter, name) == getattr(master, name), name
        assert master.orig[name].__func__ is getattr(FakeArbiter, name), name


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
    Master(arbiter, logging.getLogger("test.arbiter"))
    arbiter.manage_workers()
    assert len(arbiter.frozen_at_fork) == 2 and min(arbiter.frozen_at_fork) > 1000, arbiter.frozen_at_fork
    assert gc.get_freeze_count() == 0


# -- for real: replace before retire under load, with signals -----------------------------------------
#
# A retiring worker keeps accepting until the arbiter's replacement for it serves. The cases hold the
# replacements' boot (BOOT_HOLD_FILE: each worker's after-fork function waits while the file exists,
# whether a mold forked it or it imported the app itself) to make the overlap as long as they need,
# retire chosen workers with a CPU-heavy request (/burn, above a low cpu_soft_limit_ms), and count the
# master's children (its mold aside) to see the worker count come back.

RETIRE_ENV = {"EDGESYNC_CPU_SOFT_LIMIT_MS": "250", "EDGESYNC_CPU_HARD_LIMIT_MS": "0"}
LOAD = {"/ok": 9, TASKS: 1}
#: How long the worker count may take to come back once nothing holds the boot.
SETTLE = 20.0


def serving(server: Server) -> Set[int]:
    return {int(p) for p in re.findall(r"worker (\d+): serving \(", server.log)}


def settled(server: Server, count: int, timeout: float = SETTLE) -> List[int]:
    """Wait until the master has exactly ``count`` workers, every one of them serving."""
    assert server.proc is not None

    def back() -> List[int]:
        pids = workers_of(server.proc.pid)  # type: ignore[union-attr]
        return pids if len(pids) == count and set(pids) <= serving(server) else []
    return list(wait_for(back, timeout, "%d serving workers" % count))


def retire(server: Server, pid: int, timeout: float = 15.0) -> None:
    """Make worker ``pid`` retire: a request that spins past cpu_soft_limit_ms on that very worker."""
    def burnt() -> bool:
        try:
            return server.get("/burn?ms=400&only=%d" % pid, timeout=5)[0] == 200
        except OSError:
            return False
    wait_for(burnt, timeout, "a /burn request to land on worker %d" % pid)
    server.wait_for_log(r"worker %d: retiring \(reason=cpu\)" % pid, timeout=timeout)


def held_boots(server: Server, count: int) -> List[int]:
    """Pids of the first ``count`` workers whose boot the hold file holds."""
    return [e["pid"] for e in server.wait_for_events("boot_held", count=count, timeout=15)][:count]


def finish(server: Server, load: Wrk, case: str) -> Tuple[WrkResult, Tally]:
    result = load.stop()
    tally = stop_and_reconcile(server, result, case)
    return result, tally


def handed_off(server: Server, pid: int) -> bool:
    return bool(re.search(r"worker %d: a replacement serves \(" % pid, server.log))


def under_way(load: Wrk, seconds: float = 1.0) -> None:
    wait_for(lambda: time.monotonic() - load.started > seconds, 10, "wrk to be under way")


def retire_under_load(server_factory: Callable[..., Server],
                      tmp_path: Path) -> Tuple[Server, Path, Wrk, int, int]:
    """Two workers under wrk load, replacements' boots held, the first worker retiring.

    Returns the server, the hold file (unlink it to let boots finish), the load, the retiree
    and the other worker.
    """
    hold = tmp_path / "hold"
    server = start(server_factory, env={**RETIRE_ENV, "BOOT_HOLD_FILE": str(hold)})
    retiree, other = server.worker_pids()
    load = Wrk(server, 60, LOAD)
    under_way(load)
    hold.touch()
    retire(server, retiree)
    return server, hold, load, retiree, other


@pytest.mark.slow
@pytest.mark.parametrize("mold", ["true", "false"], ids=["mold", "imports-the-app"])
def test_every_worker_retires_at_once_and_each_gets_its_replacement(server_factory: Callable[..., Server],
                                                                    tmp_path: Path, mold: str) -> None:
    hold = tmp_path / "hold"
    server = start(server_factory, env={**RETIRE_ENV, "BOOT_HOLD_FILE": str(hold), "EDGESYNC_MOLD": mold})
    first = server.worker_pids()
    load = Wrk(server, 60, LOAD)
    under_way(load)
    hold.touch()
    threads = [background(lambda p=p: retire(server, p)) for p in first]
    for t, out in threads:
        t.join(30)
        assert out == [None], out
    # Both retire while neither replacement can boot: each still accepts, and each got its own.
    replacements = held_boots(server, 2)
    assert not any(handed_off(server, p) for p in first)
    assert sorted(workers_of(server.proc.pid)) == sorted(first + replacements)  # type: ignore[union-attr]
    hold.unlink()
    for p in first:
        wait_for(lambda p=p: handed_off(server, p), SETTLE, "worker %d to hand off" % p)
    assert sorted(settled(server, 2)) == sorted(replacements)
    under_way(load, time.monotonic() - load.started + 1.0)  # a second more with the new generation
    result, tally = finish(server, load, "every worker retires at once")
    assert result.failed() == 0, result.output
    assert tally.unaccounted == set() and tally.abandoned == set()
    assert len(re.findall(r"Booting worker with pid", server.log)) == 4  # no extra worker, ever
    assert "no replacement serving" not in server.log


@pytest.mark.slow
def test_retire_during_a_hup_reload(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server, hold, load, retiree, other = retire_under_load(server_factory, tmp_path)
    held_boots(server, 1)
    server.signal(signal.SIGHUP)  # the reload forks two more, and stops the old serving worker
    held_boots(server, 3)
    hold.unlink()
    wait_for(lambda: handed_off(server, retiree), SETTLE, "the retiree to hand off")
    final = settled(server, 2)
    assert retiree not in final and other not in final
    under_way(load, time.monotonic() - load.started + 1.0)
    result, tally = finish(server, load, "retire during a HUP reload")
    assert result.failed() == 0, result.output
    assert tally.unaccounted == set() and tally.abandoned == set()
    assert re.search(r"worker %d: unloaded \(early_drop" % retiree, server.log)
    assert re.search(r"worker %d: unloaded \(termination" % other, server.log)


@pytest.mark.slow
def test_ttin_then_ttou_while_a_worker_retires(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server, hold, load, retiree, other = retire_under_load(server_factory, tmp_path)
    held_boots(server, 1)
    server.signal(signal.SIGTTIN)
    held_boots(server, 2)
    server.signal(signal.SIGTTOU)
    # gunicorn's rule for one worker too many: SIGTERM the oldest serving worker. Never the retiree,
    # which leaves anyway (and must not turn its retire into a termination).
    server.wait_for_log(r"worker %d: beforeunload \(reason=termination" % other, timeout=15)
    hold.unlink()
    wait_for(lambda: handed_off(server, retiree), SETTLE, "the retiree to hand off")
    settled(server, 2)
    under_way(load, time.monotonic() - load.started + 1.0)
    result, tally = finish(server, load, "TTIN then TTOU while a worker retires")
    assert result.failed() == 0, result.output
    assert tally.unaccounted == set() and tally.abandoned == set()
    assert re.search(r"worker %d: unloaded \(early_drop" % retiree, server.log)
    assert len(re.findall(r"Booting worker with pid", server.log)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("mold", ["false", "true"], ids=["its-import-fails", "its-after-fork-fails"])
def test_a_replacement_that_fails_to_boot_halts_the_server(server_factory: Callable[..., Server],
                                                           tmp_path: Path, mold: str) -> None:
    broken = tmp_path / "broken"
    server = start(server_factory, env={**RETIRE_ENV, "BOOT_FAIL_FILE": str(broken), "EDGESYNC_MOLD": mold})
    retiree, other = server.worker_pids()
    load = Wrk(server, 60, LOAD)
    under_way(load)
    # The replacement cannot boot: without a mold it imports the app, which raises; a mold's worker
    # imports nothing (the mold did, before the file existed), and its after-fork function raises.
    broken.touch()
    retire(server, retiree)
    # gunicorn's own boot-error handling, unchanged: the master halts with status 3...
    assert server.proc is not None
    assert server.proc.wait(30) == 3, server.log
    result = load.stop()
    assert "Reason: Worker failed to boot." in server.log
    # ...after stopping both workers gracefully; nothing hangs, nothing is killed.
    for pid in (retiree, other):
        assert re.search(r"worker %d: unloaded \(termination" % pid, server.log), server.log
    assert "was sent SIGKILL" not in server.log and "WORKER TIMEOUT" not in server.log
    assert workers_of(server.proc.pid) == []
    tally = reconcile(server)
    tally.requests, tally.failed_requests = result.requests, result.failed()
    tally.show("replacement fails to import (wrk socket errors after the halt: %d, expected)"
               % sum(result.socket_errors.values()))
    assert set(result.statuses) <= {200}, result.output  # every answer before the halt was a 200
    assert tally.unaccounted == set()


@pytest.mark.slow
def test_sigkill_of_a_booting_replacement(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server, hold, load, retiree, other = retire_under_load(server_factory, tmp_path)
    victim = held_boots(server, 1)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(r"Worker \(pid:%d\) was sent SIGKILL" % victim, timeout=15)
    second = held_boots(server, 2)[1]  # the arbiter forks another for the retiree, still waiting
    assert not handed_off(server, retiree)
    hold.unlink()
    wait_for(lambda: handed_off(server, retiree), SETTLE, "the retiree to hand off")
    assert sorted(settled(server, 2)) == sorted([other, second])
    under_way(load, time.monotonic() - load.started + 1.0)
    result, tally = finish(server, load, "SIGKILL of a booting replacement")
    assert result.failed() == 0, result.output
    assert tally.unaccounted == set() and tally.abandoned == set()


@pytest.mark.slow
def test_master_sigkilled_while_a_replacement_boots(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server, hold, load, retiree, other = retire_under_load(server_factory, tmp_path)
    assert server.proc is not None
    replacement = held_boots(server, 1)[0]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    hold.unlink()

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    # No orphan outlives its parent check: the serving ones at their next beat, the replacement once
    # it has booted (it cannot look before), the retiree after its drain.
    for pid in (retiree, other, replacement):
        wait_for(lambda pid=pid: gone(pid), 15, "worker %d to exit after its master died" % pid)
    result = load.stop()
    assert re.search(r"Parent changed, shutting down: <Worker %d>" % replacement, server.log), server.log
    assert "Traceback" not in server.log and "WORKER TIMEOUT" not in server.log
    tally = reconcile(server)
    tally.requests, tally.failed_requests = result.requests, result.failed()
    tally.show("master SIGKILLed while a replacement boots (wrk socket errors after: %d, expected)"
               % sum(result.socket_errors.values()))
    assert set(result.statuses) <= {200}, result.output
    assert tally.unaccounted == set()


@pytest.fixture
def migrate_req() -> Iterator[None]:
    """``net.ipv4.tcp_migrate_req = 1`` for the test, as the README recommends with reuse_port.

    Without it the kernel resets a connection that reaches a retiree's socket in the
    microseconds between its last accept and its close (seen: 1 read error in 33,679 requests).
    """
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    try:
        before = path.read_text()
        path.write_text("1")
    except OSError as exc:
        missing(TCP_MIGRATE_REQ, "cannot set it: %s" % exc)
    try:
        yield
    finally:
        path.write_text(before)


@pytest.mark.slow
def test_reuse_port_recycling_under_load(server_factory: Callable[..., Server], migrate_req: None) -> None:
    # Every worker binds its own socket to the address: port 0 would give each its own port.
    port = free_port()
    server = start(server_factory, "--reuse-port", "-b", "127.0.0.1:%d" % port,
                   env={"EDGESYNC_WALL_CLOCK_LIMIT_MS": "3000"})
    result = Wrk(server, 12, LOAD).result()
    retired = len(re.findall(r"retiring \(reason=wall_clock\)", server.log))
    handoffs = len(re.findall(r"worker \d+: a replacement serves \(", server.log))
    tally = stop_and_reconcile(server, result, "reuse_port recycling under load (%d retirements, %d handed off)"
                               % (retired, handoffs))
    assert retired >= 6 and handoffs >= retired - 2  # the last ones may still be waiting at the stop
    assert result.failed() == 0, result.output
    assert tally.unaccounted == set() and tally.abandoned == set()


@pytest.mark.slow
def test_the_wall_clock_counts_from_ready_not_from_the_fork(server_factory: Callable[..., Server],
                                                            tmp_path: Path) -> None:
    # A boot held past the latest soft point (50% of 8 s): counted from the fork, the worker
    # would retire the moment it is ready; counted from ready, it serves its whole life.
    hold = tmp_path / "hold"
    hold.touch()
    server = server_factory("--workers", "1", app=APP, start=False,
                            env={"EDGESYNC_WALL_CLOCK_LIMIT_MS": "8000", "BOOT_HOLD_FILE": str(hold)})
    server.start(workers_ready=0)
    held = server.wait_for_events("boot_held", count=1, timeout=15)[0]
    wait_for(lambda: time.time() - held["t"] > 4.5, 10, "the boot to be held past 4.5 s")
    hold.unlink()
    server.wait_ready(15)
    metrics = json.loads(server.get("/metrics")[1])
    assert metrics["state"] == "serving" and metrics["age_s"] < 1.5, metrics
    assert "retiring (reason=wall_clock)" not in server.log, server.log
    stop_cleanly(server)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True])
def test_what_the_boot_made_is_frozen_out_of_the_collectors_way(server_factory: Callable[..., Server],
                                                                preload: bool) -> None:
    # With --preload the master froze the app before the fork; without, the worker froze
    # it once loaded: either way a worker's collections never walk it, nor copy its pages.
    server = server_factory("--workers", "1", *(["--preload"] if preload else []), app=APP)
    frozen = int(server.get("/gc")[1])
    assert frozen > 10000, frozen  # the app, edgesync, gunicorn: tens of thousands of objects
    stop_cleanly(server)


@pytest.mark.slow
def test_a_post_worker_init_hook_can_undo_the_freeze(server_factory: Callable[..., Server],
                                                     tmp_path: Path) -> None:
    conf = tmp_path / "unfreeze.conf.py"
    conf.write_text("import gc\n\ndef post_worker_init(worker):\n    gc.unfreeze()\n")
    server = server_factory("--workers", "1", "--preload", "-c", str(conf), app=APP)
    assert server.get("/gc")[1] == b"0"
    stop_cleanly(server)


@pytest.mark.slow
def test_replace_before_retire_off(server_factory: Callable[..., Server]) -> None:
    server = start(server_factory, env={**RETIRE_ENV, "EDGESYNC_REPLACE_BEFORE_RETIRE": "false"})
    retiree, _ = server.worker_pids()
    retire(server, retiree)
    server.wait_for_log(r"Booting worker with pid", count=3, timeout=15)
    log = server.log
    # The old way: the replacement is forked once the retiree has exited.
    assert log.index("Worker exiting (pid: %d)" % retiree) < log.rindex("Booting worker with pid")
    assert "accepting until a replacement serves" not in log
    settled(server, 2)
    stop_cleanly(server)
    check_log(server)


HOOKS_CONF = '''
import json, os, time

def _record(**fields):
    fields["t"] = time.time()
    with open(os.environ["EVENTS_FILE"], "a") as f:
        f.write(json.dumps(fields) + "\\n")

def pre_fork(server, worker):
    _record(type="hook", hook="pre_fork", age=worker.age, workers=len(server.WORKERS))

def post_fork(server, worker):
    _record(type="hook", hook="post_fork", worker=worker.pid)

def child_exit(server, worker):
    _record(type="hook", hook="child_exit", worker=worker.pid)

def worker_exit(server, worker):
    _record(type="hook", hook="worker_exit", worker=worker.pid)

def nworkers_changed(server, new_value, old_value):
    _record(type="hook", hook="nworkers_changed", new=new_value, old=old_value)
'''


@pytest.mark.slow
def test_server_hooks_see_a_retire_as_gunicorn_documents(server_factory: Callable[..., Server],
                                                         tmp_path: Path) -> None:
    conf = tmp_path / "hooks.py"
    conf.write_text(HOOKS_CONF)
    server = start(server_factory, "-c", str(conf), env=RETIRE_ENV)
    retiree, other = server.worker_pids()
    retire(server, retiree)
    wait_for(lambda: handed_off(server, retiree), SETTLE, "the retiree to hand off")
    # Gone, not only handed off: a retiree still draining would count as one of the 3 serving workers
    # below, and the stop would then reach the TTIN worker while it boots.
    assert server.proc is not None
    wait_for(lambda: retiree not in workers_of(server.proc.pid), SETTLE, "the retiree to exit")
    server.signal(signal.SIGTTIN)
    settled(server, 3)
    server.signal(signal.SIGTTOU)
    settled(server, 2)
    stop_cleanly(server)
    check_log(server)
    hooks = server.events("hook")

    def of(name: str) -> List[Dict[str, object]]:
        return [h for h in hooks if h["hook"] == name]
    booted = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", server.log)]
    assert len(booted) == 4  # the first two, the retiree's replacement, the TTIN one
    assert len(of("pre_fork")) == 4 and sorted(h["worker"] for h in of("post_fork")) == sorted(booted)
    # pre_fork sees every worker of the arbiter, the retiree included.
    assert of("pre_fork")[2]["workers"] == 2
    assert sorted(h["worker"] for h in of("child_exit")) == sorted(booted)  # retiree, TTOU'd one, the stop
    assert sorted(h["worker"] for h in of("worker_exit")) == sorted(booted)
    assert [(h["new"], h["old"]) for h in of("nworkers_changed")] == [(2, None), (3, 2), (2, 3)]
