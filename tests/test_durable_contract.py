"""The durable contract at every seam, in one process: ids, wrappers, retries, a hand-off that fails.

The gunicorn cases (re-runs in the app's setup, hand-off to RQ, a drain, Redis stopped,
Django's LOGGING) are in tests/test_durable_seams.py.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any, List

import pytest

import edgesync
from edgesync.testing import runtime

from .apps import durable_tasks
from .support import journal_tasks


@pytest.fixture(autouse=True)
def fresh_tasks(fresh_durable_tasks: None) -> None:
    """Every test here starts with tests/apps/durable_tasks fresh."""


def rows(path: Path) -> List[Any]:
    return journal_tasks(path, "id, fn, args, attempt, owner_pid")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once this socket is closed
    return "redis://127.0.0.1:%d/0" % port


# -- one id -------------------------------------------------------------------------------------------


def test_the_durable_id_is_the_task_id_the_row_and_every_line(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesync")  # each success is a DEBUG line (task logging)
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path)) as rt:
        fut = edgesync.wait_until(durable_tasks.gated, "g")
        task_id = edgesync.task_id(fut)
        assert [r[0] for r in rows(path)] == [task_id]
        assert [t.id for t in rt.runtime.pool.snapshot()] == [task_id]
        durable_tasks.gate.set()
        fut.result(5)
        rt.wait(5)
    [line] = [r.getMessage() for r in caplog.records if "succeeded in 0" in r.getMessage()]
    assert line.endswith("id=%s" % task_id), line
    # The summary line names the slowest task by the same id.
    [summary] = [r.getMessage() for r in caplog.records if "succeeded in the last" in r.getMessage()]
    assert summary.endswith("id=%s)" % task_id), summary


def test_task_id_of_a_task_handed_off_at_once_is_its_id(tmp_path: Path) -> None:
    # Redis unreachable and a journal: kept in the journal, run here; the future still has its id.
    with runtime(durable_journal=str(tmp_path / "j.db"), handoff="rq", handoff_on="always",
                 handoff_redis_url=closed_port_url()) as rt:
        fut = edgesync.wait_until(durable_tasks.note, "n", {})
        assert fut.result(5) == "n"
        assert len(edgesync.task_id(fut)) == 18
        rt.wait(5)


# -- wrappers keep durability ----------------------------------------------------------------------------


def test_named_and_partial_of_a_durable_function_stay_durable(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path), background_threads=1):
        named = edgesync.named("gate-keeper", durable_tasks.gated)
        assert isinstance(named, edgesync.DurableFunction) and named.name == "gate-keeper"
        futures = [edgesync.wait_until(named, "by-name"),
                   edgesync.wait_until(functools.partial(durable_tasks.gated, "by-partial")),
                   edgesync.wait_until(functools.partial(functools.partial(durable_tasks.note, "nested"), {"k": 1})),
                   edgesync.wait_until(edgesync.named("n", functools.partial(durable_tasks.note, "np")), {})]
        recorded = {r[0]: (r[1], r[2]) for r in rows(path)}
        assert [recorded[edgesync.task_id(f)] for f in futures] == [
            ("tests.apps.durable_tasks:gated", '[["by-name"],{}]'),
            ("tests.apps.durable_tasks:gated", '[["by-partial"],{}]'),
            ("tests.apps.durable_tasks:note", '[["nested",{"k":1}],{}]'),
            ("tests.apps.durable_tasks:note", '[["np",{}],{}]')]
        durable_tasks.gate.set()
        assert [f.result(5) for f in futures] == [None, None, "nested", "np"]
        # A partial of a plain function is a plain task.
        assert edgesync.wait_until(functools.partial(len, "abc")).result(5) == 3


# -- accepted or refused ------------------------------------------------------------------------------------


def test_always_with_redis_down_and_a_journal_keeps_the_task_and_runs_it(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path), handoff="rq", handoff_on="always",
                 handoff_redis_url=closed_port_url()) as rt:
        fut = edgesync.wait_until(durable_tasks.note, "kept", {})
        assert fut.result(5) == "kept"
        # The next ones go to the journal without trying Redis again (one line, no timeout each).
        later = [edgesync.wait_until(durable_tasks.note, "k%d" % i, {}) for i in range(3)]
        assert [f.result(5) for f in later] == ["k0", "k1", "k2"]
        rt.wait(5)
        assert rows(path) == [] and durable_tasks.ran[0]["id"] == "kept"
    [line] = [r.getMessage() for r in caplog.records if "could not hand" in r.getMessage()]
    assert "kept in the journal and run here, id=%s" % edgesync.task_id(fut) in line


def test_always_with_redis_down_and_no_journal_raises_and_keeps_nothing() -> None:
    import redis
    with runtime(handoff="rq", handoff_on="always", handoff_redis_url=closed_port_url()) as rt:
        with pytest.raises(redis.ConnectionError):
            edgesync.wait_until(durable_tasks.note, "r", {})
        rt.wait(5)
        assert durable_tasks.ran == [] and rt.metrics()["durable"]["pending"] == 0


def test_queue_full_with_redis_down_keeps_the_task_in_the_journal_or_refuses(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    settings = dict(handoff="rq", handoff_on="deadline_or_queue_full", handoff_redis_url=closed_port_url(),
                    max_pending_tasks=1, background_threads=1)
    with runtime(durable_journal=str(path), **settings):  # type: ignore[arg-type]
        edgesync.wait_until(durable_tasks.gated, "held")
        fut = edgesync.wait_until(durable_tasks.gated, "overflow")  # returns: kept
        row = [r for r in rows(path) if r[0] == edgesync.task_id(fut)]
        assert row and row[0][2] == '[["overflow"],{}]' and row[0][4] == 0  # released: any claim takes it
        durable_tasks.gate.set()
    durable_tasks.gate.clear()
    with runtime(**settings) as rt:  # type: ignore[arg-type]
        edgesync.wait_until(durable_tasks.gated, "held")
        with pytest.raises(edgesync.QueueFull, match="the hand-off to rq queue .* failed"):
            edgesync.wait_until(durable_tasks.gated, "refused")
        assert rt.metrics()["durable"]["pending"] == 1
        durable_tasks.gate.set()


# -- retries -----------------------------------------------------------------------------------------------


def test_retry_on_named_exceptions_with_backoff_then_succeed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "j.db"
    with runtime(durable_journal=str(path)) as rt:
        fut = edgesync.wait_until(durable_tasks.flaky, "f", 2)
        assert fut.result(5) == 3
        rt.wait(5)
        assert [r["attempt"] for r in durable_tasks.ran] == [1, 2, 3]
        assert rows(path) == []
        metrics = rt.metrics()["durable"]
        assert (metrics["retried"], metrics["completed"], metrics["given_up"]) == (2, 1, 0)
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(lines) == 2 and "raised ConnectionError on attempt 1; retrying in" in lines[0]
    assert lines[0].endswith("as attempt 2, id=%s" % edgesync.task_id(fut))


def test_retries_spent_give_the_task_up_and_other_errors_are_not_retried(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    with runtime(durable_journal=str(tmp_path / "j.db")) as rt:
        fut = edgesync.wait_until(durable_tasks.flaky, "f", 5)
        with pytest.raises(ConnectionError, match="fails on attempt 3"):
            fut.result(5)
        other = edgesync.wait_until(durable_tasks.wrong_error, "w")
        with pytest.raises(KeyError):
            other.result(5)
        rt.wait(5)
        assert [r["attempt"] for r in durable_tasks.ran] == [1, 2, 3, 1]
        metrics = rt.metrics()["durable"]
        assert (metrics["retried"], metrics["given_up"], metrics["completed"]) == (2, 1, 1)
    assert any("gave up durable task %s (tests.apps.durable_tasks:flaky) after 3 run(s): its retries were spent"
               % edgesync.task_id(fut) in r.getMessage() for r in caplog.records)


def test_retry_options_are_checked() -> None:
    with pytest.raises(TypeError, match=r"retry_on must be an exception class or a tuple of them"):
        edgesync.durable(retry_on=(KeyboardInterrupt,))
    with pytest.raises(TypeError, match=r"retries need retry_on"):
        edgesync.durable(max_retries=3)
    with pytest.raises(TypeError, match=r"max_retries must be an integer from 0 to 1000"):
        edgesync.durable(retry_on=OSError, max_retries=-1)
    with pytest.raises(TypeError, match=r"backoff must be a number of seconds >= 0"):
        edgesync.durable(retry_on=OSError, backoff=[])
    with pytest.raises(TypeError, match=r"backoff_max must be a number of seconds above 0"):
        edgesync.durable(retry_on=OSError, backoff_max=0)
    fn = edgesync.durable(retry_on=OSError, backoff=[1, 5])(durable_tasks.plain)
    assert 2.5 <= fn.retry_delay(2) <= 5 and 2.5 <= fn.retry_delay(7) <= 5 and 0.5 <= fn.retry_delay(1) <= 1
    fn = edgesync.durable(retry_on=OSError, max_retries=9, backoff=1, backoff_max=4)(durable_tasks.plain)
    assert 2 <= fn.retry_delay(3) <= 4 and 2 <= fn.retry_delay(9) <= 4 and fn.attempts_allowed(3) == 10


def test_the_rerun_line_counts_what_runs_again_not_what_is_given_up(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import time

    from edgesync import _recovery
    from edgesync._journal import Journal, process_start
    path = tmp_path / "j.db"
    journal = Journal(str(path))
    journal.open()  # creates the table
    dead = 2**22 + 3  # above pid_max on this machine: never alive
    assert process_start(dead) is None
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_pid, owner_start, "
                     "accepted) VALUES (?, 'tests.apps.durable_tasks:note', ?, ?, 2, ?, 1, ?)",
                     [("spent-1", '[["s1",{}],{}]', 2, dead, time.time()),  # its 2 attempts ran: given up
                      ("spent-2", '[["s2",{}],{}]', 2, dead, time.time()),
                      ("again", '[["a",{}],{}]', 1, dead, time.time())])
    conn.commit()
    conn.close()
    journal.close()
    with runtime(durable_journal=str(path)) as rt:
        assert _recovery._keeper(rt.runtime).claim_once() == 3
        rt.wait(5)
        assert [r["id"] for r in durable_tasks.ran] == ["a"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "re-running" in line] == [
        "process %d: re-running 1 durable task(s) of dead process %d from the journal" % (os.getpid(), dead)]
    assert len([line for line in lines if "gave up durable task" in line]) == 2


def test_a_job_on_an_rq_worker_runs_in_its_app_and_through_the_task_hooks() -> None:
    # What the RQ worker calls (edgesync._handoff.run), called here: the app comes from the path the
    # task recorded, the hooks (Django's connection hygiene) are the ones a gunicorn task goes through.
    from edgesync import _handoff, _runtime
    hooked: List[str] = []

    def hook(fn: Any, context: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            hooked.append("before")
            return fn(*args, **kwargs)
        return run, context
    _runtime.add_task_hook(hook)
    try:
        _handoff.run("tests.apps.flaskdurable:welcome", '[["rq-1",0.0],{}]', 1, "tests.apps.flaskdurable:app")
    finally:
        _runtime.remove_task_hook(hook)
    assert hooked == ["before"]
    with pytest.raises(RuntimeError, match="Working outside of application context"):
        _handoff.run("tests.apps.flaskdurable:welcome", '[["rq-2",0.0],{}]', 1, None)  # no app recorded
