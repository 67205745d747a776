"""The eight scenarios of issue 5. Each returns rows of ratios (and the raw rounds).

A row's ``value`` is the median over rounds (or trials, or repeats) and
``values`` holds every one of them. Throughput ratios are "edgesync / reference"
(higher is better); latency and cost ratios are "edgesync / reference" (lower is
better); the target column says which way each one goes.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .harness import (
    REPO,
    BenchError,
    Load,
    PairRound,
    PidWatcher,
    Server,
    Traced,
    compare,
    median,
    recycling_picture,
    side_by_side,
    wait_for,
)

LIMITS_OFF = {
    "EDGESYNC_WALL_CLOCK_LIMIT_MS": "0",
    "EDGESYNC_CPU_SOFT_LIMIT_MS": "0",
    "EDGESYNC_CPU_HARD_LIMIT_MS": "0",
    "EDGESYNC_MEMORY_LIMIT_MB": "0",
    "EDGESYNC_REQUEST_IDLE_TIMEOUT_MS": "0",
}
ES = "edgesync.Worker"


@dataclass
class Options:
    rounds: int
    seconds: float
    reference_rounds: int  # rounds of the comparisons that have no target
    connections: int
    threads: int
    server_cpu: Optional[int]
    client_cpu: Optional[int]
    quick: bool
    recycle_seconds: float
    trials: int
    logdir: Path
    log: Callable[[str], None] = print


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    what: str
    value: float
    unit: str  # "x" (a ratio), "ms", "%", "MB", "intervals", "count"
    target: str = ""
    ok: Optional[bool] = None
    values: List[float] = field(default_factory=list)

    def shown(self, v: Optional[float] = None) -> str:
        v = self.value if v is None else v
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if self.unit == "x":
            return "%.3fx" % v
        if self.unit == "count":
            return "%d" % v
        if self.unit == "%":
            return "%.2f%%" % v
        return "%.2f %s" % (v, self.unit)

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Outcome:
    rows: List[Row] = field(default_factory=list)
    details: List[str] = field(default_factory=list)


def at_least(v: float, t: float) -> bool:
    return not math.isnan(v) and v >= t


def at_most(v: float, t: float) -> bool:
    return not math.isnan(v) and v <= t


def _pair_rows(scenario: str, label: str, rounds: List[PairRound], *, rps: str = "", p50: str = "",
               p99: str = "", checks: Optional[Dict[str, Callable[[float], bool]]] = None) -> List[Row]:
    """req/s, p50 and p99 ratio rows (A / B) for a side-by-side comparison."""
    checks = checks or {}
    out = []
    for metric, name, target in (("rps", "req/s", rps), ("p50", "p50 latency", p50), ("p99", "p99 latency", p99)):
        values = [r.ratio(metric) for r in rounds]
        v = median(values)
        check = checks.get(metric)
        out.append(Row(scenario, "%s: %s" % (label, name), v, "x", target, check(v) if check else None, values))
    return out


def _round_details(title: str, a: str, b: str, rounds: List[PairRound]) -> List[str]:
    lines = ["%s (A = %s, B = %s):" % (title, a, b)]
    for r in rounds:
        lines.append("  round %d, %s first: A %s | B %s | A/B req/s %.3f, p50 %.3f, p99 %.3f%s"
                     % (r.index, r.first, r.a.brief(), r.b.brief(), r.ratio("rps"), r.ratio("p50"),
                        r.ratio("p99"), " [%s]" % r.note if r.note else ""))
    return lines


def _server(o: Options, name: str, worker: str, **kw: Any) -> Server:
    kw.setdefault("threads", o.threads)
    return Server(name, worker, o.logdir, cpu=o.server_cpu, **kw)


def _start(*servers: Server) -> None:
    for s in servers:
        s.start()


def _stop(*servers: Server) -> None:
    for s in servers:
        s.stop()


def _compare(o: Options, a: Load, b: Load, rounds: Optional[int] = None, **kw: Any) -> List[PairRound]:
    rounds = rounds or o.rounds
    o.log("  %s vs %s: %d rounds of %ds, %d connections each" % (a.label, b.label, rounds, o.seconds,
                                                                    o.connections))
    return compare(a, b, rounds=rounds, seconds=o.seconds, connections=o.connections,
                   client_cpu=o.client_cpu, log=o.log, **kw)


# -- 1. hello world ---------------------------------------------------------------


def s1_hello(o: Options) -> Outcome:
    es = _server(o, "s1-edgesync", ES)
    gt = _server(o, "s1-gthread", "gthread")
    sy = _server(o, "s1-sync", "sync")
    out = Outcome()
    try:
        _start(es, gt, sy)
        r = _compare(o, Load("edgesync", es, "/hello"), Load("gthread", gt, "/hello"))
        out.rows += _pair_rows("1", "hello, edgesync / gthread", r, rps=">= 1.00x",
                               checks={"rps": lambda v: at_least(v, 1.0)})
        out.details += _round_details("1. hello world", "edgesync.Worker (default limits)", "gthread", r)
        r = _compare(o, Load("edgesync", es, "/hello"), Load("sync", sy, "/hello"), rounds=o.reference_rounds)
        out.rows += _pair_rows("1", "hello, edgesync / sync (reference)", r)
        out.details += _round_details("1. hello world, reference", "edgesync.Worker (default limits)",
                                      "sync (1 worker, no threads, no keep-alive)", r)
    finally:
        _stop(es, gt, sy)
    return out


# -- 2. wait_until in the view -------------------------------------------------------


def s2_wait_until(o: Options) -> Outcome:
    a = _server(o, "s2-task", ES)
    b = _server(o, "s2-plain", ES)
    out = Outcome()
    try:
        _start(a, b)
        r = _compare(o, Load("/task", a, "/task"), Load("/plain", b, "/plain"))
        out.rows += _pair_rows("2", "view + wait_until / same view without", r, p50="<= 1.10x", p99="<= 1.30x",
                               checks={"p50": lambda v: at_most(v, 1.10), "p99": lambda v: at_most(v, 1.30)})
        out.details += _round_details("2. wait_until", "GET /task (wait_until of a light task)",
                                      "GET /plain (the same view without it)", r)
        r = _compare(o, Load("/task", a, "/task"), Load("/task_tpe", b, "/task_tpe"), rounds=o.reference_rounds)
        out.rows += _pair_rows("2", "view + wait_until / view + ThreadPoolExecutor.submit (reference)", r)
        out.details += _round_details("2. wait_until against a plain executor", "GET /task (wait_until)",
                                      "GET /task_tpe (the same task to a ThreadPoolExecutor of 8 threads)", r)
    finally:
        _stop(a, b)
    # What wait_until costs against the thread pool an app would otherwise use: a trivial
    # task (return n), 2 workers per server, gunicorn's default log level (info).
    a = _server(o, "s2-bg", ES, workers=2)
    b = _server(o, "s2-bg-tpe", ES, workers=2)
    try:
        _start(a, b)
        r = _compare(o, Load("/bg", a, "/bg"), Load("/bg_tpe", b, "/bg_tpe"))
        out.rows += _pair_rows("2", "2 workers, view + wait_until / view + ThreadPoolExecutor(8), trivial task", r,
                               rps=">= 0.95x", checks={"rps": lambda v: at_least(v, 0.95)})
        out.details += _round_details("2. wait_until against a plain executor, 2 workers",
                                      "GET /bg (wait_until of return n)",
                                      "GET /bg_tpe (the same task to a ThreadPoolExecutor of 8 threads)", r)
    finally:
        _stop(a, b)
    return out


# -- 3. limits monitor on vs off ---------------------------------------------------


def s3_limits(o: Options) -> Outcome:
    on = _server(o, "s3-limits-on", ES)
    off = _server(o, "s3-limits-off", ES, env=LIMITS_OFF)
    out = Outcome()
    try:
        _start(on, off)
        r = _compare(o, Load("limits on", on, "/hello"), Load("limits off", off, "/hello"))
        out.rows += _pair_rows("3", "hello, limits on / all limits 0", r, rps=">= 0.98x",
                               checks={"rps": lambda v: at_least(v, 0.98)})
        out.details += _round_details("3. limits monitor", "edgesync, default limits",
                                      "edgesync, every limit 0", r)
    finally:
        _stop(on, off)
    # Reference: with every limit 0 the monitor thread still wakes every interval and
    # takes the GIL; a worker whose monitor never starts shows that cost too.
    on = _server(o, "s3-monitor", ES)
    none = _server(o, "s3-no-monitor", ES, args=["-c", str(REPO / "bench" / "apps" / "no_monitor_conf.py")])
    try:
        _start(on, none)
        r = _compare(o, Load("monitor", on, "/hello"), Load("no monitor", none, "/hello"),
                     rounds=o.reference_rounds)
        out.rows += _pair_rows("3", "hello, default limits / monitor thread never started (reference)", r)
        out.details += _round_details("3. monitor thread, reference", "edgesync, default limits",
                                      "edgesync whose monitor never starts (bench/apps/no_monitor_conf.py)", r)
    finally:
        _stop(on, none)
    return out


# -- 4. in-process microbenchmarks ----------------------------------------------------


def _micro(o: Options, *args: str) -> Dict[str, Any]:
    cmd = [sys.executable, str(REPO / "bench" / "micro.py"), *args]
    if o.server_cpu is not None:
        cmd = ["taskset", "-c", str(o.server_cpu)] + cmd
    o.log("  " + " ".join(cmd[-len(args) - 1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BenchError("bench/micro.py %s failed:\n%s%s" % (" ".join(args), proc.stdout, proc.stderr))
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def s4_micro(o: Options) -> Outcome:
    out = Outcome()
    threads = 8
    sub = _micro(o, "submit", "--threads", str(threads), "--batches", "40" if o.quick else "100",
                 "--repeats", "3" if o.quick else "9")
    us = sub["us_per_submit"]
    ratios = [e / t for e, t in zip(us["edgesync"], us["tpe"], strict=True)]
    v = median(ratios)
    out.rows.append(Row("4", "wait_until submit cost / ThreadPoolExecutor.submit (%d threads)" % threads, v, "x",
                        "<= 1.00x", at_most(v, 1.0), ratios))
    best = min(us["edgesync"]) / min(us["tpe"])
    out.rows.append(Row("4", "same, best of %d each (noise only ever adds time)" % len(ratios), best, "x",
                        "<= 1.00x", at_most(best, 1.0)))
    ratios_ctx = [e / t for e, t in zip(us["edgesync"], us["tpe_ctx"], strict=True)]
    out.rows.append(Row("4", "wait_until submit cost / TPE.submit(copy_context().run, fn) (reference)",
                        median(ratios_ctx), "x", values=ratios_ctx))
    med = sub["median_us"]
    out.details.append("4. submit cost, us per submit (each repeat: the median of %d interleaved batches of %d "
                       "submits per side, pool threads blocked): edgesync %.2f, ThreadPoolExecutor %.2f, "
                       "TPE + copy_context %.2f" % (sub["batches"], sub["batch"], med["edgesync"], med["tpe"],
                                                    med["tpe_ctx"]))
    for k in ("edgesync", "tpe", "tpe_ctx"):
        out.details.append("  %s: %s" % (k, ", ".join("%.2f" % x for x in us[k])))
    thr = _micro(o, "throughput", "--threads", str(threads), "--tasks", "2000",
                 "--repeats", "8" if o.quick else "30")
    tp = thr["tasks_per_s"]
    ratios = [e / t for e, t in zip(tp["edgesync"], tp["tpe"], strict=True)]
    v = median(ratios)
    out.rows.append(Row("4", "task throughput, wait_until / ThreadPoolExecutor (%d threads)" % threads, v, "x",
                        ">= 1.00x", at_least(v, 1.0), ratios))
    best = max(tp["edgesync"]) / max(tp["tpe"])
    out.rows.append(Row("4", "same, best of %d each" % len(ratios), best, "x", ">= 1.00x", at_least(best, 1.0)))
    out.details.append("4. end-to-end throughput, tasks/s (%d no-op tasks submitted then waited for, %d pairs): "
                       "edgesync median %.0f, ThreadPoolExecutor median %.0f"
                       % (thr["tasks"], thr["repeats"], thr["median_tasks_per_s"]["edgesync"],
                          thr["median_tasks_per_s"]["tpe"]))
    for k in ("edgesync", "tpe"):
        out.details.append("  %s: %s" % (k, ", ".join("%.0f" % x for x in tp[k])))
    return out


# -- 5. cost growth -------------------------------------------------------------------


def _fill(server: Server, to: int, probe: bool = False) -> Dict[str, Any]:
    status, body = server.get("/fill?to=%d%s" % (to, "&probe=1" if probe else ""), timeout=60)
    if status != 200:
        raise BenchError("/fill?to=%d answered %d: %r" % (to, status, body[:300]))
    data: Dict[str, Any] = json.loads(body)
    if data["pending"] != to:
        raise BenchError("/fill?to=%d left %d tasks pending" % (to, data["pending"]))
    return data


def s5_growth(o: Options) -> Outcome:
    import edgesync

    out = Outcome()
    full = edgesync.Settings().max_pending_tasks
    empty = _server(o, "s5-queue-empty", ES)
    busy = _server(o, "s5-queue-busy", ES)
    try:
        _start(empty, busy)
        for n in (100, full):
            def refill(server: Server, n: int = n) -> None:
                if server is busy:
                    _fill(server, n)
            info = _fill(busy, n, probe=n == full)
            o.log("  queue of the busy server: %s" % info)
            if n == full and info["one_more_refused"] is not True:
                raise BenchError("the queue should be full at max_pending_tasks=%d: %s" % (full, info))
            label = "full queue (%d)" % n if n == full else "%d queued" % n
            r = _compare(o, Load(label, busy, "/hello"), Load("empty queue", empty, "/hello"), on_restart=refill)
            out.rows += _pair_rows("5", "hello with %s / empty queue" % label, r, rps="0.95-1.05x",
                                   p50="0.95-1.05x",
                                   checks={"rps": lambda v: 0.95 <= v <= 1.05, "p50": lambda v: 0.95 <= v <= 1.05})
            out.details += _round_details("5. latency with %s" % label, "edgesync, %d tasks pending" % n,
                                          "edgesync, no task pending", r)
        busy.get("/release")
    finally:
        _stop(empty, busy)

    mon = _micro(o, "monitor", "--live", "1", "8", "64", "--seconds", "1" if o.quick else "3")
    res = {r["live"]: r for r in mon["results"]}
    one, eight, many = res[1], res[8], res[64]
    for k in (1, 8, 64):
        pct = res[k]["thread_cpu_pct"]
        out.rows.append(Row("5", "monitor thread, share of one core with %d live invocation%s"
                            % (k, "s" if k > 1 else ""), pct, "%", "< 1%" if k == 64 else "",
                            pct < 1.0 if k == 64 else None))
    growth = many["us_per_sample"] / one["us_per_sample"]
    out.rows.append(Row("5", "monitor cost per sample, 64 live / 1 live", growth, "x"))
    # Linear means cost(k) = base + k * per_invocation: predict 8 from 1 and 64.
    slope = (many["us_per_sample"] - one["us_per_sample"]) / 63
    predicted8 = one["us_per_sample"] + 7 * slope
    lin = eight["us_per_sample"] / predicted8
    out.rows.append(Row("5", "monitor cost at 8 live / linear prediction from 1 and 64", lin, "x",
                        "0.80-1.20x", 0.8 <= lin <= 1.2))
    out.details.append("5. monitor cost (interval %.0f ms, default limits, memory checked too):"
                       % (mon["interval_s"] * 1000))
    for r in mon["results"]:
        out.details.append("  %3d live invocations: ~%.0f samples, %.1f us per sample (the monitor "
                           "thread's CPU clock), %.3f%% of one core"
                           % (r["live"], r["samples"], r["us_per_sample"], r["thread_cpu_pct"]))
    out.details.append("  marginal cost %.2f us per live invocation per sample; fixed cost %.1f us per sample"
                       % (slope, one["us_per_sample"] - slope))
    return out


# -- 6. recycling under load ------------------------------------------------------------

WALL_4S = {"EDGESYNC_WALL_CLOCK_LIMIT_MS": "4000"}
PICTURE = REPO / "docs" / "img" / "recycling.png"  # shown by docs/benchmarks.md


def _recycle_rounds(o: Options, rec: Server, ref: Server, label: str, ref_label: str, path: str = "/hello",
                    ) -> tuple[List[Any], List[Any], List[Any], List[Any]]:
    """Rounds of ``rec`` against ``ref`` at once: (rec results, ref results, rec watchers, ref watchers)."""
    rounds = 1 if o.quick else o.rounds
    loads = [Load(label, rec, path), Load(ref_label, ref, path)]
    o.log("  %s vs %s: %d rounds of %ds at once" % (label, ref_label, rounds, o.recycle_seconds))
    side_by_side(loads, 1, o.connections, o.client_cpu)  # warm-up
    ra, rb, wa, wb = [], [], [], []
    for r in range(rounds):
        with PidWatcher(rec) as watch_a, PidWatcher(ref) as watch_b:
            a, b = side_by_side(loads, o.recycle_seconds, o.connections, o.client_cpu, first=r % 2)
        ra.append(a)
        rb.append(b)
        wa.append(watch_a)
        wb.append(watch_b)
        o.log("    round %d: %s: %s | %s: %s" % (r + 1, label, a.brief(), ref_label, b.brief()))
    return ra, rb, wa, wb


def _ratio_rows(out: Outcome, title: str, ra: List[Any], rb: List[Any], with_max: bool = False) -> None:
    """Rows "<title>: p99 latency" and "<title>: req/s" (and max latency): A over B, round by round."""
    metrics = [("p99", "p99 latency"), ("rps", "req/s")] + ([("max", "max latency")] if with_max else [])
    for metric, what in metrics:
        vals = [getattr(a, metric) / getattr(b, metric) for a, b in zip(ra, rb, strict=True)]
        out.rows.append(Row("6", "%s: %s" % (title, what), median(vals), "x", values=vals))


def _gthread_recycling(o: Options, name: str, n: int) -> Server:
    """gunicorn's own recycling at about ``n`` requests per worker: 90% of it plus a jitter of 20%."""
    return _server(o, name, "gthread", workers=2,
                   args=["--max-requests", str(int(n * 0.9)), "--max-requests-jitter", str(int(n * 0.2))])


#: Calibration of gthread's --max-requests: seconds per probe, most probes, and how far
#: gthread's mean lifetime may stay from edgesync's.
MATCH_SECONDS = 30.0
MATCH_PROBES = 3
MATCH_TOLERANCE = 0.05


def _matched_gthread(o: Options, name: str, rec: Server, path: str, n: int) -> Tuple[Server, int]:
    """gunicorn's own recycling whose workers live as long as ``rec``'s, both loaded at once.

    A gthread worker lives its boot plus ``n`` requests (on average: 90% of n plus a
    jitter of up to 20%), and its rate next to ``rec`` is not known in advance: each
    probe runs both side by side and compares the mean lifetimes (fork to exit; the
    mean, since the rate of recycles is its inverse). A correction takes the probe's
    own rate per gthread worker (wrk's req/s over its workers), so its boot is what
    of its lifetime those requests do not explain, and asks for the requests that fill
    edgesync's lifetime less that boot. (A secant through two probes' lifetimes,
    tried before, overshot whenever the noise of a 30 s probe exceeded their
    difference.) Returns the started gthread server and its n; each probe's
    lifetimes are logged, and the caller reports how close they came in its own rounds.
    """
    loads = [Load("edgesync", rec, path), Load("gthread", rec, path)]
    gthread: Optional[Server] = None
    probes = 1 if o.quick else MATCH_PROBES
    for probe in range(probes):
        if gthread is not None:
            gthread.stop()
        gthread = _gthread_recycling(o, "%s-%d" % (name, probe), n)
        gthread.start()
        loads[1] = Load("gthread", gthread, path)
        with PidWatcher(rec) as wa, PidWatcher(gthread) as wb:
            _, res = side_by_side(loads, MATCH_SECONDS, o.connections, o.client_cpu)
        life_es, life_gt = _mean_life([wa]), _mean_life([wb])
        per_worker = res.rps / gthread.workers
        boot = min(max(0.0, life_gt - n / per_worker), life_es / 2) if per_worker > 0 else 0.0
        o.log("    gthread --max-requests %d (+0-%d): mean lifetime %.2fs (%.0f req/s per worker, so a boot of "
              "%.2fs), edgesync's %.2fs" % (int(n * 0.9), int(n * 0.2), life_gt, per_worker, boot, life_es))
        if (math.isnan(life_es) or math.isnan(life_gt) or abs(life_gt / life_es - 1) <= MATCH_TOLERANCE
                or probe == probes - 1):
            break  # the rows say how close the two lifetimes came
        n = max(50, int((life_es - boot) * per_worker)) if per_worker > 0 else int(n * life_es / life_gt)
    assert gthread is not None
    return gthread, n


def _lifetime_row(out: Outcome, title: str, life_es: float, life_gt: float) -> None:
    """How well the reference recycled at edgesync's rate: 1 = the same lifetime (fork to exit)."""
    out.rows.append(Row("6", title, life_gt / life_es, "x", "0.95-1.05x",
                        at_least(life_gt / life_es, 0.95) and at_most(life_gt / life_es, 1.05)))


def _lifetimes(watchers: List[Any]) -> List[float]:
    return [w.gone[p] - w.born[p] for w in watchers for p in w.gone if p in w.born]


def _mean_life(watchers: List[Any]) -> float:
    lives = _lifetimes(watchers)
    return sum(lives) / len(lives) if lives else float("nan")


def s6_recycling(o: Options) -> Outcome:
    out = Outcome()
    steady = _server(o, "s6-steady", ES, workers=2, env={"EDGESYNC_WALL_CLOCK_LIMIT_MS": "0"})
    variants = [("recycling", _server(o, "s6-recycling", ES, workers=2, env=WALL_4S)),
                ("recycling --preload", _server(o, "s6-recycling-preload", ES, workers=2, env=WALL_4S,
                                                args=["--preload"]))]
    gthread: Optional[Server] = None
    life_s = float("nan")
    try:
        steady.start()
        for label, rec in variants:
            if steady.age > 100:
                steady.restart()
            rec.start()
            booted = rec.count(r"Booting worker with pid")
            booted_at = len(rec.log)
            ra, rb, watches, ref_watches = _recycle_rounds(o, rec, steady, label, "steady")
            time.sleep(0.5)
            rec.stop()
            retired = rec.count(r"retiring \(reason=wall_clock\)")
            handed = rec.count(r"worker \d+: a replacement serves \(")
            gave_up = rec.count(r"no replacement serving")
            replaced = rec.count(r"Booting worker with pid") - booted
            terminated = rec.count(r"terminating \(reason=")
            lives = _lifetimes(watches)
            exits = sorted(t for w in watches for t in w.gone.values())
            gaps = [min(abs(t - u) for j, u in enumerate(exits) if j != i) for i, t in enumerate(exits)] \
                if len(exits) > 1 else []
            life, gap = median(lives), median(gaps)
            if label == "recycling":
                life_s = life
            tag = label.replace("recycling", "recycling workers")
            failed = sum(a.failed for a in ra)
            p99 = [a.p99 / b.p99 for a, b in zip(ra, rb, strict=True)]
            rps = [a.rps / b.rps for a, b in zip(ra, rb, strict=True)]
            o.log("    %s: %d retirements, %d handed off (replacement served first), %d gave up waiting, "
                  "%d workers booted, %d terminations; median lifetime %.2fs"
                  % (label, retired, handed, gave_up, replaced, terminated, life))
            out.rows.append(Row("6", "%s: failed requests (non-2xx + socket errors)" % tag, failed, "count", "0",
                                failed == 0, [a.failed for a in ra]))
            out.rows.append(Row("6", "%s / steady: p99 latency" % tag, median(p99), "x", "<= 1.50x",
                                at_most(median(p99), 1.5), p99))
            out.rows.append(Row("6", "%s / steady: req/s" % tag, median(rps), "x", ">= 0.95x",
                                at_least(median(rps), 0.95), rps))
            mx = [a.max / b.max for a, b in zip(ra, rb, strict=True)]
            out.rows.append(Row("6", "%s / steady: max latency" % tag, median(mx), "x", values=mx))
            # Where the CPU went: both servers share one core (each gets half: see docs/benchmarks.md),
            # so the req/s ratio is requests per CPU-second, and a boot's CPU is requests not served.
            cpu = [a.cpu / b.cpu for a, b in zip(watches, ref_watches, strict=True)]
            out.rows.append(Row("6", "%s / steady: CPU used" % tag, median(cpu), "x", values=cpu))
            booting = [100 * w.boot_cpu / w.cpu for w in watches]
            out.rows.append(Row("6", "%s: CPU spent booting workers / the server's CPU" % tag, median(booting), "%",
                                values=booting))
            stagger = gap / (life / 2) if life == life and life > 0 else float("nan")
            out.rows.append(Row("6", "%s: gap between exits / half a lifetime (1 = evenly staggered)" % tag,
                                stagger, "x"))
            out.details.append("6. %s (EDGESYNC_WALL_CLOCK_LIMIT_MS=4000) vs steady (wall clock off), %d x %ds, "
                               "2 workers each, %d connections each:"
                               % (label, len(ra), o.recycle_seconds, o.connections))
            for i, (a, b) in enumerate(zip(ra, rb, strict=True)):
                out.details.append("  round %d: %s: %s, max %.0f ms | steady: %s, max %.0f ms"
                                   % (i + 1, label, a.brief(), a.max, b.brief(), b.max))
            out.details.append("  %d retirements (reason=wall_clock), %d handed off, %d gave up waiting, %d workers "
                               "booted, %d terminations; %d worker exits seen, median lifetime %.2fs (fork to "
                               "exit), median gap from an exit to the nearest other exit %.2fs"
                               % (retired, handed, gave_up, replaced, terminated, len(exits), life, gap))
            boots = rec.boot_cpu_ms(booted_at)
            out.details.append("  CPU in the rounds: %s %s s, steady %s s; booting workers: %s s (%d boots, median "
                               "%d ms of CPU each)"
                               % (label, "/".join("%.1f" % w.cpu for w in watches),
                                  "/".join("%.1f" % w.cpu for w in ref_watches),
                                  "/".join("%.2f" % w.boot_cpu for w in watches), len(boots),
                                  median(boots) if boots else 0))
        # Reference: the same recycling with replace_before_retire off (the retiree stops accepting at once
        # and is replaced once it has exited), to tell the hand-off's effect from the machine's mood.
        # New servers (not restarts) for each comparison, so that every log is kept.
        rec = _server(o, "s6-recycling-vs-off", ES, workers=2, env=WALL_4S)
        variants.append(("", rec))
        off = _server(o, "s6-recycling-off", ES, workers=2, env={**WALL_4S, "EDGESYNC_REPLACE_BEFORE_RETIRE": "false"})
        try:
            rec.start()
            off.start()
            ra, rb, _, _ = _recycle_rounds(o, rec, off, "recycling", "recycling, replace_before_retire off")
        finally:
            off.stop()
        _ratio_rows(out, "recycling workers, replace_before_retire on / off", ra, rb, with_max=True)
        out.rows.append(Row("6", "recycling workers, replace_before_retire on: failed requests",
                            sum(a.failed for a in ra), "count", values=[a.failed for a in ra]))
        out.rows.append(Row("6", "recycling workers, replace_before_retire off: failed requests",
                            sum(b.failed for b in rb), "count", values=[b.failed for b in rb]))
        out.details.append("6. recycling, replace_before_retire on (A) vs off (B), %d x %ds:"
                           % (len(ra), o.recycle_seconds))
        for i, (a, b) in enumerate(zip(ra, rb, strict=True)):
            out.details.append("  round %d: A %s, max %.0f ms | B %s, max %.0f ms" % (i + 1, a.brief(), a.max,
                                                                                      b.brief(), b.max))
        # Reference: gunicorn's own recycling (gthread --max-requests) at the same lifetime. The lifetime is
        # edgesync's median (fork to exit) in the first comparison; gthread's request rate next to the
        # recycling server is probed first (3 s, no max_requests), so N requests take about that long.
        rec.stop()
        rec = _server(o, "s6-recycling-vs-gthread", ES, workers=2, env=WALL_4S)
        variants.append(("", rec))
        probe = _server(o, "s6-gthread-probe", "gthread", workers=2)
        try:
            rec.start()
            probe.start()
            side_by_side([Load("x", rec, "/hello"), Load("y", probe, "/hello")], 1, o.connections, o.client_cpu)
            _, rate = side_by_side([Load("x", rec, "/hello"), Load("y", probe, "/hello")], 3, o.connections,
                                   o.client_cpu)
        finally:
            probe.stop()
        per_life = rate.rps / 2 * (life_s if life_s == life_s else 2.0)
        n = max(50, int(per_life))
        o.log("  gthread alone next to the recycling server: %.0f req/s; %.2fs x %.0f req/s per worker = %d "
              "requests per lifetime, to begin with" % (rate.rps, life_s, rate.rps / 2, n))
        gthread, n = _matched_gthread(o, "s6-gthread-max-requests", rec, "/hello", n)
        ra, rb, wa, wb = _recycle_rounds(o, rec, gthread, "edgesync recycling", "gthread --max-requests")
        p99 = [a.p99 / b.p99 for a, b in zip(ra, rb, strict=True)]
        rps = [a.rps / b.rps for a, b in zip(ra, rb, strict=True)]
        mx = [a.max / b.max for a, b in zip(ra, rb, strict=True)]
        la, lb = median(_lifetimes(wa)), median(_lifetimes(wb))
        out.rows.append(Row("6", "edgesync recycling / gthread --max-requests %d (+0-%d) at the same lifetime: p99 "
                            "latency" % (int(n * 0.9), int(n * 0.2)), median(p99), "x", "< 1.00x",
                            at_most(median(p99), 0.999), p99))
        out.rows.append(Row("6", "edgesync recycling / gthread --max-requests: req/s", median(rps), "x", "> 1.00x",
                            at_least(median(rps), 1.001), rps))
        out.rows.append(Row("6", "edgesync recycling / gthread --max-requests: max latency", median(mx), "x",
                            values=mx))
        _lifetime_row(out, "gthread --max-requests / edgesync recycling: mean worker lifetime", _mean_life(wa),
                      _mean_life(wb))
        out.rows.append(Row("6", "edgesync recycling (next to gthread): failed requests", sum(a.failed for a in ra),
                            "count", values=[a.failed for a in ra]))
        out.rows.append(Row("6", "gthread --max-requests: failed requests", sum(b.failed for b in rb), "count",
                            values=[b.failed for b in rb]))
        out.details.append("6. edgesync recycling (wall_clock_limit_ms=4000) vs gthread --max-requests %d "
                           "--max-requests-jitter %d (%.0f requests per edgesync lifetime at gthread's rate), %d x %ds:"
                           % (int(n * 0.9), int(n * 0.2), per_life, len(ra), o.recycle_seconds))
        for i, (a, b) in enumerate(zip(ra, rb, strict=True)):
            out.details.append("  round %d: edgesync: %s, max %.0f ms | gthread: %s, max %.0f ms"
                               % (i + 1, a.brief(), a.max, b.brief(), b.max))
        out.details.append("  median worker lifetime: edgesync %.2fs, gthread %.2fs" % (la, lb))
        _picture(o, rec, gthread, out)
        gthread.stop()
        steady.stop()
        rec.stop()
        _s6_io_bound(o, out, variants)
    finally:
        _stop(steady, *(rec for _, rec in variants), *([gthread] if gthread is not None else []))
    return out


IO_PATH = "/io?ms=20"


def _s6_io_bound(o: Options, out: Outcome, servers: List[Tuple[str, Server]]) -> None:
    """Recycling when the view waits on I/O: where a missing worker costs capacity, not CPU.

    On the pinned core a CPU-bound view pays every recycle in CPU, whoever serves. With a
    view that waits 20 ms (a database, an API), 2 workers x 4 threads hold 8 requests at
    once: a worker that stops accepting before its replacement serves halves that, which is
    what gunicorn's own recycling does and what replace before retire avoids.
    """
    steady = _server(o, "s6-io-steady", ES, workers=2, env={"EDGESYNC_WALL_CLOCK_LIMIT_MS": "0"})
    rec = _server(o, "s6-io-recycling", ES, workers=2, env=WALL_4S)
    servers += [("", steady), ("", rec)]
    steady.start()
    rec.start()
    ra, rb, watches, _ = _recycle_rounds(o, rec, steady, "recycling, I/O-bound", "steady, I/O-bound", IO_PATH)
    steady.stop()
    life = median(_lifetimes(watches))
    _ratio_rows(out, "I/O-bound view (20 ms wait), recycling workers / steady", ra, rb)
    out.rows.append(Row("6", "I/O-bound view, recycling workers: failed requests", sum(a.failed for a in ra),
                        "count", values=[a.failed for a in ra]))
    # gunicorn's own recycling at the same lifetime; to begin with, the steady server's rate per
    # worker times it (gthread serves a waiting view at about half that rate: the calibration's job).
    n = max(50, int(median([b.rps for b in rb]) / 2 * (life if life == life else 2.0)))
    gthread, n = _matched_gthread(o, "s6-io-gthread-max-requests", rec, IO_PATH, n)
    servers.append(("", gthread))
    ga, gb, gwa, gw = _recycle_rounds(o, rec, gthread, "edgesync recycling, I/O-bound", "gthread --max-requests, "
                                      "I/O-bound", IO_PATH)
    _ratio_rows(out, "I/O-bound view, edgesync recycling / gthread --max-requests %d (+0-%d)"
                % (int(n * 0.9), int(n * 0.2)), ga, gb)
    _lifetime_row(out, "I/O-bound view, gthread --max-requests / edgesync recycling: mean worker lifetime",
                  _mean_life(gwa), _mean_life(gw))
    out.rows.append(Row("6", "I/O-bound view, gthread --max-requests: failed requests", sum(b.failed for b in gb),
                        "count", values=[b.failed for b in gb]))
    out.details.append("6. I/O-bound view (GET %s), 2 workers x 4 threads, %d connections each, %d x %ds; "
                       "median worker lifetime: edgesync %.2fs, gthread %.2fs:"
                       % (IO_PATH, o.connections, len(ra), o.recycle_seconds, median(_lifetimes(gwa)),
                          median(_lifetimes(gw))))
    for i, (a, b) in enumerate(zip(ra, rb, strict=True)):
        out.details.append("  round %d: recycling: %s, max %.0f ms | steady: %s, max %.0f ms"
                           % (i + 1, a.brief(), a.max, b.brief(), b.max))
    for i, (a, b) in enumerate(zip(ga, gb, strict=True)):
        out.details.append("  round %d: edgesync: %s, max %.0f ms | gthread: %s, max %.0f ms"
                           % (i + 1, a.brief(), a.max, b.brief(), b.max))


def _picture(o: Options, es: Server, gt: Server, out: Outcome) -> None:
    """One run of both at once, every request timed (bench/trace.py), drawn to docs/img/recycling.png."""
    # A smoke run's picture stays with its logs: the one in the docs is a full run's.
    target = o.logdir / PICTURE.name if o.quick else PICTURE
    runs = [Traced("edgesync", es, "edgesync, wall_clock_limit_ms=4000 (its replacement is forked at the retire)",
                   "tab:blue"),
            Traced("gthread", gt, "gthread --max-requests (%s)" % " ".join(gt.args[1::2]), "tab:red")]
    try:
        lines = recycling_picture(runs, "/hello", min(o.recycle_seconds, 12.0), o.connections, o.client_cpu,
                                  o.logdir, target, "Recycling under load: 2 workers each, both loaded at once "
                                  "(%d connections each), shared 2-core machine" % o.connections)
    except BenchError as e:
        o.log("  %s" % e)
        return
    out.details += ["  picture run, %s" % line for line in lines]
    o.log("  picture: %s" % target)
    out.details.append("  picture: %s" % (target if o.quick else PICTURE.relative_to(REPO)))


# -- 7. detection latency ------------------------------------------------------------


def _get_timed(server: Server, path: str, timeout: float) -> tuple[Optional[int], float, str]:
    """(status or None on a connection error, monotonic time of the answer, body or error)."""
    try:
        status, body = server.get(path, timeout=timeout)
        return status, time.monotonic(), body[:200].decode(errors="replace")
    except OSError as exc:
        return None, time.monotonic(), repr(exc)


def _logged_more(server: Server, pattern: str, before: int) -> bool:
    return server.count(pattern) > before


def _replaced(server: Server, pids: List[int]) -> bool:
    """The server's one worker is a new one, and it answers."""
    now = server.worker_pids()
    return now != pids and len(now) == 1 and server.answers()


def s7_detection(o: Options) -> Outcome:
    from edgesync._limits import INTERVAL

    out = Outcome()
    interval_ms = INTERVAL * 1000
    limit_ms = 200
    cpu = _server(o, "s7-cpu", ES, env={"EDGESYNC_CPU_HARD_LIMIT_MS": str(limit_ms),
                                        "EDGESYNC_CPU_SOFT_LIMIT_MS": "0"})
    over_cpu: List[float] = []
    over_wall: List[float] = []
    try:
        cpu.start()
        o.log("  CPU: cpu_hard_limit_ms=%d, %d trials of GET /hog" % (limit_ms, o.trials))
        for i in range(o.trials):
            before = cpu.count(r"used \d+ ms of CPU time")
            t0 = time.monotonic()
            status, t1, body = _get_timed(cpu, "/hog", 60)
            if status != 546:
                raise BenchError("GET /hog answered %s, not 546: %s" % (status, body))
            wait_for(functools.partial(_logged_more, cpu, r"used \d+ ms of CPU time", before), 10,
                     "the cancellation's log line")
            used = int(re.findall(r"used (\d+) ms of CPU time", cpu.log)[-1])
            over_cpu.append(used - limit_ms)
            over_wall.append((t1 - t0) * 1000 - limit_ms)
            o.log("    trial %d: cancelled at %d ms of CPU (+%d ms), answered 546 after %.0f ms of wall time"
                  % (i + 1, used, used - limit_ms, (t1 - t0) * 1000))
    finally:
        cpu.stop()
    intervals = [x / interval_ms for x in over_cpu]
    v = median(intervals)
    out.rows.append(Row("7", "CPU hog: cancelled past cpu_hard_limit_ms (CPU ms / %.0f ms interval), median"
                        % interval_ms, v, "intervals", "<= 2", at_most(v, 2.0), intervals))
    out.rows.append(Row("7", "CPU hog: same, max", max(intervals), "intervals", values=intervals))
    wall = [x / interval_ms for x in over_wall]
    out.rows.append(Row("7", "CPU hog: 546 answered past the limit (client wall time), median", median(wall),
                        "intervals", values=wall))
    out.details.append("7. CPU detection, cpu_hard_limit_ms=%d, interval %.0f ms: CPU ms past the limit per trial: %s;"
                       " wall ms from request to 546 minus the limit: %s"
                       % (limit_ms, interval_ms, ", ".join("%.0f" % x for x in over_cpu),
                          ", ".join("%.0f" % x for x in over_wall)))

    mem_limit = 64
    rate = 200.0  # MB/s
    marks = o.logdir / "s7-marks.jsonl"
    mem = _server(o, "s7-memory", ES, env={"EDGESYNC_MEMORY_LIMIT_MB": str(mem_limit),
                                           "BENCH_MARKS_FILE": str(marks)})
    lat: List[float] = []
    over_mb: List[float] = []
    try:
        mem.start()
        o.log("  memory: memory_limit_mb=%d, growing %.0f MB/s, %d trials of GET /grow" % (mem_limit, rate, o.trials))
        for i in range(o.trials):
            pids = mem.worker_pids()
            before = mem.count(r"RSS grew [\d.]+ MB above")
            marks.write_text("")
            status, t1, body = _get_timed(mem, "/grow?rate=%g&limit_mb=%d" % (rate, mem_limit), 60)
            wait_for(functools.partial(_logged_more, mem, r"RSS grew [\d.]+ MB above", before), 10,
                     "the termination's log line")
            lines = [json.loads(x) for x in marks.read_text().splitlines() if x.strip()]
            found = [x["crossed"] for x in lines if "crossed" in x] or [x["before"] for x in lines[-1:]
                                                                       if "before" in x]
            if not found:
                raise BenchError("/grow noted nothing (answer %s: %s)" % (status, body))
            crossed = found[0]
            grew = float(re.findall(r"RSS grew ([\d.]+) MB above", mem.log)[-1])
            lat.append((t1 - crossed) * 1000)
            over_mb.append(grew - mem_limit)
            o.log("    trial %d: answered %s %.0f ms after the growth crossed %d MB; the monitor saw %.1f MB"
                  % (i + 1, status, lat[-1], mem_limit, grew))
            wait_for(functools.partial(_replaced, mem, pids), 30,
                     "the replacement worker")
            mem.pin_all()
    finally:
        mem.stop()
    intervals = [x / interval_ms for x in lat]
    v = median(intervals)
    out.rows.append(Row("7", "memory growth: terminated past memory_limit_mb (wall / interval), median", v,
                        "intervals", "<= 2", at_most(v, 2.0), intervals))
    out.rows.append(Row("7", "memory growth: same, max", max(intervals), "intervals", values=intervals))
    mb_int = [x / (rate * INTERVAL) for x in over_mb]
    out.rows.append(Row("7", "memory growth: MB past the limit when seen / MB grown per interval, median",
                        median(mb_int), "intervals", values=mb_int))
    out.details.append("7. memory detection, memory_limit_mb=%d, growth %.0f MB/s (%.0f MB per interval): ms from "
                       "crossing to the 546 per trial: %s; MB past the limit in the termination log line: %s"
                       % (mem_limit, rate, rate * INTERVAL, ", ".join("%.0f" % x for x in lat),
                          ", ".join("%.1f" % x for x in over_mb)))
    return out


# -- 8. memory -------------------------------------------------------------------------


def s8_memory(o: Options) -> Outcome:
    import psutil

    out = Outcome()
    es = _server(o, "s8-edgesync", ES)
    gt = _server(o, "s8-gthread", "gthread")
    readings: Dict[str, List[tuple[float, float]]] = {"edgesync": [], "gthread": []}
    try:
        _start(es, gt)
        loads = [Load("edgesync", es, "/hello"), Load("gthread", gt, "/hello")]
        side_by_side(loads, 2, o.connections, o.client_cpu)
        side_by_side([Load("edgesync", es, "/plain"), Load("gthread", gt, "/plain")], 1, o.connections,
                     o.client_cpu)
        time.sleep(1.0)
        for _ in range(3):
            for name, server in (("edgesync", es), ("gthread", gt)):
                (pid,) = server.worker_pids()
                p = psutil.Process(pid)
                full = p.memory_full_info()
                readings[name].append((full.rss / 2**20, full.uss / 2**20))
            time.sleep(0.5)
    finally:
        _stop(es, gt)
    rss = {k: median([r for r, _ in v]) for k, v in readings.items()}
    uss = {k: median([u for _, u in v]) for k, v in readings.items()}
    diff = rss["edgesync"] - rss["gthread"]
    out.rows.append(Row("8", "idle worker RSS, edgesync - gthread", diff, "MB", "<= 5 MB", at_most(diff, 5.0),
                        [a - b for (a, _), (b, _) in zip(readings["edgesync"], readings["gthread"], strict=True)]))
    out.rows.append(Row("8", "idle worker RSS, edgesync / gthread", rss["edgesync"] / rss["gthread"], "x"))
    out.rows.append(Row("8", "idle worker USS, edgesync - gthread", uss["edgesync"] - uss["gthread"], "MB"))
    out.details.append("8. idle worker memory after %d s of /hello and /plain: RSS edgesync %.1f MB, gthread %.1f MB;"
                       " USS edgesync %.1f MB, gthread %.1f MB" % (3, rss["edgesync"], rss["gthread"],
                                                                  uss["edgesync"], uss["gthread"]))
    return out


SCENARIOS: Dict[str, tuple[str, Callable[[Options], Outcome]]] = {
    "1": ("hello world: edgesync vs gthread (and sync)", s1_hello),
    "2": ("wait_until in the view vs the same view without it", s2_wait_until),
    "3": ("limits monitor on vs off", s3_limits),
    "4": ("wait_until vs ThreadPoolExecutor, in-process", s4_micro),
    "5": ("cost growth: queue depth, live invocations", s5_growth),
    "6": ("recycling under load", s6_recycling),
    "7": ("detection latency: CPU and memory", s7_detection),
    "8": ("idle worker memory", s8_memory),
}

NAMES: Dict[str, str] = {
    "hello": "1", "wait_until": "2", "limits": "3", "micro": "4", "growth": "5", "recycling": "6",
    "detection": "7", "memory": "8",
}


def resolve(names: Sequence[str]) -> List[str]:
    """Scenario numbers for ``--only`` values (numbers or names, comma-separated)."""
    out: List[str] = []
    for item in names:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key = NAMES.get(part, part)
            if key not in SCENARIOS:
                raise BenchError("unknown scenario %r: use a number 1-8 or one of %s" % (part, ", ".join(NAMES)))
            if key not in out:
                out.append(key)
    return sorted(out)
