"""Run edgesync's benchmark suite and print a table of ratios (see docs/benchmarks.md).

    python bench/run.py                       # every scenario, 5 rounds x 10 s; writes bench/RESULTS.md
    python bench/run.py --quick               # a short smoke run (does not touch RESULTS.md)
    python bench/run.py --only 1,3 --rounds 7 --seconds 15    # rewrites the sections of 1 and 3 only

bench/RESULTS.md holds one section per scenario, each with the command, machine and
commit that measured it: a run rewrites the sections of the scenarios it ran and keeps
the others, so the file always holds the latest figures of every scenario.

Run it with the Python that has edgesync, gunicorn and Flask installed. It
installs wrk with apt-get if it is missing, and kills every server it started
when it ends, whether it finishes, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.scenarios import NAMES, SCENARIOS, Options, Outcome, Row, resolve

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds x 2 s, short recycling run, 3 trials; RESULTS.md is left alone")
    p.add_argument("--rounds", type=int, help="side-by-side rounds per comparison (default 5; quick 2)")
    p.add_argument("--seconds", type=float, help="seconds of load per round (default 10; quick 2)")
    p.add_argument("--reference-rounds", type=int,
                   help="rounds of the reference comparisons, which have no target (default: --rounds minus 2, "
                        "at least 2)")
    p.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                   help="run only these scenarios: numbers or names (%s), comma-separated or repeated"
                   % ", ".join("%s=%s" % (n, name) for name, n in sorted(NAMES.items(), key=lambda x: x[1])))
    p.add_argument("--connections", type=int, default=8, help="wrk connections per server (default 8)")
    p.add_argument("--threads", type=int, default=4, help="gunicorn --threads of every server (default 4)")
    p.add_argument("--recycle-seconds", type=float, help="length of the recycling run (default 30; quick 6)")
    p.add_argument("--trials", type=int, help="trials per detection measurement (default 9; quick 3)")
    p.add_argument("--server-cpu", type=int, default=0, help="core every server process is pinned to (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="core every wrk is pinned to (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything (a machine with one core)")
    p.add_argument("--results", metavar="PATH",
                   help="the Markdown results file whose sections of the scenarios run are rewritten "
                        "(default: bench/RESULTS.md, nowhere for --quick); '-' for nowhere")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.seconds = a.seconds or (2.0 if a.quick else 10.0)
    a.reference_rounds = a.reference_rounds or max(2, a.rounds - 2)
    a.recycle_seconds = a.recycle_seconds or (6.0 if a.quick else 30.0)
    a.trials = a.trials or (3 if a.quick else 9)
    if a.rounds < 1 or a.seconds < 1 or a.trials < 1:
        p.error("--rounds, --seconds and --trials must be at least 1")
    return a


def check_cpus(a: argparse.Namespace) -> None:
    if a.no_pin:
        a.server_cpu = a.client_cpu = None
        return
    allowed = os.sched_getaffinity(0)
    if a.server_cpu not in allowed or a.client_cpu not in allowed or a.server_cpu == a.client_cpu:
        raise harness.BenchError(
            "the servers (--server-cpu %s) and wrk (--client-cpu %s) need two different cores among %s; "
            "pick others or pass --no-pin (the ratios are then much noisier)"
            % (a.server_cpu, a.client_cpu, sorted(allowed)))
    if not shutil.which("taskset"):
        raise harness.BenchError("taskset is missing (package util-linux): install it or pass --no-pin")


def text_table(rows: List[Row]) -> str:
    head = ("#", "measure", "median", "target", "verdict", "every round / trial")
    body = [(r.scenario, r.what, r.shown(), r.target, r.verdict,
             " ".join(r.shown(v).replace(" intervals", "") for v in r.values) if len(r.values) > 1 else "")
            for r in rows]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    widths[-1] = 0

    def line(cells: Any) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths[:-1]] + ["-" * 20])] + [line(b) for b in body])


TABLE_HEAD = "| # | measure | median | target | verdict | every round / trial |\n|---|---|---|---|---|---|"


def md_rows(rows: List[Row]) -> List[str]:
    out = []
    for r in rows:
        every = ", ".join(r.shown(v).replace(" intervals", "") for v in r.values) if len(r.values) > 1 else ""
        verdict = {"PASS": "pass", "MISS": "**MISS**"}.get(r.verdict, "")
        out.append("| %s | %s | %s | %s | %s | %s |" % (r.scenario, r.what, r.shown(), r.target, verdict, every))
    return out


HEADER = """# Benchmark results

The latest figures of every scenario, as `python bench/run.py` wrote them: a run rewrites the
sections of the scenarios it ran and keeps the others. How to read them: docs/benchmarks.md.
"""
#: Opens each scenario's section; what follows, up to the next one, is that scenario's.
SECTION = "<!-- scenario %s -->"


def scenario_section(key: str, title: str, cmd: str, took: str, machine: List[str], rows: List[str],
                     details: List[str]) -> str:
    """One scenario's section of RESULTS.md: what measured it, its table rows, every round."""
    lines = [SECTION % key, "## %s. %s" % (key, title), "", "Measured by `%s` (%s) on:" % (cmd, took), ""]
    lines += ["- %s" % m for m in machine]
    lines += ["", TABLE_HEAD] + rows + ["", "```"] + details + ["```", ""]
    return "\n".join(lines)


def merge_results(old: str, new: Dict[str, str]) -> str:
    """RESULTS.md with the sections in ``new`` (by scenario) replacing or joining those of ``old``."""
    sections: Dict[str, str] = {}
    for chunk in re.split(r"(?m)^(?=<!-- scenario )", old)[1:]:
        match = re.match(r"<!-- scenario (\d+) -->", chunk)
        if match:
            sections[match.group(1)] = chunk.rstrip("\n") + "\n"
    sections.update({k: v.rstrip("\n") + "\n" for k, v in new.items()})
    return HEADER + "".join("\n" + sections[k] for k in sorted(sections, key=int))


def write_results(path: Path, a: argparse.Namespace, argv: List[str], before: Dict[str, str],
                  after: Dict[str, str], ran: Dict[str, Tuple[List[Row], List[str], float]]) -> None:
    """Rewrite the sections of ``path`` for the scenarios in ``ran``, keeping the others."""
    cmd = "python bench/run.py" + ("" if not argv else " " + " ".join(shlex.quote(x) for x in argv))
    machine = ["%s: %s" % (k, v) for k, v in before.items()]
    machine.append("load average at the end: %s" % after.get("load average (1/5/15 min)", "?"))
    machine.append(
        "method: servers pinned to core %s (every process, `taskset -a -p`), one `wrk -t1 -c%d` per server "
        "pinned to core %s, both loaded at once; %d rounds x %g s per comparison, which server starts first "
        "alternates; gunicorn `--threads %d`, 1 worker unless said otherwise"
        % (a.server_cpu, a.connections, a.client_cpu, a.rounds, a.seconds, a.threads))
    new = {key: scenario_section(key, SCENARIOS[key][0], cmd, "%.0f s for this scenario" % elapsed, machine,
                                 md_rows(rows), details)
           for key, (rows, details, elapsed) in ran.items()}
    old = path.read_text() if path.exists() else ""
    path.write_text(merge_results(old, new))


def main(argv: List[str]) -> int:
    a = parse_args(argv)
    try:
        chosen = resolve(a.only) if a.only else sorted(SCENARIOS)
    except harness.BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 2
    results: Optional[Path] = None
    if a.results and a.results != "-":
        results = Path(a.results)
    elif a.results is None and not a.quick:
        results = RESULTS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = BENCH / "results" / stamp
    logdir.mkdir(parents=True, exist_ok=True)

    def on_term(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt("signal %d" % sig)

    # Ctrl-C must stop the run even when SIGINT was ignored by whoever started it
    # (a background job of a script): the servers are in sessions of their own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    rows: List[Row] = []
    ran: Dict[str, Tuple[List[Row], List[str], float]] = {}
    failed: List[str] = []
    t0 = time.monotonic()
    try:
        harness.ensure_wrk()
        check_cpus(a)
        before = harness.machine()
        print("edgesync benchmarks: %s" % ", ".join(chosen))
        for k, v in before.items():
            print("  %s: %s" % (k, v))
        print("  logs: %s" % logdir)
        opts = Options(rounds=a.rounds, seconds=a.seconds, reference_rounds=a.reference_rounds,
                       connections=a.connections, threads=a.threads,
                       server_cpu=a.server_cpu, client_cpu=a.client_cpu, quick=a.quick,
                       recycle_seconds=a.recycle_seconds, trials=a.trials, logdir=logdir,
                       log=lambda s: print(s, flush=True))
        for key in chosen:
            title, fn = SCENARIOS[key]
            print("\n[%s] %s" % (key, title), flush=True)
            started = time.monotonic()
            try:
                outcome: Outcome = fn(opts)
            except harness.BenchError as exc:
                print("  FAILED: %s" % exc, flush=True)
                failed.append(key)
                harness.cleanup()
                continue
            rows += outcome.rows
            ran[key] = (outcome.rows, outcome.details, time.monotonic() - started)
            print(text_table(outcome.rows))
            print("  (%.0f s)" % ran[key][2], flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server", file=sys.stderr)
        return 130
    except harness.BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 2
    finally:
        harness.cleanup()
    elapsed = time.monotonic() - t0
    print("\n== edgesync benchmarks: ratios (median; every round listed) ==")
    print(text_table(rows))
    misses = [r for r in rows if r.ok is False]
    print("\n%d measures with a target: %d pass, %d miss%s. %.0f s."
          % (sum(r.ok is not None for r in rows), sum(r.ok is True for r in rows), len(misses),
             "; scenarios that failed to run: %s" % ", ".join(failed) if failed else "", elapsed))
    if results is not None:
        write_results(results, a, argv, before, harness.machine(), ran)
        print("results written to %s (the sections of scenario%s %s)"
              % (results, "s" if len(ran) != 1 else "", ", ".join(ran) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
