"""Task identity and names (issue 12 items 6, task identity, lifecycle logs; issue 13's partial names).

Every task has an id reachable from its future and shown in every log line about it; a task is named
after its function (or the name the user gave it with ``edgesync.named``), never after its arguments.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from concurrent.futures import Future
from typing import Any, List

import pytest

import edgesync
from edgesync import TaskInfo, testing
from edgesync._identity import task_name

WAIT = 10.0
SECRET = "alice.SECRET@example.com"

pytestmark = pytest.mark.usefixtures("registry_restored")


def send(address: str, *, subject: str = "hi") -> str:
    return "sent"


def fail(address: str) -> None:
    raise ValueError("smtp down")


class Sender:
    def __init__(self, token: str):
        self.token = token

    def __call__(self, address: str) -> str:
        return "sent"

    def __repr__(self) -> str:
        return "Sender(token=%r)" % self.token


async def fetch(url: str) -> str:
    return url


def edgesync_lines(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("edgesync")]


# -- names ----------------------------------------------------------------------------------------------------


def test_names_never_show_argument_values() -> None:
    assert task_name(send) == "tests.test_identity.send"
    assert task_name(functools.partial(send, SECRET)) == "tests.test_identity.send (partial)"
    assert task_name(functools.partial(functools.partial(send, SECRET), subject=SECRET)) == \
        "tests.test_identity.send (partial)"
    assert task_name(Sender(SECRET)) == "tests.test_identity.Sender object"
    assert task_name(Sender(SECRET).__call__) == "tests.test_identity.Sender.__call__"
    coro = fetch(SECRET)
    try:
        assert task_name(coro) == "tests.test_identity.fetch"
    finally:
        coro.close()
    assert task_name(Future()) == "concurrent.futures._base.Future object"


def test_a_failing_partial_is_logged_by_name_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesync")
    with testing.runtime(background_threads=1) as rt:
        fut = edgesync.wait_until(functools.partial(fail, SECRET))
        assert isinstance(fut.exception(WAIT), ValueError)
        ok = edgesync.wait_until(functools.partial(send, SECRET))
        ok.result(WAIT)
        rt.wait(WAIT)
    lines = edgesync_lines(caplog)
    assert "process %d: background task tests.test_identity.fail (partial) raised ValueError, id=%s" % (
        os.getpid(), edgesync.task_id(fut)) in lines, lines
    assert any("task tests.test_identity.send (partial) succeeded" in line for line in lines), lines
    assert SECRET not in caplog.text


def test_an_abandoned_task_is_logged_with_its_id_and_no_arguments(
        caplog: pytest.LogCaptureFixture, release: threading.Event) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    rt = testing.TestRuntime(background_threads=1)
    try:
        running = edgesync.wait_until(functools.partial(release.wait, WAIT))
        queued = edgesync.wait_until(Sender(SECRET), SECRET)
        abandoned = rt.runtime.unload("the test abandons it")
    finally:
        release.set()
        rt.close()
    assert [(t.id, t.name) for t in abandoned] == [
        (edgesync.task_id(running), "threading.Event.wait (partial)"),
        (edgesync.task_id(queued), "tests.test_identity.Sender object")]
    text = caplog.text
    assert SECRET not in text
    assert re.search(r"abandoned task threading\.Event\.wait \(partial\) \((running, ran|queued, never started)"
                     r"[^)]*\), id=%s, reason=the test abandons it" % edgesync.task_id(running), text), text
    assert "abandoned task tests.test_identity.Sender object (queued, never started, waited" in text
    assert "id=%s, reason=the test abandons it" % edgesync.task_id(queued) in text


# -- user-given names ---------------------------------------------------------------------------------------------


def test_named_names_a_task_without_touching_its_arguments(edgesync_runtime: testing.TestRuntime,
                                                          release: threading.Event) -> None:
    events = edgesync_runtime.record("beforeunload")
    # The task's own keyword arguments, even one called "name", reach it untouched.
    fut = edgesync.wait_until(edgesync.named("send-welcome", send), SECRET, subject="welcome")
    assert fut.result(WAIT) == "sent"
    seen: List[Any] = []
    blocker = edgesync.wait_until(edgesync.named("upload", lambda name: seen.append(name) or release.wait(WAIT)),
                                  name="report.pdf")
    edgesync_runtime.fire_beforeunload("early_drop")
    release.set()
    assert blocker.result(WAIT) is True and seen == ["report.pdf"]
    [event] = events
    assert [(t.name, t.id) for t in event.pending_tasks] == [("upload", edgesync.task_id(blocker))]


def test_named_as_a_decorator_and_with_coroutine_functions(edgesync_runtime: testing.TestRuntime) -> None:
    @edgesync.named("nightly-report")
    def report(day: str) -> str:
        return "report " + day

    assert report("mon") == "report mon", "a named function is still called as before"
    assert edgesync.wait_until(report, "tue").result(WAIT) == "report tue"
    assert edgesync.wait_until(edgesync.named("fetch", fetch), "u").result(WAIT) == "u"
    assert task_name(report) == "nightly-report"


@pytest.mark.parametrize("args, fragment", [
    (("", send), "non-empty string"),
    ((None, send), "NoneType"),
    (("x", None), "must be callable"),
    (("x", Future()), "concurrent.futures._base.Future"),
], ids=["empty", "not-a-string", "not-callable", "future"])
def test_named_rejects_what_it_cannot_name(args: Any, fragment: str) -> None:
    with pytest.raises(TypeError, match=re.escape(fragment)):
        edgesync.named(*args)


# -- ids --------------------------------------------------------------------------------------------------------


def test_every_task_has_a_short_unique_id_reachable_from_its_future(edgesync_runtime: testing.TestRuntime) -> None:
    futures = [edgesync.wait_until(send, SECRET) for _ in range(50)]
    tracked: Future[None] = Future()
    assert edgesync.wait_until(tracked) is tracked
    ids = [edgesync.task_id(f) for f in futures] + [edgesync.task_id(tracked)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"%d-\d+" % os.getpid(), i) for i in ids), ids
    tracked.set_result(None)
    edgesync_runtime.wait(WAIT)


def test_task_id_of_a_foreign_future_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="not a future returned by edgesync.wait_until"):
        edgesync.task_id(Future())


def test_task_info_is_plain_json_with_id_name_state_and_timings(edgesync_runtime: testing.TestRuntime,
                                                               release: threading.Event) -> None:
    events = edgesync_runtime.record("beforeunload")
    fut = edgesync.wait_until(edgesync.named("upload", release.wait), WAIT)
    edgesync_runtime.fire_beforeunload("termination")
    release.set()
    fut.result(WAIT)
    [info] = events[0].pending_tasks
    assert isinstance(info, TaskInfo)
    data = json.loads(json.dumps(info.to_dict()))
    assert set(data) == {"id", "name", "state", "age", "running_for"}
    assert (data["id"], data["name"]) == (edgesync.task_id(fut), "upload")
    assert data["state"] in ("queued", "running") and data["age"] >= 0


# -- lifecycle logs -------------------------------------------------------------------------------------------------


def test_success_is_one_debug_line_with_id_name_and_duration(caplog: pytest.LogCaptureFixture,
                                                             edgesync_runtime: testing.TestRuntime) -> None:
    # At INFO, successes are summarised (tests/test_task_path.py); each is a DEBUG line.
    caplog.set_level(logging.DEBUG, logger="edgesync")
    fut = edgesync.wait_until(edgesync.named("send-welcome", send), SECRET)
    fut.result(WAIT)
    edgesync_runtime.wait(WAIT)
    [record] = [r for r in caplog.records if "succeeded" in r.getMessage()]
    assert record.levelno == logging.DEBUG and record.name == "edgesync.tasks"
    assert re.fullmatch(r"process %d: task send-welcome succeeded in \d+\.\d{3}s, id=%s"
                        % (os.getpid(), edgesync.task_id(fut)), record.getMessage()), record.getMessage()


def test_success_lines_can_be_silenced_alone(caplog: pytest.LogCaptureFixture,
                                             edgesync_runtime: testing.TestRuntime) -> None:
    caplog.set_level(logging.INFO, logger="edgesync")
    caplog.set_level(logging.WARNING, logger="edgesync.tasks")
    edgesync.wait_until(send, SECRET).result(WAIT)
    edgesync.wait_until(fail, SECRET).exception(WAIT)
    edgesync_runtime.wait(WAIT)
    lines = edgesync_lines(caplog)
    assert not [line for line in lines if "succeeded" in line]
    assert [line for line in lines if "raised ValueError" in line], "failures are still logged"
