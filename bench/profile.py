"""Where a request's CPU time goes: edgesync.Worker against gthread, side by side.

    python bench/profile.py [--seconds 10] [--path /hello] [--rate 250]    # py-spy sampling
    python bench/profile.py --cprofile [--seconds 10]                     # cProfile: call counts
    python bench/profile.py --syscalls [--seconds 10]                     # strace -c: system calls

Starts one edgesync and one gthread server (same app, same --threads), pinned to
the server core, loads both at once with wrk pinned to the client core (as
bench/run.py does), and meanwhile

- reads each worker's CPU time (user + system, from /proc through psutil), so
  the CPU cost of one request is known for each, kernel time included;
- samples each worker with ``py-spy record --gil`` (installed with pip if
  missing): only the thread holding the GIL is sampled, so the samples are the
  Python time of the process, not threads waiting for the GIL.

Each sample is charged to the innermost frame that belongs to a component
(edgesync, gunicorn, flask/werkzeug, the bench app, concurrent.futures); the
standard library frames under it (threading, queue, socket, selectors...) are
charged to that component. It prints, per server, microseconds per request per
component and the top functions by self time, and writes the same as Markdown
plus the raw py-spy stacks to bench/results/profile-<time>/.

Caveat, measured: on a core shared by two busy servers a process is often
descheduled, and a sampler charges that time to wherever the process was
preempted while it held the GIL. A real system call made with the GIL held (such
as ``time.thread_time()``, ``clock_gettime(CLOCK_THREAD_CPUTIME_ID)``) is where the
kernel notices a used-up time slice, so it collects those samples: hundreds of us
per request that are not CPU (compare the /proc CPU time per request). The
preemption there is not free either: the worker's other threads then wait for the
GIL (an A/B measured ~2% of req/s for one such call per request on the request
path, which is why the monitor, not the request thread, reads the CPU clock).
``--cprofile`` shows the same effect in wall time; its call counts are exact.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import Load, Server, WrkResult, finish_wrk, start_wrk

COMPONENTS: List[Tuple[str, str]] = [
    # (component, regex on the frame's file); the first match wins
    ("bench app", r"bench/apps/"),
    ("edgesync", r"(^|/)edgesync/"),
    ("concurrent.futures", r"concurrent/futures/"),
    ("flask/werkzeug", r"(^|/)(flask|werkzeug|jinja2|markupsafe|itsdangerous|click|blinker)/"),
    ("gunicorn", r"(^|/)gunicorn/"),
]
ROLES = [("request threads", r"^(edgesync-request|ThreadPoolExecutor)"), ("main thread", r"^MainThread"),
         ("monitor", r"^edgesync-monitor"), ("background tasks", r"^edgesync-task")]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*):(?P<line>\d+)\)$")


def ensure_py_spy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    found = shutil.which("py-spy")
    if found:
        return found
    print("py-spy is missing: installing it with pip", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(here) if here.exists() else "py-spy"


def component(file: str) -> Optional[str]:
    for name, rx in COMPONENTS:
        if re.search(rx, file):
            return name
    return None


def role(thread: str) -> str:
    for name, rx in ROLES:
        if re.search(rx, thread):
            return name
    return "other threads"


class Profile:
    """py-spy raw (collapsed) stacks of one worker, aggregated."""

    def __init__(self, path: Path):
        self.total = 0
        self.by_component: collections.Counter[str] = collections.Counter()
        self.by_role: collections.Counter[str] = collections.Counter()
        self.self_time: collections.Counter[str] = collections.Counter()
        self.inclusive: collections.Counter[str] = collections.Counter()
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else ""
            frames = frames[1:] if thread else frames
            parsed = [_FRAME.match(f) for f in frames]
            names = ["%s (%s)" % (m.group("func"), m.group("file")) if m else f for m, f in zip(parsed, frames,
                                                                                                strict=True)]
            self.total += n
            self.by_role[role(thread)] += n
            owner = "other (interpreter, stdlib)"
            for m in reversed(parsed):
                c = component(m.group("file")) if m else None
                if c:
                    owner = c
                    break
            self.by_component[owner] += n
            if names:
                self.self_time[names[-1]] += n
            for name in set(names):
                self.inclusive[name] += n


@dataclass
class Measured:
    wrk: WrkResult
    requests: float  # requests answered during the profiling window
    user_us: float  # worker CPU per request
    system_us: float
    profile: Profile

    def per_req(self, samples: int, rate: int) -> float:
        """Microseconds per request that ``samples`` py-spy samples stand for."""
        return samples / rate / self.requests * 1e6


def measure(seconds: float, rate: int, path: str, threads: int, connections: int, outdir: Path,
            server_cpu: int, client_cpu: int, alone: bool = False) -> Dict[str, Measured]:
    import psutil

    spy = ensure_py_spy()
    servers = {"edgesync": Server("edgesync", "edgesync.Worker", outdir, threads=threads, cpu=server_cpu),
               "gthread": Server("gthread", "gthread", outdir, threads=threads, cpu=server_cpu)}
    out: Dict[str, Measured] = {}
    try:
        for s in servers.values():
            s.start()
        loads = [Load(k, s, path) for k, s in servers.items()]
        harness.side_by_side(loads, 2, connections, client_cpu)  # warm-up
        groups = [[ld] for ld in loads] if alone else [loads]
        for group in groups:
            wrks = {ld.label: start_wrk(ld, seconds + 2, connections, client_cpu) for ld in group}
            time.sleep(1.0)
            procs = {k: psutil.Process(servers[k].worker_pids()[0]) for k in wrks}
            cpu0 = {k: p.cpu_times() for k, p in procs.items()}
            spies = {k: subprocess.Popen(["taskset", "-c", str(client_cpu), spy, "record", "--pid", str(p.pid),
                                          "--duration", str(int(seconds)), "--rate", str(rate), "--format", "raw",
                                          "--gil", "--threads", "--nonblocking", "--output",
                                          str(outdir / ("%s.stacks" % k))],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for k, p in procs.items()}
            t0 = time.monotonic()
            for k, sp in spies.items():
                _, err = sp.communicate(timeout=seconds + 60)
                if sp.returncode != 0:
                    raise harness.BenchError("py-spy failed on %s: %s" % (k, err.decode(errors="replace")))
            window = time.monotonic() - t0
            cpu1 = {k: p.cpu_times() for k, p in procs.items()}
            results = {k: finish_wrk(w, seconds + 40) for k, w in wrks.items()}
            for k in wrks:
                requests = results[k].rps * window
                user = cpu1[k].user - cpu0[k].user
                system = cpu1[k].system - cpu0[k].system
                out[k] = Measured(results[k], requests, user / requests * 1e6, system / requests * 1e6,
                                  Profile(outdir / ("%s.stacks" % k)))
    finally:
        for s in servers.values():
            s.stop()
        harness.cleanup()
    return out


def report(res: Dict[str, Measured], rate: int, top: int, path: str) -> str:
    es, gt = res["edgesync"], res["gthread"]
    pe, pg = es.profile, gt.profile
    lines = ["# Profile: edgesync.Worker vs gthread, GET %s" % path, ""]
    lines.append("| | edgesync | gthread | edgesync / gthread |")
    lines.append("|---|---|---|---|")

    def row(label: str, a: float, b: float, fmt: str = "%.1f") -> None:
        lines.append("| %s | %s | %s | %s |" % (label, fmt % a, fmt % b, "%.3fx" % (a / b) if b else "n/a"))

    def per_req(p: Profile, n: int, r: Measured) -> float:
        return r.per_req(n, rate)

    row("req/s (wrk)", es.wrk.rps, gt.wrk.rps, "%.0f")
    row("CPU us per request, user", es.user_us, gt.user_us)
    row("CPU us per request, system", es.system_us, gt.system_us)
    row("CPU us per request, total", es.user_us + es.system_us, gt.user_us + gt.system_us)
    row("py-spy samples holding the GIL", pe.total, pg.total, "%d")
    row("GIL-holding Python time, us per request", per_req(pe, pe.total, es), per_req(pg, pg.total, gt))
    lines += ["", "## Python time per request, by component (us, from py-spy --gil samples)", "",
              "| component | edgesync | gthread | difference |", "|---|---|---|---|"]
    comps = sorted(set(pe.by_component) | set(pg.by_component), key=lambda c: -(pe.by_component[c]
                                                                                 + pg.by_component[c]))
    for c in comps:
        a, b = per_req(pe, pe.by_component[c], es), per_req(pg, pg.by_component[c], gt)
        lines.append("| %s | %.1f | %.1f | %+.1f |" % (c, a, b, a - b))
    lines += ["", "## Python time per request, by thread (us)", "", "| threads | edgesync | gthread |",
              "|---|---|---|"]
    for role in sorted(set(pe.by_role) | set(pg.by_role)):
        lines.append("| %s | %.1f | %.1f |" % (role, per_req(pe, pe.by_role[role], es),
                                               per_req(pg, pg.by_role[role], gt)))
    for name, p, r in (("edgesync", pe, es), ("gthread", pg, gt)):
        lines += ["", "## %s: top %d functions by self time (us per request, %% of samples)" % (name, top), "",
                  "| function | self us/req | self % | inclusive % |", "|---|---|---|---|"]
        for fn, n in p.self_time.most_common(top):
            lines.append("| `%s` | %.1f | %.1f%% | %.1f%% |" % (fn, per_req(p, n, r), 100.0 * n / p.total,
                                                               100.0 * p.inclusive[fn] / p.total))
    lines += ["", "## edgesync functions on the stack (inclusive, us per request)", "",
              "| function | edgesync us/req | % of samples |", "|---|---|---|"]
    for fn, n in pe.inclusive.most_common():
        if "edgesync/" in fn:
            lines.append("| `%s` | %.1f | %.1f%% |" % (fn, per_req(pe, n, es), 100.0 * n / pe.total))
    lines += ["", "## Largest differences in inclusive time (us per request, edgesync - gthread)", "",
              "| function | edgesync | gthread | difference |", "|---|---|---|---|"]
    diffs = []
    for fn in set(pe.inclusive) | set(pg.inclusive):
        a, b = per_req(pe, pe.inclusive[fn], es), per_req(pg, pg.inclusive[fn], gt)
        diffs.append((abs(a - b), fn, a, b))
    for _, fn, a, b in sorted(diffs, reverse=True)[:top]:
        lines.append("| `%s` | %.1f | %.1f | %+.1f |" % (fn, a, b, a - b))
    return "\n".join(lines) + "\n"


# -- cProfile (deterministic: call counts) ---------------------------------------------


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _load_stats(directory: Path) -> Dict[str, Tuple[float, float, float]]:
    """{"func (file)": (ncalls, tottime, cumtime)} summed over every thread's pstats file."""
    import pstats

    files = sorted(str(f) for f in directory.glob("*.pstats"))
    if not files:
        raise harness.BenchError("no profile was written to %s (did the worker exit cleanly?)" % directory)
    st = pstats.Stats(*files)
    out: Dict[str, Tuple[float, float, float]] = {}
    for (file, _line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        key = "%s (%s)" % (func, _short(file))
        old = out.get(key, (0.0, 0.0, 0.0))
        out[key] = (old[0] + nc, old[1] + tt, old[2] + ct)
    return out


def measure_cprofile(seconds: float, path: str, threads: int, connections: int, outdir: Path,
                     server_cpu: int, client_cpu: int) -> str:
    hook = str(Path(__file__).resolve().parent / "profile_hook.py")
    servers = {}
    for name, worker in (("edgesync", "edgesync.Worker"), ("gthread", "gthread")):
        d = outdir / ("%s-pstats" % name)
        d.mkdir(parents=True, exist_ok=True)
        servers[name] = Server(name, worker, outdir, threads=threads, cpu=server_cpu, args=["-c", hook],
                               env={"BENCH_PROFILE_DIR": str(d)})
    try:
        for s in servers.values():
            s.start()
        loads = [Load(k, s, path) for k, s in servers.items()]
        res = harness.side_by_side(loads, seconds, connections, client_cpu)
    finally:
        for s in servers.values():
            s.stop()
        harness.cleanup()
    stats = {k: _load_stats(outdir / ("%s-pstats" % k)) for k in servers}
    reqkey = "handle_request (gunicorn/workers/gthread.py)"
    nreq = {k: stats[k][reqkey][0] for k in stats}
    lines = ["# cProfile: edgesync.Worker vs gthread, GET %s, %gs side by side" % (path, seconds), "",
             "Deterministic profile of every thread of each worker (bench/profile_hook.py). Times include "
             "cProfile's own overhead and GIL waits, so read the call counts first and the times as "
             "relative. Requests profiled: edgesync %d, gthread %d (wrk: %s | %s)."
             % (nreq["edgesync"], nreq["gthread"], res[0].brief(), res[1].brief()), ""]

    def table(title: str, keys: List[str], k: str) -> None:
        lines.extend(["## " + title, "", "| function | calls/req | tottime us/req | cumtime us/req |",
                      "|---|---|---|---|"])
        for key in keys:
            nc, tt, ct = stats[k].get(key, (0, 0, 0))
            lines.append("| `%s` | %.2f | %.1f | %.1f |" % (key, nc / nreq[k], tt / nreq[k] * 1e6,
                                                           ct / nreq[k] * 1e6))
        lines.append("")

    for k in ("edgesync", "gthread"):
        top = sorted(stats[k], key=lambda key: -stats[k][key][1])[:30]
        table("%s: top 30 by own time" % k, top, k)
    only_es = [key for key in stats["edgesync"] if stats["edgesync"][key][0] / nreq["edgesync"] >= 0.5
               and stats["gthread"].get(key, (0, 0, 0))[0] / nreq["gthread"] < 0.05]
    only_gt = [key for key in stats["gthread"] if stats["gthread"][key][0] / nreq["gthread"] >= 0.5
               and stats["edgesync"].get(key, (0, 0, 0))[0] / nreq["edgesync"] < 0.05]
    table("called per request by edgesync only", sorted(only_es, key=lambda x: -stats["edgesync"][x][1]), "edgesync")
    table("called per request by gthread only", sorted(only_gt, key=lambda x: -stats["gthread"][x][1]), "gthread")
    for k in stats:
        total_calls = sum(v[0] for v in stats[k].values())
        lines.append("- %s: %.0f function calls per request in all threads" % (k, total_calls / nreq[k]))
    return "\n".join(lines) + "\n"


# -- strace: system calls per request ---------------------------------------------------


def _strace_counts(path: Path) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  errors  syscall" (errors may be blank)
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",) and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


def measure_syscalls(seconds: float, path: str, threads: int, connections: int, outdir: Path,
                     server_cpu: int, client_cpu: int) -> str:
    """``strace -c -f`` on both workers while both are loaded: system calls per request."""
    import psutil

    if not shutil.which("strace"):
        raise harness.BenchError("strace is missing: apt-get install -y strace")
    servers = {"edgesync": Server("edgesync", "edgesync.Worker", outdir, threads=threads, cpu=server_cpu),
               "gthread": Server("gthread", "gthread", outdir, threads=threads, cpu=server_cpu)}
    try:
        for s in servers.values():
            s.start()
        loads = [Load(k, s, path) for k, s in servers.items()]
        harness.side_by_side(loads, 2, connections, client_cpu)  # warm-up
        wrks = {ld.label: start_wrk(ld, seconds + 3, connections, client_cpu) for ld in loads}
        time.sleep(1.0)
        traces = {}
        for k, s in servers.items():
            pid = s.worker_pids()[0]
            tids = [t.id for t in psutil.Process(pid).threads()]
            cmd = ["taskset", "-c", str(client_cpu), "strace", "-c", "-o", str(outdir / ("%s.strace" % k))]
            for tid in tids:
                cmd += ["-p", str(tid)]
            traces[k] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        t0 = time.monotonic()
        time.sleep(seconds)
        for tr in traces.values():
            tr.send_signal(2)  # strace prints its summary on SIGINT
        for tr in traces.values():
            tr.wait(30)
        window = time.monotonic() - t0
        results = {k: finish_wrk(w, seconds + 40) for k, w in wrks.items()}
    finally:
        for s in servers.values():
            s.stop()
        harness.cleanup()
    counts = {k: _strace_counts(outdir / ("%s.strace" % k)) for k in servers}
    # strace slows a worker several times over, so wrk's rate over the whole run does not
    # count the requests of the traced window; a small keep-alive GET is read with one
    # recvfrom, so that count is the number of requests served while traced.
    nreq = {k: float(counts[k].get("recvfrom", 0)) or results[k].rps * window for k in servers}
    lines = ["# System calls per request, GET %s, %gs side by side (strace -c on every worker thread)" % (
        path, seconds), "", "strace slows both workers alike; the counts are what matter. Requests while traced "
             "(one recvfrom each): edgesync %.0f, gthread %.0f. futex counts are GIL and lock hand-offs, and "
             "depend on timing more than on code." % (nreq["edgesync"], nreq["gthread"]), "",
             "| system call | edgesync /req | gthread /req | difference |", "|---|---|---|---|"]
    names = sorted(set(counts["edgesync"]) | set(counts["gthread"]),
                   key=lambda n: -(counts["edgesync"].get(n, 0) / nreq["edgesync"]
                                   + counts["gthread"].get(n, 0) / nreq["gthread"]))
    tot = {k: sum(counts[k].values()) / nreq[k] for k in counts}
    for n in names:
        a = counts["edgesync"].get(n, 0) / nreq["edgesync"]
        b = counts["gthread"].get(n, 0) / nreq["gthread"]
        if a >= 0.01 or b >= 0.01:
            lines.append("| %s | %.2f | %.2f | %+.2f |" % (n, a, b, a - b))
    lines.append("| **total** | %.2f | %.2f | %+.2f |" % (tot["edgesync"], tot["gthread"],
                                                         tot["edgesync"] - tot["gthread"]))
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python bench/profile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="profiling window (default 10)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--path", default="/hello", help="the route to load (default /hello)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--cprofile", action="store_true",
                   help="a deterministic cProfile of every worker thread instead of py-spy: call counts per "
                        "request, and what each worker calls that the other does not")
    p.add_argument("--syscalls", action="store_true",
                   help="count system calls per request with strace -c instead (both workers, side by side)")
    p.add_argument("--alone", action="store_true",
                   help="profile one server after the other, each alone on its core (default: both at once, "
                        "side by side, which on a shared machine is the only fair comparison)")
    a = p.parse_args(argv)
    outdir = Path(__file__).resolve().parent / "results" / ("profile-" + time.strftime("%Y%m%d-%H%M%S"))
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        harness.ensure_wrk()
        if a.syscalls:
            text = measure_syscalls(a.seconds, a.path, a.threads, a.connections, outdir, a.server_cpu,
                                    a.client_cpu)
            (outdir / "syscalls.md").write_text(text)
            print(text)
            return 0
        if a.cprofile:
            text = measure_cprofile(a.seconds, a.path, a.threads, a.connections, outdir, a.server_cpu,
                                    a.client_cpu)
            (outdir / "cprofile.md").write_text(text)
            print(text)
            print("written to %s" % outdir)
            return 0
        res = measure(a.seconds, a.rate, a.path, a.threads, a.connections, outdir, a.server_cpu, a.client_cpu,
                      alone=a.alone)
    except KeyboardInterrupt:
        harness.cleanup()
        return 130
    except harness.BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 2
    text = report(res, a.rate, a.top, a.path)
    (outdir / "profile.md").write_text(text)
    print(text)
    print("written to %s (raw stacks: *.stacks, for flamegraph.pl or speedscope)" % outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
