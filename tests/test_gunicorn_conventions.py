"""edgesync's settings follow gunicorn's own conventions.

- ``gunicorn --check-config`` validates edgesync.toml too (when the app imports edgesync).
- Settings are read once in the master, validated, and inherited by every worker; a file
  edited without a HUP changes nothing, not even for a replacement worker; a HUP re-reads
  it, and a broken file at HUP is refused (logged) while the old settings keep serving.
- A refused config is logged where gunicorn logs (``--error-logfile``, even ``--daemon``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

from .conftest import REPO, Server, wait_for

BROKEN = "[edge_runtime]\nbackground_threads = -1\n"
REFUSAL = "background_threads must be an integer"


def gunicorn(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    env["PYTHONPATH"] = str(REPO)  # --check-config loads the app before it applies --pythonpath
    return subprocess.run([sys.executable, "-m", "gunicorn", "-k", "edgesync.Worker", *args], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=60)


def test_check_config_refuses_a_broken_edgesync_toml(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text(BROKEN)
    done = gunicorn(tmp_path, "--check-config", "tests.apps.core:app")
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "edgesync.toml: [edge_runtime] " + REFUSAL in done.stderr, done.stderr


def test_check_config_passes_a_valid_edgesync_toml(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text("[edge_runtime]\nbackground_threads = 3\n")
    done = gunicorn(tmp_path, "--check-config", "tests.apps.core:app")
    assert done.returncode == 0, (done.stdout, done.stderr)


def test_a_refused_config_is_in_the_error_log(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text(BROKEN)
    error_log = tmp_path / "error.log"
    done = gunicorn(tmp_path, "-b", "127.0.0.1:0", "--error-logfile", str(error_log), "tests.apps.core:app")
    assert done.returncode != 0
    assert REFUSAL in error_log.read_text(), error_log.read_text()


def test_a_refused_config_with_daemon_is_in_the_error_log(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text(BROKEN)
    error_log = tmp_path / "error.log"
    pidfile = tmp_path / "gunicorn.pid"
    done = gunicorn(tmp_path, "-b", "127.0.0.1:0", "--daemon", "--pid", str(pidfile),
                    "--error-logfile", str(error_log), "tests.apps.core:app")
    assert done.returncode == 0  # the launcher returns before the daemon checks anything
    try:
        wait_for(lambda: error_log.exists() and REFUSAL in error_log.read_text(), 20,
                 "the refusal in the error log")
    finally:
        if pidfile.exists():  # a daemon that did start: stop it
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass


def threads_served(server: Server) -> int:
    return int(server.get_json("/metrics")["background_threads"])


def serving_pid(server: Server) -> int:
    return int(server.get_json("/metrics")["pid"])


def newest_worker(server: Server, count: int) -> int:
    server.wait_for_log(r"Booting worker with pid", count=count, timeout=20)
    pids: List[int] = server.worker_pids()
    booted = [int(line.rsplit(" ", 1)[1]) for line in server.wait_for_log(r"Booting worker with pid", count)]
    newest = booted[-1]
    assert newest in pids
    # Once only the newest serves, every answer comes from it.
    wait_for(lambda: serving_pid(server) == newest, 20, "worker %d to serve" % newest)
    return newest


def test_settings_change_on_hup_only(server_factory: Callable[..., Server]) -> None:
    server = server_factory("-w", "1", toml="[edge_runtime]\nbackground_threads = 2\n")
    toml = server.workdir / "edgesync.toml"
    first = serving_pid(server)
    assert threads_served(server) == 2

    # Edited without a HUP: a replacement worker keeps what the master read.
    toml.write_text("[edge_runtime]\nbackground_threads = 3\n")
    os.kill(first, signal.SIGKILL)
    newest_worker(server, 2)
    assert threads_served(server) == 2, "a replacement worker read the file the master did not"

    # A HUP re-reads it.
    server.signal(signal.SIGHUP)
    newest_worker(server, 3)
    assert threads_served(server) == 3

    # A broken file at HUP: refused, said why, and the settings that validated keep serving.
    toml.write_text(BROKEN)
    server.signal(signal.SIGHUP)
    newest_worker(server, 4)
    assert threads_served(server) == 3
    [line] = server.wait_for_log(REFUSAL)
    assert "keeping the previous settings" in line, line


def test_hup_applies_settings_from_gunicorn_raw_env(server_factory: Callable[..., Server]) -> None:
    # raw_env in gunicorn.conf.py is applied by the reload after the worker class is resolved.
    server = server_factory("-w", "1", "-c", "gunicorn.conf.py", start=False)
    conf = server.workdir / "gunicorn.conf.py"
    conf.write_text("raw_env = ['EDGESYNC_BACKGROUND_THREADS=2']\n")
    server.start()
    assert threads_served(server) == 2
    conf.write_text("raw_env = ['EDGESYNC_BACKGROUND_THREADS=5']\n")
    server.signal(signal.SIGHUP)
    newest_worker(server, 2)
    assert threads_served(server) == 5
