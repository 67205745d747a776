"""The gunicorn boundary: every contact with gunicorn is in ``edgesync._gunicorn``, and the gunicorn code
it relies on is the code it was written against.

edgesync subclasses gunicorn's threaded worker, patches the arbiter on its instance in the
master and mirrors the child half of ``Arbiter.spawn_worker``: none of that is gunicorn's
public API. The package's docstring is the inventory of what is relied on and by what;
this test hashes each entry's gunicorn source and fails on a gunicorn whose code differs,
quoting the entry to re-read. After reading it against the edgesync code it names, update
the hash in KNOWN.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any, Dict, List

from gunicorn import http, sock, util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import AppImportError
from gunicorn.http import wsgi
from gunicorn.http.body import LengthReader
from gunicorn.http2.connection import HTTP2ServerConnection
from gunicorn.http2.response import HTTP2Response
from gunicorn.workers import base, gthread, workertmp

import edgesync._gunicorn as boundary

PACKAGE = Path(boundary.__file__).resolve().parent
EDGESYNC = PACKAGE.parent

KNOWN: Dict[str, str] = {  # gunicorn 27.0.1
    "Arbiter.spawn_worker": "6abc0d90b0b9f80b",
    "Arbiter.spawn_workers": "8fd09f6b3f3e5047",
    "Arbiter.manage_workers": "518f2dd040ef6809",
    "Arbiter.reap_workers": "ebcf4187e9ebf378",
    "Arbiter.kill_worker": "47e1a8ccdca2b567",
    "Arbiter.reload": "fec344d2f774ee32",
    "Arbiter.init_signals": "68125f99ad6599b1",
    "Arbiter.start": "92668bdb3e86b1af",
    "Arbiter.setup": "9eb391c82c190108",
    "BaseApplication.run": "4fcc52f6dfc0c8b9",
    "ThreadWorker.run": "f92c7394d85715a4",
    "ThreadWorker.accept": "f8dcead3dce5c851",
    "ThreadWorker.finish_request": "616e7bb15a009ff7",
    "ThreadWorker.handle_request": "6d0de5b919102efc",
    "ThreadWorker._keepalive_after": "4ebdbbc8bf5aafa5",
    "ThreadWorker.set_accept_enabled": "140150ebfd3cae34",
    "ThreadWorker.enqueue_req": "c9f428953d24acef",
    "ThreadWorker.get_thread_pool": "003f3549a71b6d34",
    "ThreadWorker.handle": "ca85c9be3df75da4",
    "ThreadWorker.wait_for_and_dispatch_events": "ea969b352482bd5c",
    "ThreadWorker.murder_keepalived": "4459960c4ccc36d4",
    "ThreadWorker.murder_pending": "7bf11f46454296e1",
    "ThreadWorker.is_parent_alive": "3517612f7763cc47",
    "ThreadWorker.__init__": "5681b8b542ea91bf",
    "ThreadWorker.init_process": "e4fc63a1a68e4f48",
    "LengthReader.read": "be99a0aa587fc555",
    "Worker.__init__": "e0f1de2d60574066",
    "Worker.init_process": "114caccd7a0e3c21",
    "Worker.load_wsgi": "18b02fc35e964f2b",
    "Worker.init_signals": "65442e0602b05f37",
    "WorkerTmp.__init__": "5d731e1551a94ace",
    "util._setproctitle": "565a467c3e87360c",
    "util.import_app": "a4d34dd3c36cb4f0",
    "wsgi.default_environ": "b7e18b84d829cb5a",
    "http.get_parser": "b7d8dcde91e20db4",
    "wsgi.create": "2c35d4a2dc629ede",
    "ThreadWorker.handle_http2_request": "ab456fbbca0edd89",
    "HTTP2Response.__init__": "7ff22bf8c96f1def",
    "HTTP2ServerConnection.send_response": "5d0ce1b0456e5647",
}
OWNERS: Dict[str, Any] = {"Arbiter": Arbiter, "BaseApplication": BaseApplication, "ThreadWorker": gthread.ThreadWorker,
                          "LengthReader": LengthReader, "Worker": base.Worker, "WorkerTmp": workertmp.WorkerTmp,
                          "util": util, "wsgi": wsgi, "http": http, "HTTP2Response": HTTP2Response,
                          "HTTP2ServerConnection": HTTP2ServerConnection}


def _hash(name: str) -> str:
    owner, attr = name.split(".")
    return hashlib.sha256(inspect.getsource(getattr(OWNERS[owner], attr)).encode()).hexdigest()[:16]


def _inventory() -> Dict[str, str]:
    """The package docstring's inventory: each ``Owner.name`` it lists -> the entry that names it."""
    doc = boundary.__doc__ or ""
    entries = re.split(r"\n(?=- )", doc[doc.index("Inventory:"):doc.index("Outside this package")])
    found: Dict[str, str] = {}
    for entry in entries[1:]:
        head = entry.split(":", 1)[0] if "``:" in entry else entry
        for name in re.findall(r"``(\w+\.\w+)``", head):
            found[name] = " ".join(entry.split())
    return found


def test_the_inventory_lists_exactly_the_hashed_gunicorn_code() -> None:
    listed = _inventory()
    assert set(listed) == set(KNOWN), ("the inventory in edgesync/_gunicorn/__init__.py and KNOWN differ: "
                                       "listed only %s, hashed only %s" % (sorted(set(listed) - set(KNOWN)),
                                                                           sorted(set(KNOWN) - set(listed))))


def test_the_gunicorn_code_edgesync_mirrors_and_patches_is_the_known_one() -> None:
    listed = _inventory()
    changed = [name for name, known in KNOWN.items() if _hash(name) != known]
    assert not changed, ("gunicorn's code changed. Re-read each against the edgesync code its inventory entry "
                         "(edgesync/_gunicorn/__init__.py) names, then update KNOWN:\n%s" % "\n".join(
                             "- %s (now %s): %s" % (name, _hash(name), listed.get(name, "?")) for name in changed))


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


def _gunicorn_module(name: str) -> bool:
    if name != "gunicorn" and not name.startswith("gunicorn."):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def gunicorn_contacts(path: Path, root: Path = EDGESYNC.parent) -> List[str]:
    """Where ``path`` imports gunicorn (at the top or inside a function) or names one of its modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if _gunicorn_module(node.value) else []
        found += ["%s:%d %s" % (path.relative_to(root), getattr(node, "lineno", 0), name)
                  for name in names if name == "gunicorn" or name.startswith("gunicorn.")]
    return found


def test_only_the_gunicorn_package_touches_gunicorn() -> None:
    outside = [p for p in sorted(EDGESYNC.rglob("*.py")) if PACKAGE not in p.parents]
    assert len(outside) > 20
    contacts = [c for p in outside for c in gunicorn_contacts(p)]
    assert contacts == [], ("edgesync touches gunicorn outside edgesync/_gunicorn: %s. Put that contact in the "
                            "package (and its inventory), and call it from there." % contacts)


def test_the_scan_sees_imports_anywhere_in_a_module(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    import gunicorn.util\n    from gunicorn import sock\n"
                     "    return __import__('sys').modules.get('gunicorn.arbiter'), {'gunicorn.socket': 1}\n")
    assert gunicorn_contacts(probe, tmp_path) == ["probe.py:5 gunicorn.util", "probe.py:6 gunicorn",
                                                  "probe.py:7 gunicorn.arbiter"]


def test_importing_the_package_or_edgesync_does_not_import_gunicorn() -> None:
    import subprocess
    import sys

    code = ("import sys, edgesync, edgesync._gunicorn, edgesync._gunicorn.roles, edgesync._gunicorn.http; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gunicorn'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
