"""A gunicorn worker class for a floor measurement: an instance that does nothing but serve its one request.

``gunicorn -k bench.apps.floor_worker.FloorWorker`` is edgesync's worker class with its
births (the master installs the mold in ``check_config``, and the mold forks each
worker) and nothing else: its ``init_process`` takes one connection on the main
thread, passes the request through gunicorn's HTTP/1.1 parser and the app, answers
with ``Connection: close`` and exits. No thread, no limits, no heartbeat, no event, no
log line of edgesync's. ``bench/births.py oneshot --floor`` loads it side by side with
edgesync's ``per_worker`` and ``oneshot`` (``perbirth --floor``: in alternate rounds):
what a oneshot birth costs on this machine when the arbiter still reaps, counts and
signals every instance and a mold forks it. Measurement only: such a worker enforces
nothing, and with no heartbeat an instance left idle for ``--timeout`` is killed by the
arbiter.
"""

from __future__ import annotations

from gunicorn import http
from gunicorn.http import wsgi

from edgesync import Worker


class FloorWorker(Worker):  # type: ignore[misc]  # gunicorn's classes are untyped
    def init_process(self) -> None:
        self.booted = True  # the master reads a worker that never booted and exits as a boot error
        app = self.app.wsgi()
        listener = self.sockets[0]
        listener.setblocking(True)
        while True:  # a connection closed before its request (a client's probe) is not the one request
            conn, addr = listener.accept()
            try:
                req = next(http.get_parser(self.cfg, conn, addr))
                break
            except StopIteration:
                conn.close()
        resp, environ = wsgi.create(req, conn, addr, listener.getsockname(), self.cfg)
        resp.force_close()
        for chunk in app(environ, resp.start_response):
            resp.write(chunk)
        resp.close()
        conn.close()
        raise SystemExit(0)
