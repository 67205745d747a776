"""Django integration: background tasks get Django's database-connection hygiene.

Django keeps one database connection per thread and alias, and relies on its
request signals to look after them: ``request_started`` and ``request_finished``
both call ``django.db.close_old_connections()``, which closes every connection of
the current thread that is broken or older than ``CONN_MAX_AGE``. edgesync's
background threads serve no request, so nothing would ever do that for them: a
task would leave its connection open after it ends (with the default
``CONN_MAX_AGE = 0``, a leak of one connection per background thread), and the
next task on that thread would reuse a connection the database may have closed
hours ago ("server closed the connection unexpectedly").

With this integration every background task runs between two calls to
``close_old_connections()``, exactly like a request::

    # settings.py
    INSTALLED_APPS = [..., "edgesync.django.EdgeSyncConfig"]

or, without touching ``INSTALLED_APPS``, once per process (in ``wsgi.py``)::

    application = get_wsgi_application()
    edgesync.django.install()

Then schedule ORM work as usual, passing ids and plain values rather than model
instances or the request (the request is finished by the time the task runs)::

    def record_visit(path: str) -> None:
        Visit.objects.create(path=path)

    def index(request):
        edgesync.wait_until(record_visit, request.path)
        return HttpResponse("Request accepted", status=202)

With persistent connections (``CONN_MAX_AGE > 0`` or ``None``) each background
thread keeps its connection between tasks, as a request thread does, so a worker
holds at most ``background_threads`` extra connections per database alias.

Django's Tasks framework (``django.tasks``, or the ``django-tasks`` backport before
Django 6) gets a backend that runs each enqueued task through ``wait_until``, with
the same hygiene::

    TASKS = {"default": {"BACKEND": "edgesync.django.TasksBackend"}}

    @task
    def record_visit(path: str) -> None:
        Visit.objects.create(path=path)

    def index(request):
        record_visit.enqueue(request.path)
        return HttpResponse("Request accepted", status=202)

Tasks and results live in the worker's memory: see docs/django.md, "The Tasks
backend", for what that guarantees and what the backend declares it supports.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import json
import logging
import os
import secrets
import socket
import threading
import traceback
from concurrent.futures import CancelledError, Future
from contextvars import Context
from typing import Any, Awaitable, Callable, Deque, Dict, Optional, Tuple

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.apps import AppConfig  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.db import close_old_connections, connections  # type: ignore[import-untyped]
from django.utils import timezone  # type: ignore[import-untyped]

from . import _logging, _results, _runtime, wait_until
from ._config import Settings, load_settings
from ._pool import run_awaitable

log = logging.getLogger("edgesync")

# TasksBackend is public too, but built on first access (see ``__getattr__``), so a
# star import does not need Django's Tasks framework.
__all__ = ["EdgeSyncConfig", "install", "uninstall"]


def install() -> None:
    """Run every background task of this process between two ``close_old_connections()``.

    Idempotent: calling it again (or from ``EdgeSyncConfig.ready``) changes nothing.
    """
    _runtime.add_task_hook(_task_hook)


def uninstall() -> None:
    """Undo ``install()`` for tasks scheduled from now on (for tests)."""
    _runtime.remove_task_hook(_task_hook)


class EdgeSyncConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """The Django app ``"edgesync.django.EdgeSyncConfig"``: its ``ready()`` calls ``install()``.

    Name the class, not the module, in ``INSTALLED_APPS``: Django only finds an
    ``AppConfig`` by itself in a package's ``apps`` submodule.
    """

    name = "edgesync.django"
    label = "edgesync"
    verbose_name = "edgesync"

    def ready(self) -> None:
        install()
        # Django configured logging from LOGGING just before: keep edgesync's lines (see _logging).
        _logging.keep_enabled()


def _task_hook(fn: Callable[..., Any], context: Context) -> Tuple[Callable[..., Any], Context]:
    return _with_connection_hygiene(fn), context


def _with_connection_hygiene(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run_between_close_old_connections(*args: Any, **kwargs: Any) -> Any:
        # Before: what request_started does; a connection left broken or expired by
        # an earlier task on this thread is closed, not reused.
        close_old_connections()
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                # An ``async def`` task: finish it before the connections are closed.
                result = run_awaitable(result)
            return result
        finally:
            # After: what request_finished does; with CONN_MAX_AGE = 0 this closes
            # the task's connection, so an idle background thread holds none.
            close_old_connections()

    return run_between_close_old_connections


# -- Django's Tasks framework ---------------------------------------------------------
#
# design: ``TasksBackend`` is built on first use (the module ``__getattr__`` below),
# on whichever Tasks API is importable: ``django.tasks`` (Django >= 6.0) or else the
# ``django_tasks`` backport. So ``import edgesync.django`` needs neither unless TASKS
# names the backend. Django keeps one backend instance per thread and alias
# (``task_backends`` is a ``BaseConnectionHandler``), so the results live in this
# module, per alias, where every request thread of the process finds them.

#: The OPTIONS of ``TasksBackend`` and their defaults.
_OPTIONS: Dict[str, int] = {"RESULTS_KEPT": 1000}


def __getattr__(name: str) -> Any:
    if name == "TasksBackend":
        return _tasks_backend_class()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


class _TasksAPI:
    """The names the backend uses, from ``django.tasks`` or from the backport."""

    def __init__(self) -> None:
        try:
            self.package = "django.tasks"
            importlib.import_module(self.package)
            self.normalize_json = importlib.import_module("django.utils.json").normalize_json
        except ImportError:
            try:
                self.package = "django_tasks"
                importlib.import_module(self.package)
                self.normalize_json = importlib.import_module("django_tasks.utils").normalize_json
            except ImportError as exc:
                import django  # type: ignore[import-untyped]
                raise ImportError(
                    "edgesync.django.TasksBackend needs Django's Tasks framework: django.tasks "
                    "(Django >= 6.0, Python >= 3.12) or, on older Django, its backport "
                    "(pip install django-tasks, then add \"django_tasks\" to INSTALLED_APPS); "
                    "neither is importable here (Django %s)" % django.get_version()) from exc
        base = importlib.import_module(self.package + ".base")
        self.BaseTaskBackend = importlib.import_module(self.package + ".backends.base").BaseTaskBackend
        self.TaskResult = base.TaskResult
        self.TaskResultStatus = base.TaskResultStatus
        self.TaskError = base.TaskError
        self.TaskContext = base.TaskContext
        self.signals = importlib.import_module(self.package + ".signals")
        self.TaskResultDoesNotExist = importlib.import_module(
            self.package + ".exceptions").TaskResultDoesNotExist


_backend_lock = threading.Lock()
_backend_class: Optional[type] = None


def _tasks_backend_class() -> type:
    global _backend_class
    with _backend_lock:
        if _backend_class is None:
            _backend_class = _define_tasks_backend(_TasksAPI())
            # From now on a plain module attribute: __getattr__ is not consulted again.
            globals()["TasksBackend"] = _backend_class
        return _backend_class


def _define_tasks_backend(api: _TasksAPI) -> type:
    status = api.TaskResultStatus

    class TasksBackend(api.BaseTaskBackend):  # type: ignore[misc, name-defined]  # Django ships no type hints
        """Django Tasks backend: ``task.enqueue()`` runs the task after the response, via ``wait_until``.

        ``TASKS = {"default": {"BACKEND": "edgesync.django.TasksBackend"}}``. Each
        enqueued task is one ``edgesync.wait_until`` task of this worker: it runs on
        the background threads with edgesync's limits, keeps the instance up until it
        is done, and runs between two ``close_old_connections()``. A task not yet
        finished when the process dies is lost. Results are kept in the process that
        enqueued the task (the ``RESULTS_KEPT`` most recent finished ones, plus every
        pending one); with ``durable_journal`` set they are also written to its SQLite
        file (edgesync._results: the same retention per alias), where ``get_result``
        in any process of the server finds them (``supports_get_result`` is then True).

        Every ``TaskResult`` handed out (by ``enqueue``, ``get_result`` and the
        ``task_*`` signals) is a copy: the state when it was handed out, consistent
        (never a status without its data), updated by ``refresh()``, as Django
        documents. Only the task's own ``TaskContext.task_result`` is the live one.

        ``enqueue`` raises what ``wait_until`` raises (``edgesync.QueueFull``, or
        ``RuntimeError`` once the instance is unloading); ``get_result`` raises
        ``TaskResultDoesNotExist`` for an id this process does not hold.
        """

        # run_after would need a timer that outlives requests and retirements: refused.
        supports_defer = False
        # Coroutine functions run on an event loop of the background thread.
        supports_async_task = True
        @property
        def supports_get_result(self) -> bool:
            """Results are readable "from any thread/process" once ``durable_journal`` is set."""
            return _shared_results() is not None
        # One FIFO queue: a priority would be recorded but would order nothing.
        supports_priority = False

        def __init__(self, alias: str, params: Dict[str, Any]) -> None:
            super().__init__(alias, params)
            self.results_kept = _results_kept(alias, self.options)

        def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
            # Ids as long as Django's backends make them (32 characters), from one
            # urandom call: get_random_string(32) makes 32, most of enqueue's cost.
            self.validate_task(task)
            install()  # connection hygiene for the task (idempotent)
            result = api.TaskResult(
                task=task, id=secrets.token_hex(16), status=status.READY, enqueued_at=None,
                started_at=None, finished_at=None, last_attempted_at=None, args=args,
                kwargs=kwargs, backend=self.alias, errors=[], worker_ids=[])
            object.__setattr__(result, "enqueued_at", timezone.now())
            store = _store(self.alias)
            store.add(result)
            handed_out = store.copy(result)  # before the task can start: READY
            run = _TaskRun(api, type(self), result, store, self.results_kept)
            try:
                _publish(handed_out, self.results_kept)
                future = wait_until(run)
            except BaseException:
                # why BaseException: whatever refused the task (QueueFull, unloading),
                # it is not enqueued; forget its result and let the caller see why.
                store.discard(result.id)
                raise
            future.add_done_callback(run.settle_if_never_ran)
            try:
                api.signals.task_enqueued.send(type(self), task_result=store.copy(handed_out))
            finally:
                run.enqueued.set()
            return handed_out

        def get_result(self, result_id: str) -> Any:
            store = _store(self.alias)
            result = store.get(result_id)
            if result is not None:
                return store.copy(result)
            shared = _shared_results()
            doc = None if shared is None else shared.get(self.alias, result_id)
            if doc is None:
                raise api.TaskResultDoesNotExist(result_id)
            return _from_doc(api, doc)

    TasksBackend.__module__ = __name__
    TasksBackend.__qualname__ = "TasksBackend"
    return TasksBackend


def _results_kept(alias: str, options: Dict[str, Any]) -> int:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(
            "TASKS[%r]['OPTIONS'] has unknown key(s) %s: edgesync.django.TasksBackend accepts %s"
            % (alias, ", ".join(map(repr, unknown)), ", ".join(_OPTIONS)))
    kept = options.get("RESULTS_KEPT", _OPTIONS["RESULTS_KEPT"])
    if not isinstance(kept, int) or isinstance(kept, bool) or kept < 0:
        raise ImproperlyConfigured(
            "TASKS[%r]['OPTIONS']['RESULTS_KEPT'] must be an integer >= 0, got %r (it is how "
            "many finished results get_result() can still find)" % (alias, kept))
    return kept


class _ResultStore:
    """The results of one backend alias in this process: every pending one, and the
    ``kept`` most recently finished ones.

    Rule: a live result changes only under ``lock`` (``_TaskRun.update``), and leaves
    the store only as a ``copy``, taken under it.
    """

    def __init__(self) -> None:
        self._lock = self.lock = threading.Lock()
        self._results: Dict[str, Any] = {}
        self._finished: Deque[str] = collections.deque()

    def add(self, result: Any) -> None:
        with self._lock:
            self._results[result.id] = result

    def discard(self, result_id: str) -> None:
        with self._lock:
            self._results.pop(result_id, None)

    def get(self, result_id: str) -> Any:
        with self._lock:
            return self._results.get(result_id)

    def copy(self, result: Any) -> Any:
        """``result`` as it is now, in an object of its own (its lists copied too)."""
        twin = object.__new__(type(result))
        with self._lock:
            for field in dataclasses.fields(result):
                value = getattr(result, field.name)
                object.__setattr__(twin, field.name, list(value) if isinstance(value, list) else value)
        return twin

    def finished(self, result_id: str, kept: int) -> None:
        with self._lock:
            self._finished.append(result_id)
            while len(self._finished) > kept:
                self._results.pop(self._finished.popleft(), None)


_stores: Dict[str, _ResultStore] = {}
_stores_lock = threading.Lock()


def _store(alias: str) -> _ResultStore:
    with _stores_lock:
        store = _stores.get(alias)
        if store is None:
            store = _stores[alias] = _ResultStore()
        return store


def _forget_results_after_fork() -> None:
    # The parent's pending tasks do not run in a child (its threads are gone).
    global _stores_lock
    _stores.clear()
    _stores_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_results_after_fork)


_settings_read: Dict[int, Settings] = {}  # outside a runtime: pid -> settings read once


def _shared_results() -> Optional[_results.SharedResults]:
    """The results table every worker of the server reads, when ``durable_journal`` is set."""
    rt = _runtime.peek()
    if rt is not None:
        settings = rt.settings  # a gunicorn worker: what the master read (edgesync._gunicorn.worker)
    else:
        settings = _settings_read.get(os.getpid()) or _settings_read.setdefault(os.getpid(), load_settings())
    if not settings.durable_journal:
        return None
    return _results.shared_results(os.path.abspath(settings.durable_journal))


def _publish(result: Any, kept: int) -> None:
    """Write ``result`` (a copy: nothing changes it meanwhile) where every worker reads it."""
    shared = _shared_results()
    if shared is not None:
        shared.put(result.backend, result.id, _to_doc(result),
                   None if result.finished_at is None else result.finished_at.timestamp(), kept)


def _to_doc(result: Any) -> str:
    task = result.task
    return json.dumps({
        "task": task.module_path, "queue_name": task.queue_name, "backend": result.backend,
        "id": result.id, "status": str(result.status), "args": result.args, "kwargs": result.kwargs,
        **{name: None if getattr(result, name) is None else getattr(result, name).isoformat()
           for name in ("enqueued_at", "started_at", "finished_at", "last_attempted_at")},
        "errors": [[e.exception_class_path, e.traceback] for e in result.errors],
        "worker_ids": result.worker_ids, "return_value": result._return_value})


def _from_doc(api: _TasksAPI, doc: str) -> Any:
    from datetime import datetime

    from django.utils.module_loading import import_string  # type: ignore[import-untyped]

    d = json.loads(doc)
    task = import_string(d["task"])
    if (task.queue_name, task.backend) != (d["queue_name"], d["backend"]):
        task = task.using(queue_name=d["queue_name"], backend=d["backend"])
    result = api.TaskResult(
        task=task, id=d["id"], status=api.TaskResultStatus(d["status"]), args=d["args"], kwargs=d["kwargs"],
        backend=d["backend"], worker_ids=d["worker_ids"],
        errors=[api.TaskError(exception_class_path=path, traceback=tb) for path, tb in d["errors"]],
        **{name: None if d[name] is None else datetime.fromisoformat(d[name])
           for name in ("enqueued_at", "started_at", "finished_at", "last_attempted_at")})
    object.__setattr__(result, "_return_value", d["return_value"])
    return result


def _worker_id() -> str:
    return "%s:%d" % (socket.gethostname()[:40], os.getpid())


#: How long a task that started at once waits for ``enqueue`` to send ``task_enqueued``.
_ENQUEUED_WAIT_SECONDS = 5.0


class _TaskRun:
    """One enqueued task, as the callable ``wait_until`` runs; it updates the result.

    Rule: each change of the result (a status with the data it announces) is made
    under the store's lock, so a copy never shows a status without its data.
    """

    def __init__(self, api: _TasksAPI, sender: type, result: Any, store: _ResultStore, kept: int):
        self.api = api
        self.sender = sender
        self.result = result
        self.store = store
        self.kept = kept
        self.enqueued = threading.Event()
        func = result.task.func
        # What edgesync's logs and beforeunload events call this task.
        self.__module__ = func.__module__
        self.__qualname__ = "%s[%s]" % (func.__qualname__, result.id)

    def __call__(self) -> Any:
        api, result, task = self.api, self.result, self.result.task
        status = api.TaskResultStatus
        # task_started must not overtake task_enqueued, sent by enqueue() just after
        # wait_until accepted the task.
        self.enqueued.wait(_ENQUEUED_WAIT_SECONDS)
        started = timezone.now()
        with self.store.lock:
            object.__setattr__(result, "started_at", started)
            object.__setattr__(result, "last_attempted_at", started)
            result.worker_ids.append(_worker_id())
            object.__setattr__(result, "status", status.RUNNING)
        self._publish()
        try:
            api.signals.task_started.send(self.sender, task_result=self.store.copy(result))
            args = list(result.args)
            if task.takes_context:
                args.insert(0, api.TaskContext(task_result=result))
            value = task.func(*args, **result.kwargs)
            if inspect.isawaitable(value):
                value = run_awaitable(_with_async_connection_hygiene(value))
            value = api.normalize_json(value)
        # why BaseException: a cancellation by a CPU limit (InvocationCancelled) fails
        # the task too; it is recorded here and re-raised for edgesync to count.
        except BaseException as exc:
            self._finish(status.FAILED, exc)
            raise
        self._finish(status.SUCCESSFUL, None, value)
        return value

    def _finish(self, outcome: Any, exc: Optional[BaseException], value: Any = None) -> None:
        result = self.result
        error = None if exc is None else self.api.TaskError(
            exception_class_path="%s.%s" % (type(exc).__module__, type(exc).__qualname__),
            traceback="".join(traceback.format_exception(exc)))
        finished = timezone.now()
        with self.store.lock:
            if error is not None:
                result.errors.append(error)
            else:
                object.__setattr__(result, "_return_value", value)
            object.__setattr__(result, "finished_at", finished)
            object.__setattr__(result, "status", outcome)
        self.store.finished(result.id, self.kept)
        self._publish()
        # Sent inside the task's ``except`` block when it failed, as Django's own
        # backends do: receivers (its logger among them) see the exception.
        self.api.signals.task_finished.send(self.sender, task_result=self.store.copy(result))

    def _publish(self) -> None:
        try:
            _publish(self.store.copy(self.result), self.kept)
        # why Exception: the task's own outcome must not depend on the shared copy of
        # its result; other workers see the previous state (logged, with why).
        except Exception:
            log.exception("edgesync: could not write the result %s to the durable_journal; other "
                          "workers read its previous state", self.result.id)

    def settle_if_never_ran(self, future: Future[Any]) -> None:
        """A done callback: the task was cancelled before it started (the instance
        unloaded with it queued), so its result says FAILED rather than READY for ever."""
        if not future.cancelled() or self.result.status != self.api.TaskResultStatus.READY:
            return
        try:
            raise CancelledError("edgesync: this worker unloaded before the task could start; "
                                 "it did not run")
        except CancelledError as exc:
            self._finish(self.api.TaskResultStatus.FAILED, exc)


async def _with_async_connection_hygiene(awaitable: Awaitable[Any]) -> Any:
    """Await an ``async def`` task's coroutine with its own thread for sync ORM calls.

    Outside a request, asgiref sends ``sync_to_async`` calls (every async ORM method)
    to one thread shared by the whole process, whose connections nothing ever closes.
    In a ``ThreadSensitiveContext`` they go to a thread of this task's own; its
    connections are closed here, before that thread ends.
    """
    async with ThreadSensitiveContext():
        try:
            return await awaitable
        finally:
            await sync_to_async(connections.close_all)()
