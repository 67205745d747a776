"""edgesync's boundary with gunicorn: every import of it, every patch and mirror of its code.

design: edgesync is a gunicorn worker class, and it needs more of gunicorn than its
public API gives: the arbiter is patched on its instance in the master, gthread's
serving loop is mirrored, and the mold mirrors the child half of ``spawn_worker``.
All of it is here; the rest of edgesync (the lifecycle, the table of workers, the
mold's own loop, the exit) talks to gunicorn only through this package, and
``tests/test_gunicorn_boundary.py`` fails if a module outside it imports gunicorn or
names one of its modules. Importing this package does not import gunicorn (``roles``
and ``http`` do not either): ``worker``, ``arbiter`` and ``child`` do.

- ``worker``: ``edgesync.Worker``, gunicorn's threaded worker (``gthread.ThreadWorker``)
  with the runtime wired in.
- ``arbiter``: the one patch of the arbiter (``Master``: ``spawn_worker``,
  ``spawn_workers``, ``manage_workers``, ``reap_workers``, ``kill_worker``), installed
  from ``Worker.check_config``.
- ``child``: the mold's process and the workers it forks, as gunicorn's ``spawn_worker``
  makes them, and the request the mold rehearses for them.
- ``roles``: which gunicorn process this is (the master edgesync patched, or the
  main thread's stack).
- ``http``: a request's connection, as gunicorn gives it, for answering it from
  another thread (``_wsgi``).

Inventory: the gunicorn internals edgesync relies on, written against gunicorn
27.0.1. ``tests/test_gunicorn_boundary.py`` hashes the source of each and fails on
a gunicorn whose code differs, naming the entry below: re-read the gunicorn code
against the edgesync code the entry names, then update the hash.

- ``Arbiter.spawn_worker``: replaced by ``arbiter.Master.spawn_worker``, which calls it
  (``_gunicorn_spawn_worker``: the child leaves it by ``SystemExit``, then ``_exit.leave``);
  its master half mirrored by ``arbiter.Master._spawn_from_mold``, its child half by
  ``child.run_worker``; ``self`` its only parameter.
- ``Arbiter.spawn_workers``: replaced without its sleep (``arbiter.Master.spawn_workers``).
- ``Arbiter.manage_workers``: wrapped; retirees hidden from ``WORKERS`` while it runs.
- ``Arbiter.reap_workers``: wrapped; a served worker exiting with ``WORKER_BOOT_ERROR`` (3)
  or ``APP_LOAD_ERROR`` (4) reaped before it (``arbiter.Master._reap_served_boot_codes``).
- ``Arbiter.kill_worker``: wrapped (which workers were told to stop).
- ``Arbiter.reload``: calls ``spawn_worker`` for each new worker (a HUP's generation,
  ``_mold.Molds``: a new ``cfg`` object) and ``reap_workers`` alone while it waits.
- ``Arbiter.init_signals``: installs the bound ``signal`` as SIGHUP's handler
  (``arbiter.running_arbiter``).
- ``Arbiter.start``: ``init_signals`` before ``worker_class.check_config``, where
  ``arbiter.install`` runs.
- ``Arbiter.setup``: the worker class resolved (``Worker.setup``) before ``--preload``
  imports the app in ``setup``'s frame (``roles.gunicorn_role``).
- ``BaseApplication.run``: ``--check-config`` loads the app in its frame, with
  ``self.cfg.check_config`` (``roles.checking_config``).
- ``ThreadWorker.run``: mirrored by ``worker.Worker._serve``.
- ``ThreadWorker.accept``, ``ThreadWorker.finish_request``, ``ThreadWorker.handle_request``
  (reads ``alive`` for keep-alive), ``ThreadWorker._keepalive_after``,
  ``ThreadWorker.set_accept_enabled``, ``ThreadWorker.enqueue_req``,
  ``ThreadWorker.get_thread_pool``: overridden or called by ``worker.Worker``.
- ``ThreadWorker.handle``: run on edgesync's request threads (``worker._RequestThreads``),
  its result passed to ``finish_request`` through ``method_queue.defer``.
- ``ThreadWorker.wait_for_and_dispatch_events``, ``ThreadWorker.murder_keepalived``,
  ``ThreadWorker.murder_pending``, ``ThreadWorker.is_parent_alive``: the steps of
  ``worker.Worker._serve`` and of the drain's ``tick``.
- ``ThreadWorker.__init__``, ``ThreadWorker.init_process``: the attributes
  ``keepalived_conns``, ``pending_conns``, ``nr_conns``, ``method_queue``, ``poller``
  (``worker.Worker._can_accept``, ``_close``).
- ``LengthReader.read``: a body read to its end leaves ``length`` at 0
  (``worker.Worker._keepalive_after``).
- ``Worker.init_process``, ``Worker.load_wsgi``: ``load_wsgi`` reuses ``app.wsgi()``'s
  cached callable (the mold, ``--preload``).
- ``Worker.init_signals``: the worker's handlers (``worker.Worker.handle_exit``,
  ``handle_quit``).
- ``WorkerTmp.__init__``: the heartbeat file lives in ``_tmp``; ``child._Heartbeat`` sets only
  that, on the master's descriptor.
- ``Worker.__init__``: builds ``tmp`` with ``base.WorkerTmp``, looked up when it runs
  (``child.new_worker`` gives it the master's file).
- ``util._setproctitle``: the mold's and its workers' titles (``child``).
- ``util.import_app``: an ``app_uri`` imported for a durable task (``import_app`` below).
- ``wsgi.default_environ``: the client's socket in the environ as ``gunicorn.socket``
  (``http.client_socket``).
- ``http.get_parser``, ``wsgi.create``: a request parsed from a socket and its environ and
  ``Response`` built, with no server hook called (``child.rehearse``, in the mold).
- ``ThreadWorker.handle_http2_request``: ``HTTP_VERSION`` is ``"2"`` in the environ, and
  ``start_response`` is bound to an ``HTTP2Response`` (``http.http2``).
- ``HTTP2Response.__init__``: the response keeps ``h2_conn`` and ``stream_id``
  (``http.send_http2_response``).
- ``HTTP2ServerConnection.send_response``: a whole response sent on a stream
  (``http.send_http2_response``).

Outside this package, edgesync reads gunicorn's documented settings on ``cfg`` and
the documented attributes of a ``Worker`` (``age``, ``max_requests``, ``tmp``) that
``_mold`` passes to its workers, and holds the arbiter as an opaque handle there.
"""

from __future__ import annotations

from typing import Any


def import_app(path: str) -> Any:
    """The WSGI app at ``path``, in gunicorn's syntax (``module:name``, ``module:factory()``)."""
    from gunicorn.util import import_app as gunicorn_import_app

    return gunicorn_import_app(path)
