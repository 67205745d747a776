"""The benchmark harness: gunicorn servers pinned to one core, wrk pinned to another.

Method (issue 5): absolute req/s swing by 10-15% from run to run on a shared
machine, so two servers are always compared *side by side*: both run at once,
every process of both is pinned to the server core, each is loaded by its own
``wrk`` pinned to the client core, and the two ``wrk`` start together (which one
starts first alternates per round). Whatever else the machine does then slows
both alike, and the ratio of their figures is their cost ratio.

Every process this module starts is registered and killed (its whole process
group) by ``cleanup()``, which the runner calls in a ``finally`` and on SIGTERM,
so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
APP = "bench.apps.flask_app:app"

#: A pair of servers older than this is restarted before its next round: the
#: default wall_clock_limit_ms (400 s) retires an edgesync worker at 20-50% of
#: it, 80 s at the earliest, and a retire in the middle of a round is not what
#: a throughput round measures.
SERVER_MAX_AGE = 60.0

_procs: List[subprocess.Popen[bytes]] = []

#: The wrk binary: ``$WRK`` if set (a binary carried to a machine where nothing can be
#: installed), else ``wrk`` on PATH.
WRK = os.environ.get("WRK") or "wrk"

#: A core, or a taskset list of cores ("0-5"): what every process of a server is pinned to.
Cpus = Union[int, str]


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server did not start, wrk is missing...)."""


# -- cleanup -----------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanup() -> None:
    """Kill every process group this run started (servers and wrk), and reap them."""
    for proc in list(_procs):
        if proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
    for proc in list(_procs):
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    _procs.clear()


def _spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Each child leads its own session, so killpg reaches gunicorn's workers too.
    proc = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
    _procs.append(proc)
    return proc


# -- the machine --------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> Dict[str, str]:
    """What the results were measured on."""

    def run(cmd: List[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "unknown"

    try:
        load = " ".join("%.2f" % x for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": run(["nproc"]),
        "cpu": cpu_model(),
        "python": "%s (%s)" % (sys.version.split()[0], sys.executable),
        "gunicorn": importlib.metadata.version("gunicorn"),
        "flask": importlib.metadata.version("flask"),
        "wrk": run([WRK, "--version"]).split(" [")[0],
        "commit": run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"]),
        "load average (1/5/15 min)": load,
    }


def ensure_wrk() -> str:
    """The path of ``wrk`` (``$WRK``, else on PATH), installed with apt-get if it is missing."""
    path = shutil.which(WRK)
    if path:
        return path
    print("wrk is missing: installing it with apt-get", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "wrk"], env=env)
    if install.returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=False)
    path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk is not installed and `apt-get install -y wrk` did not install it: "
                         "install wrk (https://github.com/wg/wrk) and run again")
    return path


def pin(pid: int, cpu: Cpus) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (``taskset -a -p -c``)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- servers ----------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


class Server:
    """One gunicorn master (``-k worker_class``) running the bench app on 127.0.0.1.

    The master starts under ``taskset -c cpu`` and every process is pinned again
    with ``taskset -a -p`` once the workers are up (workers forked later, by a
    recycle, inherit the master's affinity). ``env`` sets EDGESYNC_* overrides;
    any EDGESYNC_* of the caller's environment is dropped, and the working
    directory is a fresh one, so no stray edgesync.toml is read. ``root`` is the
    tree the app and edgesync are imported from (another checkout: a "before" server).
    """

    def __init__(self, name: str, worker_class: str, logdir: Path, *, threads: int = 4, workers: int = 1,
                 env: Optional[Dict[str, str]] = None, args: Sequence[str] = (), cpu: Optional[Cpus] = 0,
                 app: str = APP, root: Path = REPO):
        self.name = name
        self.worker_class = worker_class
        self.threads = threads
        self.workers = workers
        self.env = dict(env or {})
        self.args = list(args)
        self.cpu = cpu
        self.app = app
        self.root = root
        self.workdir = logdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "gunicorn.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.started_at = 0.0

    def start(self, timeout: float = 60.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        env.update(self.env)
        cmd = [sys.executable, "-m", "gunicorn", "-k", self.worker_class, "-w", str(self.workers),
               "-b", "127.0.0.1:0", "--pythonpath", str(self.root), "--chdir", str(self.workdir),
               "--log-level", "info", "--graceful-timeout", "5", "--timeout", "30",
               "--no-control-socket"]
        if self.worker_class != "sync":
            cmd += ["--threads", str(self.threads)]
        cmd += self.args + [self.app]
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu)] + cmd
        self.log_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.proc = _spawn(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        match = wait_for(lambda: self._listening(), timeout, "%s to listen" % self.name)
        self.port = int(match.group(1))
        wait_for(lambda: len(self.worker_pids()) >= self.workers and self.answers(), timeout,
                 "%s's workers to answer" % self.name)
        self.pin_all()
        return self

    def _listening(self) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError("%s exited with %s:\n%s" % (self.name, self.proc.returncode, self.log[-3000:]))
        return re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log)

    def pin_all(self) -> None:
        if self.cpu is None or self.proc is None:
            return
        for pid in [self.proc.pid] + self.processes():
            try:
                pin(pid, self.cpu)
            except subprocess.CalledProcessError:
                pass  # a worker that just exited (a recycle)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def processes(self) -> List[int]:
        """Every live process under the master: its workers, its molds and what they are forking."""
        import psutil

        if self.proc is None:
            return []
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            return []

    def worker_pids(self) -> List[int]:
        """The master's workers: its live children but its molds (named ``edgesync-mold``)."""
        return self._children(molds=False)

    def mold_pids(self) -> List[int]:
        """The master's live molds (edgesync names their processes ``edgesync-mold``)."""
        return self._children(molds=True)

    def _children(self, molds: bool) -> List[int]:
        import psutil

        if self.proc is None:
            return []
        out = []
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        for kid in kids:
            try:
                if kid.status() != psutil.STATUS_ZOMBIE and (kid.name() == "edgesync-mold") == molds:
                    out.append(kid.pid)
            except psutil.Error:
                pass  # gone since the listing
        return sorted(out)

    def get(self, path: str, timeout: float = 10.0) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def answers(self) -> bool:
        try:
            return self.get("/pid", timeout=5)[0] == 200
        except OSError:
            return False

    @property
    def age(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the master, then SIGKILL its group if it is not gone in ``timeout`` s."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc, signal.SIGKILL)  # stragglers of the group, if any
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc in _procs:
            _procs.remove(proc)
        self.proc = None

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log))

    def cpu_seconds(self) -> float:
        """CPU time of the whole server so far: the master, the workers it reaped, the live ones.

        Read from ``/proc/<pid>/stat`` (utime, stime and the reaped children's cutime,
        cstime), so a worker counts once whether it is alive or gone.
        """
        if self.proc is None:
            return 0.0
        total = 0.0
        for pid in [self.proc.pid] + self.processes():
            try:
                st = proc_stat(pid)
            except OSError:
                continue  # gone since the listing: its master's cutime has it now
            total += (st["cpu"] + st["ccpu"]) / _CLOCK_TICKS
        return total

    def boot_cpu_ms(self, since: int = 0) -> List[int]:
        """Each worker's boot CPU (its serving line) logged after offset ``since`` of the log."""
        return [int(m) for m in re.findall(r"serving \(.*; booted in [\d.]+s, (\d+) ms of CPU\)", self.log[since:])]


# -- wrk ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError("not a wrk duration: %r" % text)
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    """What one wrk run reported (latencies in ms)."""

    rps: float
    requests: int
    p50: float
    p75: float
    p90: float
    p99: float
    avg: float
    max: float
    non2xx: int = 0
    errors: Dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def failed(self) -> int:
        """Non-2xx/3xx answers plus socket errors (connect, read, write, timeout)."""
        return self.non2xx + sum(self.errors.values())

    def brief(self) -> str:
        s = "%.0f req/s, p50 %.2f ms, p99 %.2f ms" % (self.rps, self.p50, self.p99)
        if self.failed:
            s += ", %d failed (%d non-2xx, errors %s)" % (self.failed, self.non2xx, self.errors)
        return s


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output."""
    def grab(pattern: str) -> Optional[re.Match[str]]:
        return re.search(pattern, text, re.MULTILINE)

    rps = grab(r"^Requests/sec:\s+([\d.]+)")
    total = grab(r"^\s*(\d+) requests in")
    lat = grab(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)")
    if not (rps and total and lat):
        raise BenchError("could not parse wrk's output:\n%s" % text)
    pct = {int(m.group(1)): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.MULTILINE)}
    non2xx = grab(r"Non-2xx or 3xx responses:\s+(\d+)")
    errs = grab(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    errors = {}
    if errs:
        kinds = ("connect", "read", "write", "timeout")
        errors = {k: int(v) for k, v in zip(kinds, errs.groups(), strict=True) if int(v)}
    return WrkResult(rps=float(rps.group(1)), requests=int(total.group(1)), p50=pct.get(50, float("nan")),
                     p75=pct.get(75, float("nan")), p90=pct.get(90, float("nan")), p99=pct.get(99, float("nan")),
                     avg=_ms(lat.group(1)), max=_ms(lat.group(3)), non2xx=int(non2xx.group(1)) if non2xx else 0,
                     errors=errors, raw=text)


@dataclass
class Load:
    """One side of a side-by-side run: which server, which path."""

    label: str
    server: Server
    path: str


def start_wrk(load: Load, seconds: float, connections: int, cpu: Optional[Cpus],
              threads: int = 1) -> subprocess.Popen[bytes]:
    cmd = [WRK, "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(seconds)), "--latency",
           "--timeout", "5s", "http://127.0.0.1:%d%s" % (load.server.port, load.path)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    return _spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_wrk(proc: subprocess.Popen[bytes], timeout: float) -> WrkResult:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        out, _ = proc.communicate()
        raise BenchError("wrk did not finish in %.0fs:\n%s" % (timeout, out.decode(errors="replace"))) from None
    finally:
        if proc in _procs:
            _procs.remove(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError("wrk exited with %d:\n%s" % (proc.returncode, text))
    return parse_wrk(text)


def side_by_side(loads: Sequence[Load], seconds: float, connections: int, cpu: Optional[Cpus],
                 first: int = 0, wrk_threads: int = 1) -> List[WrkResult]:
    """Load every server at once, each with its own wrk; ``loads[first]`` starts first.

    Returns the results in the order of ``loads``.
    """
    order = list(range(first, len(loads))) + list(range(first))
    procs = {i: start_wrk(loads[i], seconds, connections, cpu, wrk_threads) for i in order}
    return [finish_wrk(procs[i], seconds + 30) for i in range(len(loads))]


@dataclass
class PairRound:
    """One round of a side-by-side comparison of A against B."""

    index: int
    first: str
    a: WrkResult
    b: WrkResult
    note: str = ""

    def ratio(self, metric: str) -> float:
        return float(getattr(self.a, metric) / getattr(self.b, metric))


def compare(a: Load, b: Load, *, rounds: int, seconds: float, connections: int, client_cpu: Optional[Cpus],
            warmup: float = 1.0, log: Callable[[str], None] = print,
            on_restart: Optional[Callable[[Server], None]] = None, wrk_threads: int = 1) -> List[PairRound]:
    """``rounds`` side-by-side rounds of A against B, alternating which starts first.

    Servers older than ``SERVER_MAX_AGE`` are restarted before a round. A worker
    that changed during a round (a recycle) is noted on that round;
    ``on_restart(server)`` restores a restarted server's state.
    """
    out: List[PairRound] = []
    warm = True
    for r in range(rounds):
        for load in (a, b):
            if load.server.age + seconds > SERVER_MAX_AGE:
                log("    restarting %s (up %.0fs; a default worker retires after 160 s)"
                    % (load.server.name, load.server.age))
                load.server.restart()
                if on_restart is not None:
                    on_restart(load.server)
                warm = True
        if warm and warmup > 0:
            side_by_side([a, b], warmup, connections, client_cpu, wrk_threads=wrk_threads)
            warm = False
        pids = (a.server.worker_pids(), b.server.worker_pids())
        first = r % 2
        ra, rb = side_by_side([a, b], seconds, connections, client_cpu, first=first, wrk_threads=wrk_threads)
        note = ""
        if (a.server.worker_pids(), b.server.worker_pids()) != pids:
            note = "a worker was replaced during this round"
        pr = PairRound(r + 1, (a, b)[first].label, ra, rb, note)
        out.append(pr)
        log("    round %d (%s first): %s: %s | %s: %s%s" % (
            pr.index, pr.first, a.label, ra.brief(), b.label, rb.brief(), " [%s]" % note if note else ""))
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class PidWatcher:
    """Polls a server's worker pids in a thread: when each worker appeared and went.

    ``born`` holds only the workers forked during the watch, so a lifetime (``gone``
    minus ``born``) is never one cut short by the watch's start.
    """

    def __init__(self, server: Server, interval: float = 0.02):
        import threading

        self.server = server
        self.interval = interval
        self.born: Dict[int, float] = {}
        self.gone: Dict[int, float] = {}
        # The server's CPU during the watch, and the boot CPU of the workers that
        # became ready in it (from their serving lines).
        self.cpu = 0.0
        self.boot_cpu = 0.0
        self._log_at = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pid-watcher", daemon=True)

    def __enter__(self) -> PidWatcher:
        self._log_at = len(self.server.log)
        self.cpu = -self.server.cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cpu += self.server.cpu_seconds()
        self.boot_cpu = sum(self.server.boot_cpu_ms(self._log_at)) / 1000

    def _run(self) -> None:
        # Workers already there were born before the watch: their lifetimes would be cut
        # short, so only their exits are recorded.
        known: set[int] = set(self.server.worker_pids())
        while not self._stop.is_set():
            now = time.monotonic()
            pids = set(self.server.worker_pids())
            for pid in pids - known:
                self.born.setdefault(pid, now)
            for pid in known - pids:
                self.gone[pid] = now
            known = pids
            self._stop.wait(self.interval)

    def stagger(self) -> Tuple[float, float, int]:
        """(median lifetime, median gap from an exit to the nearest other exit, exits seen).

        Two workers retiring evenly staggered leave half a lifetime between exits;
        retiring together, almost none.
        """
        exits = sorted(self.gone.values())
        lives = [self.gone[p] - self.born[p] for p in self.gone if p in self.born]
        gaps = [min(abs(t - u) for j, u in enumerate(exits) if j != i) for i, t in enumerate(exits)]
        return median(lives), median(gaps), len(exits)


def main_thread_instructions(argv: List[str]) -> int:
    """Instructions of the main thread of ``python argv...``, counted by callgrind.

    Other threads (timers, exporters) are left out: they wake on wall-clock timers, so
    their counts grow with how slow the run under valgrind is, not with the work.
    ``PYTHONHASHSEED=0`` gives the same dict layouts in every run that is compared.
    """
    with tempfile.TemporaryDirectory(prefix="edgesync-bench-cg-") as tmp:
        out = Path(tmp) / "cg"
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", "--callgrind-out-file=%s" % out,
                        sys.executable, *argv], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONHASHSEED="0"))
        files = sorted(Path(tmp).glob("cg-01")) or sorted(Path(tmp).glob("cg*-01"))
        if not files:
            raise RuntimeError("callgrind wrote no file for the main thread in %s" % tmp)
        found = re.search(r"^(?:summary|totals): (\d+)", files[0].read_text(), re.M)
        if found is None:
            raise RuntimeError("no total in %s" % files[0])
        return int(found.group(1))


def proc_stat(pid: int) -> Dict[str, int]:
    """From ``/proc/<pid>/stat``: minor faults and CPU ticks (user + system) of the process and of its
    reaped children (``minflt``, ``cminflt``, ``cpu``, ``ccpu``). Raises OSError if it is gone."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {"minflt": int(fields[7]), "cminflt": int(fields[8]), "cpu": int(fields[11]) + int(fields[12]),
            "ccpu": int(fields[13]) + int(fields[14])}


@dataclass
class Traced:
    """One server of a latency-over-time picture: its name, its legend, its colour."""

    name: str
    server: Server
    label: str
    colour: str


def recycling_picture(runs: Sequence[Traced], path: str, seconds: float, connections: int,
                      client_cpu: Optional[int], logdir: Path, target: Path, title: str) -> List[str]:
    """Load every server of ``runs`` at once with bench/trace.py (every request timed) and draw to ``target``.

    Each server gets its own trace.py (pinned to ``client_cpu``) on ``path`` for ``seconds``:
    a dot per request at the time it was sent, its p99 per 250 ms, and a vertical line where
    a worker was forked (dotted) and where one exited (dashed), from a PidWatcher. Returns
    one line per server (requests, errors, p50, p99, max, median lifetime) for the report;
    raises BenchError if matplotlib is missing (``pip install -e '.[bench]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BenchError("no picture: matplotlib is missing (pip install -e '.[bench]')") from e
    import json

    traces = []
    watches = [PidWatcher(run.server) for run in runs]
    for w in watches:
        w.__enter__()
    try:
        procs = []
        for run in runs:
            out = logdir / ("trace-%s.json" % run.name)
            cmd = [sys.executable, str(REPO / "bench" / "trace.py"), str(run.server.port), path,
                   str(seconds), str(connections), str(out)]
            if client_cpu is not None:
                cmd = ["taskset", "-c", str(client_cpu)] + cmd
            procs.append((subprocess.Popen(cmd), out))
        for proc, out in procs:
            proc.wait(seconds + 60)
            traces.append(json.loads(out.read_text()))
    finally:
        for w in watches:
            w.__exit__()
    t0 = min(tr["t0"] for tr in traces)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bin_s = 0.25
    lines = []
    for run, tr, watch in zip(runs, traces, watches, strict=True):
        bins: Dict[int, List[float]] = {}
        for sent, ms, _status in tr["requests"]:
            bins.setdefault(int((sent - t0) / bin_s), []).append(ms)
        xs = list(range(0, int(seconds / bin_s) + 1))
        # A bin in which no request was sent stays empty (a gap), not a line across it.
        p99 = [sorted(bins[x])[int(0.99 * (len(bins[x]) - 1))] if x in bins else float("nan") for x in xs]
        ax.scatter([sent - t0 for sent, _, _ in tr["requests"]], [ms for _, ms, _ in tr["requests"]],
                   s=1, color=run.colour, alpha=0.15, linewidths=0)
        ax.plot([(x + 0.5) * bin_s for x in xs], p99, color=run.colour, label=run.label + ": p99 per 250 ms")
        for what, times, style in (("exits", watch.gone.values(), "--"), ("is forked", watch.born.values(), ":")):
            first = True
            for t in sorted(times):
                if 0 < t - t0 <= seconds:
                    ax.axvline(t - t0, color=run.colour, linestyle=style, linewidth=0.9, alpha=0.7,
                               label="%s: a worker %s" % (run.name, what) if first else None)
                    first = False
        all_ms = sorted(ms for _, ms, _ in tr["requests"])
        lives = [watch.gone[p] - watch.born[p] for p in watch.gone if p in watch.born]
        lines.append("%s: %d requests, %d errors, p50 %.2f ms, p99 %.2f ms, max %.1f ms, median worker lifetime %s"
                     % (run.name, len(all_ms), len(tr["errors"]), all_ms[len(all_ms) // 2],
                        all_ms[int(0.99 * (len(all_ms) - 1))], all_ms[-1],
                        "%.2fs" % median(lives) if lives else "(none ended)"))
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency (ms), dots: every request at the time it was sent")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return lines
