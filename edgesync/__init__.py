"""edgesync: the edge-runtime background-task model for sync WSGI apps under gunicorn.

Answer the request now, finish the work after it::

    import edgesync

    @app.post("/signup")
    def signup():
        user = create_user(request.form)
        edgesync.wait_until(send_welcome_email, user.email)   # does not block
        return "ok"

    edgesync.add_event_listener("beforeunload", lambda ev: save_progress(ev.reason))

Serve it with ``gunicorn -k edgesync.Worker app:app``. Outside gunicorn a default
in-process runtime runs the same tasks and drains them at interpreter exit.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Optional, ParamSpec, TypeVar, Union, overload

from . import _recovery, _recycle, _runtime  # noqa: F401  (_recovery registers the durable layer)
from ._births import after_fork, warm_up
from ._config import ConfigError, Settings, load_settings
from ._durable import DurableFunction, current_attempt, durable
from ._events import (
    BeforeUnloadEvent,
    TaskInfo,
    UnhandledRejectionEvent,
    UnloadEvent,
    add_event_listener,
    remove_event_listener,
)
from ._gunicorn.roles import checking_config as _checking_config
from ._identity import named, task_id
from ._invocation import InvocationCancelled
from ._pool import QueueFull
from ._process import first_runtime as _first_runtime
from ._process import metrics_runtime as _metrics_runtime
from ._runtime import accepts as _accepts
from ._runtime import peek as _peek_runtime

if TYPE_CHECKING:
    from ._gunicorn.worker import Worker

__all__ = [
    "BeforeUnloadEvent",
    "ConfigError",
    "DurableFunction",
    "InvocationCancelled",
    "QueueFull",
    "Settings",
    "TaskInfo",
    "UnhandledRejectionEvent",
    "UnloadEvent",
    "Worker",
    "add_event_listener",
    "after_fork",
    "current_attempt",
    "durable",
    "load_settings",
    "named",
    "remove_event_listener",
    "runtime_metrics",
    "server_metrics",
    "task_id",
    "wait_until",
    "warm_up",
]

__version__ = "0.1.0"

P = ParamSpec("P")
T = TypeVar("T")


@overload
def wait_until(fn: Future[T], /) -> Future[T]: ...
@overload
def wait_until(fn: Awaitable[T], /) -> Future[T]: ...
@overload
def wait_until(fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...
@overload
def wait_until(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...


def wait_until(fn: Union[Callable[..., Any], Future[Any], Awaitable[Any]], /,
               *args: Any, **kwargs: Any) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` in the background; does not block.

    Returns a ``concurrent.futures.Future`` of its result. ``fn`` may also be an
    existing ``Future`` (tracked, and returned as is) or an awaitable such as a
    coroutine (run to completion on a background thread). The task runs in a copy
    of the caller's ``contextvars`` context, taken now. The instance stays up until
    the task is done, within its limits. ``edgesync.task_id(future)`` is the task's
    id, shown in every log line about it; the logs name the task after its function
    (or ``edgesync.named(name, fn)``), never after its argument values.

    Raises ``TypeError`` for anything else, ``RuntimeError`` in the gunicorn master
    before fork (an app imported with ``--preload``: schedule from a request or
    gunicorn's ``post_worker_init`` instead), ``QueueFull`` when
    ``max_pending_tasks`` tasks are pending already, and ``RuntimeError`` once the
    instance is unloading and accepts no more background work. A task that raises
    dispatches an ``unhandledrejection`` event and never affects other tasks.

    A function declared with ``@edgesync.durable`` (also through ``edgesync.named``
    or ``functools.partial``) is recorded before this returns and run again by a
    live worker if its worker dies first (see ``durable``); its arguments must be
    JSON values, else ``TypeError``. It returns only once the task is kept (journal,
    hand-off target, or memory without a journal) and raises only if nothing was kept.
    """
    rt = _runtime._current or _first_runtime()
    # A type a layer claims (a @durable function, a partial): that layer records it before this returns.
    if type(fn) in _accepts:
        return _accepts[type(fn)](rt, fn, args, kwargs)
    return rt.wait_until(fn, args, kwargs)


def server_metrics() -> Optional[Dict[str, Any]]:
    """Every worker of this gunicorn server, as plain data: ``{"master_pid", "workers", "totals"}``.

    ``runtime_metrics()`` describes the one worker that answers; this reads the
    figures each live worker publishes at its heartbeat (at most about half a second
    old; ``figures_age_s`` says) in memory the master shares with its workers:
    per worker ``pid``, ``state`` (booting, serving, retiring), ``requests``,
    ``tasks_completed``, ``tasks_failed``, ``tasks_pending``,
    ``invocations_cancelled``; ``totals`` sums them over the live workers (a worker
    that exited takes its figures with it). None outside an ``edgesync.Worker``.
    """
    rt = _peek_runtime()
    if rt is None:
        return None
    return _recycle.server_metrics(rt)


def runtime_metrics() -> Dict[str, Any]:
    """A plain-data snapshot of this instance (one gunicorn worker, or this process).

    Keys: ``pid``, ``state`` (serving / draining / terminating / unloaded), ``cause``
    (why it drains: retire, oneshot, stop, quick, exit, close), ``policy``, ``age_s``
    (counted from when the worker serves), ``boot_cpu_s`` (the CPU the worker process
    spent from its fork until it served: what each recycle costs; None outside a
    worker), ``rss_bytes``, ``rss_baseline_bytes``, ``requests``, ``tasks`` (queued,
    running, tracked, completed, failed, abandoned), ``background_threads`` (the
    setting) and ``background_threads_started``, ``invocations_cancelled``,
    ``retire_reason``, ``terminate_reason`` and ``beforeunload_dispatched`` (reasons,
    in order), and ``durable`` (None unless durable tasks are configured or used:
    ``pending`` held by this instance, ``recorded``, ``completed``, ``rerun``,
    ``retried``, ``given_up``, ``handed_off``, ``left_pending``, of the whole journal
    ``journal_pending`` and ``journal_given_up`` (the given-up tasks it keeps:
    ``python -m edgesync durable``), ``journal`` (its path) and ``handoff`` (the
    target, or None)).
    Outside gunicorn this creates the default runtime if needed (its events thread
    starts then, its pool's threads when work arrives); in the gunicorn master
    (``--preload``) it describes a runtime that is never installed.
    """
    rt = _peek_runtime()
    if rt is None:
        rt = _metrics_runtime()
    return rt.metrics()


if _checking_config():
    # gunicorn --check-config imports the app, never the worker class: validate here,
    # so that a broken edgesync.toml fails the check (gunicorn prints the ConfigError).
    load_settings()


def __getattr__(name: str) -> Any:
    # The worker class imports gunicorn (about 20 modules): only a process that runs
    # it pays for that, not a script or a management command that calls wait_until.
    # gunicorn's ``-k edgesync.Worker`` and the entry point both look it up by name.
    if name == "Worker":
        from ._gunicorn.worker import Worker

        return Worker
    raise AttributeError("module 'edgesync' has no attribute %r" % name)
