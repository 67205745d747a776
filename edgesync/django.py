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
"""

from __future__ import annotations

import inspect
from contextvars import Context
from typing import Any, Callable, Tuple

from django.apps import AppConfig  # type: ignore[import-untyped]
from django.db import close_old_connections  # type: ignore[import-untyped]

from . import _runtime
from ._pool import run_awaitable

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
