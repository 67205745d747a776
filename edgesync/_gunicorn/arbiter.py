"""The one patch of gunicorn's arbiter: births, reaps, counts and stop signals, told to edgesync.

design: edgesync needs four things of the arbiter that gunicorn has no hook for. Every
one is a method replaced on the arbiter's instance, in the master only, here and
nowhere else (``Master``; ``install`` from the worker class's ``check_config``):

- ``spawn_worker``: each fork claims a record of the table shared with the workers
  (``_recycle.Table``); the fork is done by the generation's mold when there is one
  (``_mold``), else by gunicorn; every worker forked ends through ``_exit.leave``.
- ``spawn_workers``: gunicorn's, without its ``time.sleep(0.1 * random())`` after each fork.
- ``manage_workers`` (and ``reap_workers``, which ``Arbiter.reload`` calls alone): retirees
  are hidden from gunicorn's count, so it forks one replacement per retiree; the table
  then releases as many retirees as serving workers allow.
- ``reap_workers``: gunicorn's halt on exit codes 3 and 4 stays for workers that never served.
- ``kill_worker``: which workers the arbiter told to stop (they no longer count as serving).

Every patched method checks that it runs in the master: the same object is copied
into every forked worker. gunicorn's own code still decides everything else.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

from gunicorn.arbiter import Arbiter

from .. import _exit, _mold, _recycle
from .._lifecycle import RETIREES
from . import child, roles

#: Signals with which the arbiter stops a worker (its kill_worker): a worker it
#: signalled so no longer counts as serving, even while it drains.
_STOPPING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL, signal.SIGABRT})
_PATCHED = ("spawn_worker", "spawn_workers", "manage_workers", "reap_workers", "kill_worker")


def running_arbiter() -> Any:
    """The gunicorn arbiter running in this process (from its ``start`` on), or None.

    The arbiter installs its bound method ``signal`` as the handler of SIGHUP before
    it calls the worker class's ``check_config`` (arbiter.py, ``start``: ``init_signals``).
    """
    handler = signal.getsignal(signal.SIGHUP)
    arbiter = getattr(handler, "__self__", None)
    if isinstance(arbiter, Arbiter) and getattr(arbiter, "pid", None) == os.getpid():
        return arbiter
    return None


class Master:
    """The arbiter's patched methods, and what they tell the table of workers and the molds."""

    def __init__(self, arbiter: Any, glog: Any, mold: bool = False, code_generations: bool = False,
                 before_mold: Optional[Callable[[], object]] = None, immortal_heap: bool = False):
        self.arbiter = arbiter
        self.glog = glog
        self.table = _recycle.Table(glog)
        self.molds = _mold.Molds(arbiter, mold, glog, code_generations, before_mold, immortal_heap)
        self.hidden: Dict[int, Any] = {}  # retirees taken out of WORKERS during manage_workers
        self.orig: Dict[str, Callable[..., Any]] = {}
        for name in _PATCHED:
            self.orig[name] = getattr(arbiter, name)
            setattr(arbiter, name, getattr(self, name))

    def in_master(self) -> bool:
        return self.table.in_master()

    # -- births -----------------------------------------------------------------------

    def _gunicorn_spawn_worker(self) -> Any:
        """gunicorn's ``spawn_worker``; the worker it forks leaves it through ``_exit.leave``.

        The child leaves that call through ``SystemExit``, after gunicorn's end of the
        worker (``worker_exit`` called, "Worker exiting" logged): ``leave`` ends it there,
        without Python's teardown of its modules.
        """
        try:
            return self.orig["spawn_worker"]()
        except SystemExit as exc:
            if not self.in_master():  # the worker, at its very end
                _exit.leave(exc.code)
            raise

    def spawn_worker(self) -> Any:
        if not self.in_master():
            return self._gunicorn_spawn_worker()
        if self.molds.get() is not None:
            return self._spawn_from_mold()
        # Python's advice for fork without exec (gc docs, gc.freeze): what the master
        # holds (with --preload, the whole app) goes to the permanent generation, so
        # the worker's collections neither walk it nor touch its pages, which would
        # copy them (copy-on-write). Measured: without it a fresh worker's first
        # full collections cost a recycling server ~15% of its throughput. The
        # master unfreezes after the fork: its own garbage stays collectable.
        gc.freeze()
        slot = self.table.claim()
        _recycle.adopt(slot)  # copied into the child by the fork below: its own record
        try:
            with self._retirees_shown():
                pid = self._gunicorn_spawn_worker()
        except BaseException:
            # why BaseException: in the master a failed fork, whatever it raised, must
            # give its record back. A child passes through untouched (its normal end
            # never gets here: _exit.leave ends it inside the call).
            if self.in_master() and slot is not None:
                self.table.free(slot)
            raise
        finally:
            if self.in_master():
                gc.unfreeze()
                _recycle.adopt(None)
        self.table.assign(pid, slot)
        return pid

    @contextmanager
    def _retirees_shown(self) -> Iterator[None]:
        """``WORKERS`` with the retirees ``manage_workers`` hides, for the length of a fork.

        As in gunicorn's ``spawn_worker``, ``pre_fork`` sees every worker of the arbiter,
        and the child closes every sibling's heartbeat file.
        """
        workers = self.arbiter.WORKERS
        workers.update(self.hidden)
        try:
            yield
        finally:
            if self.in_master():
                for hidden in self.hidden:
                    workers.pop(hidden, None)

    def _spawn_from_mold(self) -> int:
        """gunicorn's ``spawn_worker`` (arbiter.py, 27.0.x), with the fork done by the generation's mold.

        The master's half is gunicorn's: the ``Worker`` object, ``pre_fork``, the worker
        in ``WORKERS``. If the mold and its successor fail, the master forks this worker
        itself, as gunicorn would have.
        """
        arbiter = self.arbiter
        slot = self.table.claim()
        arbiter.worker_age += 1
        worker = arbiter.worker_class(arbiter.worker_age, arbiter.pid, arbiter.LISTENERS, arbiter.app,
                                      arbiter.timeout / 2.0, arbiter.cfg, arbiter.log)
        with self._retirees_shown():
            arbiter.cfg.pre_fork(arbiter, worker)
            # A mold that died on the way may have forked this worker already: Molds.fork clears
            # what that one wrote (Table.refork) before any second fork, its own or this one's.
            pid = self.molds.fork(worker, slot, functools.partial(self.table.refork, slot))
            if pid is None:
                pid = self._fork_here(worker, slot)
        worker.pid = pid
        arbiter.WORKERS[pid] = worker
        stats = getattr(arbiter, "_stats", None)
        if isinstance(stats, dict):
            stats["workers_spawned"] = stats.get("workers_spawned", 0) + 1
        self.table.assign(pid, slot)
        return pid

    def _fork_here(self, worker: Any, slot: Optional[int]) -> int:
        gc.freeze()
        try:
            pid = os.fork()
        finally:
            if self.in_master():
                gc.unfreeze()
        if pid:
            return pid
        _recycle.adopt(slot)
        for sibling in self.arbiter.WORKERS.values():
            sibling.tmp.close()
        child.run_worker(self.arbiter, worker)

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

    # -- counting, reaping, stopping ------------------------------------------------------

    def manage_workers(self) -> Any:
        if not self.in_master():
            return self.orig["manage_workers"]()
        self._forget_gone()
        workers = self.arbiter.WORKERS
        self.hidden = {pid: w for pid, w in workers.items() if self.table.seat(pid) in RETIREES}
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
            self.table.stopped(pid)
        return self.orig["kill_worker"](pid, sig)

    def _forget_gone(self) -> None:
        self.table.forget_gone(set(self.arbiter.WORKERS) | set(self.hidden))

    def _release(self) -> None:
        self.table.release(list(self.arbiter.WORKERS), int(self.arbiter.num_workers))

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
            if not self.table.served(pid):
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


_master: Optional[Master] = None


def install(glog: Any, mold: bool = False, code_generations: bool = False,
            before_mold: Optional[Callable[[], object]] = None, immortal_heap: bool = False) -> bool:
    """In gunicorn's master, before the first fork: share the workers' table and patch the arbiter.

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
    _master = Master(arbiter, glog, mold, code_generations, before_mold, immortal_heap)
    _recycle.share(_master.table)
    roles.record_master(arbiter)
    return True
