"""The gunicorn internals edgesync relies on, checked against the installed gunicorn.

edgesync subclasses gunicorn's threaded worker and patches the arbiter on its instance
in the master; the mold mirrors the child half of ``Arbiter.spawn_worker``. Those
contacts are not gunicorn's public API. This test fails on a gunicorn whose relevant
code differs from the one edgesync was written against (27.0.x), and says which
piece to re-read; after reading it and the edgesync code named, update the hash.

Inventory (what relies on it):

- ``Arbiter.spawn_worker``: patched (``_recycle._Master``, ``_exit.install``); its child
  half mirrored by ``_mold.run_worker``, its master half by ``_recycle._Master._spawn_from_mold``.
- ``Arbiter.spawn_workers``: replaced without its sleep (``_recycle._Master.spawn_workers``).
- ``Arbiter.manage_workers``: wrapped; retirees hidden from ``WORKERS`` during it.
- ``Arbiter.reap_workers``: wrapped; served workers exiting with 3/4 reaped before it
  (``_recycle._Master._reap_served_boot_codes``), ``WORKER_BOOT_ERROR``, ``APP_LOAD_ERROR``.
- ``Arbiter.kill_worker``: wrapped (which workers were told to stop).
- ``Arbiter.reload``: calls ``spawn_worker`` for each new worker (a HUP's generation).
- ``Arbiter.init_signals``: installs the bound ``signal`` as SIGHUP's handler
  (``_process.running_arbiter``).
- ``ThreadWorker.run``: mirrored by ``Worker._serve``; ``accept``, ``finish_request``,
  ``handle_request`` (reads ``alive`` for keep-alive), ``_keepalive_after``,
  ``set_accept_enabled``: overridden or relied on by ``edgesync._worker``.
- ``WorkerTmp.__init__``: the heartbeat file lives in ``_tmp`` (``_mold._worker_main``).
- ``Worker.init_process``: ``load_wsgi`` reuses ``app.wsgi()``'s cached callable (the mold, --preload).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Dict

from gunicorn import sock, util
from gunicorn.arbiter import Arbiter
from gunicorn.errors import AppImportError
from gunicorn.workers import base, gthread, workertmp

KNOWN: Dict[str, str] = {  # gunicorn 27.0.1
    "Arbiter.spawn_worker": "6abc0d90b0b9f80b",
    "Arbiter.spawn_workers": "8fd09f6b3f3e5047",
    "Arbiter.manage_workers": "518f2dd040ef6809",
    "Arbiter.reap_workers": "ebcf4187e9ebf378",
    "Arbiter.kill_worker": "47e1a8ccdca2b567",
    "Arbiter.reload": "fec344d2f774ee32",
    "Arbiter.init_signals": "68125f99ad6599b1",
    "ThreadWorker.run": "f92c7394d85715a4",
    "ThreadWorker.accept": "f8dcead3dce5c851",
    "ThreadWorker.finish_request": "616e7bb15a009ff7",
    "ThreadWorker.handle_request": "6d0de5b919102efc",
    "ThreadWorker._keepalive_after": "4ebdbbc8bf5aafa5",
    "ThreadWorker.set_accept_enabled": "140150ebfd3cae34",
    "WorkerTmp.__init__": "5d731e1551a94ace",
    "Worker.init_process": "114caccd7a0e3c21",
}
OWNERS: Dict[str, Any] = {"Arbiter": Arbiter, "ThreadWorker": gthread.ThreadWorker,
                          "WorkerTmp": workertmp.WorkerTmp, "Worker": base.Worker}


def _hash(name: str) -> str:
    owner, attr = name.split(".")
    return hashlib.sha256(inspect.getsource(getattr(OWNERS[owner], attr)).encode()).hexdigest()[:16]


def test_the_gunicorn_code_edgesync_mirrors_and_patches_is_the_known_one() -> None:
    changed = [name for name, known in KNOWN.items() if _hash(name) != known]
    assert not changed, ("gunicorn's code changed in %s: re-read it against the edgesync code this module's "
                         "docstring names, then update KNOWN" % ", ".join(changed))


def test_the_gunicorn_names_edgesync_uses_exist() -> None:
    for attr in ("WORKER_BOOT_ERROR", "APP_LOAD_ERROR", "SIGNALS", "signal"):
        assert hasattr(Arbiter, attr), attr
    assert (Arbiter.WORKER_BOOT_ERROR, Arbiter.APP_LOAD_ERROR) == (3, 4)
    assert hasattr(gthread, "STOP_KEEPALIVE_LINGER")
    for attr in ("keepalived_conns", "pending_conns", "nr_conns", "method_queue", "poller"):
        assert attr in inspect.getsource(gthread.ThreadWorker.__init__) + inspect.getsource(
            gthread.ThreadWorker.init_process), attr
    assert callable(util._setproctitle) and callable(sock.create_sockets) and issubclass(AppImportError, Exception)
    assert list(inspect.signature(Arbiter.spawn_worker).parameters) == ["self"]
    assert list(inspect.signature(base.Worker.__init__).parameters) == [
        "self", "age", "ppid", "sockets", "app", "timeout", "cfg", "log"]
