"""Does the durable journal keep up with the workers? A durable view against the same view with a plain task.

``python bench/journal_scale.py`` (this 2-core machine: 2 workers x 4 threads, both servers on
core 0, each ``wrk`` on core 1, side by side) and, on a many-core machine,
``python bench/journal_scale.py --preset 16core`` (12 workers x 4 threads per server, the servers
on cores 0-13 one after the other, ``wrk -t2`` on cores 14-15; about 2.5 minutes).

Two gunicorn servers run ``bench.apps.flask_app:app`` with ``edgesync.Worker``, each with its own
``durable_journal``: one is loaded on ``/durable`` (``wait_until`` of a ``@durable`` no-op, recorded
in the journal before it returns, deleted when it ends), the other on ``/nondurable`` (the same
no-op, plain). ``--mode side-by-side`` runs both at once on the same cores (what slows one slows
both; the method of ``bench/harness.py``); ``--mode alternate`` runs them one after the other on
dedicated cores, the order swapped every round, for a machine with nothing else running. Prints
each round and the medians (req/s ratio durable / plain, p50 and p99 of each), then one JSON line.
After the last round every task the durable server accepted must have left the journal (none
pending, none given up): the script fails otherwise.

Nothing to install on the target machine: the venv's python runs it, ``--wrk PATH`` names a
``wrk`` binary carried there (else ``wrk`` on PATH), and ``taskset`` (util-linux) pins.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Server, WrkResult, cleanup, parse_wrk, wait_for

ES = "edgesync.Worker"

PRESETS: Dict[str, Dict[str, Any]] = {
    # This machine (2 cores): the setup, both servers on one core, wrk on the other.
    "small": {"workers": 2, "threads": 4, "mode": "side-by-side", "server_cpus": "0", "client_cpus": "1",
              "wrk_threads": 1, "connections": 16, "seconds": 5, "rounds": 5},
    # A 16-core machine: 12 workers per server on 14 dedicated cores, wrk on the 2 others.
    "16core": {"workers": 12, "threads": 4, "mode": "alternate", "server_cpus": "0-13", "client_cpus": "14-15",
               "wrk_threads": 2, "connections": 96, "seconds": 10, "rounds": 5},
}


def run_wrk(wrk: str, port: int, path: str, seconds: float, connections: int, threads: int,
            cpus: Optional[str]) -> subprocess.Popen[bytes]:
    cmd = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(seconds)), "--latency",
           "--timeout", "5s", "http://127.0.0.1:%d%s" % (port, path)]
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> WrkResult:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit("wrk exited with %d:\n%s" % (proc.returncode, out.decode(errors="replace")))
    return parse_wrk(out.decode(errors="replace"))


def journal_left(path: Path) -> tuple[int, int]:
    """(pending, given up) rows left in a journal."""
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        pending, given_up = conn.execute("SELECT COALESCE(SUM(given_up IS NULL), 0), "
                                         "COALESCE(SUM(given_up IS NOT NULL), 0) FROM edgesync_tasks").fetchone()
    finally:
        conn.close()
    return int(pending), int(given_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for key in ("workers", "threads", "connections", "rounds", "wrk_threads"):
        parser.add_argument("--" + key.replace("_", "-"), type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--mode", choices=("side-by-side", "alternate"))
    parser.add_argument("--server-cpus", help="taskset list for the servers, e.g. 0 or 0-13 ('' : no pinning)")
    parser.add_argument("--client-cpus", help="taskset list for wrk, e.g. 1 or 14-15 ('' : no pinning)")
    parser.add_argument("--wrk", default="wrk", help="the wrk binary (default: wrk on PATH)")
    parser.add_argument("--logdir", default=None, help="where the servers run (default: a new temporary directory)")
    opts = parser.parse_args()
    cfg = dict(PRESETS[opts.preset])
    for key in list(cfg):
        value = getattr(opts, key)
        if value is not None:
            cfg[key] = value
    logdir = Path(opts.logdir or "/tmp/edgesync-journal-scale-%d" % os.getpid())
    logdir.mkdir(parents=True, exist_ok=True)
    server_cpus: Optional[str] = cfg["server_cpus"] or None
    client_cpus: Optional[str] = cfg["client_cpus"] or None
    print("journal_scale: %s, pid %d, %d cpus, python %s, cwd %s" % (
        opts.preset, os.getpid(), os.cpu_count() or 0, sys.version.split()[0], logdir), flush=True)
    print("config: %s" % json.dumps(cfg), flush=True)
    journals = {side: logdir / ("journal-%s.db" % side) for side in ("durable", "plain")}
    servers = {side: Server("js-" + side, ES, logdir, threads=cfg["threads"], workers=cfg["workers"],
                            cpu=server_cpus,  # type: ignore[arg-type]  # taskset takes a list too
                            env={"EDGESYNC_DURABLE_JOURNAL": str(journals[side]),
                                 "EDGESYNC_MAX_PENDING_TASKS": "100000"})
               for side in ("durable", "plain")}
    paths = {"durable": "/durable", "plain": "/nondurable"}
    rounds: List[Dict[str, WrkResult]] = []
    try:
        for s in servers.values():
            s.start(timeout=120)
        sides = ["durable", "plain"]
        for r in range(-1, cfg["rounds"]):  # round -1: warm-up, not kept
            seconds = 2.0 if r < 0 else float(cfg["seconds"])
            order = sides if r % 2 == 0 else sides[::-1]
            got: Dict[str, WrkResult] = {}
            if cfg["mode"] == "side-by-side":
                procs = {side: run_wrk(opts.wrk, servers[side].port, paths[side], seconds, cfg["connections"],
                                       cfg["wrk_threads"], client_cpus) for side in order}
                got = {side: finish(p, seconds + 60) for side, p in procs.items()}
            else:
                for side in order:
                    got[side] = finish(run_wrk(opts.wrk, servers[side].port, paths[side], seconds,
                                               cfg["connections"], cfg["wrk_threads"], client_cpus), seconds + 60)
            if r < 0:
                continue
            rounds.append(got)
            d, p = got["durable"], got["plain"]
            print("round %d (%s first): durable %.0f req/s p50 %.2f p99 %.2f ms | plain %.0f req/s p50 %.2f p99 "
                  "%.2f ms | ratio %.3f | non-2xx %d/%d, errors %s/%s" % (
                      r + 1, order[0], d.rps, d.p50, d.p99, p.rps, p.p50, p.p99, d.rps / p.rps, d.non2xx,
                      p.non2xx, d.errors or 0, p.errors or 0), flush=True)
        # Every accepted task runs and leaves the journal: wait for the last ones to drain.
        left = wait_for(lambda: journal_left(journals["durable"]) == (0, 0) or None, 60,
                        "the durable server's journal to drain") and (0, 0)
    finally:
        for s in servers.values():
            s.stop()
        cleanup()

    def med(side: str, metric: str) -> float:
        return float(statistics.median(getattr(g[side], metric) for g in rounds))
    ratio = statistics.median(g["durable"].rps / g["plain"].rps for g in rounds)
    print()
    print("| %s, %d workers x %d threads, %s | durable | plain | durable / plain |" % (
        opts.preset, cfg["workers"], cfg["threads"], cfg["mode"]))
    print("|---|---|---|---|")
    print("| req/s (median of %d rounds) | %.0f | %.0f | %.3fx (median of the rounds' ratios) |" % (
        len(rounds), med("durable", "rps"), med("plain", "rps"), ratio))
    for metric in ("p50", "p99"):
        print("| %s ms | %.2f | %.2f | %.2fx |" % (metric, med("durable", metric), med("plain", metric),
                                                  med("durable", metric) / med("plain", metric)))
    print("journal after the run: %d pending, %d given up" % left)
    print(json.dumps({"preset": opts.preset, "config": cfg, "ratio_rps": round(ratio, 3),
                      "ratios": [round(g["durable"].rps / g["plain"].rps, 3) for g in rounds],
                      "durable": {m: round(med("durable", m), 2) for m in ("rps", "p50", "p99")},
                      "plain": {m: round(med("plain", m), 2) for m in ("rps", "p50", "p99")},
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


if __name__ == "__main__":
    main()
