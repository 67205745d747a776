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
from typing import Any, List, NoReturn

from gunicorn import http as ghttp
from gunicorn import sock as gsock
from gunicorn import util
from gunicorn.errors import AppImportError
from gunicorn.http import wsgi as gwsgi
from gunicorn.workers import base, workertmp

from .. import _exit
from .._invocation import Tracker
from .._wsgi import Boundary

#: How many requests a mold rehearses. CPython specializes a function's bytecode in
#: place once it has run a few times (3.11: after 8 calls); the rehearsals take every
#: function of the request path past that in the mold, so no worker does it again.
REHEARSALS = 20
#: The shapes a worker's first requests take, each rehearsed REHEARSALS times: a GET whose
#: connection is kept alive, the same answered with "Connection: close" (every response
#: of a oneshot instance, or of a worker past max_requests), a POST with a body.
_GET = b"GET /edgesync-rehearsal?mold=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: edgesync-mold\r\nAccept: */*\r\n\r\n"
_POST = (b"POST /edgesync-rehearsal HTTP/1.1\r\nHost: localhost\r\nUser-Agent: edgesync-mold\r\n"
         b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"mold\": 1}")
_REHEARSALS = ((_GET, False), (_GET, True), (_POST, False))


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


def rehearse(cfg: Any, times: int = REHEARSALS) -> bytes:
    """In a mold: pass requests of its own through the code of a worker's first requests.

    That code (gunicorn's HTTP/1.1 parser, its environ and its response, and edgesync's
    boundary) never ran in the mold: each worker would specialize it (CPython rewrites
    a function's bytecode in place once it has run a few times) and fill the caches it
    uses, writing to pages it shares with the mold, which copies them. Rehearsed here,
    once a generation, every worker starts with it warm (docs/births.md has the
    figures). The mold rehearses before it imports the app, so that the import's own
    allocations fill the memory the rehearsal freed (freed blocks left between the
    app's objects would be filled by each worker instead, each one a page it copies);
    with ``--preload`` the master imported it already.

    The requests go over a socketpair to a WSGI app of this function's own, never to
    the user's, and no server hook runs (``pre_request`` and ``post_request`` are
    called by gthread's ``handle_request``, which does not run here): nothing outside
    this process sees them. Each shape of ``_REHEARSALS`` goes ``times`` times (60
    requests, about 5 ms, by default). Returns the last response's bytes. Raises what
    gunicorn raises for a request this configuration refuses (a ``limit_request_line``
    too short for it, say): the caller goes on without the rehearsal.
    """

    def app(environ: Any, start_response: Any) -> List[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    boundary = Boundary(app, Tracker(), os.getpid())
    client, server = socket.socketpair()
    peer, local = ("127.0.0.1", 1), ("127.0.0.1", 2)
    answer = b""
    try:
        for request, closing in _REHEARSALS:
            for _ in range(times):
                client.sendall(request)
                req = next(ghttp.get_parser(cfg, server, peer))
                resp, environ = gwsgi.create(req, server, peer, local, cfg)
                if closing:
                    resp.force_close()
                for chunk in boundary(environ, resp.start_response):
                    resp.write(chunk)
                resp.close()
                answer = client.recv(65536)
    finally:
        client.close()
        server.close()
    return answer


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
