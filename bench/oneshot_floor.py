"""The floor of oneshot on this machine: what one forked instance per request costs with no server around it.

    python bench/oneshot_floor.py [--seconds 4] [--rounds 3] [--connections 4] [--no-pin]

One process imports the bench Flask app, passes ``/hello`` through it once (so the
forks start warm, as a mold with the app's warm-up does), runs ``gc.collect();
gc.freeze()`` and listens on 127.0.0.1. It then serves ``/hello`` two ways, each
loaded by wrk for ``--seconds``:

- ``persistent``: the process accepts each connection and answers it itself: the
  CPU of a request to a warm worker, with nothing but the app and a minimal HTTP
  read and write (``Connection: close``);
- ``fork``: for each connection it forks a child that accepts it, answers it the
  same way and ends with ``os._exit``, and waits for that child before forking the
  next: one instance per request, with nothing edgesync or gunicorn do (no thread,
  no log line, no heartbeat file, no double fork, no drain).

Prints, per mode, req/s and the process's CPU per request (its own and its reaped
children's, from ``getrusage``; for ``fork``, also each child's minor page faults),
then the floor ratio persistent CPU / fork CPU: the req/s ratio oneshot / per_worker
cannot exceed on a CPU-bound machine, whatever a server does around the fork. The
server is pinned to core 0 and wrk to core 1.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import WRK, median, parse_wrk  # noqa: E402

RESPONSE_HEAD = "HTTP/1.1 %s\r\nConnection: close\r\n%s\r\n\r\n"


def _handle(conn: socket.socket, app: Any, port: int) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    method, target, protocol = line.split(" ", 2)
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": str(port), "SERVER_PROTOCOL": protocol, "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
               "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0)}
    started: List[Tuple[str, List[Tuple[str, str]]]] = []

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started.append((status, headers))
        return lambda b: None

    body = b"".join(app(environ, start_response))
    status, headers = started[0]
    head = RESPONSE_HEAD % (status, "\r\n".join("%s: %s" % h for h in headers))
    conn.sendall(head.encode("latin-1") + body)
    conn.close()


def _serve(mode: str, app: Any, listener: socket.socket, port: int, until: float) -> int:
    """Serve until no connection came for 0.3 s after ``until`` (wrk's end)."""
    served = 0
    while True:
        if not select.select([listener], [], [], 0.3)[0]:
            if time.monotonic() >= until:
                return served
            continue
        if mode == "persistent":
            conn, _ = listener.accept()
            _handle(conn, app, port)
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    conn, _ = listener.accept()
                    _handle(conn, app, port)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        served += 1


def _usage() -> Tuple[float, int]:
    """CPU seconds of this process and its reaped children, and the children's minor page faults."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, kids.ru_minflt


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python bench/oneshot_floor.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--no-pin", action="store_true")
    a = p.parse_args(argv)
    client: Optional[int] = None if a.no_pin else 1
    if not a.no_pin:
        os.sched_setaffinity(0, {0})
    from bench.apps.flask_app import app

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    # Warm, then freeze: as the mold does before its first fork.
    local = socket.socket()
    local.connect(("127.0.0.1", port))
    local.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = listener.accept()
    _handle(conn, app, port)
    local.close()
    gc.collect()
    gc.freeze()
    cpu_per: dict[str, List[float]] = {"persistent": [], "fork": []}
    rps: dict[str, List[float]] = {"persistent": [], "fork": []}
    for r in range(a.rounds):
        for mode in (("persistent", "fork") if r % 2 == 0 else ("fork", "persistent")):
            cmd = [WRK, "-t1", "-c%d" % a.connections, "-d%ds" % max(1, round(a.seconds)), "--timeout", "5s",
                   "http://127.0.0.1:%d/hello" % port]
            if client is not None:
                cmd = ["taskset", "-c", str(client)] + cmd
            wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            cpu_before, faults_before = _usage()
            served = _serve(mode, app, listener, port, time.monotonic() + a.seconds)
            cpu_after, faults_after = _usage()
            spent, faults = cpu_after - cpu_before, faults_after - faults_before
            out, _ = wrk.communicate(timeout=a.seconds + 30)
            res = parse_wrk(out.decode(errors="replace"))
            cpu_per[mode].append(1000 * spent / max(1, served))
            rps[mode].append(res.rps)
            print("round %d %s: %.0f req/s, %.3f ms of CPU per request%s (%d served, %d failed)"
                  % (r + 1, mode, res.rps, cpu_per[mode][-1],
                     ", %d page faults per child" % (faults // max(1, served)) if mode == "fork" else "",
                     served, res.failed), flush=True)
        # The wrk of the last mode leaves connections in the backlog: drain them.
        listener.setblocking(False)
        try:
            while True:
                listener.accept()[0].close()
        except BlockingIOError:
            pass
        listener.setblocking(True)
    pw, fk = median(cpu_per["persistent"]), median(cpu_per["fork"])
    print("median CPU per request: persistent %.3f ms, fork %.3f ms; floor ratio persistent / fork %.4fx; "
          "req/s fork / persistent %.4fx" % (pw, fk, pw / fk, median(rps["fork"]) / median(rps["persistent"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
