"""Births, measured side by side: what a worker's birth costs the server.

    python bench/births.py oneshot [--rounds 5] [--seconds 5] [--workers 2] [--connections 8] [--no-pin]
    python bench/births.py boot [--births 20] [--workers 2]

``oneshot``: three servers of the bench Flask app, loaded at once by their own wrk
(each round starts a different one first): edgesync ``policy = "oneshot"``; the same
with gunicorn's own ``spawn_workers`` (its random sleep after each fork: the births
of before); and edgesync ``per_worker``. Prints per round and the medians of the
ratios oneshot / per_worker and oneshot / oneshot-with-the-sleep, the failed
requests (non-2xx and socket errors), and the births each oneshot server made.

``boot``: the CPU each new worker spent from its fork to serving (its serving
line, ``runtime_metrics()["boot_cpu_s"]``), without and with ``--preload``, over
``--births`` births each (oneshot servers, one request per birth). Medians.

The servers are pinned to core 0 and wrk to core 1 (``--no-pin``: no pinning, e.g. on
a many-core machine). On a loaded machine, quote medians of several rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import Load, Server, cleanup, median, side_by_side, wait_for  # noqa: E402

ES = "edgesync.Worker"
SLEEP_CONF = str(REPO / "bench" / "apps" / "spawn_sleep_conf.py")
QUIET = {"EDGESYNC_REQUEST_IDLE_TIMEOUT_MS": "0"}


def _births(server: Server) -> int:
    return server.count(r"Booting worker with pid")


def oneshot(a: argparse.Namespace, logdir: Path) -> int:
    cpu: Optional[int] = None if a.no_pin else 0
    client: Optional[int] = None if a.no_pin else 1
    one = {**QUIET, "EDGESYNC_POLICY": "oneshot"}
    servers = [Server("oneshot", ES, logdir, workers=a.workers, env=one, cpu=cpu),
               Server("oneshot-spawn-sleep", ES, logdir, workers=a.workers, env=one, cpu=cpu,
                      args=["-c", SLEEP_CONF]),
               Server("per_worker", ES, logdir, workers=a.workers, env=QUIET, cpu=cpu)]
    try:
        for s in servers:
            s.start()
        loads = [Load(s.name, s, "/hello") for s in servers]
        side_by_side(loads, 1, a.connections, client)  # warm-up
        vs_pw: List[float] = []
        vs_sleep: List[float] = []
        failed = [0, 0, 0]
        for r in range(a.rounds):
            before = [_births(s) for s in servers]
            res = side_by_side(loads, a.seconds, a.connections, client, first=r % len(loads))
            births = [_births(s) - b for s, b in zip(servers, before, strict=True)]
            for i, x in enumerate(res):
                failed[i] += x.failed
            vs_pw.append(res[0].rps / res[2].rps)
            vs_sleep.append(res[0].rps / res[1].rps)
            print("round %d: %s" % (r + 1, " | ".join("%s: %s, %d births" % (s.name, x.brief(), n)
                                                      for s, x, n in zip(servers, res, births, strict=True))))
        print("median oneshot / per_worker req/s: %.4fx (rounds %s)" % (median(vs_pw), _fmt(vs_pw)))
        print("median oneshot / oneshot with gunicorn's spawn sleep req/s: %.2fx (rounds %s)"
              % (median(vs_sleep), _fmt(vs_sleep)))
        print("failed requests: %s" % ", ".join("%s %d" % (s.name, f) for s, f in zip(servers, failed, strict=True)))
        return 0
    finally:
        for s in servers:
            s.stop()


def boot(a: argparse.Namespace, logdir: Path) -> int:
    cpu: Optional[int] = None if a.no_pin else 0
    one = {**QUIET, "EDGESYNC_POLICY": "oneshot"}
    rows = []
    for preload in (False, True):
        name = "preload" if preload else "import-in-worker"
        s = Server(name, ES, logdir, workers=a.workers, env=one, cpu=cpu, args=["--preload"] if preload else [])
        try:
            s.start()
            since = len(s.log)
            while len(s.boot_cpu_ms(since)) < a.births:
                s.get("/hello")
            wait_for(lambda s=s, since=since: len(s.boot_cpu_ms(since)) >= a.births, 30, "the births")
            ms = s.boot_cpu_ms(since)
            rows.append((name, median([float(x) for x in ms]), len(ms)))
        finally:
            s.stop()
    for name, ms_med, n in rows:
        print("boot CPU of a new worker, %s: median %.0f ms over %d births" % (name, ms_med, n))
    return 0


def _fmt(values: List[float]) -> str:
    return ", ".join("%.4f" % v for v in values)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python bench/births.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("oneshot", "boot"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--births", type=int, default=20)
    p.add_argument("--no-pin", action="store_true")
    a = p.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgesync-births-") as tmp:
        try:
            rc = (oneshot if a.what == "oneshot" else boot)(a, Path(tmp))
        finally:
            cleanup()
    print("(%s took %.0fs)" % (a.what, time.monotonic() - started))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
