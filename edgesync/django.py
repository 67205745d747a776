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

Tasks and results live in the worker's memory: see README.md, "Django Tasks
backend", for what that guarantees and what the backend declares it supports.
"""

from __future__ import annotations

import collections
import importlib
import inspect
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

from . import _logging, _runtime, wait_until
from ._pool import run_awaitable

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
        is done, and runs between two ``close_old_connections()``. Nothing is written
        anywhere: a task not yet finished when the process dies is lost, and results
        are visible only in the process that enqueued the task (the
        ``RESULTS_KEPT`` most recent finished ones, plus every pending one).

        ``enqueue`` raises what ``wait_until`` raises (``edgesync.QueueFull``, or
        ``RuntimeError`` once the instance is unloading); ``get_result`` raises
        ``TaskResultDoesNotExist`` for an id this process does not hold.
        """

        # run_after would need a timer that outlives requests and retirements: refused.
        supports_defer = False
        # Coroutine functions run on an event loop of the background thread.
        supports_async_task = True
        # Results live in this process only, not "from any thread/process".
        supports_get_result = False
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
            run = _TaskRun(api, type(self), result, store, self.results_kept)
            try:
                future = wait_until(run)
            except BaseException:
                # why BaseException: whatever refused the task (QueueFull, unloading),
                # it is not enqueued; forget its result and let the caller see why.
                store.discard(result.id)
                raise
            future.add_done_callback(run.settle_if_never_ran)
            try:
                api.signals.task_enqueued.send(type(self), task_result=result)
            finally:
                run.enqueued.set()
            return result

        def get_result(self, result_id: str) -> Any:
            result = _store(self.alias).get(result_id)
            if result is None:
                raise api.TaskResultDoesNotExist(result_id)
            return result

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
    ``kept`` most recently finished ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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


def _worker_id() -> str:
    return "%s:%d" % (socket.gethostname()[:40], os.getpid())


#: How long a task that started at once waits for ``enqueue`` to send ``task_enqueued``.
_ENQUEUED_WAIT_SECONDS = 5.0


class _TaskRun:
    """One enqueued task, as the callable ``wait_until`` runs; it updates the result.

    Rule: each field of the result is written before the status that announces it
    (``errors`` before FAILED, the return value before SUCCESSFUL), so a request
    thread reading the live result never sees a status without its data.
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
        object.__setattr__(result, "started_at", started)
        object.__setattr__(result, "last_attempted_at", started)
        result.worker_ids.append(_worker_id())
        object.__setattr__(result, "status", status.RUNNING)
        try:
            api.signals.task_started.send(self.sender, task_result=result)
            args = list(result.args)
            if task.takes_context:
                args.insert(0, api.TaskContext(task_result=result))
            value = task.func(*args, **result.kwargs)
            if inspect.isawaitable(value):
                value = run_awaitable(_with_async_connection_hygiene(value))
            object.__setattr__(result, "_return_value", api.normalize_json(value))
        # why BaseException: a cancellation by a CPU limit (InvocationCancelled) fails
        # the task too; it is recorded here and re-raised for edgesync to count.
        except BaseException as exc:
            self._finish(status.FAILED, exc)
            raise
        self._finish(status.SUCCESSFUL, None)
        return result._return_value

    def _finish(self, outcome: Any, exc: Optional[BaseException]) -> None:
        result = self.result
        if exc is not None:
            result.errors.append(self.api.TaskError(
                exception_class_path="%s.%s" % (type(exc).__module__, type(exc).__qualname__),
                traceback="".join(traceback.format_exception(exc))))
        object.__setattr__(result, "finished_at", timezone.now())
        object.__setattr__(result, "status", outcome)
        self.store.finished(result.id, self.kept)
        # Sent inside the task's ``except`` block when it failed, as Django's own
        # backends do: receivers (its logger among them) see the exception.
        self.api.signals.task_finished.send(self.sender, task_result=result)

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
