"""Durable tasks in one process: the API's refusals, the journal's rows, re-runs of a dead process's rows.

The dead processes are real: a child interpreter records tasks in the journal and
SIGKILLs itself; this process then claims its rows as a replacement worker would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, List

import pytest

import edgesync
from edgesync import _recovery
from edgesync._config import ConfigError, Settings, load_settings
from edgesync._journal import Journal, process_start
from edgesync.testing import TestRuntime, runtime

from .apps import durable_tasks
from .support import REPO, free_port, journal_marked, journal_runs, journal_tasks, wait_for


@pytest.fixture(autouse=True)
def fresh_tasks(fresh_durable_tasks: None) -> None:
    """Every test here starts with tests/apps/durable_tasks fresh."""


def rows(path: Path) -> List[Any]:
    return journal_tasks(path)


# -- the API --------------------------------------------------------------------------------------


def not_importable_lambda() -> Any:
    return edgesync.durable(lambda: None)


def test_decorator_refuses_what_another_process_could_not_import() -> None:
    with pytest.raises(TypeError, match=r"it is a lambda \(it has no import path\)"):
        not_importable_lambda()

    def nested() -> None: ...
    with pytest.raises(TypeError, match="defined inside another function"):
        edgesync.durable(nested)

    class Mailer:
        def send(self) -> None: ...
    with pytest.raises(TypeError, match="bound method"):
        edgesync.durable(Mailer().send)
    with pytest.raises(TypeError, match="it is a builtin_function_or_method, not a function defined with def"):
        edgesync.durable(print)
    with pytest.raises(TypeError, match="durable already"):
        edgesync.durable(durable_tasks.note)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"max_attempts must be an integer from 1 to 1000"):
        edgesync.durable(max_attempts=0)


def test_wait_until_refuses_arguments_that_json_would_change(tmp_path: Path) -> None:
    # The error names the argument (position or keyword) and the type, never a value.
    secret = "alice@example.com"
    with runtime(durable_journal=str(tmp_path / "j.db")):
        with pytest.raises(TypeError, match=r"tests\.apps\.durable_tasks:note.*must be JSON values.*argument 2 is "
                                            r"a dict holding a value of type object \(not a JSON value\).*Pass an id"):
            edgesync.wait_until(durable_tasks.note, "a", {"x": object()})
        with pytest.raises(TypeError, match=r"come back from JSON unchanged.*; argument 2 is a dict holding a tuple "
                                            r"\(JSON makes it a list\)\. Use lists instead of tuples") as refused:
            edgesync.wait_until(durable_tasks.note, "a", {"pair": (secret, 2)})
        assert secret not in str(refused.value)
        with pytest.raises(TypeError, match=r"come back from JSON unchanged.*; argument 1 is a tuple \(JSON makes it "
                                            r"a list\); keyword argument payload is a dict with a key of type int"
                                            ) as refused:
            edgesync.wait_until(durable_tasks.note, (secret,), payload={1: secret})  # type: ignore[arg-type, dict-item]
        assert secret not in str(refused.value)
        with pytest.raises(TypeError, match="must be JSON values.*; argument 2 is a dict holding a float that is NaN"):
            edgesync.wait_until(durable_tasks.note, "a", {"x": math.nan})
        assert rows(tmp_path / "j.db") == []  # nothing refused was recorded


def test_wait_until_refuses_a_durable_function_its_path_does_not_name() -> None:
    with runtime():
        with pytest.raises(TypeError, match=r"tests\.apps\.durable_tasks:plain names <function plain"):
            edgesync.wait_until(durable_tasks.renamed, "x")


def test_the_task_sees_its_attempt_and_a_direct_call_is_a_plain_call(edgesync_runtime: TestRuntime) -> None:
    assert edgesync.current_attempt() == 0
    assert durable_tasks.note("direct", {}) == "direct"
    assert durable_tasks.ran == [{"id": "direct", "payload": {}, "attempt": 0}]
    fut = edgesync.wait_until(durable_tasks.note, "t1", {"k": [1, 2.5, None, True]})
    async_fut = edgesync.wait_until(durable_tasks.note_async, "t2")
    assert fut.result(5) == "t1" and async_fut.result(5) == 1
    assert durable_tasks.ran[1] == {"id": "t1", "payload": {"k": [1, 2.5, None, True]}, "attempt": 1}
    assert repr(durable_tasks.note) == "<durable function tests.apps.durable_tasks:note>"


# -- the journal ------------------------------------------------------------------------------------


def test_recorded_before_wait_until_returns_and_deleted_when_done(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with runtime(durable_journal=str(path)) as rt:
        fut = edgesync.wait_until(durable_tasks.gated, "g1")
        (row,) = rows(path)
        assert row[1:3] + row[4:] == ("tests.apps.durable_tasks:gated", '[["g1"],{}]', 2, os.getpid())
        # Its run is counted when it starts, by its mark (outside SQLite): the row's count stays 0.
        wait_for(lambda: row[0] in journal_marked(path), 5, "the task's run to be marked")
        assert rows(path)[0][3] == 0
        metrics = edgesync.runtime_metrics()["durable"]
        assert metrics["pending"] == 1 and metrics["journal_pending"] == 1 and metrics["recorded"] == 1
        durable_tasks.gate.set()
        fut.result(5)
        rt.wait(5)
        assert rows(path) == []  # wait() writes the batched deletes
        assert rt.metrics()["durable"]["completed"] == 1
    assert journal_marked(path) == set()  # ended, deleted: its mark is cleared
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_a_task_that_raises_is_done_too(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path)) as rt:
        rejections = rt.record("unhandledrejection")
        fut = edgesync.wait_until(durable_tasks.boom, "b")
        with pytest.raises(ValueError, match="fails on purpose"):
            fut.result(5)
        rt.wait(5)
        assert rows(path) == [] and len(rejections) == 1
        assert rt.metrics()["durable"]["completed"] == 1


def test_queue_full_leaves_no_record(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path), max_pending_tasks=1, background_threads=1):
        edgesync.wait_until(durable_tasks.gated, "held")
        with pytest.raises(edgesync.QueueFull):
            edgesync.wait_until(durable_tasks.gated, "refused")
        assert [r[2] for r in rows(path)] == ['[["held"],{}]']
        durable_tasks.gate.set()


def test_unload_leaves_unfinished_tasks_in_the_journal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Kept in the journal is not abandoned: each task's line says where it went, and none is counted.
    caplog.set_level(logging.INFO, logger="edgesync")
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path), background_threads=1) as rt:
        running = edgesync.task_id(edgesync.wait_until(durable_tasks.gated, "running"))
        queued = edgesync.task_id(edgesync.wait_until(durable_tasks.gated, "queued"))
        wait_for(lambda: rt.metrics()["tasks"]["running"] == 1, 5, "the first task to start")
        abandoned = rt.runtime.unload("the test unloads it")
        assert abandoned == []
        assert sorted(r[2] for r in rows(path)) == ['[["queued"],{}]', '[["running"],{}]']
        assert rt.metrics()["durable"]["left_pending"] == 2
        assert rt.metrics()["tasks"]["abandoned"] == 0
    durable_tasks.gate.set()
    lines = [r.getMessage() for r in caplog.records]
    for task_id, state in ((running, "running"), (queued, "queued, never started")):
        assert any(re.fullmatch(r"process %d: task tests\.apps\.durable_tasks\.gated \(%s.*\) kept in the journal "
                                r"for a live worker to re-run, id=%s, reason=the test unloads it"
                                % (os.getpid(), state, task_id), line) for line in lines), lines
    assert not [line for line in lines if "abandoned task" in line]
    assert "process %d: unloaded (the test unloads it; 0 requests served, 0 tasks abandoned)" % os.getpid() in lines


DEAD_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import edgesync
    from edgesync.testing import TestRuntime
    from tests.apps import durable_tasks
    rt = TestRuntime(durable_journal={path!r}, background_threads=1)
    import sqlite3, time
    for i in range({n}):
        edgesync.wait_until(durable_tasks.{fn}, "dead-%d" % i)
    # One thread: the first task starts (its run is marked), the others wait behind it.
    from tests.support import journal_runs
    deadline = time.monotonic() + 10
    while sum(journal_runs({path!r}).values()) != 1:
        assert time.monotonic() < deadline, "the first task did not start"
        time.sleep(0.01)
    print("recorded", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def die_with_tasks(path: Path, n: int, fn: str = "gated") -> int:
    proc = subprocess.run([sys.executable, "-c", DEAD_WORKER.format(repo=str(REPO), path=str(path), n=n, fn=fn)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "recorded\n", proc
    return proc.returncode


def test_a_live_process_reruns_the_tasks_of_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    die_with_tasks(path, 5)
    # An attempt is a run: the one task that started counts 1 (its mark), the four queued behind it 0.
    assert journal_runs(path) == {'[["dead-%d"],{}]' % i: int(i == 0) for i in range(5)}
    durable_tasks.gate.set()
    with runtime(durable_journal=str(path)) as rt:
        _recovery.boot(rt.runtime)  # what the gunicorn worker does when it is ready
        wait_for(lambda: len(durable_tasks.ran) == 5, 10, "the five re-runs")
        rt.wait(5)
        assert sorted(r["id"] for r in durable_tasks.ran) == ["dead-%d" % i for i in range(5)]
        assert {r["id"]: r["attempt"] for r in durable_tasks.ran} == {"dead-%d" % i: 1 + (i == 0) for i in range(5)}
        assert rows(path) == []
        metrics = rt.metrics()["durable"]
        assert (metrics["rerun"], metrics["completed"], metrics["given_up"]) == (5, 5, 0)


def test_gives_up_after_max_runs_and_keeps_the_task(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "j.db"
    die_with_tasks(path, 2)  # gated: max_attempts=2; dead-0 ran once, dead-1 never started
    # A second process claims both, starts both (dead-0's second run, dead-1's first), and dies too.
    claimer = textwrap.dedent("""
        import os, signal, sqlite3, sys, time
        sys.path.insert(0, {repo!r})
        from edgesync import _recovery
        from edgesync.testing import TestRuntime
        rt = TestRuntime(durable_journal={path!r})
        assert _recovery._keeper(rt.runtime).claim_once() == 2
        from tests.support import journal_runs
        while sum(journal_runs({path!r}).values()) != 3:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    """).format(repo=str(REPO), path=str(path))
    assert subprocess.run([sys.executable, "-c", claimer], timeout=30).returncode == -signal.SIGKILL
    assert journal_runs(path) == {'[["dead-0"],{}]': 2, '[["dead-1"],{}]': 1}
    durable_tasks.gate.set()
    with runtime(durable_journal=str(path)) as rt:
        assert _recovery._keeper(rt.runtime).claim_once() == 2
        rt.wait(5)
        # dead-0 had its two runs: given up, and kept; dead-1 had one: it ran again, and is done.
        assert durable_tasks.ran == [{"id": "dead-1", "attempt": 2}]
        conn = sqlite3.connect(path)
        kept = conn.execute("SELECT args, attempt, given_up IS NOT NULL, last_error FROM edgesync_tasks").fetchall()
        conn.close()
        assert len(kept) == 1 and kept[0][:3] == ('[["dead-0"],{}]', 2, 1)
        assert kept[0][3].startswith("its 2 run(s) all ended with their process (dead process ")
        metrics = rt.metrics()["durable"]
        assert (metrics["given_up"], metrics["journal_given_up"], metrics["journal_pending"]) == (1, 1, 0)
        # A later claim never takes a given-up task.
        assert _recovery._keeper(rt.runtime).claim_once() == 0
    lines = [r.getMessage() for r in caplog.records if "gave up durable task" in r.getMessage()]
    assert len(lines) == 1 and "after 2 run(s)" in lines[0] and "python -m edgesync durable list" in lines[0]
    assert not [r for r in caplog.records if "dead-0" in r.getMessage()], "arguments are never logged"


CLAIMER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from edgesync._journal import Journal
    j = Journal({path!r})
    j.open()
    while time.time() < {start}:
        pass
    print(json.dumps([e.id for e in j.claim(1000)]), flush=True)
    sys.stdin.read()  # stay alive (a live owner) until every claimer has claimed
""")


def test_two_processes_never_claim_the_same_row(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(str(path))
    dead_pid = 2**22 + 1  # above pid_max on this machine: never alive
    assert process_start(dead_pid) is None
    conn = sqlite3.connect(path)
    for round_ in range(3):
        ids = ["r%d-%d" % (round_, i) for i in range(300)]
        journal.open()
        conn.executemany("INSERT INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_pid, owner_start, "
                         "accepted) VALUES (?, 'm:f', '[[],{}]', 1, 3, ?, 1, ?)",
                         [(i, dead_pid, time.time()) for i in ids])
        conn.commit()
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", CLAIMER.format(repo=str(REPO), path=str(path),
                                                                        start=start)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(3)]
        assert all(p.stdout is not None for p in procs)
        claimed = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.communicate(timeout=30)
        together = [i for c in claimed for i in c]
        assert sorted(together) == sorted(ids), "claimed %s rows (%d distinct) of %d, by process: %s" % (
            len(together), len(set(together)), len(ids), [len(c) for c in claimed])
        conn.execute("DELETE FROM edgesync_tasks")
        conn.commit()
    conn.close()
    journal.close()


# -- configuration -----------------------------------------------------------------------------------


def test_new_keys_are_validated(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_text('[edge_runtime]\ndurable_journal = "var/journal.db"\n')
    with pytest.raises(ConfigError, match=r"^edgesync\.toml: \[edge_runtime\] durable_journal must be a path in an "
                                          r"existing directory, got 'var/journal\.db' \('.*/var' does not exist"):
        load_settings({}, cwd=tmp_path)
    (tmp_path / "var").mkdir()
    assert load_settings({}, cwd=tmp_path).durable_journal == "var/journal.db"
    with pytest.raises(ConfigError, match=r"EDGESYNC_HANDOFF: handoff must be one of '', 'rq', 'celery', "
                                          r"got 'dramatiq'"):
        load_settings({"EDGESYNC_HANDOFF": "dramatiq"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"handoff_redis_url must be a redis://, rediss:// or unix:// URL, "
                                          r"got 'localhost:6379'"):
        load_settings({"EDGESYNC_HANDOFF_REDIS_URL": "localhost:6379"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"durable_max_attempts must be an integer from 1 to 1000, got 0"):
        Settings(durable_max_attempts=0)
    with pytest.raises(ConfigError, match="handoff_on must be one of 'deadline', 'deadline_or_queue_full', "
                                          "'always'"):
        load_settings({"EDGESYNC_HANDOFF_ON": "sometimes"}, cwd=tmp_path)
    settings = load_settings({"EDGESYNC_HANDOFF": "rq", "EDGESYNC_HANDOFF_QUEUE": "mail"}, cwd=tmp_path)
    assert (settings.handoff, settings.handoff_queue) == ("rq", "mail")


def test_without_a_journal_a_durable_task_runs_and_says_it_is_kept_in_memory(
        edgesync_runtime: TestRuntime, caplog: pytest.LogCaptureFixture) -> None:
    edgesync.wait_until(durable_tasks.note, "m1", {}).result(5)
    edgesync.wait_until(durable_tasks.note, "m2", {}).result(5)
    warnings = [r.getMessage() for r in caplog.records if "kept in memory only" in r.getMessage()]
    assert len(warnings) == 1 and "set durable_journal" in warnings[0]
    metrics = edgesync_runtime.metrics()["durable"]
    assert (metrics["recorded"], metrics["journal"], metrics["journal_pending"]) == (2, None, None)


def test_a_function_of_main_is_refused(tmp_path: Path) -> None:
    script = "import edgesync\n@edgesync.durable\ndef job() -> None: ...\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          cwd=REPO)
    assert proc.returncode == 1
    assert "TypeError: @edgesync.durable cannot take <function job" in proc.stderr
    assert "it is defined in __main__" in proc.stderr


def test_hand_off_always_to_an_unreachable_redis_raises_at_the_call(tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens on it
    with runtime(handoff="rq", handoff_on="always", handoff_redis_url="redis://127.0.0.1:%d/0" % closed_port):
        import redis
        with pytest.raises(redis.ConnectionError):
            edgesync.wait_until(durable_tasks.note, "r", {})
        assert durable_tasks.ran == []
