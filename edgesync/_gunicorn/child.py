"""What of gunicorn's ``Arbiter.spawn_worker`` a mold does: its process, and the worker it forks.

design: a worker forked by edgesync's mold (``_mold``) must be what gunicorn's own fork
makes: the child half of ``spawn_worker`` (arbiter.py, 27.0.x) is mirrored here
(``run_worker``), and the worker object is built in the mold's child as the master
builds it, with the heartbeat file the master watches (``new_worker``). The mold itself
is a copy of the master that must not act as one (``become_mold``). The mold's own
loop, its generations and its fork protocol are ``_mold``'s.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

from gunicorn import sock as gsock
from gunicorn import util
from gunicorn.errors import AppImportError
from gunicorn.workers import base, workertmp

from .. import _exit


def become_mold(arbiter: Any) -> None:
    """In a mold just forked from the master: none of the arbiter's signal handlers nor workers."""
    # The arbiter's handlers would queue signals for a loop that does not run here.
    for sig in list(getattr(arbiter, "SIGNALS", [])):
        signal.signal(sig, signal.SIG_DFL)
    # The master's workers' heartbeat files: none of ours.
    for worker in list(arbiter.WORKERS.values()):
        worker.tmp.close()
    arbiter.WORKERS.clear()
    util._setproctitle("mold [%s]" % arbiter.proc_name)  # with setproctitle installed


def load_app(arbiter: Any) -> None:
    """The app's import, as ``--preload`` does it in the master (``Worker.load_wsgi`` then reuses it)."""
    arbiter.app.wsgi()


class _Heartbeat(workertmp.WorkerTmp):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's heartbeat file, on the descriptor the master made for this worker."""

    def __init__(self, fd: int) -> None:
        # Not WorkerTmp.__init__: it creates, chowns and unlinks a new temporary file
        # (0.8 ms of a birth), which the worker would only close for the master's.
        self._tmp = os.fdopen(fd, "w+b", 0)


def new_worker(arbiter: Any, master: int, age: int, max_requests: int, heartbeat_fd: int) -> Any:
    """In a worker the mold forked: its ``Worker`` object, as the master's ``spawn_worker`` builds it.

    ``max_requests`` is the master's draw of ``max_requests_jitter`` (every worker forked
    by one mold would otherwise draw the same: the mold's random state); ``heartbeat_fd``
    is the heartbeat file the master watches, which becomes the worker's ``tmp``.
    """
    # The master may have reopened its logs since the mold was born (USR1).
    arbiter.log.reopen_files()
    # Worker.__init__ builds its heartbeat with the module's WorkerTmp: this one process
    # builds one worker, so it is given the master's file for that one construction.
    made = base.WorkerTmp
    base.WorkerTmp = lambda cfg: _Heartbeat(heartbeat_fd)
    try:
        worker = arbiter.worker_class(age, master, arbiter.LISTENERS, arbiter.app, arbiter.timeout / 2.0,
                                      arbiter.cfg, arbiter.log)
    finally:
        base.WorkerTmp = made
    worker.max_requests = max_requests
    return worker


def run_worker(arbiter: Any, worker: Any) -> NoReturn:
    """The child half of gunicorn's ``Arbiter.spawn_worker`` (arbiter.py, 27.0.x), then ``_exit.leave``."""
    cfg = arbiter.cfg
    worker.pid = os.getpid()
    code: object = 0
    try:
        util._setproctitle("worker [%s]" % arbiter.proc_name)
        arbiter.log.info("Booting worker with pid: %s", worker.pid)
        if cfg.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            worker.sockets = gsock.create_sockets(cfg, arbiter.log)
        cfg.post_fork(arbiter, worker)
        worker.init_process()
    except SystemExit as exc:
        code = exc.code
    except AppImportError as e:
        arbiter.log.debug("Exception while loading the application", exc_info=True)
        print("%s" % e, file=sys.stderr)
        sys.stderr.flush()
        code = arbiter.APP_LOAD_ERROR
    except Exception as e:
        arbiter.log.exception("Exception in worker process")
        print("%s" % e, file=sys.stderr)
        sys.stderr.flush()
        code = -1 if worker.booted else arbiter.WORKER_BOOT_ERROR
    finally:
        arbiter.log.info("Worker exiting (pid: %s)", worker.pid)
        try:
            worker.tmp.close()
            cfg.worker_exit(arbiter, worker)
        except Exception:
            arbiter.log.warning("Exception during worker exit:\n%s", traceback.format_exc())
    _exit.leave(code)
