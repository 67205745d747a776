"""Births: how workers are born and what their end means to the server (real gunicorn, real signals).

gunicorn halts the whole server when a worker exits with 3 (``WORKER_BOOT_ERROR``) or
4 (``APP_LOAD_ERROR``): meant for a worker that cannot boot. A worker that has served
exits with those codes for other reasons (a background task's ``os._exit(3)``): the
server lives and replaces it.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

import edgesync
from edgesync import _heap

from .conftest import Server, wait_for
from .support import REPO

APP = "tests.apps.births:app"
MOLD = {"EDGESYNC_MOLD": "true"}


@pytest.mark.parametrize("code", [3, 4])
@pytest.mark.parametrize(("handoff", "mold"), [("true", "false"), ("false", "false"), ("true", "true")])
def test_a_worker_that_served_never_halts_the_server_by_its_exit_code(
        server_factory: Callable[..., Server], code: int, handoff: str, mold: str) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={"EDGESYNC_REPLACE_BEFORE_RETIRE": handoff, "EDGESYNC_MOLD": mold})
    status, body = server.get("/exit_later?code=%d&delay=0.2" % code)
    assert status == 200
    pid = int(body)
    server.wait_for_log(r"Worker \(pid:%d\) exited with code %d" % (pid, code))
    server.wait_for_log(r"worker %d exited with code %d after serving: not a boot error" % (pid, code))
    # A replacement is born, and the server keeps serving.
    wait_for(lambda: len(server.worker_pids()) == 2 and pid not in server.worker_pids(), 15,
             "a replacement for the worker that exited")
    for _ in range(10):
        status, body = server.get("/pid")
        assert status == 200 and int(body) != pid
    assert server.exited() is None, server.log
    assert "Worker failed to boot" not in server.log and "App failed to load" not in server.log
    assert server.stop() == 0, server.log



def _keep_alive_client(port: int, requests: int, out: List[Tuple[int, str, int]], errors: List[str]) -> None:
    """One http.client connection object asking ``requests`` times; it reconnects after each close."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        for _ in range(requests):
            try:
                conn.request("GET", "/pid")
                resp = conn.getresponse()
                body = resp.read()
                out.append((resp.status, resp.getheader("Connection", ""), int(body)))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(repr(exc))
                conn.close()
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("mold", ["false", "true"])
def test_oneshot_serves_exactly_one_request_per_instance_under_keep_alive(
        server_factory: Callable[..., Server], mold: str) -> None:
    server = server_factory("--workers", "2", "--threads", "2", app=APP, workers_ready=2,
                            env={"EDGESYNC_POLICY": "oneshot", "EDGESYNC_MOLD": mold})
    probes = set(int(p) for p in re.findall(r"worker (\d+): retiring \(reason=oneshot\)", server.log))
    out: List[Tuple[int, str, int]] = []
    errors: List[str] = []
    clients = [threading.Thread(target=_keep_alive_client, args=(server.port, 3, out, errors))
               for _ in range(30)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert errors == [] and len(out) == 90, (errors, len(out))
    assert all(status == 200 for status, _, _ in out)
    # Every response closes its connection, and every instance answered one request.
    assert Counter(conn.lower() for _, conn, _ in out) == {"close": 90}
    per_pid: Dict[int, int] = Counter(pid for _, _, pid in out)
    assert max(per_pid.values()) == 1, [p for p, n in per_pid.items() if n > 1]
    assert not probes & set(per_pid)  # the readiness probes' instances served nothing else
    assert server.stop() == 0, server.log


# -- the mold --------------------------------------------------------------------------


class _Load:
    """Clients asking ``/version`` one request after another until stopped; every request accounted for."""

    def __init__(self, server: Server, clients: int = 3):
        self.server = server
        self.answers: List[str] = []  # "<version> <pid>", in the order they came
        self.errors: List[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            try:
                status, body = self.server.get("/version", timeout=20)
                with self._lock:
                    if status == 200:
                        self.answers.append(body.decode())
                    else:
                        self.errors.append("%d %r" % (status, body))
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(repr(exc))

    def versions(self, last: int = 0) -> List[str]:
        with self._lock:
            return [a.split()[0] for a in self.answers[-last:]]

    def answered(self) -> int:
        with self._lock:
            return len(self.answers)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert self.sent == len(self.answers) + len(self.errors)


def _mold_pids(server: Server) -> List[int]:
    return [int(p) for p in re.findall(r"edgesync: mold (\d+) ready", server.log)]


def _one_fork_here() -> bool:
    """Whether a mold here forks each worker in one step (edgesync._fork: Linux on x86_64 or aarch64, glibc)."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    return sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64") and libc.startswith("glibc")


def _gone(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_broken_deploy_is_refused_and_the_old_code_serves_until_a_fixed_one(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.write_text("v1")
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "CODE_FILE": str(code)})
    server.wait_for_log(r"edgesync: mold \d+ ready for the first generation")
    load = _Load(server)
    try:
        wait_for(lambda: load.answered() >= 10, 20, "the load to get answers")
        code.write_text("raise")
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"the new code's mold could not import the app .*this generation is refused")
        # The old generation's mold forks the HUP's workers: the old code serves on.
        wait_for(lambda: len(re.findall(r"Booting worker with pid", server.log)) >= 4, 20, "the HUP's workers")
        seen = load.answered()
        wait_for(lambda: load.answered() >= seen + 20, 20, "answers after the refused HUP")
        assert set(load.versions()) == {"v1"}
        assert server.log.count("RuntimeError: a broken deploy") == 1, server.log  # the traceback, once
        code.write_text("v2")
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"edgesync: mold \d+ ready for a new generation")
        wait_for(lambda: load.versions(10) == ["v2"] * 10, 30, "the fixed code to serve")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert server.exited() is None
    assert "Worker failed to boot" not in server.log
    assert server.stop() == 0, server.log


@pytest.mark.slow
def test_a_killed_mold_is_replaced_and_the_workers_serve_on(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env=MOLD)
    [mold] = _mold_pids(server)
    load = _Load(server)
    try:
        os.kill(mold, signal.SIGKILL)
        wait_for(lambda: _gone(mold), 10, "the mold to die")
        server.signal(signal.SIGTTIN)  # a birth: from a new mold
        server.wait_for_log(r"edgesync: mold %d is gone; starting another" % mold)
        server.wait_for_log(r"edgesync: mold \d+ ready for the same generation, in place of mold %d " % mold)
        wait_for(lambda: len(server.worker_pids()) == 3, 20, "the third worker")
        seen = load.answered()
        wait_for(lambda: load.answered() >= seen + 20, 20, "answers after the mold died")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert server.stop() == 0, server.log


class _KillAfterFork:
    """Traces a mold (ptrace, as a debugger does) and SIGKILLs it right after it forks a worker: the worker
    lives, the mold never tells the master its pid. The window a real crash (OOM, SIGKILL) has to hit."""

    SEIZE, CONT, DETACH, GETEVENTMSG = 0x4206, 7, 17, 0x4201
    TRACEFORK, TRACEVFORK, TRACECLONE = 0x02, 0x04, 0x08
    WALL = 0x40000000

    def __init__(self, mold: int):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self.libc.ptrace.restype = ctypes.c_long
        self.mold = mold
        try:
            self._ptrace(self.SEIZE, mold, self.TRACEFORK | self.TRACEVFORK | self.TRACECLONE)
        except PermissionError as exc:  # Yama's ptrace_scope 2-3, or a container's seccomp profile
            pytest.skip("this machine refuses ptrace on a descendant: %s" % exc)

    def _ptrace(self, request: int, pid: int, data: Any = None) -> None:
        if self.libc.ptrace(request, pid, None, data) != 0:
            raise OSError(ctypes.get_errno(), "ptrace(%#x, %d)" % (request, pid))

    def worker(self) -> int:
        """Wait for the mold's next fork, kill it, let the new process run; its pid."""
        while True:
            _, status = os.waitpid(self.mold, self.WALL)
            assert os.WIFSTOPPED(status), "the mold ended before it forked (status %#x)" % status
            if status >> 16:  # a fork (or clone) event: the new process exists
                break
            self._ptrace(self.CONT, self.mold, os.WSTOPSIG(status))  # a signal on its way to the mold
        child = ctypes.c_ulong()
        self._ptrace(self.GETEVENTMSG, self.mold, ctypes.addressof(child))
        os.kill(self.mold, signal.SIGKILL)
        os.waitpid(self.mold, self.WALL)  # its exit, which the master reaps after us
        os.waitpid(child.value, self.WALL)  # the new process's first stop (traced from birth)
        self._ptrace(self.DETACH, child.value)
        return child.value


@pytest.mark.slow
def test_a_worker_whose_mold_dies_before_naming_it_retires(server_factory: Callable[..., Server]) -> None:
    # The master never hears its pid, forks the same worker again from a new mold, and records that
    # one: the first must not serve on uncounted (nothing would time it out or stop it before the
    # master exits), nor write in the replacement's record.
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env=MOLD)
    [mold] = _mold_pids(server)
    catcher = _KillAfterFork(mold)
    load = _Load(server)
    try:
        server.signal(signal.SIGTTIN)
        stranger = catcher.worker()
        server.wait_for_log(r"edgesync: mold %d is gone; starting another" % mold)
        unknown = r"worker %d: the master does not know this worker \(it recorded pid (\d+) in its place" % stranger
        [line] = server.wait_for_log(unknown)
        replacement = int(re.findall(unknown, line)[0])
        server.wait_for_log(r"worker %d: retiring \(reason=unregistered\)" % stranger)
        wait_for(lambda: _gone(stranger), 20, "the unregistered worker to exit")
        assert replacement in server.worker_pids() and len(server.worker_pids()) == 3
        assert server.proc is not None and _ppid(replacement) == server.proc.pid
        seen = load.answered()
        wait_for(lambda: load.answered() >= seen + 20, 20, "answers after the stranger left")
        metrics = server.get_json("/server_metrics")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert stranger not in {w["pid"] for w in metrics["workers"]}, metrics  # the replacement's record is its own
    assert server.exited() is None
    assert server.stop() == 0, server.log


def test_an_import_that_starts_a_thread_falls_back_to_gunicorns_births(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={**MOLD, "IMPORT_THREAD": "metrics-exporter"})
    server.wait_for_log(r"the app's import started threads: metrics-exporter .*post_worker_init")
    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.worker_pids()) == 3, 20, "the third worker")
    pids = {int(server.get("/pid")[1]) for _ in range(30)}
    assert pids <= set(server.worker_pids())
    assert server.log.count("the app's import started threads") == 1  # logged once
    assert _mold_pids(server) == []
    assert server.stop() == 0, server.log


@pytest.mark.slow
def test_no_mold_nor_worker_outlives_a_killed_master(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env=MOLD)
    [mold] = _mold_pids(server)
    workers = server.worker_pids()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGKILL)
    wait_for(lambda: all(_gone(p) for p in [mold, *workers]), 20, "the mold and the workers to end")


@pytest.mark.parametrize("os_thread", [False, True], ids=["one fork", "a C library's thread: double fork"])
def test_the_workers_are_the_masters_children_and_the_mold_is_not_a_worker(
        server_factory: Callable[..., Server], os_thread: bool) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={**MOLD, **({"IMPORT_OS_THREAD": "1"} if os_thread else {})})
    [mold] = _mold_pids(server)
    assert server.proc is not None
    # One fork per worker, or, with a thread that threading does not list (its C library's
    # pthread_atfork handlers must run), a double fork through an intermediate.
    if os_thread:
        assert "each worker forked through an intermediate: probed with more than one thread" in server.log
        server.signal(signal.SIGTTIN)
        wait_for(lambda: len(server.worker_pids()) == 3, 20, "the third worker")
    elif _one_fork_here():
        assert "each worker forked in one step" in server.log
    for pid in [mold, *server.worker_pids()]:
        assert os.stat("/proc/%d" % pid) and _ppid(pid) == server.proc.pid
    assert mold not in server.worker_pids()
    with open("/proc/%d/comm" % mold) as f:
        assert f.read().strip() == "edgesync-mold"  # what ps shows
    with open("/proc/%d/comm" % server.proc.pid) as f:
        master_name = f.read().strip()
    for pid in server.worker_pids():  # a worker takes the master's name back from the mold
        with open("/proc/%d/comm" % pid) as f:
            assert f.read().strip() == master_name != "edgesync-mold"
    # Every worker was forked by the mold: none paid the app's import.
    assert all(int(ms) < 50 for ms in re.findall(r"booted in [\d.]+s, (\d+) ms of CPU", server.log)), server.log
    assert server.stop() == 0, server.log
    assert _gone(mold)


def test_usr1_reopens_the_log_files_for_the_workers_the_mold_forks_later(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    # gunicorn's log rotation: rename the file, USR1; every process logs to the new file,
    # the workers born after it too (the mold opened its files before the rotation).
    log = tmp_path / "server0" / "gunicorn.log"
    server = server_factory("--workers", "2", "--error-logfile", str(log), app=APP, workers_ready=2, env=MOLD)
    rotated = tmp_path / "rotated.log"
    log.rename(rotated)
    server.signal(signal.SIGUSR1)
    wait_for(log.exists, 10, "the master to reopen its log file")
    server.signal(signal.SIGTTIN)  # (server.log reads the new file from here on)
    server.wait_for_log(r"Booting worker with pid: \d+", timeout=20)
    [born] = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log.read_text())]
    assert "Booting worker with pid: %d" % born not in rotated.read_text()
    server.wait_for_log(r"worker %d: serving" % born)
    assert server.stop() == 0, server.log


def _heartbeats(pid: int) -> Dict[Tuple[int, int], str]:
    """The gunicorn heartbeat files (unlinked ``wgunicorn-*``) process ``pid`` holds open: (dev, inode) -> path."""
    out = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        link = "/proc/%d/fd/%s" % (pid, fd)
        try:
            if "wgunicorn-" in os.readlink(link):
                st = os.stat(link)
                out[(st.st_dev, st.st_ino)] = link
        except OSError:
            pass  # closed since the listing
    return out


def test_a_molds_worker_beats_on_the_heartbeat_file_the_master_watches(
        server_factory: Callable[..., Server]) -> None:
    # gunicorn's master kills a worker whose heartbeat file goes stale (--timeout). A worker
    # forked by the mold must hold the one file the master made for it, and touch it.
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env=MOLD)
    assert server.proc is not None
    master = _heartbeats(server.proc.pid)
    [mold] = _mold_pids(server)
    assert _heartbeats(mold) == {}, "the mold holds none of the workers' heartbeat files"
    for pid in server.worker_pids():
        held = _heartbeats(pid)
        assert len(held) == 1 and set(held) <= set(master), (held, master)
        [link] = held.values()
        before = os.stat(link).st_mtime
        wait_for(lambda link=link, before=before: os.stat(link).st_mtime != before, 10, "worker %d to beat" % pid)
    assert server.stop() == 0, server.log


def _ppid(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _live_molds(server: Server) -> List[int]:
    return [p for p in _mold_pids(server) if not _gone(p)]


@pytest.mark.slow
def test_twenty_hups_in_ten_seconds_under_load(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.write_text("v0")
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "CODE_FILE": str(code)})
    load = _Load(server)
    try:
        for i in range(1, 21):
            code.write_text("v%d" % i)
            server.signal(signal.SIGHUP)
            time.sleep(0.5)  # the pace of the HUPs, not a wait for an outcome
        server.wait_for_log(r"Handling signal: hup", count=20, timeout=60)
        wait_for(lambda: load.versions(10) == ["v20"] * 10, 60, "the last code to serve")
        wait_for(lambda: len(server.worker_pids()) == 2, 30, "two workers")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert server.exited() is None
    wait_for(lambda: len(_live_molds(server)) == 1, 10, "one mold alive")
    assert server.stop() == 0, server.log
    assert _live_molds(server) == []


@pytest.mark.slow
def test_ttin_and_ttou_during_a_rollover(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.write_text("v1")
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "CODE_FILE": str(code)})
    load = _Load(server)
    try:
        code.write_text("v2")
        server.signal(signal.SIGHUP)
        # One signal at a time: the kernel merges a signal sent while the same one is pending.
        for sig, seen in ((signal.SIGTTIN, 1), (signal.SIGTTIN, 2), (signal.SIGTTOU, 1)):
            server.signal(sig)
            server.wait_for_log(r"Handling signal: %s" % sig.name[3:].lower(), count=seen)
        wait_for(lambda: load.versions(10) == ["v2"] * 10, 30, "the new code to serve")
        # gunicorn's count: the HUP reset it to 2, then +1 +1 -1.
        wait_for(lambda: len(server.worker_pids()) == 3, 30, "three workers")
        seen = load.answered()
        wait_for(lambda: load.answered() >= seen + 20, 20, "answers after the rollover")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert server.stop() == 0, server.log


MAX_REQUESTS_CONF = '''
import json, os

def post_worker_init(worker):
    with open(os.environ["EVENTS_FILE"], "a") as f:
        f.write(json.dumps({"type": "max_requests", "pid": worker.pid, "value": worker.max_requests}) + "\\n")
'''


def test_a_molds_workers_draw_their_own_max_requests_jitter(server_factory: Callable[..., Server],
                                                             tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text(MAX_REQUESTS_CONF)
    server = server_factory("--workers", "4", "--max-requests", "20", "--max-requests-jitter", "1000",
                            "-c", str(conf), app=APP, workers_ready=4, env=MOLD)
    drawn = server.wait_for_events("max_requests", count=4)
    # gunicorn's jitter, drawn in the master for each worker (one mold's random state would give one draw).
    assert len({e["value"] for e in drawn}) > 1, drawn
    assert all(20 <= e["value"] <= 1020 for e in drawn), drawn
    assert server.stop() == 0, server.log


def test_max_requests_retires_a_molds_worker(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "1", "--max-requests", "3", app=APP, env=MOLD)
    first = int(server.get("/pid")[1])
    for _ in range(3):
        server.get("/pid")
    server.wait_for_log(r"worker %d: retiring \(reason=max_requests\)" % first)
    # Its replacement, forked by the mold, serves (the retiree serves on until then: "at least" 3).
    wait_for(lambda: int(server.get("/pid")[1]) != first, 20, "the replacement to answer")
    server.wait_for_log(r"Worker exiting \(pid: %d\)" % first)
    assert len(_mold_pids(server)) == 1
    assert server.stop() == 0, server.log


HOLD_CONF = '''
import json, os, time

def post_fork(server, worker):
    hold = os.environ["HOLD_FILE"]
    if os.path.exists(hold):
        with open(os.environ["EVENTS_FILE"], "a") as f:
            f.write(json.dumps({"type": "held", "pid": worker.pid}) + "\\n")
        deadline = time.monotonic() + 60
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.02)
'''


def test_a_molds_worker_that_cannot_be_built_says_why_in_the_error_log(server_factory: Callable[..., Server],
                                                                       tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    server = server_factory("--workers", "1", "-k", "tests.apps.broken_worker.BrokenWorker", app=APP,
                            env={**MOLD, "BROKEN_WORKER_FILE": str(broken)})
    broken.touch()
    server.signal(signal.SIGTTIN)
    # In gunicorn's error log, with its traceback: not Python's last-resort handler on
    # stderr (the edgesync logger has no handler before the worker is set up).
    server.wait_for_log(r"\[ERROR\] edgesync: a worker forked by the mold could not be set up")
    assert "RuntimeError: this worker cannot be built" in server.log
    broken.unlink()
    wait_for(lambda: len(server.worker_pids()) == 2, 20, "the second worker, once it can be built")
    assert server.get("/pid")[0] == 200
    assert server.stop() == 0, server.log


SECCOMP_CONF = """
import ctypes, os
# A seccomp filter on the master, inherited by the mold: clone() with CLONE_PARENT fails
# with EPERM, as a container runtime's filter may make it; every other call is allowed.
ARCH, NR = {"x86_64": (0xC000003E, 56), "aarch64": (0xC00000B7, 220)}[os.uname().machine]

class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

def on_starting(server):
    program = (Insn * 8)(
        Insn(0x20, 0, 0, 4),          # the architecture
        Insn(0x15, 0, 4, ARCH),       # another one: allow
        Insn(0x20, 0, 0, 0),          # the system call's number
        Insn(0x15, 0, 2, NR),         # not clone: allow
        Insn(0x20, 0, 0, 16),         # its flags (low 32 bits)
        Insn(0x45, 1, 0, 0x8000),     # CLONE_PARENT: refuse
        Insn(0x06, 0, 0, 0x7FFF0000), # SECCOMP_RET_ALLOW
        Insn(0x06, 0, 0, 0x00050001)) # SECCOMP_RET_ERRNO | EPERM
    prog = Prog(len(program), program)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "seccomp")
"""


def _seccomp_refused() -> str:
    """Why this machine refuses the test's seccomp filter to an unprivileged process ("" if it allows it)."""
    probe = subprocess.run([sys.executable, "-c", SECCOMP_CONF + "\non_starting(None)\n"],
                           capture_output=True, text=True, timeout=60)
    return "" if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not _one_fork_here(), reason="the mold forks in one step only on Linux x86_64/aarch64 with glibc")
def test_a_mold_refused_clone_parent_says_so_in_the_error_log_and_double_forks(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    refused = _seccomp_refused()
    if refused:
        pytest.skip("this machine refuses an unprivileged seccomp filter: %s" % refused)
    conf = tmp_path / "conf.py"
    conf.write_text(SECCOMP_CONF)
    server = server_factory("--workers", "2", "-c", str(conf), app=APP, workers_ready=2, env=MOLD)
    # gunicorn's error log format: the warning went through the master's logger, not
    # Python's last-resort handler on stderr (which prints the bare message).
    pattern = (r"\[WARNING\] edgesync: mold (\d+): clone\(CLONE_PARENT\): Operation not permitted; "
               r"forking each worker through an intermediate process")
    server.wait_for_log(pattern)
    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.worker_pids()) == 3, 20, "the third worker")
    assert server.proc is not None
    for pid in server.worker_pids():
        assert _ppid(pid) == server.proc.pid  # through an intermediate, still the master's children
    assert len(re.findall(pattern, server.log)) == 1, server.log  # once, not at every birth
    assert server.get("/pid")[0] == 200
    assert server.stop() == 0, server.log


@pytest.mark.slow
def test_a_worker_killed_while_the_mold_forks_it_is_replaced(server_factory: Callable[..., Server],
                                                               tmp_path: Path) -> None:
    conf, hold = tmp_path / "conf.py", tmp_path / "hold"
    conf.write_text(HOLD_CONF)
    server = server_factory("--workers", "2", "-c", str(conf), app=APP, workers_ready=2,
                            env={**MOLD, "HOLD_FILE": str(hold)})
    load = _Load(server)
    try:
        hold.touch()
        server.signal(signal.SIGTTIN)
        [held] = server.wait_for_events("held")
        assert server.proc is not None and _ppid(held["pid"]) == server.proc.pid  # the master's child already
        os.kill(held["pid"], signal.SIGKILL)
        server.wait_for_log(r"Worker \(pid:%d\) was sent SIGKILL" % held["pid"])
        hold.unlink()
        wait_for(lambda: len(server.worker_pids()) == 3, 20, "its replacement")
        seen = load.answered()
        wait_for(lambda: load.answered() >= seen + 20, 20, "answers after the kill")
    finally:
        load.stop()
    assert load.errors == [], load.errors
    assert server.exited() is None
    assert server.stop() == 0, server.log


def test_a_wait_until_at_import_is_refused_in_the_mold_and_the_workers_import_the_app(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "WAIT_UNTIL_AT_IMPORT": "1"})
    # One warning naming the call, not an error with a traceback: the app is fine without a mold.
    server.wait_for_log(r"the app's import calls edgesync.wait_until \(\S*tests/apps/births.py:\d+\), which the "
                        r"mold refuses.*@edgesync.after_fork")
    assert server.get("/pid")[0] == 200  # gunicorn's births: each worker imported the app, wait_until and all
    server.signal(signal.SIGTTIN)  # a later birth does not try another mold
    wait_for(lambda: len(server.worker_pids()) == 3, 20, "the third worker")
    assert server.log.count("calls edgesync.wait_until") == 1 and "Traceback" not in server.log, server.log
    assert _mold_pids(server) == []
    assert server.stop() == 0, server.log


ONESHOT_APP = '''
VERSION = "%s"


def app(environ, start_response):
    body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.slow
def test_oneshot_with_a_mold_serves_the_source_on_disk(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app="oneshot_app:app", start=False,
                            env={**MOLD, "EDGESYNC_POLICY": "oneshot"})
    src = server.workdir / "oneshot_app.py"
    src.write_text(ONESHOT_APP % "v1")
    server.start(workers_ready=2)
    assert server.get("/")[1] == b"v1"
    src.write_text(ONESHOT_APP % "v2")
    # The instances forked before the edit serve their one request each; then the new code.
    wait_for(lambda: server.get("/")[1] == b"v2", 20, "the edited code to serve")
    server.wait_for_log(r"the app's source changed: mold \d+ ready for a new generation")
    src.write_text("raise RuntimeError('a broken edit')\n")
    answers = [server.get("/")[1] for _ in range(6)]
    assert answers == [b"v2"] * 6, answers  # the old code serves on
    server.wait_for_log(r"the changed source's mold could not import the app")
    assert server.log.count("RuntimeError: a broken edit") == 1  # refused once, not at every birth
    src.write_text(ONESHOT_APP % "v3")
    wait_for(lambda: server.get("/")[1] == b"v3", 20, "the fixed code to serve")
    assert server.exited() is None
    assert server.stop() == 0, server.log


@pytest.mark.slow
def test_a_mold_imports_the_standard_library_modules_its_workers_imported(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "EDGESYNC_POLICY": "oneshot"})
    answers = [server.get("/lazy_import")[1].decode().split()[0]]
    assert answers == ["imported"]  # nothing had it: the first instance imports it itself
    # It reports colorsys at its exit, and the mold imports it: the instances forked before
    # that import it themselves, every instance forked after has it.
    wait_for(lambda: answers.append(server.get("/lazy_import")[1].decode().split()[0]) or
             answers[-5:] == ["had"] * 5, 20, "five instances in a row forked with colorsys imported")
    assert server.exited() is None
    assert server.stop() == 0, server.log


def test_only_the_standard_librarys_own_modules_are_reported_to_the_mold(tmp_path: Path) -> None:
    import colorsys
    import importlib.util

    from edgesync import _mold

    # An app module that takes a standard-library name: its import may open what workers must not share.
    (tmp_path / "colorsys.py").write_text("OPENED = True\n")
    spec = importlib.util.spec_from_file_location("colorsys", tmp_path / "colorsys.py")
    assert spec is not None and spec.loader is not None
    shadow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shadow)
    assert _mold._stdlib("colorsys", colorsys)
    assert not _mold._stdlib("colorsys", shadow)
    assert _mold._stdlib("_socket", sys.modules["_socket"])  # built into the interpreter, or in lib-dynload
    assert not _mold._stdlib("pytest", pytest)
    assert not _mold._stdlib("this", types.ModuleType("this"))  # prints the Zen at import


@pytest.mark.slow
def test_without_a_mold_no_worker_learns_from_another(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={"EDGESYNC_MOLD": "false", "EDGESYNC_POLICY": "oneshot"})
    answers = [server.get("/lazy_import")[1].decode().split()[0] for _ in range(8)]
    assert answers == ["imported"] * 8
    assert server.stop() == 0, server.log


def test_with_reload_the_workers_import_the_app_themselves(server_factory: Callable[..., Server]) -> None:
    # gunicorn's --reload: each worker watches the files it imported; a mold's workers imported none.
    server = server_factory("--workers", "1", "--reload", app=APP, env=MOLD)
    server.wait_for_log(r"workers are forked by the master, not by a mold \(--reload")
    assert _mold_pids(server) == []
    assert server.get("/pid")[0] == 200
    assert server.stop() == 0, server.log


# -- the mold's rehearsal ----------------------------------------------------------------


def test_the_rehearsal_answers_its_own_app_and_runs_no_server_hook() -> None:
    from gunicorn.config import Config

    from edgesync._gunicorn import child

    hooked: List[str] = []
    cfg = Config()
    cfg.set("pre_request", lambda worker, req: hooked.append("pre_request"))
    cfg.set("post_request", lambda worker, req, environ, resp: hooked.append("post_request"))
    answer = child.rehearse(cfg, times=3)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer
    assert hooked == []
    cfg.set("limit_request_line", 20)  # shorter than the rehearsal's request line: gunicorn refuses it
    with pytest.raises(Exception, match=r"Request Line is too large"):
        child.rehearse(cfg)


HOOK_CONF = """
import os
def pre_request(worker, req):
    with open(os.environ["HOOK_FILE"], "a") as f:
        f.write(req.path + "\\n")
"""


@pytest.mark.parametrize("preload", [False, True], ids=["mold", "mold-preload"])
def test_the_molds_rehearsal_reaches_neither_the_app_nor_the_hooks_and_a_refused_one_only_costs_warmth(
        server_factory: Callable[..., Server], tmp_path: Path, preload: bool) -> None:
    conf, hooked = tmp_path / "conf.py", tmp_path / "hooked"
    conf.write_text(HOOK_CONF)
    preloading = ["--preload"] if preload else []
    env = {**MOLD, "HOOK_FILE": str(hooked)}
    server = server_factory("--workers", "2", "-c", str(conf), *preloading, app=APP, workers_ready=2, env=env)
    seen = {pid: answer["seen"] for pid, answer in _every_workers_answer(server, "/seen").items()}
    # What the app saw in each worker, and inherited from the mold (the master with
    # --preload), and what pre_request saw: the warm-up's /pid, the harness's and this
    # test's requests; never the rehearsal's /edgesync-rehearsal.
    assert all(set(paths) <= {"/pid", "/seen"} for paths in seen.values()), seen
    assert set(hooked.read_text().split()) <= {"/pid", "/seen"}
    assert "no rehearsed request" not in server.log
    assert server.stop() == 0, server.log
    # A configuration that refuses the rehearsal's request (its line is 39 bytes): the
    # mold says so and its workers serve.
    refused = server_factory("--workers", "2", "--limit-request-line", "36", *preloading, app=APP,
                             workers_ready=2, env=MOLD)
    refused.wait_for_log(r"edgesync: mold \d+: no rehearsed request \(LimitRequestLine: Request Line is too "
                         r"large \(39 > 36\)\); each worker warms gunicorn's request code itself")
    assert "each worker forked" in refused.log  # the generation is ready all the same
    assert refused.get("/pid")[0] == 200
    assert refused.stop() == 0, refused.log


# -- the app's birth hooks: warm_up and after_fork ------------------------------------


def test_the_birth_hooks_run_nothing_outside_gunicorn_and_refuse_what_they_cannot_call() -> None:
    calls: List[str] = []

    def warm() -> None:
        calls.append("warm_up")

    def fork() -> None:
        calls.append("after_fork")
    assert edgesync.warm_up(warm) is warm and edgesync.after_fork(fork) is fork  # decorators
    assert calls == []  # no gunicorn here: nothing is forked, nothing runs
    with pytest.raises(TypeError, match=r"edgesync.warm_up\(\) takes a function called with no argument, got 42"):
        edgesync.warm_up(42)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"edgesync.after_fork\(\) takes a function .*got 'x'.*@edgesync.after_fork"):
        edgesync.after_fork("x")  # type: ignore[type-var]


def _every_workers_answer(server: Server, path: str) -> Dict[int, Dict[str, Any]]:
    """The JSON each live worker answers on ``path`` (which names its ``pid``), by pid."""
    seen: Dict[int, Dict[str, Any]] = {}

    def all_of_them() -> bool:
        answer = json.loads(server.get(path)[1])
        seen[answer["pid"]] = answer
        return set(seen) >= set(server.worker_pids())
    wait_for(all_of_them, 20, "an answer from every worker")
    return seen


@pytest.mark.parametrize(("mold", "preload"), [("true", False), ("true", True), ("false", True), ("false", False)],
                         ids=["mold", "mold-preload", "preload", "imports-the-app"])
def test_the_warm_up_runs_once_where_the_app_was_imported_and_after_fork_in_each_worker(
        server_factory: Callable[..., Server], mold: str, preload: bool) -> None:
    server = server_factory("--workers", "2", *(["--preload"] if preload else []), app=APP, workers_ready=2,
                            env={"EDGESYNC_MOLD": mold})
    assert server.proc is not None
    molds = _mold_pids(server)
    assert len(molds) == (1 if mold == "true" else 0)
    for pid, hooks in _every_workers_answer(server, "/hooks").items():
        # What the import opened was reopened in the worker by its after-fork function.
        assert hooks["connection_opened_in"] == pid, hooks
        # The warm-up ran once, in the process that imported the app, and its request went through the app.
        warmed_by = server.proc.pid if preload else molds[0] if molds else pid
        assert hooks["warmed_by"] == warmed_by and hooks["warm_ups"] == 1, (hooks, warmed_by, molds)
        assert hooks["warm_up_answer"] == str(warmed_by)
    # The app's objects are immortal in a mold's workers, where this Python has immortal objects (_heap).
    immortal = bool(molds) and _heap.unsupported() is None
    assert {w["immortal"] for w in _every_workers_answer(server, "/immortal").values()} == {immortal}
    if molds:
        # One fork per worker (clone(CLONE_PARENT)), not a double fork, where the machine allows it.
        assert re.search(r"mold %d ready for the first generation \(imported in [\d.]+s, warmed up in [\d.]+s; %s%s\)"
                         % (molds[0], r"\d+ objects made immortal in [\d.]+s; " if immortal else "",
                            "each worker forked in one step" if _one_fork_here() else "each worker forked through"),
                         server.log), server.log
    assert server.stop() == 0, server.log


def test_the_mold_leaves_its_heap_mortal_when_told(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "2", app=APP, workers_ready=2,
                            env={**MOLD, "EDGESYNC_MOLD_IMMORTAL_HEAP": "false"})
    assert len(_mold_pids(server)) == 1
    assert {w["immortal"] for w in _every_workers_answer(server, "/immortal").values()} == {False}
    assert "made immortal" not in server.log
    assert server.stop() == 0, server.log


HEAP_PROBE = """
import ctypes, gc, json, sys
from edgesync import _heap
kept = {"kept": ["by", "the", "heap"]}
done = _heap.freeze(sys.argv[1] == "1")
before = sys.getrefcount(kept)
held = [kept] * 10
print(json.dumps({"done": done, "unsupported": _heap.unsupported(),
                  "immortal": ctypes.c_int32.from_address(id(kept)).value < 0,
                  "inner_immortal": ctypes.c_int32.from_address(id(kept["kept"][2])).value < 0,
                  "counted": sys.getrefcount(kept) - before, "frozen": gc.get_freeze_count() > 0}))
"""


@pytest.mark.parametrize("immortal", [True, False])
def test_freezing_the_heap_makes_its_objects_immortal_where_python_can(tmp_path: Path, immortal: bool) -> None:
    # In a process of its own: an immortal object is never freed.
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, "1" if immortal else "0"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    got = json.loads(out)
    assert got["frozen"]
    supported = sys.version_info >= (3, 12) and not sysconfig.get_config_var("Py_GIL_DISABLED")
    assert got["unsupported"] is None if supported else "3.12+" in got["unsupported"], got
    if immortal and supported:
        assert re.fullmatch(r"\d+ objects made immortal in [\d.]+s", got["done"]), got
        assert got["immortal"] and got["inner_immortal"], got  # and what it holds, strings included
        assert got["counted"] == 0, got  # ten more references, and its count did not move
    else:
        assert got["done"] == "" and not got["immortal"] and got["counted"] == 10, got


@pytest.mark.slow
def test_a_new_generation_whose_warm_up_raises_is_refused(server_factory: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    server = server_factory("--workers", "2", app=APP, workers_ready=2, env={**MOLD, "WARM_UP_FAIL_FILE": str(fail)})
    [first] = _mold_pids(server)
    fail.touch()
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"the new code's mold could not import the app .*this generation is refused")
    wait_for(lambda: len(re.findall(r"Booting worker with pid", server.log)) >= 4, 20, "the HUP's workers")
    # The HUP's workers come from the first generation's mold, warmed by it.
    assert {h["warmed_by"] for h in _every_workers_answer(server, "/hooks").values()} == {first}
    assert server.log.count("RuntimeError: the warm-up fails on purpose") == 1, server.log
    fail.unlink()
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"edgesync: mold \d+ ready for a new generation")
    second = _mold_pids(server)[-1]
    wait_for(lambda: {h["warmed_by"] for h in _every_workers_answer(server, "/hooks").values()} == {second}, 20,
             "the second generation to serve")
    assert server.exited() is None and "Worker failed to boot" not in server.log
    assert server.stop() == 0, server.log
