"""edgesync.django.TasksBackend: Django's Tasks framework on edgesync's background threads.

In-process tests configure Django with tests/apps/djangotasks/settings.py and wait
for tasks through the ``edgesync_runtime`` fixture; the last test serves the same
project with real gunicorn and checks that an enqueued task runs after the
response. They run with ``django.tasks`` (Django >= 6, Python >= 3.12) and with the
``django_tasks`` backport (older Django) alike.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import CancelledError
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import django
import pytest
from django.conf import settings

import edgesync
import edgesync.django
from edgesync.testing import TestRuntime, runtime

from .support import DJANGO_TASKS, REPO, Server, call, missing, run_example, wait_for

if importlib.util.find_spec("django.tasks") is None and importlib.util.find_spec("django_tasks") is None:
    missing(DJANGO_TASKS, "neither django.tasks (Django >= 6) nor the django-tasks backport is installed")

try:
    from django.tasks import TaskResultStatus, signals, task, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
    API = "django.tasks"
except ImportError:  # Django < 6: the backport
    from django_tasks import TaskResultStatus, signals, task, task_backends  # type: ignore[no-redef]
    from django_tasks.exceptions import InvalidTaskError as InvalidTask  # type: ignore[no-redef]
    from django_tasks.exceptions import (  # type: ignore[no-redef]
        TaskResultDoesNotExist,
        TaskResultMismatch,
    )
    API = "django_tasks"

DB_DIR = tempfile.mkdtemp(prefix="edgesync-djangotasks-")
atexit.register(shutil.rmtree, DB_DIR, True)  # even if no test of this module runs
if not settings.configured:
    from tests.apps.djangotasks import settings as site_settings
    settings.configure(**{**{k: getattr(site_settings, k) for k in dir(site_settings) if k.isupper()},
                          "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3",
                                                    "NAME": os.path.join(DB_DIR, "db.sqlite3")}}})
    django.setup()

from .apps.djangotasks import tasks  # noqa: E402  (@task needs the settings above)

WORKER_ID = "%s:%d" % (socket.gethostname()[:40], os.getpid())


def refreshed(result: Any) -> Any:
    """``result`` after ``refresh()``: a result is the state when it was handed out."""
    result.refresh()
    return result


@pytest.fixture(autouse=True)
def hygiene_hook_removed() -> Iterator[None]:
    """The backend installs edgesync.django's task hook; keep it out of later tests."""
    yield
    edgesync.django.uninstall()


@pytest.fixture
def gates() -> Iterator[Callable[[str], threading.Event]]:
    """``gates(name)``: the event ``tasks.blocked(name)`` waits on; all opened at teardown."""
    def gate(name: str) -> threading.Event:
        return tasks.GATES.setdefault(name, threading.Event())
    yield gate
    for event in tasks.GATES.values():
        event.set()
    tasks.GATES.clear()


@pytest.fixture
def signal_log() -> Iterator[List[Tuple[str, str, str]]]:
    """(signal, result id, status) for every Tasks signal sent during the test."""
    seen: List[Tuple[str, str, str]] = []
    receivers = []
    for name in ("task_enqueued", "task_started", "task_finished"):
        def receiver(sender: Any, task_result: Any, name: str = name, **kwargs: Any) -> None:
            seen.append((name, task_result.id, str(task_result.status)))
        getattr(signals, name).connect(receiver, weak=False)
        receivers.append((name, receiver))
    yield seen
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver)


def test_the_backend_declares_what_it_supports() -> None:
    backend = task_backends["default"]
    assert type(backend) is edgesync.django.TasksBackend
    assert type(backend).__module__ == "edgesync.django"
    assert backend.__class__.__mro__[1].__module__.startswith(API)
    assert (backend.supports_async_task, backend.supports_defer, backend.supports_get_result,
            backend.supports_priority) == (True, False, False, False)


def test_enqueue_runs_the_task_in_the_background_and_the_result_follows(
        edgesync_runtime: TestRuntime, gates: Callable[[str], threading.Event],
        signal_log: List[Tuple[str, str, str]]) -> None:
    result = tasks.blocked.enqueue("g")
    assert result.status in (TaskResultStatus.READY, TaskResultStatus.RUNNING)
    assert result.enqueued_at is not None and result.finished_at is None
    assert (result.args, result.kwargs, result.backend) == (["g"], {}, "default")
    # The result is the state when it was handed out; refresh() reads the task's progress.
    wait_for(lambda: refreshed(result).status == TaskResultStatus.RUNNING, 5, "the task to start")
    assert result.started_at is not None and result.worker_ids == [WORKER_ID]
    with pytest.raises(ValueError, match="not finished"):
        _ = result.return_value
    found = tasks.blocked.get_result(result.id)
    assert found is not result and found.status == TaskResultStatus.RUNNING
    gates("g").set()
    edgesync_runtime.wait()
    assert result.status == found.status == TaskResultStatus.RUNNING, "a result changed under its holder"
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value.startswith("edgesync-task")  # it ran on a background thread
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at and result.attempts == 1
    assert result.errors == []
    assert signal_log == [("task_enqueued", result.id, "READY"), ("task_started", result.id, "RUNNING"),
                          ("task_finished", result.id, "SUCCESSFUL")]
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 1


def test_beforeunload_names_pending_tasks_by_function_and_result_id(
        edgesync_runtime: TestRuntime, gates: Callable[[str], threading.Event]) -> None:
    events = edgesync_runtime.record("beforeunload")
    result = tasks.blocked.enqueue("named")
    edgesync_runtime.fire_beforeunload("wall_clock")
    [event] = events
    assert [t.name for t in event.pending_tasks] == ["tests.apps.djangotasks.tasks.blocked[%s]" % result.id]
    gates("named").set()
    edgesync_runtime.wait()


def test_arguments_and_return_values_are_json(edgesync_runtime: TestRuntime) -> None:
    result = tasks.add.enqueue(2, b=3)
    edgesync_runtime.wait()
    result.refresh()
    assert (result.args, result.kwargs, result.return_value) == ([2], {"b": 3}, 5)
    with pytest.raises(TypeError):
        tasks.add.enqueue(object(), 1)  # refused by Django at enqueue, never run
    edgesync_runtime.wait()
    assert edgesync_runtime.metrics()["tasks"]["completed"] == 1


def test_a_failing_task_is_failed_with_its_error_and_not_swallowed(
        edgesync_runtime: TestRuntime, signal_log: List[Tuple[str, str, str]]) -> None:
    rejections = edgesync_runtime.record("unhandledrejection")
    result = tasks.fail.enqueue("boom")
    edgesync_runtime.wait()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback and "in fail" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    assert result.finished_at is not None and result.worker_ids == [WORKER_ID]
    assert signal_log[-1] == ("task_finished", result.id, "FAILED")
    # edgesync sees the failure too: counted, and an unhandledrejection event.
    assert [type(e.reason) for e in rejections] == [ValueError]
    assert edgesync_runtime.metrics()["tasks"]["failed"] == 1


def test_an_async_task_runs_on_a_background_thread(edgesync_runtime: TestRuntime) -> None:
    result = tasks.async_double.enqueue(21)
    edgesync_runtime.wait()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL, result.errors
    assert result.return_value["value"] == 42
    assert result.return_value["thread"].startswith("edgesync-task")


def test_tasks_close_their_database_connections(edgesync_runtime: TestRuntime) -> None:
    tasks.CONNECTIONS.clear()
    sync, async_ = tasks.sync_connect.enqueue(), tasks.async_connect.enqueue()
    edgesync_runtime.wait()
    sync.refresh()
    async_.refresh()
    assert sync.status == async_.status == TaskResultStatus.SUCCESSFUL, (sync.errors, async_.errors)
    # An async task's sync_to_async calls run on a thread of its own (not asgiref's
    # process-wide one, which nothing cleans): its connection is closed and the
    # thread is gone (the no_leaked_threads fixture checks that).
    loop_thread, orm_thread = async_.return_value
    assert loop_thread.startswith("edgesync-task") and orm_thread != loop_thread
    assert sync.return_value.startswith("edgesync-task")
    assert len(tasks.CONNECTIONS) == 2
    assert [w.connection for w in tasks.CONNECTIONS] == [None, None]


def test_a_task_that_takes_context_gets_its_own_result(edgesync_runtime: TestRuntime) -> None:
    result = tasks.with_context.enqueue("x")
    edgesync_runtime.wait()
    result.refresh()
    assert result.return_value == ["x", 1, result.id]
    assert result.args == ["x"]  # the context is not an argument


def test_queue_names_are_checked_against_the_backends_queues(edgesync_runtime: TestRuntime) -> None:
    assert tasks.send_email.queue_name == "emails"
    result = tasks.send_email.enqueue("a@example.com")
    other = tasks.add.using(queue_name="emails").enqueue(1, 1)
    edgesync_runtime.wait()
    result.refresh()
    other.refresh()
    assert (result.return_value, other.return_value) == ("sent to a@example.com", 2)
    with pytest.raises(InvalidTask, match="Queue 'nope' is not valid"):
        tasks.add.using(queue_name="nope")


def test_priorities_and_run_after_are_refused_not_ignored() -> None:
    # One FIFO queue: Django refuses a priority rather than the backend ignoring it.
    with pytest.raises(InvalidTask, match="priority"):
        task(priority=10)(tasks.add.func)
    with pytest.raises(InvalidTask, match="run_after"):
        tasks.add.using(run_after=django.utils.timezone.now() + timedelta(minutes=5))
    with pytest.raises(InvalidTask, match="module level"):
        task(lambda: None)


def test_results_are_found_by_id_in_this_process(edgesync_runtime: TestRuntime) -> None:
    result = tasks.add.enqueue(1, 2)
    edgesync_runtime.wait()
    found = task_backends["default"].get_result(result.id)
    assert found is not result and found.return_value == 3 and found.id == result.id
    assert tasks.add.get_result(result.id).return_value == 3
    with pytest.raises(TaskResultMismatch):
        tasks.fail.get_result(result.id)
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result("no-such-id")
    # Each alias keeps its own results.
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["small"].get_result(result.id)

    # From another thread (another request): the same result, in an object of its own.
    seen: List[Any] = []
    thread = threading.Thread(target=lambda: seen.append(tasks.add.get_result(result.id)))
    thread.start()
    thread.join(5)
    assert [(r.id, r.return_value) for r in seen] == [(result.id, 3)] and seen[0] is not found


def test_only_the_most_recent_finished_results_are_kept() -> None:
    with runtime(background_threads=1) as rt:  # one thread: they finish in order
        seen: List[Any] = []
        signals.task_finished.connect(lambda sender, task_result, **kw: seen.append(task_result),
                                      weak=False, dispatch_uid="kept")
        try:
            results = [tasks.small.enqueue(n) for n in range(4)]
            rt.wait()
        finally:
            signals.task_finished.disconnect(dispatch_uid="kept")
    assert [r.return_value for r in seen] == [0, 1, 2, 3]
    backend = task_backends["small"]
    assert backend.results_kept == 2
    found = []
    for r in results:
        try:
            found.append(backend.get_result(r.id).return_value)
        except TaskResultDoesNotExist:
            pass
    assert found == [2, 3]


def test_bad_options_name_the_setting() -> None:
    cls = edgesync.django.TasksBackend
    with pytest.raises(django.core.exceptions.ImproperlyConfigured, match=r"'RESULT_KEPT'.*RESULTS_KEPT"):
        cls("x", {"OPTIONS": {"RESULT_KEPT": 5}})
    with pytest.raises(django.core.exceptions.ImproperlyConfigured, match=r"integer >= 0, got -1"):
        cls("x", {"OPTIONS": {"RESULTS_KEPT": -1}})


def test_a_full_queue_surfaces_as_queue_full(gates: Callable[[str], threading.Event]) -> None:
    with runtime(max_pending_tasks=1) as rt:
        running = tasks.blocked.enqueue("full")
        with pytest.raises(edgesync.QueueFull, match="max_pending_tasks"):
            tasks.add.enqueue(1, 2)
        gates("full").set()
        rt.wait()
        assert refreshed(running).status == TaskResultStatus.SUCCESSFUL
        assert rt.metrics()["tasks"]["completed"] == 1


def test_an_unloading_instance_refuses_and_fails_what_never_started(
        gates: Callable[[str], threading.Event], signal_log: List[Tuple[str, str, str]]) -> None:
    with runtime(background_threads=1) as rt:
        running = tasks.blocked.enqueue("unload")
        wait_for(lambda: refreshed(running).status == TaskResultStatus.RUNNING, 5, "the first task to start")
        queued = tasks.add.enqueue(1, 2)
        abandoned = rt.runtime.unload("the test unloads it")
        assert len(abandoned) == 2
        with pytest.raises(RuntimeError, match="unloading"):
            tasks.add.enqueue(3, 4)
        # The queued task never ran: its result says so rather than READY for ever.
        queued.refresh()
        assert queued.status == TaskResultStatus.FAILED
        assert queued.errors[0].exception_class is CancelledError
        assert "before the task could start" in queued.errors[0].traceback
        assert signal_log[-1] == ("task_finished", queued.id, "FAILED")
        assert refreshed(running).status == TaskResultStatus.RUNNING  # still running, still honest
        gates("unload").set()
        wait_for(lambda: refreshed(running).status == TaskResultStatus.SUCCESSFUL, 5, "the running task to end")


def test_without_a_tasks_framework_only_the_backend_fails_and_says_what_to_install() -> None:
    code = """if True:
        import sys
        sys.modules["django.tasks"] = None  # as on Django < 6 without the backport
        sys.modules["django_tasks"] = None
        import edgesync.django               # fine: the backend is built on first use
        edgesync.django.install()
        try:
            edgesync.django.TasksBackend
        except ImportError as exc:
            print(exc)
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "edgesync.django.TasksBackend needs Django's Tasks framework" in out
    assert "pip install django-tasks" in out and "Django >= 6.0" in out


@pytest.mark.slow
def test_under_gunicorn_an_enqueued_task_runs_after_the_response(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory("--threads", "2", app="tests.apps.djangotasks.wsgi")
    # The task waits for a file the test writes only once the response is in hand.
    status, body = server.get("/enqueue?dir=%s" % tmp_path, timeout=5)
    assert status == 200, body
    enqueued = json.loads(body)
    assert enqueued["status"] in ("READY", "RUNNING")
    assert not (tmp_path / "done").exists()
    (tmp_path / "go").touch()
    worker = int(server.get("/pid")[1])
    text = wait_for(lambda: (tmp_path / "done").exists() and (tmp_path / "done").read_text(), 10,
                    "the task to write its file")
    assert text == "written by %d" % worker

    def finished() -> Any:
        report = server.get_json("/result?id=%s" % enqueued["id"])
        return report["status"] == "SUCCESSFUL" and report
    report = wait_for(finished, 5, "the result to read SUCCESSFUL")
    assert report["return_value"] == text
    assert report["worker_ids"] == ["%s:%d" % (socket.gethostname()[:40], worker)]


@pytest.mark.slow
def test_the_django_example_runs_its_tasks_unchanged_on_another_backend(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    # tests/test_examples.py runs examples/django_app on edgesync's backend; here only
    # the TASKS setting changes (to Django's inline backend) and the same task code runs.
    immediate = API + ".backends.immediate.ImmediateBackend"
    server = run_example(server_factory, "django_app.wsgi",
                         {"DJANGO_DB": str(tmp_path / "db.sqlite3"), "DJANGO_TASKS_BACKEND": immediate})
    assert server.get("/") == (202, b"Request accepted\n")
    # Inline: the row exists as soon as the response does.
    visits = call(server, "GET", "/visits")[1]
    assert visits["count"] == 1 and visits["latest"][0]["path"] == "/"


@pytest.mark.slow
def test_under_gunicorn_the_cpu_limit_cancels_a_task_and_its_result_says_so(
        server_factory: Callable[..., Server]) -> None:
    no_other_limits = {"EDGESYNC_WALL_CLOCK_LIMIT_MS": "0", "EDGESYNC_CPU_SOFT_LIMIT_MS": "0",
                       "EDGESYNC_MEMORY_LIMIT_MB": "0", "EDGESYNC_REQUEST_IDLE_TIMEOUT_MS": "0"}
    server = server_factory("--threads", "2", app="tests.apps.djangotasks.wsgi",
                            env={**no_other_limits, "EDGESYNC_CPU_HARD_LIMIT_MS": "300"})
    status, body = server.get("/spin?s=30", timeout=5)
    assert status == 200, body
    result_id = json.loads(body)["id"]
    server.wait_for_log(r"cancelled task tests\.apps\.djangotasks\.tasks\.spin\[%s\] \(reason=cpu\)" % result_id)

    def failed() -> Any:
        report = server.get_json("/result?id=%s" % result_id)
        return report["status"] == "FAILED" and report
    report = wait_for(failed, 10, "the result to read FAILED")
    assert report["errors"] == ["edgesync._invocation.InvocationCancelled"]
