"""edgesync.flask: tasks run in a fresh app context of their app, never with a stale request.

In-process tests use Flask's test client and the ``edgesync_runtime`` fixture
(edgesync.testing); one test runs the same app under real gunicorn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import flask
import pytest
from flask import Flask
from flask.testing import FlaskClient

import edgesync
from edgesync.flask import EdgeSync
from edgesync.testing import TestRuntime

from .apps import flaskapp
from .support import REPO, Server, wait_for

REQUEST_ERROR = "Working outside of request context."


@pytest.fixture
def app() -> Iterator[Flask]:
    flaskapp.seen.clear()
    yield flaskapp.create_app()
    flaskapp.seen.clear()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def observe(client: FlaskClient, rt: TestRuntime, label: str, query: str = "") -> Any:
    resp = client.get("/observe?label=%s&trace=trace-%s%s" % (label, label, query))
    assert resp.status_code == 200, resp.data
    rt.wait(timeout=5)
    return flaskapp.seen[label]


def test_task_sees_its_app_and_config_but_no_request(client: FlaskClient, edgesync_runtime: TestRuntime) -> None:
    seen = observe(client, edgesync_runtime, "a")
    assert seen["thread"].startswith("edgesync-task")
    assert seen["app"] == "flaskapp"
    assert seen["greeting"] == "hello from flaskapp"
    assert seen["has_app_context"] is True
    assert seen["has_request_context"] is False
    assert "request_path" not in seen
    assert seen["request_error"].startswith(REQUEST_ERROR)


def test_task_gets_a_fresh_g_and_its_teardown_runs(client: FlaskClient, edgesync_runtime: TestRuntime) -> None:
    seen = observe(client, edgesync_runtime, "g")
    assert seen["g"] == []  # the view had set g.user: it does not reach the task
    # The task's app context was popped on the task's own thread, teardown included.
    assert seen["thread"] in flaskapp.seen["teardowns"]


def test_callers_other_contextvars_reach_the_task(client: FlaskClient, edgesync_runtime: TestRuntime) -> None:
    assert observe(client, edgesync_runtime, "c1")["trace_id"] == "trace-c1"
    assert observe(client, edgesync_runtime, "c2")["trace_id"] == "trace-c2"


def test_async_task_runs_inside_the_app_context(client: FlaskClient, edgesync_runtime: TestRuntime) -> None:
    seen = observe(client, edgesync_runtime, "async", "&async=1")
    assert (seen["app"], seen["has_request_context"]) == ("flaskapp", False)
    assert seen["request_error"].startswith(REQUEST_ERROR)


def test_each_app_of_a_factory_gets_its_own_context(edgesync_runtime: TestRuntime) -> None:
    one, two = flaskapp.create_app("one"), flaskapp.create_app("two")
    assert one.extensions["edgesync"] is two.extensions["edgesync"] is flaskapp.sync
    assert observe(one.test_client(), edgesync_runtime, "one")["greeting"] == "hello from one"
    assert observe(two.test_client(), edgesync_runtime, "two")["greeting"] == "hello from two"


def test_init_app_twice_is_harmless(edgesync_runtime: TestRuntime) -> None:
    app = flaskapp.create_app("twice")
    EdgeSync(app)
    EdgeSync().init_app(app)
    seen = observe(app.test_client(), edgesync_runtime, "twice")
    assert (seen["app"], seen["g"]) == ("twice", [])


def test_app_without_init_app_gets_the_same_isolation(edgesync_runtime: TestRuntime) -> None:
    # Forgetting EdgeSync(app) must not hand the task the finished request or its g (issue 12, item 1).
    plain = flaskapp.create_app("plain", with_edgesync=False)
    assert "edgesync" not in plain.extensions
    seen = observe(plain.test_client(), edgesync_runtime, "plain")
    assert (seen["app"], seen["greeting"], seen["g"]) == ("plain", "hello from plain", [])
    assert seen["has_app_context"] is True and seen["has_request_context"] is False
    assert seen["request_error"].startswith(REQUEST_ERROR)
    assert seen["trace_id"] == "trace-plain", "the caller's other contextvars still reach the task"
    assert seen["thread"] in flaskapp.seen["teardowns"], "teardown_appcontext runs for the task's context"


def test_request_form_is_never_read_from_a_closed_request(edgesync_runtime: TestRuntime) -> None:
    # The trap reported: request.form of a finished request read {} in the task, silently.
    plain = Flask("form")
    got: list[Any] = []

    def task() -> None:
        try:
            got.append(dict(flask.request.form))
        except RuntimeError as exc:
            got.append(str(exc))

    @plain.post("/signup")
    def signup() -> str:
        assert flask.request.form["email"] == "a@example.com"
        edgesync.wait_until(task)
        return "ok"

    assert plain.test_client().post("/signup", data={"email": "a@example.com"}).status_code == 200
    edgesync_runtime.wait(timeout=5)
    assert len(got) == 1 and got[0].startswith(REQUEST_ERROR), got


def test_a_task_scheduled_by_a_task_gets_its_own_app_context(edgesync_runtime: TestRuntime) -> None:
    plain = Flask("nested")
    inner: list[Any] = []

    def child() -> None:
        inner.append((flask.current_app.name, sorted(vars(flask.g))))

    def parent() -> None:
        flask.g.parent_was_here = True
        edgesync.wait_until(child)

    with plain.app_context():
        flask.g.caller = True
        edgesync.wait_until(parent)
    edgesync_runtime.wait(timeout=5)
    assert inner == [("nested", [])]


def test_task_scheduled_outside_any_app_context_gets_none(edgesync_runtime: TestRuntime) -> None:
    future = edgesync.wait_until(flask.has_app_context)
    edgesync_runtime.wait(timeout=5)
    assert future.result() is False


def test_helpers_assert_a_task_ran_and_a_listener_saw_the_reason(
        client: FlaskClient, edgesync_runtime: TestRuntime) -> None:
    events = edgesync_runtime.record("beforeunload")
    job = client.post("/jobs", data={"steps": "2"}).json["job"]
    edgesync_runtime.wait(timeout=5)  # no sleep: returns once the job's task is done
    assert client.get("/jobs/" + job).json == {"job": job, "done": 2}
    edgesync_runtime.fire_beforeunload("memory")  # returns once the listeners have run
    assert [e.reason for e in events] == ["memory"]
    assert flaskapp.saved[-1]["reason"] == "memory"
    assert flaskapp.saved[-1]["progress"][job] == 2


USER_TEST_SUITE = '''
"""What a user writes: Flask's test client plus the edgesync_runtime fixture, no sleeps."""
import pytest
from tests.apps import flaskapp

@pytest.fixture
def client():
    return flaskapp.create_app().test_client()

def test_job_runs_to_the_end(client, edgesync_runtime):
    job = client.post("/jobs", data={"steps": "3"}).json["job"]
    edgesync_runtime.wait(timeout=5)                  # every task scheduled so far is done
    assert client.get("/jobs/" + job).json["done"] == 3
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 1

def test_progress_is_saved_before_unload(client, edgesync_runtime):
    events = edgesync_runtime.record("beforeunload")
    job = client.post("/jobs", data={"steps": "2"}).json["job"]
    edgesync_runtime.wait(timeout=5)
    edgesync_runtime.fire_beforeunload("wall_clock")  # returns once the listeners have run
    assert [e.reason for e in events] == ["wall_clock"]
    assert events[0].detail == {"reason": "wall_clock"}
    assert flaskapp.saved[-1]["reason"] == "wall_clock"
    assert flaskapp.saved[-1]["progress"][job] == 2

def test_each_test_gets_a_fresh_runtime(edgesync_runtime):
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 0
    assert edgesync_runtime.metrics()["beforeunload_dispatched"] == []
'''


def run_user_suite(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_users_flask_test_suite_with_the_helpers(tmp_path: Path) -> None:
    # Run as the user's own pytest session would: the edgesync_runtime fixture
    # comes from the pytest11 entry point, not from our conftest. (In this session
    # the autouse leak check also covers the helpers: fire_beforeunload above.)
    result = run_user_suite(tmp_path, USER_TEST_SUITE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["app", "plain_app"])
def test_under_gunicorn_tasks_get_the_app_context(server_factory: Callable[..., Server], name: str) -> None:
    server = server_factory("--threads", "4", app="tests.apps.flaskapp:" + name)
    status, _ = server.get("/observe?label=gu&trace=t-gu")
    assert status == 200

    def seen() -> Any:
        status, body = server.get("/seen?label=gu")
        return status == 200 and flask.json.loads(body)
    got = wait_for(seen, 10, "the task's report")
    app_name = "flaskapp" if name == "app" else "plain"
    assert (got["app"], got["greeting"], got["g"]) == (app_name, "hello from " + app_name, [])
    assert got["request_error"].startswith(REQUEST_ERROR)
    assert got["trace_id"] == "t-gu"
    # app.logger works from the task (Flask's default handler writes to stderr).
    server.wait_for_log(r"task gu ran in app " + app_name)
