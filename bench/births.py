"""Births, measured side by side: what a worker's birth costs the server.

    python bench/births.py oneshot [--rounds 5] [--seconds 5] [--workers 2] [--connections 8] [--pair] [--no-pin]
                                   [--against KEY=VALUE] [--floor]
    python bench/births.py boot [--births 20] [--workers 2]
    python bench/births.py recycling [--rounds 5] [--seconds 10] [--workers 2] [--preload-only] [--pair]
                                     [--wall-clock-ms 4000] [--against KEY=VALUE]
    python bench/births.py memory [--rounds 3] [--requests 1000] [--against KEY=VALUE]
    python bench/births.py warmup [--rounds 5] [--seconds 5] [--workers 2] [--connections 8] [--no-pin]
    python bench/births.py picture [--seconds 12] [--workers 2] [--connections 8] [--no-pin]
    python bench/births.py perbirth [--rounds 5] [--requests 200] [--workers 2] [--no-pin] [--against KEY=VALUE]
                                    [--floor]

``oneshot``: four servers of the bench Flask app, loaded at once by their own wrk
(each round starts a different one first): edgesync ``policy = "oneshot"`` with the
mold; oneshot as before (no mold, gunicorn's own ``spawn_workers`` with its random sleep
after each fork); edgesync ``per_worker``; and oneshot with the mold but gunicorn's
sleep. Prints per round and the medians of the ratios oneshot / per_worker, mold /
before, mold / mold-with-the-sleep, each server's CPU per request (its master, workers
and mold: a CPU-bound oneshot server's req/s ratio is about the inverse ratio of
these), the failed requests (non-2xx and socket errors), and the births each oneshot
server made. ``--pair``: oneshot with the mold and ``per_worker`` only, two servers sharing
the core instead of four (the issue's own comparison).

``boot``: the CPU each new worker spent from its fork to serving (its serving
line, ``runtime_metrics()["boot_cpu_s"]``): the worker imports the app, the master did
(``--preload``), a mold did, a mold forked from a preloading master; over ``--births``
births each (oneshot servers, one request per birth). Medians.

``recycling``: four servers at once, 2 workers each: steady (wall clock off),
recycling (``wall_clock_limit_ms = 4000``, ``--wall-clock-ms``) with births as gunicorn's,
recycling with the mold, and the same with the bench app's warm-up (``BENCH_WARM_UP=1``);
the medians of recycling / steady req/s and p99; then the same four with
``--preload``. ``--pair``: steady and the mold's recycling only, two servers sharing the
core instead of four (a birth then weighs on a server with half the core, not a quarter).

``warmup``: three servers loaded at once: oneshot with the mold, the same with the bench
app's ``edgesync.warm_up`` function (``BENCH_WARM_UP=1``: ``/hello`` and ``/pid`` passed
through the app in the mold), and ``per_worker``; the medians of warm / plain and of each
oneshot / per_worker req/s, and each oneshot server's CPU per birth (its master, its
workers live or reaped, its mold and the mold's children, over the births of the rounds).

``picture``: two recycling servers (``wall_clock_limit_ms = 4000``) loaded at once,
every request timed (bench/trace.py): births as gunicorn's (``mold = false``, before)
and with the mold (after); drawn to docs/img/births-recycling.png with each worker's
fork and exit marked (a retire forks the replacement first, so the fork is the retire's
moment), and a line per server with its p50, p99, max and errors.

``perbirth``: where a oneshot birth's CPU goes, per process, with nothing running inside
the server: a oneshot server (the mold on, no ``--preload``) answers ``--requests``
sequential requests, one birth each, and ``/proc/<pid>/stat`` of its master and of its
mold give the CPU and minor page faults per birth of the master, the workers (the
master's reaped children), the mold and the double fork's intermediates (the mold's
reaped children). One server per round; medians.

``--against KEY=VALUE`` (``oneshot``, ``recycling``, ``perbirth``, ``memory``): the mold's
births also with this edgesync setting (``mold_immortal_heap=false``): one more server
side by side (``oneshot``, ``recycling``), rounds alternating with the default's
(``perbirth``), one more pair of servers (``memory``), and their ratios.

``--floor`` (``oneshot``, ``perbirth``): also births of ``bench/apps/floor_worker.py``'s
worker, which the same master and mold fork but which only serves its one request (on
the main thread, through gunicorn's parser and the app, then exits): the floor of a
oneshot birth on this machine while gunicorn's arbiter reaps, counts and signals every
instance. One more server side by side (``oneshot``: floor / per_worker, oneshot /
floor), rounds alternating (``perbirth``).

The servers are pinned to core 0 and wrk to core 1 (``--no-pin``: no pinning, e.g. on
a many-core machine). On a loaded machine, quote medians of several rounds.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    Load,
    Server,
    Traced,
    WrkResult,
    cleanup,
    median,
    proc_stat,
    recycling_picture,
    side_by_side,
)

ES = "edgesync.Worker"
SLEEP_CONF = str(REPO / "bench" / "apps" / "spawn_sleep_conf.py")
FLOOR = "bench.apps.floor_worker.FloorWorker"
QUIET = {"EDGESYNC_REQUEST_IDLE_TIMEOUT_MS": "0"}


def _births(server: Server) -> int:
    return server.count(r"Booting worker with pid")


def _round(servers: List[Server], loads: List[Load], a: argparse.Namespace, client: Optional[int], first: int,
           cpu_ms: List[List[float]]) -> List[WrkResult]:
    """One round of ``side_by_side``; appends each server's CPU per request over it (ms) to ``cpu_ms``."""
    before = [s.cpu_seconds() for s in servers]
    res = side_by_side(loads, a.seconds, a.connections, client, first=first)
    for spent, s, b, x in zip(cpu_ms, servers, before, res, strict=True):
        spent.append(1000 * (s.cpu_seconds() - b) / max(1, x.requests))
    return res


def _cpu_line(servers: List[Server], cpu_ms: List[List[float]], tag: str = "") -> str:
    return "median server CPU per request%s (master, workers, mold): %s" % (tag, ", ".join(
        "%s %.3f ms" % (s.name, median(c)) for s, c in zip(servers, cpu_ms, strict=True)))


def oneshot(a: argparse.Namespace, logdir: Path) -> int:
    cpu: Optional[int] = None if a.no_pin else 0
    client: Optional[int] = None if a.no_pin else 1
    one = {**QUIET, "EDGESYNC_POLICY": "oneshot"}
    mold = {**one, "EDGESYNC_MOLD": "true"}
    servers = [Server("oneshot-mold", ES, logdir, workers=a.workers, env=mold, cpu=cpu),
               Server("per_worker", ES, logdir, workers=a.workers, env=QUIET, cpu=cpu)]
    ratios = {"oneshot (mold) / per_worker": (0, 1)}  # name -> indices of its two servers
    if not a.pair:
        servers += [Server("oneshot-before", ES, logdir, workers=a.workers, env={**one, "EDGESYNC_MOLD": "false"},
                           cpu=cpu, args=["-c", SLEEP_CONF]),
                    Server("oneshot-mold-spawn-sleep", ES, logdir, workers=a.workers, env=mold, cpu=cpu,
                           args=["-c", SLEEP_CONF])]
        ratios.update({"oneshot (before: no mold, gunicorn's spawn sleep) / per_worker": (2, 1),
                       "oneshot (mold) / oneshot (before)": (0, 2),
                       "oneshot (mold) / oneshot (mold, gunicorn's spawn sleep)": (0, 3)})
    if a.against:
        servers.append(Server("oneshot-mold-against", ES, logdir, workers=a.workers, env={**mold, **a.against},
                              cpu=cpu))
        what = _against(a)
        ratios.update({"oneshot (mold, %s) / per_worker" % what: (len(servers) - 1, 1),
                       "oneshot (mold) / oneshot (mold, %s)" % what: (0, len(servers) - 1)})
    if a.floor:
        servers.append(Server("floor", FLOOR, logdir, workers=a.workers, env=mold, cpu=cpu))
        ratios.update({"floor (an instance that only serves its request) / per_worker": (len(servers) - 1, 1),
                       "oneshot (mold) / floor": (0, len(servers) - 1)})
    try:
        for s in servers:
            s.start()
        loads = [Load(s.name, s, "/hello") for s in servers]
        side_by_side(loads, 1, a.connections, client)  # warm-up
        seen: Dict[str, List[float]] = {name: [] for name in ratios}
        failed = [0] * len(servers)
        cpu_ms: List[List[float]] = [[] for _ in servers]
        for r in range(a.rounds):
            before = [_births(s) for s in servers]
            res = _round(servers, loads, a, client, r % len(loads), cpu_ms)
            births = [_births(s) - b for s, b in zip(servers, before, strict=True)]
            for i, x in enumerate(res):
                failed[i] += x.failed
            for name, (i, j) in ratios.items():
                seen[name].append(res[i].rps / res[j].rps if res[j].rps else float("inf"))
            print("round %d: %s" % (r + 1, " | ".join("%s: %s, %d births" % (s.name, x.brief(), n)
                                                      for s, x, n in zip(servers, res, births, strict=True))))
        for name, values in seen.items():
            print("median %s req/s: %.4fx (rounds %s)" % (name, median(values), _fmt(values)))
        print(_cpu_line(servers, cpu_ms))
        print("failed requests: %s" % ", ".join("%s %d" % (s.name, f) for s, f in zip(servers, failed, strict=True)))
        return 0
    finally:
        for s in servers:
            s.stop()


def perbirth(a: argparse.Namespace, logdir: Path) -> int:
    """Where a oneshot birth's CPU goes, per process, read from /proc: nothing runs inside the server."""
    import os

    cpu: Optional[int] = None if a.no_pin else 0
    tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    variants = ["default"] + ([_against(a)] if a.against else []) + (["floor"] if a.floor else [])
    rows: Dict[str, Dict[str, List[float]]] = {v: {} for v in variants}
    for r in range(a.rounds * len(variants)):
        variant = variants[r % len(variants)]  # alternately, round by round
        s = Server("perbirth-%d" % r, FLOOR if variant == "floor" else ES, logdir, workers=a.workers, env={
            **QUIET, "EDGESYNC_POLICY": "oneshot", **(a.against if variant not in ("default", "floor") else {})},
                   cpu=cpu)
        try:
            s.start()
            for _ in range(20):
                s.get("/hello")
            assert s.proc is not None
            molds = s.mold_pids()
            if not molds:
                raise SystemExit("no mold in %s:\n%s" % (s.name, s.log[-2000:]))
            before = (proc_stat(s.proc.pid), proc_stat(molds[0]), _births(s))
            for _ in range(a.requests):
                s.get("/hello")
            time.sleep(0.5)  # the last instances exit and are reaped
            master, mold, births = proc_stat(s.proc.pid), proc_stat(molds[0]), _births(s) - before[2]
        finally:
            s.stop()
        per = {"master": (master["cpu"] - before[0]["cpu"]) * tick_ms,
               "workers": (master["ccpu"] - before[0]["ccpu"]) * tick_ms,
               "intermediates": (mold["ccpu"] - before[1]["ccpu"]) * tick_ms,
               "mold": (mold["cpu"] - before[1]["cpu"]) * tick_ms}
        per = {k: v / births for k, v in per.items()}
        per["total"] = sum(per.values())
        per["worker faults"] = (master["cminflt"] - before[0]["cminflt"]) / births
        per["intermediate faults"] = (mold["cminflt"] - before[1]["cminflt"]) / births
        per["mold faults"] = (mold["minflt"] - before[1]["minflt"]) / births
        print("round %d, %s (%d births): %s" % (r + 1, variant, births,
                                                ", ".join("%s %.2f" % kv for kv in per.items())), flush=True)
        for k, v in per.items():
            rows[variant].setdefault(k, []).append(v)
    for variant in variants:
        print("median per oneshot birth, %s: %s (ms of CPU; faults: minor page faults)"
              % (variant, ", ".join("%s %.2f" % (k, median(v)) for k, v in rows[variant].items())))
    for variant in variants[1:]:
        print("%s / default, per birth: total CPU %.3fx, worker faults %.3fx" % (
            variant, median(rows[variant]["total"]) / median(rows["default"]["total"]),
            median(rows[variant]["worker faults"]) / median(rows["default"]["worker faults"])))
    return 0


def warmup(a: argparse.Namespace, logdir: Path) -> int:
    cpu: Optional[int] = None if a.no_pin else 0
    client: Optional[int] = None if a.no_pin else 1
    one = {**QUIET, "EDGESYNC_POLICY": "oneshot", "EDGESYNC_MOLD": "true"}
    servers = [Server("oneshot-mold", ES, logdir, workers=a.workers, env=one, cpu=cpu),
               Server("oneshot-mold-warm-up", ES, logdir, workers=a.workers, env={**one, "BENCH_WARM_UP": "1"},
                      cpu=cpu),
               Server("per_worker", ES, logdir, workers=a.workers, env=QUIET, cpu=cpu)]
    try:
        for s in servers:
            s.start()
        loads = [Load(s.name, s, "/hello") for s in servers]
        side_by_side(loads, 1, a.connections, client)  # warm-up of the servers, not the feature
        ratios: List[List[float]] = [[], [], []]
        births = [0, 0]
        cpu_s = [0.0, 0.0]
        failed = [0] * len(servers)
        for r in range(a.rounds):
            before = [_births(s) for s in servers[:2]]
            cpu_before = [s.cpu_seconds() for s in servers[:2]]
            res = side_by_side(loads, a.seconds, a.connections, client, first=r % len(loads))
            for i in (0, 1):
                births[i] += _births(servers[i]) - before[i]
                cpu_s[i] += servers[i].cpu_seconds() - cpu_before[i]
            for i, x in enumerate(res):
                failed[i] += x.failed
            ratios[0].append(res[1].rps / res[0].rps if res[0].rps else float("inf"))
            ratios[1].append(res[0].rps / res[2].rps)
            ratios[2].append(res[1].rps / res[2].rps)
            print("round %d: %s" % (r + 1, " | ".join("%s: %s" % (s.name, x.brief())
                                                      for s, x in zip(servers, res, strict=True))))
        print("median oneshot with warm-up / without req/s: %.2fx (rounds %s)" % (median(ratios[0]), _fmt(ratios[0])))
        print("median oneshot / per_worker req/s: without warm-up %.4fx (%s), with %.4fx (%s)"
              % (median(ratios[1]), _fmt(ratios[1]), median(ratios[2]), _fmt(ratios[2])))
        for i in (0, 1):
            print("%s: %d births, %.1f ms of server CPU per birth (master, workers, mold)"
                  % (servers[i].name, births[i], 1000 * cpu_s[i] / max(1, births[i])))
        print("failed requests: %s" % ", ".join("%s %d" % (s.name, f) for s, f in zip(servers, failed, strict=True)))
        return 0
    finally:
        for s in servers:
            s.stop()


def boot(a: argparse.Namespace, logdir: Path) -> int:
    cpu: Optional[int] = None if a.no_pin else 0
    one = {**QUIET, "EDGESYNC_POLICY": "oneshot"}
    rows = []
    for name, preload, mold in (("import-in-worker", False, "false"), ("preload", True, "false"),
                                ("mold", False, "true"), ("mold + preload", True, "true")):
        s = Server(name.replace(" + ", "-"), ES, logdir, workers=a.workers, env={**one, "EDGESYNC_MOLD": mold},
                   cpu=cpu, args=["--preload"] if preload else [])
        try:
            s.start()
            since = len(s.log)
            while len(s.boot_cpu_ms(since)) < a.births:
                s.get("/hello")
            ms = s.boot_cpu_ms(since)
            rows.append((name, median([float(x) for x in ms]), len(ms)))
        finally:
            s.stop()
    for name, ms_med, n in rows:
        print("boot CPU of a new worker, %s: median %.0f ms over %d births" % (name, ms_med, n))
    return 0


def recycling(a: argparse.Namespace, logdir: Path) -> int:
    """Recycling (wall clock 4 s) / steady, without and with the mold (and its warm-up); then with --preload."""
    cpu: Optional[int] = None if a.no_pin else 0
    client: Optional[int] = None if a.no_pin else 1
    wall = {**QUIET, "EDGESYNC_WALL_CLOCK_LIMIT_MS": str(a.wall_clock_ms)}
    variants: List[List[str]] = ([] if a.preload_only else [[]]) + [["--preload"]]
    for preload in variants:
        tag = " --preload" if preload else ""
        servers = [Server("steady" + tag.replace(" ", ""), ES, logdir, workers=a.workers, cpu=cpu, args=preload,
                          env={**QUIET, "EDGESYNC_WALL_CLOCK_LIMIT_MS": "0"}),
                   Server("recycling" + tag.replace(" ", ""), ES, logdir, workers=a.workers, cpu=cpu, args=preload,
                          env={**wall, "EDGESYNC_MOLD": "false"}),
                   Server("recycling-mold" + tag.replace(" ", ""), ES, logdir, workers=a.workers, cpu=cpu,
                          args=preload, env={**wall, "EDGESYNC_MOLD": "true"}),
                   Server("recycling-mold-warm-up" + tag.replace(" ", ""), ES, logdir, workers=a.workers, cpu=cpu,
                          args=preload, env={**wall, "EDGESYNC_MOLD": "true", "BENCH_WARM_UP": "1"})]
        if a.pair:  # steady and the mold's recycling only: each server has half the core, not a quarter
            servers = [servers[0], servers[2]]
        if a.against:
            servers.append(Server("recycling-mold-against" + tag.replace(" ", ""), ES, logdir, workers=a.workers,
                                  cpu=cpu, args=preload, env={**wall, "EDGESYNC_MOLD": "true", **a.against}))
        try:
            for s in servers:
                s.start()
            loads = [Load(s.name, s, "/hello") for s in servers]
            side_by_side(loads, 1, a.connections, client)  # warm-up
            rows = len(servers) - 1
            rps: List[List[float]] = [[] for _ in range(rows)]
            p99: List[List[float]] = [[] for _ in range(rows)]
            failed = [0] * len(servers)
            cpu_ms: List[List[float]] = [[] for _ in servers]
            for r in range(a.rounds):
                res = _round(servers, loads, a, client, r % len(loads), cpu_ms)
                for i, x in enumerate(res):
                    failed[i] += x.failed
                for i in range(rows):
                    rps[i].append(res[i + 1].rps / res[0].rps)
                    p99[i].append(res[i + 1].p99 / res[0].p99)
                print("round %d%s: %s" % (r + 1, tag, " | ".join("%s: %s" % (s.name, x.brief())
                                                                for s, x in zip(servers, res, strict=True))))
            names = ["recycling (mold)"] if a.pair else ["recycling (no mold)", "recycling (mold)",
                                                         "recycling (mold + warm_up)"]
            names += ["recycling (mold, %s)" % _against(a)] if a.against else []
            for i, name in enumerate(names):
                print("median %s / steady%s: req/s %.3fx (%s), p99 %.2fx (%s)"
                      % (name, tag, median(rps[i]), _fmt(rps[i]), median(p99[i]), _fmt(p99[i])))
            print(_cpu_line(servers, cpu_ms, tag))
            print("failed requests%s: %s" % (tag, ", ".join("%s %d" % (s.name, f)
                                                          for s, f in zip(servers, failed, strict=True))))
            for s in servers[1:]:
                ms = s.boot_cpu_ms()
                print("  %s: %d births, median boot CPU %.0f ms" % (s.name, len(ms), median([float(x) for x in ms])))
        finally:
            for s in servers:
                s.stop()
    return 0


PICTURE = REPO / "docs" / "img" / "births-recycling.png"  # shown by docs/births.md


def picture(a: argparse.Namespace, logdir: Path) -> int:
    """Latency over time of one recycling run, births as gunicorn's against the mold's, forks and exits marked."""
    cpu: Optional[int] = None if a.no_pin else 0
    client: Optional[int] = None if a.no_pin else 1
    wall = {**QUIET, "EDGESYNC_WALL_CLOCK_LIMIT_MS": "4000"}
    before = Server("before", ES, logdir, workers=a.workers, cpu=cpu, env={**wall, "EDGESYNC_MOLD": "false"})
    after = Server("after", ES, logdir, workers=a.workers, cpu=cpu, env={**wall, "EDGESYNC_MOLD": "true"})
    try:
        for s in (before, after):
            s.start()
        side_by_side([Load(s.name, s, "/hello") for s in (before, after)], 1, a.connections, client)  # warm-up
        runs = [Traced("before", before, "before: each worker imports the app (mold = false)", "tab:red"),
                Traced("after", after, "after: each worker forked by the generation's mold", "tab:blue")]
        lines = recycling_picture(runs, "/hello", a.seconds, a.connections, client, logdir, PICTURE,
                                  "Recycling at wall_clock_limit_ms = 4000, %d workers each, both loaded at once "
                                  "(%d connections each), servers on one core of a 2-core machine"
                                  % (a.workers, a.connections))
    finally:
        for s in (before, after):
            s.stop()
    for line in lines:
        print(line)
    print("picture: %s" % PICTURE.relative_to(REPO))
    return 0


def memory(a: argparse.Namespace, logdir: Path) -> int:
    """Private memory (USS) of a worker after ``--requests`` requests: births by the mold or gunicorn's, with and
    without --preload (one worker per server, servers one after the other)."""
    import psutil

    cpu: Optional[int] = None if a.no_pin else 0
    kinds: List[Tuple[str, bool, str, Dict[str, str]]] = [
        ("import-in-worker", False, "false", {}), ("preload", True, "false", {}),
        ("mold", False, "true", {}), ("mold + preload", True, "true", {})]
    if a.against:
        kinds += [("mold, %s" % _against(a), False, "true", a.against),
                  ("mold + preload, %s" % _against(a), True, "true", a.against)]
    for name, preload, mold, extra in kinds:
        uss: List[float] = []
        for _ in range(a.rounds):
            s = Server(re.sub(r"[^a-z0-9-]+", "-", name.replace(" + ", "-")), ES, logdir, workers=1,
                       env={**QUIET, "EDGESYNC_MOLD": mold, **extra}, cpu=cpu, args=["--preload"] if preload else [])
            try:
                s.start()
                for _ in range(a.requests):
                    s.get("/hello")
                pid = int(s.get("/pid")[1])
                uss.append(psutil.Process(pid).memory_full_info().uss / 2**20)
            finally:
                s.stop()
        print("USS of a worker after %d requests, %s: median %.1f MB (%s)" % (a.requests, name, median(uss), _fmt(uss)))
    return 0


def _against(a: argparse.Namespace) -> str:
    return ", ".join("%s=%s" % (k[len("EDGESYNC_"):].lower(), v) for k, v in a.against.items())


def _setting(text: str) -> Dict[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (an edgesync setting), got %r" % text)
    return {"EDGESYNC_" + key.strip().upper(): value.strip()}


def _fmt(values: List[float]) -> str:
    return ", ".join("%.4f" % v for v in values)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python bench/births.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("oneshot", "boot", "recycling", "memory", "warmup", "picture", "perbirth"))
    p.add_argument("--requests", type=int, default=1000,
                   help="memory: requests before the reading; perbirth: requests (births) measured")
    p.add_argument("--preload-only", action="store_true", help="recycling: only the --preload servers")
    p.add_argument("--pair", action="store_true",
                   help="recycling: only steady and the mold's recycling; oneshot: only oneshot with the mold and "
                        "per_worker; two servers at once instead of four")
    p.add_argument("--wall-clock-ms", type=int, default=4000,
                   help="recycling: the recycling servers' wall_clock_limit_ms (a worker retires at 20-50%% of it)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, help="seconds of load per round (default 5; picture: 12)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--births", type=int, default=20)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--against", type=_setting, metavar="KEY=VALUE",
                   help="oneshot, recycling, perbirth, memory: also measure the mold's births with this edgesync "
                        "setting (e.g. mold_immortal_heap=false), side by side or in alternate rounds")
    p.add_argument("--floor", action="store_true",
                   help="oneshot, perbirth: also births of an instance that only serves its request "
                        "(bench/apps/floor_worker.py), side by side or in alternate rounds")
    a = p.parse_args(argv)
    if a.seconds is None:
        a.seconds = 12.0 if a.what == "picture" else 5.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgesync-births-") as tmp:
        try:
            rc = {"oneshot": oneshot, "boot": boot, "recycling": recycling, "memory": memory,
                  "warmup": warmup, "picture": picture, "perbirth": perbirth}[a.what](a, Path(tmp))
        finally:
            cleanup()
    print("(%s took %.0fs)" % (a.what, time.monotonic() - started))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
