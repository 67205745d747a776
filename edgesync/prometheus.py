"""Prometheus metrics for a server whose workers recycle: edgesync's figures and the app's own.

design: ``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) has
each process write its values to its own files, named after its process
identifier, and a scrape sums every file in the directory. Counter and histogram
files of dead processes are never removed (``mark_process_dead`` removes only the
live gauges' files), so a server that recycles its workers, as edgesync does by
design, grows files and scrape time without bound (client_python #204, #367).

When ``PROMETHEUS_MULTIPROC_DIR`` is set and ``prometheus_client`` is installed,
``edgesync.Worker`` turns this module on in the gunicorn master, before ``--preload``
imports the app (gunicorn's ``Worker.setup`` hook), so every metric of the server
uses it:

- each process writes under a unique identifier, ``<pid>-<start time>`` (the
  kernel's start time of the process, in clock ticks), so that a reused pid never
  writes into a dead worker's files, and any process can tell whether the owner of
  a file is alive;
- the files of dead processes are compacted: counters, histograms, summaries and
  ``sum`` gauges are added into one ``<type>_compacted.db`` per type, ``max`` /
  ``min`` / ``mostrecent`` gauges are folded the same way, and ``all`` / ``live*``
  gauges of dead processes are dropped (a per-pid series of a worker that no longer
  exists). Every worker tries at its heartbeat (at most once a second, never
  waiting for the lock) and every scrape does it first, so the directory holds the
  live processes' files plus one accumulated file per type;
- compaction and scrape take one lock (``flock`` on ``.edgesync-metrics.lock``), so
  a scrape never sees a value both in its dead file and in the accumulated one.
  A compaction writes the accumulated files under temporary names, notes in a
  journal which files each absorbs, renames them into place, then deletes the
  absorbed files: a compaction cut short (the worker killed meanwhile) is finished
  or undone by the next one, before anything is read;
- each worker mirrors its ``runtime_metrics()`` into ``edgesync_*`` counters and
  live-sum gauges at its heartbeat and once more when it unloads, so the server's
  counters (requests, tasks, cancellations, retires by reason, births and their
  CPU, durable tasks) only ever grow, across any number of recycles.

Expose it with ``make_wsgi_app()``, a WSGI app the user mounts (a route, or
werkzeug's ``DispatcherMiddleware``): it serves the whole server's figures,
whichever worker answers.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import math
import os
import threading
import time
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, values
from prometheus_client import make_wsgi_app as _client_wsgi_app
from prometheus_client.mmap_dict import MmapedDict as _MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector as _MultiProcessCollector

from . import _events, _runtime
from ._journal import process_start  # the one reading of a process's start time (and zombies)

__all__ = ["ENV", "compact", "install", "installed", "make_wsgi_app", "process_identifier"]

log = logging.getLogger("edgesync")

#: prometheus_client's own switch for multiprocess mode: the directory of the value files.
ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The identifier of the accumulated files (``counter_compacted.db``, ...).
COMPACTED = "compacted"
LOCK_NAME = ".edgesync-metrics.lock"
JOURNAL_NAME = ".edgesync-compaction.json"
#: How often a worker looks for dead processes' files (at its heartbeat).
COMPACT_INTERVAL = 1.0
#: How long a scrape waits for a compaction running elsewhere.
SCRAPE_LOCK_TIMEOUT = 5.0

# How a dead process's values fold into the accumulated file, per file prefix.
_ADD = ("counter", "histogram", "summary", "gauge_sum")
_FOLD = {"gauge_max": max, "gauge_min": min}
# prometheus_client's file format and collector (untyped there).
MmapedDict: Any = _MmapedDict
MultiProcessCollector: Any = _MultiProcessCollector


# -- the process identifier -----------------------------------------------------------------

_identifier: Optional[str] = None


def process_identifier() -> str:
    """This process's identifier for its value files: ``<pid>-<start ticks>`` (unique while it lives)."""
    ident = _identifier
    if ident is None:
        ident = _set_identifier()
    return ident


def _set_identifier() -> str:
    global _identifier
    pid = os.getpid()
    started = process_start(pid)
    _identifier = "%d-%d" % (pid, started if started is not None else time.monotonic_ns())
    return _identifier


def _alive(ident: str) -> bool:
    """Whether the process that writes under ``ident`` still runs (a zombie has stopped writing)."""
    pid, _, ticks = ident.partition("-")
    if not pid.isdigit() or not ticks.isdigit():
        return True  # not one of ours (another identifier scheme): never touched
    return process_start(int(pid)) == int(ticks)  # None for a zombie: it has stopped writing


# -- compaction ----------------------------------------------------------------------------

class _Lock:
    """The directory's ``flock``: compaction and scrape hold it; ``None`` from ``take`` when busy."""

    def __init__(self, path: str):
        self.fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def take(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def compact(path: Optional[str] = None, timeout: float = 0.0) -> Optional[int]:
    """Fold the value files of dead processes in ``path`` into the accumulated files.

    Returns how many files it removed, or None if another process held the lock for
    ``timeout`` seconds (it is compacting, or a scrape is reading).
    """
    path = path or os.environ[ENV]
    lock = _Lock(path)
    try:
        if not lock.take(timeout):
            return None
        return _compact_locked(path)
    finally:
        lock.release()


def _split(name: str) -> Optional[Tuple[str, str]]:
    """``counter_123-456.db`` -> (``counter``, ``123-456``); ``gauge_livesum_...`` -> (``gauge_livesum``, ...)."""
    if not name.endswith(".db"):
        return None
    parts = name[:-3].split("_")
    if len(parts) == 2 and parts[0] != "gauge":
        return parts[0], parts[1]
    if len(parts) == 3 and parts[0] == "gauge":
        return parts[0] + "_" + parts[1], parts[2]
    return None


def _compact_locked(path: str) -> int:
    _recover(path)
    by_prefix: Dict[str, List[str]] = {}
    dead: Dict[str, bool] = {}
    for name in os.listdir(path):
        split = _split(name)
        if split is None or split[1] == COMPACTED:
            continue
        prefix, ident = split
        if ident not in dead:
            dead[ident] = not _alive(ident)
        if dead[ident]:
            by_prefix.setdefault(prefix, []).append(os.path.join(path, name))
    if not by_prefix:
        return 0
    steps: List[Dict[str, Any]] = []
    drops: List[str] = []
    for prefix, files in by_prefix.items():
        if prefix in _ADD or prefix in _FOLD or prefix == "gauge_mostrecent":
            final = os.path.join(path, "%s_%s.db" % (prefix, COMPACTED))
            tmp = final + ".tmp"
            _write(tmp, _merge(prefix, ([final] if os.path.exists(final) else []) + files))
            steps.append({"tmp": tmp, "final": final, "absorbed": files})
        else:  # all / live* gauges: a dead process's series ends with it
            drops.extend(files)
    journal = os.path.join(path, JOURNAL_NAME)
    with open(journal + ".tmp", "w") as f:
        json.dump(steps, f)
    os.replace(journal + ".tmp", journal)  # from here the compaction is finished, never redone
    for step in steps:
        os.replace(step["tmp"], step["final"])
    _finish(steps)
    os.remove(journal)
    for name in drops:
        _remove(name)
    return sum(len(s["absorbed"]) for s in steps) + len(drops)


def _recover(path: str) -> None:
    """Finish or undo a compaction that was cut short (its journal is still there)."""
    journal = os.path.join(path, JOURNAL_NAME)
    _remove(journal + ".tmp")  # never committed: its temporary files are dropped below
    for tmp in glob.glob(os.path.join(path, "*.db.tmp")):
        if not os.path.exists(journal):
            _remove(tmp)
    if not os.path.exists(journal):
        return
    with open(journal) as f:
        steps = json.load(f)
    for step in steps:
        if os.path.exists(step["tmp"]):
            os.replace(step["tmp"], step["final"])
    _finish(steps)
    os.remove(journal)


def _finish(steps: List[Dict[str, Any]]) -> None:
    for step in steps:
        for name in step["absorbed"]:
            _remove(name)


def _remove(name: str) -> None:
    try:
        os.remove(name)
    except FileNotFoundError:
        pass


def _merge(prefix: str, files: List[str]) -> Dict[str, Tuple[float, float]]:
    found: Dict[str, List[Tuple[float, float]]] = {}
    for name in files:
        for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(name):
            found.setdefault(key, []).append((value, timestamp))
    fold = _FOLD.get(prefix)
    out: Dict[str, Tuple[float, float]] = {}
    for key, entries in found.items():
        if prefix == "gauge_mostrecent":
            out[key] = max(entries, key=lambda e: e[1])
        elif fold is not None:
            out[key] = (fold(v for v, _ in entries), 0.0)
        else:
            out[key] = (_sum_up([v for v, _ in entries]), 0.0)
    return out


def _sum_up(addends: List[float]) -> float:
    """The sum of ``addends`` rounded up, never down: what a scrape shows never decreases.

    A scrape sums each series exactly (``math.fsum``, see ``_Collector``); folding
    dead files into one value rounds once, and rounding down there could show a
    counter 1 ulp lower than the scrape before, which Prometheus reads as a reset.
    """
    total = math.fsum(addends)
    if Fraction(total) < sum(map(Fraction, addends)):
        total = math.nextafter(total, math.inf)
    return total


def _write(name: str, entries: Dict[str, Tuple[float, float]]) -> None:
    _remove(name)
    d = MmapedDict(name)
    try:
        for key, (value, timestamp) in entries.items():
            d.write_value(key, value, timestamp)
    finally:
        d.close()


# -- the scrape endpoint ------------------------------------------------------------------------

WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Collector:
    """prometheus_client's ``MultiProcessCollector``, minus the files a process is creating now.

    A process that makes its first value of a type creates its file empty, then
    sizes it: a scrape in between would fail on the empty file (and births, which
    edgesync has many of, make that likely). Files only grow: one of 8 bytes or more
    reads whole.
    """

    def __init__(self, path: str):
        self.path = path

    def collect(self) -> Any:
        files = []
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(name) >= 8:
                    files.append(name)
            except FileNotFoundError:  # a live gauge of a process that just died, dropped
                pass
        metrics = MultiProcessCollector._read_metrics(files)
        # Counters, histograms and summaries summed exactly (math.fsum), whatever the
        # order of the files and however they were folded: prometheus_client adds them
        # in file order, and a compaction changes that order (see _sum_up).
        for metric in metrics.values():
            if metric.type in ("counter", "histogram", "summary"):
                series: Dict[Tuple[str, Any], List[float]] = {}
                for sample in metric.samples:
                    series.setdefault((sample.name, sample.labels), []).append(sample.value)
                metric.samples = []
                for (name, labels), addends in series.items():
                    metric.add_sample(name, labels, math.fsum(addends))
        return MultiProcessCollector._accumulate_metrics(metrics, True)


def make_wsgi_app(path: Optional[str] = None) -> WSGIApp:
    """A WSGI app answering the whole server's metrics (Prometheus text or OpenMetrics).

    Mount it where Prometheus scrapes (``/metrics``). Each scrape first compacts the
    files of dead processes, then reads every file under the same lock. It answers
    503 if another process held the lock for ``SCRAPE_LOCK_TIMEOUT`` seconds.
    Raises ``RuntimeError`` if ``PROMETHEUS_MULTIPROC_DIR`` is not set (and no
    ``path`` is given), or is not a directory.
    """
    where = path or os.environ.get(ENV)
    if not where or not os.path.isdir(where):
        raise RuntimeError(
            "edgesync.prometheus.make_wsgi_app(): set %s to a directory that exists and is empty at "
            "startup (got %r), so that every process writes its metrics there" % (ENV, where))
    registry = CollectorRegistry()
    registry.register(_Collector(where))
    inner = _client_wsgi_app(registry)

    def metrics_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        lock = _Lock(where)
        try:
            if not lock.take(SCRAPE_LOCK_TIMEOUT):
                body = b"edgesync: the metrics directory stayed locked; try again\n"
                start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                           ("Content-Length", str(len(body)))])
                return [body]
            _compact_locked(where)
            # prometheus_client's app renders the whole answer in this call.
            return list(inner(environ, start_response))
        finally:
            lock.release()
    return metrics_app


# -- edgesync's own figures, per worker -----------------------------------------------------------

class _Figures:
    """This worker's ``runtime_metrics()`` mirrored into its value files (created after fork)."""

    def __init__(self) -> None:
        no = None  # not in the default registry: the scrape reads the files
        self.requests = Counter("edgesync_requests", "Requests begun, every worker since the server started",
                                registry=no)
        self.tasks = Counter("edgesync_tasks", "Background tasks ended, by outcome (failed includes "
                             "cancelled by a limit)", ["outcome"], registry=no)
        self.cancelled = Counter("edgesync_invocations_cancelled", "Requests and tasks a limit cancelled",
                                 registry=no)
        self.retirements = Counter("edgesync_retirements", "Workers that retired, by reason", ["reason"],
                                   registry=no)
        self.terminations = Counter("edgesync_terminations", "Workers a hard limit terminated, by reason",
                                    ["reason"], registry=no)
        self.beforeunload = Counter("edgesync_beforeunload", "beforeunload events dispatched, by reason",
                                    ["reason"], registry=no)
        self.births = Counter("edgesync_workers_started", "Workers that booted and served", registry=no)
        self.boot_cpu = Counter("edgesync_worker_boot_cpu_seconds", "CPU the workers spent booting "
                                "(from their fork until they served)", registry=no)
        self.durable = Counter("edgesync_durable_tasks", "Durable tasks, by event", ["event"], registry=no)
        self.pending = Gauge("edgesync_tasks_pending", "Background tasks not finished, by state", ["state"],
                             multiprocess_mode="livesum", registry=no)
        self.workers = Gauge("edgesync_workers", "Live workers, by state", ["state"],
                             multiprocess_mode="livesum", registry=no)
        self.rss = Gauge("edgesync_rss_bytes", "Resident memory of the live workers",
                         multiprocess_mode="livesum", registry=no)
        self.durable_pending = Gauge("edgesync_durable_pending", "Durable tasks held by live workers",
                                     multiprocess_mode="livesum", registry=no)
        self.sent: Dict[Tuple[str, str], float] = {}
        self.state: Optional[str] = None
        self.lock = threading.Lock()  # the heartbeat and the unload listener may meet

    def _add(self, counter: Any, key: str, label: Optional[str], total: float) -> None:
        delta = total - self.sent.get((key, label or ""), 0)
        if delta > 0:
            (counter if label is None else counter.labels(label)).inc(delta)
            self.sent[(key, label or "")] = total

    def publish(self, rt: Any, final: bool = False) -> None:
        m = rt.metrics()
        with self.lock:
            self._add(self.requests, "requests", None, m["requests"])
            for outcome in ("completed", "failed", "abandoned"):
                self._add(self.tasks, "tasks", outcome, m["tasks"][outcome])
            self._add(self.cancelled, "cancelled", None, m["invocations_cancelled"])
            if m["retire_reason"]:
                self._add(self.retirements, "retire", m["retire_reason"], 1)
            if m["terminate_reason"]:
                self._add(self.terminations, "terminate", m["terminate_reason"], 1)
            for reason in m["beforeunload_dispatched"]:
                self._add(self.beforeunload, "beforeunload", reason, 1)
            if m["boot_cpu_s"] is not None:
                self._add(self.births, "births", None, 1)
                self._add(self.boot_cpu, "boot_cpu", None, m["boot_cpu_s"])
            durable = m["durable"] or {}
            for event in ("recorded", "completed", "rerun", "given_up", "handed_off", "left_pending"):
                if isinstance(durable.get(event), int):
                    self._add(self.durable, "durable", event, durable[event])
            live = not final
            for state in ("queued", "running", "tracked"):
                self.pending.labels(state).set(m["tasks"][state] if live else 0)
            now: Optional[str] = m["state"] if live else None
            if now != self.state:
                if self.state is not None:
                    self.workers.labels(self.state).set(0)
                if now is not None:
                    self.workers.labels(now).set(1)
                self.state = now
            self.rss.set((m["rss_bytes"] or 0) if live else 0)
            self.durable_pending.set((durable.get("pending") or 0) if live else 0)


_figures: Optional[Tuple[int, _Figures]] = None
_next_compaction = 0.0


def _own_figures() -> _Figures:
    global _figures
    pid = os.getpid()
    if _figures is None or _figures[0] != pid:
        _figures = (pid, _Figures())
    return _figures[1]


def _on_heartbeat(rt: Any) -> None:
    """``_runtime.on_heartbeat``: mirror this worker's figures; now and then, compact."""
    global _next_compaction
    try:
        _own_figures().publish(rt)
        now = time.monotonic()
        if now >= _next_compaction:
            _next_compaction = now + COMPACT_INTERVAL
            compact(timeout=0.0)
    except Exception:  # metrics are best effort: never let them stop the heartbeat
        log.exception("worker %d: edgesync.prometheus could not publish or compact", os.getpid())


def _on_unload(event: Any) -> None:
    rt = _runtime.peek()
    if rt is not None:
        _own_figures().publish(rt, final=True)


# -- turning it on ---------------------------------------------------------------------------------

_installed = False


def install() -> None:
    """Turn this module on in this process and the workers it forks (idempotent).

    ``edgesync.Worker`` calls it in the gunicorn master when ``PROMETHEUS_MULTIPROC_DIR``
    is set: before any metric exists, every value the server writes must use
    ``process_identifier``. Raises ``RuntimeError`` if the variable is not set.
    """
    global _installed
    if _installed:
        return
    if not os.environ.get(ENV):
        raise RuntimeError("edgesync.prometheus.install(): %s is not set; set it to an empty directory "
                           "before gunicorn starts" % ENV)
    # Replaced once per process: two value classes would open the same file twice.
    make_class: Any = values.MultiProcessValue
    values.ValueClass = make_class(process_identifier=process_identifier)
    _runtime.on_heartbeat = _on_heartbeat
    _events.add_event_listener(_events.UNLOAD, _on_unload)
    _installed = True


def installed() -> bool:
    """Whether ``install()`` ran in this process (or the process it was forked from)."""
    return _installed


def _after_fork_in_child() -> None:
    global _identifier, _figures, _next_compaction
    _identifier = None
    _figures = None
    _next_compaction = 0.0


os.register_at_fork(after_in_child=_after_fork_in_child)
