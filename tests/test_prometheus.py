"""``edgesync.prometheus``: a real gunicorn scraped through many recycles.

The server recycles its workers every few hundred milliseconds; the test scrapes it
all along and checks what prometheus_client alone gets wrong under recycling: the
value files of dead workers stay bounded (compacted), the scrape time stays flat,
counters never go down, and nothing is lost or counted twice.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Set

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.mmap_dict import MmapedDict, mmap_key

from edgesync import prometheus

from .support import NO_LIMITS, Server, workers_of


def parse(text: str) -> Dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def idents(directory: Path) -> Set[str]:
    return {name[:-3].rsplit("_", 1)[1] for name in os.listdir(directory) if name.endswith(".db")}


def start(server_factory: Callable[..., Server], tmp_path: Path, *args: str,
          env: Dict[str, str] = NO_LIMITS, workers_ready: int = 1) -> Server:
    directory = tmp_path / "metrics"
    directory.mkdir()
    return server_factory(*args, app="tests.apps.prom:app", workers_ready=workers_ready,
                          env=dict(env, PROMETHEUS_MULTIPROC_DIR=str(directory)))


def test_every_worker_writes_under_a_unique_identifier(server_factory: Callable[..., Server],
                                                       tmp_path: Path) -> None:
    server = start(server_factory, tmp_path, "-w", "2", workers_ready=2)
    for _ in range(10):
        assert server.get("/hit")[0] == 200
    pids = server.worker_pids()
    found = idents(tmp_path / "metrics")
    assert found and all(re.fullmatch(r"\d+-\d+", i) for i in found), found
    # The mold (on by default) imported the app, which made its metrics: its files hold zeros, under its own id.
    assert {int(i.split("-")[0]) for i in found} <= set(pids) | set(workers_of(server.proc.pid, molds=True))
    figures = parse(server.get("/metrics")[1].decode())
    assert figures["app_hits_total"] == 10
    assert figures['app_latency_seconds_bucket{le="0.1"}'] == 10


@pytest.mark.slow
def test_scraped_through_hundreds_of_recycles(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    # Each worker retires 0.4-1 s after it serves (20-50% of its wall clock).
    server = start(server_factory, tmp_path, "-w", "2", "--threads", "2", "--preload",
                   env=dict(NO_LIMITS, EDGESYNC_WALL_CLOCK_LIMIT_MS="2000"), workers_ready=2)
    sent, ok = [0], [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            sent[0] += 1
            try:
                if server.get("/hit", timeout=5)[0] == 200:
                    ok[0] += 1
            except OSError:
                pass  # a connection a dying worker reset: counted as sent, maybe not as hit
    client = threading.Thread(target=hammer)
    client.start()
    scrapes: List[Dict[str, float]] = []
    times: List[float] = []
    files: List[int] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and len(re.findall("Booting worker", server.log)) < 250:
            began = time.perf_counter()
            status, body = server.get("/metrics", timeout=10)
            times.append(time.perf_counter() - began)
            assert status == 200
            scrapes.append(parse(body.decode()))
            # Right after a scrape (which compacts), one identifier per process still alive:
            # 2 workers, a retiree or two draining, a replacement or two booting, the master.
            live = idents(directory) - {prometheus.COMPACTED}
            files.append(len(live))
            assert len(live) <= 7, sorted(live)
            time.sleep(0.05)
    finally:
        stop.set()
        client.join()
    births = len(re.findall("Booting worker", server.log))
    print("%d births, %d scrapes, files per scrape max %d, scrape median %.1f ms"
          % (births, len(times), max(files), 1000 * statistics.median(times)))
    assert births >= 100, "only %d births: the bound below would mean little" % births
    # One file per metric type per live process, plus one accumulated file per type.
    assert len(os.listdir(directory)) <= 4 * 7 + 4 + 1

    # Counters never go down across recycles.
    for key in ("app_hits_total", "edgesync_requests_total", "edgesync_workers_started_total",
                'edgesync_tasks_total{outcome="completed"}', "edgesync_worker_boot_cpu_seconds_total",
                'app_latency_seconds_bucket{le="+Inf"}', "app_latency_seconds_sum"):
        series = [s.get(key, 0.0) for s in scrapes]
        drops = [(a, b) for a, b in zip(series, series[1:], strict=False) if a > b]
        assert not drops, (key, drops)
    # Nothing lost, nothing counted twice: every answered hit once, no more than were sent.
    final = parse(server.get("/metrics")[1].decode())
    assert ok[0] <= final["app_hits_total"] <= sent[0]
    assert final['app_latency_seconds_bucket{le="+Inf"}'] == final["app_hits_total"]
    assert final["edgesync_requests_total"] >= ok[0]
    assert births - 4 <= final["edgesync_workers_started_total"] <= births
    assert final['edgesync_retirements_total{reason="wall_clock"}'] >= births - 6
    # Dead workers' "all" gauges are dropped: only live processes have a series.
    assert sum(1 for k in final if k.startswith("app_last_pid")) <= 7
    # The scrape time stays flat: the last fifth of the scrapes is not slower than the first.
    fifth = max(1, len(times) // 5)
    first, last = statistics.median(times[:fifth]), statistics.median(times[-fifth:])
    assert last < 3 * first + 0.05, (first, last, files)


def _write_values(directory: Path, amounts: List[float]) -> None:
    """A short-lived process that adds ``amounts`` to a counter and a histogram, then exits."""
    code = (
        "import sys; from edgesync import prometheus; prometheus.install()\n"
        "from prometheus_client import Counter, Histogram\n"
        "c = Counter('float_things', 'x'); h = Histogram('float_latency', 'x')\n"
        "for a in map(float, sys.argv[1:]): c.inc(a); h.observe(a)\n")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    subprocess.run([sys.executable, "-c", code, *map(repr, amounts)], env=env, check=True, timeout=30)


def _scrape(directory: Path) -> Dict[str, float]:
    out: List[bytes] = []
    app = prometheus.make_wsgi_app(str(directory))
    out = list(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
                   lambda status, headers: None))
    return parse(b"".join(out).decode())


def _ident(pid: int) -> str:
    with open("/proc/%d/stat" % pid) as f:
        return "%d-%s" % (pid, f.read().rsplit(")", 1)[1].split()[19])


def test_compaction_never_lowers_a_float_counter(tmp_path: Path) -> None:
    # Three processes that are alive (their files are never compacted) and, as each one
    # "dies", its file renamed to a dead process's identifier, as a dead worker leaves it.
    # Floating-point sums of such amounts depend on the order of addition.
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    live = [_ident(os.getpid()), _ident(os.getppid()), _ident(1)]
    key = mmap_key("float_things", "float_things_total", [], [], "x")
    amounts = [1e16, 0.7, 1.0, 0.1, 3.0, 7e15]
    rng = random.Random(26)
    totals = {ident: 0.0 for ident in live}
    added: List[float] = []
    shown: List[float] = []

    def write(ident: str, value: float) -> None:
        d = MmapedDict(str(tmp_path / ("counter_%s.db" % ident)))
        d.write_value(key, value, 0.0)
        d.close()
    for step in range(120):
        ident = rng.choice(live)
        amount = rng.choice(amounts)
        totals[ident] += amount  # what that process's own counter holds now
        added.append(amount)
        write(ident, totals[ident])
        if step % 3 == 2:  # it dies; a new process takes its place, from 0
            os.rename(tmp_path / ("counter_%s.db" % ident),
                      tmp_path / ("counter_%d-%d.db" % (dead_pid.pid, step)))
            totals[ident] = 0.0
        shown.append(_scrape(tmp_path)["float_things_total"])
        # Never below the exact sum of what was added (a counter that loses an ulp on a
        # compaction goes down, which Prometheus reads as a reset), and hardly above it.
        exact = math.fsum(added)
        assert exact <= shown[-1] <= exact * (1 + 1e-14), (step, exact, shown[-1])
    drops = [(a, b) for a, b in zip(shown, shown[1:], strict=False) if a > b]
    assert not drops


def test_a_compaction_cut_short_is_finished_before_anything_is_read(tmp_path: Path) -> None:
    _write_values(tmp_path, [1.0, 2.0])
    assert _scrape(tmp_path)["float_things_total"] == 3.0  # compacted: counter_compacted.db holds 3
    _write_values(tmp_path, [4.0])
    [dead] = [n for n in os.listdir(tmp_path) if n.startswith("counter_") and "compacted" not in n]
    # The state a compaction leaves when it is killed after its journal, before its renames:
    # the new accumulated file under its temporary name, the absorbed file still there.
    final = tmp_path / "counter_compacted.db"
    shutil.copy(final, str(final) + ".tmp")
    with open(tmp_path / prometheus.JOURNAL_NAME, "w") as f:
        json.dump([{"tmp": str(final) + ".tmp", "final": str(final), "absorbed": [str(tmp_path / dead)]}], f)
    d = MmapedDict(str(final) + ".tmp")
    [(key, value, _ts)] = [kv for kv in d.read_all_values() if "float_things_total" in kv[0]]
    d.write_value(key, value + 4.0, 0.0)
    d.close()
    # Read now, the dead file and the new accumulated one would count 4 twice.
    assert _scrape(tmp_path)["float_things_total"] == 7.0
    assert not (tmp_path / dead).exists() and not (tmp_path / prometheus.JOURNAL_NAME).exists()
