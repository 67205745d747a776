"""``clone(CLONE_PARENT)`` as the mold's fork (edgesync._fork), in a process of its own: the child is its
grandparent's child, and glibc and Python in it know who they are."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="clone(2) is Linux's")

# P forks C with os.fork(); C forks G with fork_sibling(): G must be P's child, with its own
# thread id where glibc keeps it, so that the main thread's CPU clock (read from another
# thread, as the limits monitor reads a request thread's) is G's own.
SCRIPT = textwrap.dedent(r"""
    import json, os, ssl, sys, threading, time
    from edgesync import _fork

    def report(fd, **kw):
        os.write(fd, json.dumps(kw).encode() + b"\n")

    def in_g(fd):
        field = __import__("ctypes").c_int32.from_address(_fork._tid_offset).value
        clock = {}
        def read_main_clock():
            try:
                cid = time.pthread_getcpuclockid(threading.main_thread().ident)
                clock["cpu"] = time.clock_gettime(cid)
            except OSError as exc:
                clock["error"] = str(exc)
        t = threading.Thread(target=read_main_clock)
        t.start()
        t.join()
        report(fd, ppid=os.getppid(), pid=os.getpid(), tid=threading.get_native_id(), field=field, clock=clock,
               drawn=ssl.RAND_bytes(16).hex())

    p = os.getpid()
    r, w = os.pipe()
    c = os.fork()
    if c == 0:
        why = _fork.probe()
        if why is not None:
            report(w, why=why)
            os._exit(0)
        ssl.RAND_bytes(16)  # OpenSSL's generator seeded before the forks, as an app's import may do
        for _ in range(2):
            g = _fork.fork_sibling()
            if g == 0:
                in_g(w)
                os._exit(7)
        # A second thread: fork_sibling declines, and does nothing.
        stop = threading.Event()
        threading.Thread(target=stop.wait).start()
        declined = _fork.fork_sibling()
        stop.set()
        report(w, g=g, declined=declined)
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(c, 0)
    out = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    # G is P's child: P reaps it.
    reaped = []
    for _ in range(100):
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            reaped.append([pid, os.waitstatus_to_exitcode(st)])
            continue
        time.sleep(0.05)
    print(json.dumps({"p": p, "c": c, "c_status": status, "out": out.decode(), "reaped": reaped}))
""")


def test_the_child_of_fork_sibling_is_its_grandparents_child_and_knows_its_thread_id() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    reports = [json.loads(line) for line in res["out"].splitlines()]
    if len(reports) == 1 and "why" in reports[0]:
        pytest.skip("clone(CLONE_PARENT) not available here: %s" % reports[0]["why"])
    g_reports = [r for r in reports if "ppid" in r]
    c_report = next(r for r in reports if "g" in r)
    assert len(g_reports) == 2, reports
    for g_report in g_reports:
        assert g_report["ppid"] == res["p"], (g_report, res)  # the grandparent's child, not C's
        assert g_report["tid"] == g_report["pid"] == g_report["field"], g_report
        assert "cpu" in g_report["clock"] and g_report["clock"]["cpu"] < 5.0, g_report
        # P reaped G (exit 7): the exit went to G's parent, P.
        assert [g_report["pid"], 7] in res["reaped"], res
    # No pthread_atfork handler ran, and OpenSSL still reseeded in each child (it tells a fork by its pid).
    assert g_reports[0]["drawn"] != g_reports[1]["drawn"], g_reports
    assert c_report["g"] in [r["pid"] for r in g_reports] and c_report["declined"] is None, c_report
