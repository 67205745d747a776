"""A task's whole path, in-process: who holds what (a dropped runtime is collected) and what it logs.

Real runtimes and pools, real threads, real ``logging`` records (pytest's ``caplog``); every wait has a
deadline.
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import random
import re
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterator, List

import pytest

import edgesync
from edgesync import Settings, testing
from edgesync._identity import _BOUNDS, Successes
from edgesync._runtime import Runtime

from .support import Server

WAIT = 10.0


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out after %.1fs waiting for %s" % (timeout, what)
        time.sleep(0.005)


def answer(n: int) -> int:
    return n


def fail() -> None:
    raise ValueError("task failed on purpose")


# -- who holds the runtime ----------------------------------------------------------------------------------


def test_a_dropped_runtime_is_collected_while_its_pool_thread_idles() -> None:
    # Garbage that earlier tests left (an unclosed socket warns when collected) is theirs:
    # collect it first, so that the collection below is about this runtime alone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    rt = Runtime(Settings())
    assert rt.wait_until(answer, (7,), {}).result(WAIT) == 7
    assert rt.wait_until(fail, (), {}).exception(WAIT) is not None  # the failure path too
    pool = rt.pool
    wait_for(lambda: pool.pending == 0, "the pool to be idle")
    threads = list(pool._threads)
    assert threads and all(t.is_alive() for t in threads)
    ref = weakref.ref(rt)
    del rt
    gc.collect()
    try:
        assert ref() is None, "the runtime outlived its owner: %s" % [
            type(r).__name__ for r in gc.get_referrers(ref())]
        assert all(t.is_alive() for t in threads), "the pool's threads idle on, holding nothing of it"
    finally:
        pool.shutdown("the test ended")
        for t in threads:
            t.join(WAIT)


# -- success lines: DEBUG per task, one INFO summary per interval ---------------------------------------------


@pytest.fixture
def quiet_summary() -> Iterator[testing.TestRuntime]:
    """A runtime whose summary interval is long: no summary line unless a drain or a test flushes it."""
    with testing.runtime(task_log_interval_ms=3_600_000) as tr:
        yield tr


def successes(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edgesync.tasks" and "succeeded" in r.getMessage()]


def test_each_success_is_a_debug_line_with_name_duration_and_id(caplog: pytest.LogCaptureFixture,
                                                                 quiet_summary: testing.TestRuntime) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesync")
    fut = edgesync.wait_until(edgesync.named("send-welcome", answer), 1)
    fut.result(WAIT)
    quiet_summary.wait(WAIT)
    [record] = successes(caplog)
    assert record.levelno == logging.DEBUG
    assert re.fullmatch(r"process %d: task send-welcome succeeded in \d+\.\d{3}s, id=%s"
                        % (os.getpid(), edgesync.task_id(fut)), record.getMessage()), record.getMessage()


def test_at_info_successes_are_one_summary_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    interval = 0.3
    with testing.runtime(task_log_interval_ms=int(interval * 1000)) as tr:
        first = time.monotonic()
        futures = [edgesync.wait_until(answer, n) for n in range(50)]
        for f in futures:
            f.result(WAIT)
        tr.wait(WAIT)
        assert not successes(caplog), "no line per task at INFO, and none before the interval is over"
        time.sleep(interval)  # the interval must pass: that is what is tested
        edgesync.wait_until(edgesync.named("slow-one", time.sleep), 0.05).result(WAIT)
        tr.wait(WAIT)
        elapsed = time.monotonic() - first
    [record] = successes(caplog)
    assert record.levelno == logging.INFO
    m = re.fullmatch(r"process %d: 51 tasks succeeded in the last (\d+\.\d)s \(p50 (\d+\.\d{3})s, "
                     r"p99 (\d+\.\d{3})s, max (\d+\.\d{3})s: slow-one, id=%d-\d+\)" % (os.getpid(), os.getpid()),
                     record.getMessage())
    assert m, record.getMessage()
    window, p50, p99, top = (float(x) for x in m.groups())
    assert interval <= window <= elapsed + 0.1
    assert p50 <= p99 <= top and 0.05 <= top < WAIT
    assert p50 < 0.05, "the 50 quick tasks set the median"


def test_the_drain_logs_what_the_last_interval_has_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    with testing.runtime(task_log_interval_ms=3_600_000):
        for n in range(3):
            edgesync.wait_until(answer, n).result(WAIT)
        assert not successes(caplog)
    # The runtime drained and unloaded when the block ended: its last summary is out, before "unloaded".
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edgesync")]
    [summary] = [i for i, line in enumerate(lines) if "3 tasks succeeded in the last" in line]
    assert any("unloaded" in line for line in lines[summary + 1:]), lines


def test_interval_zero_logs_each_success_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    with testing.runtime(task_log_interval_ms=0) as tr:
        futures = [edgesync.wait_until(answer, n) for n in range(3)]
        tr.wait(WAIT)
    records = successes(caplog)
    assert [r.levelno for r in records] == [logging.INFO] * 3
    assert sorted(re.search(r"id=(\S+)$", r.getMessage()).group(1) for r in records  # type: ignore[union-attr]
                  ) == sorted(edgesync.task_id(f) for f in futures)


def test_failures_keep_their_own_line_and_are_not_counted_as_successes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    with testing.runtime(task_log_interval_ms=3_600_000) as tr:
        edgesync.wait_until(answer, 1).result(WAIT)
        fut = edgesync.wait_until(fail)
        assert isinstance(fut.exception(WAIT), ValueError)
        tr.wait(WAIT)
        assert tr.runtime.metrics()["tasks"]["completed"] == 1
        assert tr.runtime.metrics()["tasks"]["failed"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edgesync")]
    assert any("raised ValueError, id=%s" % edgesync.task_id(fut) in line for line in lines), lines
    assert any("1 task succeeded in the last" in line for line in lines), lines


def test_success_lines_can_still_be_silenced_alone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    caplog.set_level(logging.WARNING, logger="edgesync.tasks")
    with testing.runtime(task_log_interval_ms=0) as tr:
        edgesync.wait_until(answer, 1).result(WAIT)
        tr.wait(WAIT)
    assert not successes(caplog)


def test_tasks_finishing_on_many_threads_are_all_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    n = 2000
    with testing.runtime(task_log_interval_ms=3_600_000, background_threads=8, max_pending_tasks=n) as tr:
        submitters = [threading.Thread(target=lambda: [edgesync.wait_until(answer, i) for i in range(n // 4)])
                      for _ in range(4)]
        for t in submitters:
            t.start()
        for t in submitters:
            t.join(WAIT)
        tr.wait(WAIT)
        assert tr.runtime.metrics()["tasks"]["completed"] == n
    assert [line for line in (r.getMessage() for r in successes(caplog))
            if "%d tasks succeeded in the last" % n in line]


def test_summaries_taken_while_threads_add_count_each_success_once_with_its_own_max() -> None:
    # The pool's threads add successes without a lock while the monitor takes summaries
    # (Successes' rule: each add and each take is one step). With a thread switch
    # forced every microsecond, a success counted in no summary or in two shows (a take
    # that copied the histogram before swapping it out lost 10-20% of them); and each
    # summary's max must fall in its own slowest bucket.
    threads, each = 8, 20000
    successes = Successes(3600.0)
    summaries: List[Any] = []
    adding = threading.Barrier(threads + 1)

    def add(k: int) -> None:
        took = [1e-6 * 2 ** random.uniform(0, 39) for _ in range(each)]
        adding.wait(WAIT)
        for j in range(each):
            successes.add(took[j], "%d-%d" % (k, j), "task-%d" % k, 0.0)

    adders = [threading.Thread(target=add, args=(k,), name="adder-%d" % k) for k in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in adders:
            t.start()
        adding.wait(WAIT)
        while any(t.is_alive() for t in adders):
            summary = successes.take(time.monotonic())
            if summary is not None:
                summaries.append(summary)
    finally:
        sys.setswitchinterval(interval)
        for t in adders:
            t.join(WAIT)
    last = successes.take(time.monotonic())
    summaries += [last] if last is not None else []
    assert len(summaries) > 2, "too few summaries were taken while the threads added: this tested little"
    assert sum(count for _, count, _, _, _, _ in summaries) == threads * each
    for _, _, buckets, top, seq, name in summaries:
        assert bisect.bisect_left(_BOUNDS, top) == max(i for i, n in enumerate(buckets) if n), (
            "the max is the slowest of the summary's own successes")
        assert name == "task-%s" % str(seq).split("-")[0], "the max names its own task"


# -- in a real gunicorn, at its default log level ------------------------------------------------------------


@pytest.mark.slow
def test_gunicorn_at_info_logs_summaries_that_count_every_success(server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"EDGESYNC_TASK_LOG_INTERVAL_MS": "300"})  # --log-level info (conftest)
    pid = int(server.get("/pid")[1])
    for n in range(5):
        assert server.get("/task?id=s%d&sleep=0" % n)[0] == 200
    summary = re.compile(r"worker %d: (\d+) tasks? succeeded in the last \d+\.\ds \(p50 \d+\.\d{3}s, "
                         r"p99 \d+\.\d{3}s, max \d+\.\d{3}s: tests\.apps\.core\.sleepy_task, id=%d-\d+\)$"
                         % (pid, pid))

    def counted() -> int:
        return sum(int(m.group(1)) for m in map(summary.search, server.log.splitlines()) if m)

    wait_for(lambda: counted() >= 5, "summary lines counting the 5 tasks", timeout=15.0)
    assert counted() == 5
    assert "succeeded in 0." not in server.log, "no line per task at INFO"


# -- counters: each thread counts its own outcomes, the tracker sums them -----------------------------------


def test_outcomes_counted_by_threads_survive_the_threads() -> None:
    from edgesync._invocation import REQUEST, TASK, Outcome, Tracker

    tracker = Tracker()

    def run(n: int, unregister: bool) -> None:
        slot = tracker.register_thread()
        for _ in range(n):
            slot.end_surely(slot.begin(REQUEST, "test"), Outcome.COMPLETED)
        slot.end_surely(slot.begin(TASK, "test"), Outcome.FAILED)
        if unregister:
            tracker.unregister_thread(slot)

    threads = [threading.Thread(target=run, args=(100, i % 2 == 0)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    tracker.record(TASK, Outcome.FAILED, 2)  # from another thread: under the tracker's lock
    assert tracker.count(REQUEST, Outcome.COMPLETED) == 600
    assert tracker.count(TASK, Outcome.FAILED) == 8
    # A new thread whose ident was a gone thread's takes its place; what that one counted stays.
    for _ in range(3):
        t = threading.Thread(target=run, args=(10, False))
        t.start()
        t.join(WAIT)
    assert tracker.count(REQUEST, Outcome.COMPLETED) == 630
