"""How a worker process ends (edgesync._exit), with real gunicorn masters and SIGTERM.

A worker whose work is done runs what Python's exit promises (non-daemon threads
joined, ``atexit`` callbacks), closes the files its app left open for writing (so that
their buffers are flushed), and skips the teardown of its modules.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable

import pytest

from .support import Server

APP = "tests.apps.exits:app"


def test_a_worker_ends_without_tearing_down_its_modules(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "1", app=APP)
    pid = int(server.get("/pid")[1])
    assert server.get("/keep")[1] == b"kept"
    assert server.get("/thread?s=1")[0] == 200
    assert server.stop() == 0, server.log
    kinds = [e["type"] for e in server.events() if e["pid"] == pid]
    # The thread was joined before the atexit callbacks ran, as in Python's own exit; the
    # kept object was never finalized.
    assert kinds == ["thread_done", "atexit"], (kinds, server.log)


@pytest.mark.parametrize("handoff", ["true", "false"])
def test_a_file_the_app_never_closed_is_flushed_and_closed_at_exit(server_factory: Callable[..., Server],
                                                                    tmp_path: Path, handoff: str) -> None:
    # Opened at import, so frozen while the worker served; the exit closes it (and ends
    # the worker without the teardown, with or without the hand-off).
    unflushed = tmp_path / "unflushed.log"
    server = server_factory("--workers", "1", app=APP,
                            env={"UNFLUSHED_FILE": str(unflushed), "EDGESYNC_REPLACE_BEFORE_RETIRE": handoff})
    pid = int(server.get("/pid")[1])
    assert server.get("/keep")[1] == b"kept"
    assert server.get("/unflushed")[1] == b"buffered"
    assert unflushed.read_text() == ""  # still in the file object's buffer
    assert server.stop() == 0, server.log
    line = "written by %d, never flushed by the app\n" % pid
    assert unflushed.read_text() == line
    # Closed outermost first: the text layer, then the GzipFile (its trailer), then its file.
    assert gzip.decompress(Path(str(unflushed) + ".gz").read_bytes()).decode() == line
    kinds = [e["type"] for e in server.events() if e["pid"] == pid]
    assert kinds == ["atexit"], (kinds, server.log)
