"""Hand-off of durable tasks to a task engine: one interface, one job body, one module per engine.

design: a durable task is an import path plus JSON arguments, so it can run on any
machine that can import the app. Handing it off means sending a :class:`Handed`
record (the durable id, the task's path, its JSON arguments, the attempt it runs as,
its attempt cap, the import path of the app that accepted it) to an engine's queue.
Each engine is one module, public because its worker side is what queued jobs name:

- ``edgesync.rq`` (``handoff = "rq"``): the job ``edgesync.rq.run`` on an RQ queue;
- ``edgesync.celery`` (``handoff = "celery"``): the task ``edgesync.run_durable`` on a
  Celery queue, sent by name (``send_task``), never importing the user's tasks.

An engine module holds a ``Target`` class (the web side: :class:`Target`, built from the
settings; ``target_for`` imports the module on first use, and the target connects on its
first send, both in the gunicorn worker, after fork) and the
worker side's entry point, which calls :func:`run_handed`: the task runs on the
engine's worker as it would in gunicorn: ``edgesync.current_attempt()``, the app's
framework setup (a Flask app context, Django's connection hygiene:
``_context.run_in_app`` and the task hooks) and its retries.

One id: the engine's job id is the durable id (RQ's ``job_id``, Celery's ``task_id``).

Down: ``send`` raises what the engine's client raises, within about ``SEND_TIMEOUT_S``;
the durable layer (``_recovery``) decides what a failed send means (kept in the journal,
or ``wait_until`` raises), the same for every engine.

A third engine (Dramatiq, a Django Tasks backend) is one module with a ``Target`` and a
worker entry point calling ``run_handed``, plus its name in ``ENGINES`` and in the
``handoff`` setting's choices.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, NamedTuple, Optional, Protocol

from ._context import load_app
from ._durable import resolve
from ._identity import who

log = logging.getLogger("edgesync")

#: How long one send may wait for the broker (connect and answer) before it counts as down.
SEND_TIMEOUT_S = 2.0

#: ``handoff`` setting -> the module of that engine (its ``Target`` and its worker entry point).
ENGINES: Dict[str, str] = {"rq": "edgesync.rq", "celery": "edgesync.celery"}


class Handed(NamedTuple):
    """What a hand-off sends: everything a run elsewhere needs, and nothing else."""

    id: str  # the durable id: the engine's job id
    fn: str  # the task's import path, module:qualname
    args: str  # JSON text of [positional, keywords], as the journal keeps it
    attempt: int  # the attempt the run elsewhere is
    max_attempts: int
    app: Optional[str]  # the import path of the app it runs in (see _context), or None


class Target(Protocol):
    """Where durable tasks can be handed: one engine's queue. Built in the worker process (after fork)."""

    #: The engine's name, as ``handoff`` spells it: "rq", "celery".
    engine: str

    def describe(self) -> str:
        """The queue and broker, for log lines and metrics (no password)."""

    def where(self, task_id: str) -> str:
        """Where a task handed off went, for its log line ("handed to rq queue 'x' as job ...")."""

    def send(self, task: Handed) -> str:
        """Put ``task`` on the queue as job ``task.id``; return the engine's job id (``task.id``).

        Raises what the engine's client raises when the broker refuses or does not answer within
        about ``SEND_TIMEOUT_S``: the task was then not queued (but see "Accepted or refused":
        a timeout after the broker received it may leave it queued too).
        """


def target_for(settings: Any) -> Optional[Target]:
    """The hand-off target the settings name (``handoff``), or None for ``handoff = ""``.

    Its engine module (and with it the engine's client library: Celery's costs about 60 ms of CPU
    to import) is imported on its first use, so a worker that never hands a task off never pays it.
    """
    if not settings.handoff:
        return None
    return _Deferred(settings.handoff, settings)


class _Deferred:
    """A :class:`Target` that builds the engine's own on first use (in the process that uses it)."""

    def __init__(self, engine: str, settings: Any):
        self.engine = engine
        self._settings = settings
        self._target: Optional[Target] = None
        self._lock = threading.Lock()

    def _get(self) -> Target:
        target = self._target
        if target is None:
            with self._lock:
                if self._target is None:
                    self._target = importlib.import_module(ENGINES[self.engine]).Target(self._settings)
                target = self._target
        return target

    def describe(self) -> str:
        return self._get().describe()

    def where(self, task_id: str) -> str:
        return self._get().where(task_id)

    def send(self, task: Handed) -> str:
        return self._get().send(task)


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for log lines and metrics."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc="%s:***@%s" % (user, netloc[2])))
    except ValueError:  # not a URL we can parse: say so rather than print it
        return "<a URL that does not parse>"


def run_handed(job_id: str, fn: str, args: str, attempt: int, app: Optional[str], max_attempts: int) -> Any:
    """Run a handed-off durable task on an engine's worker: ``fn(*args, **kwargs)`` as ``attempt``.

    Inside the app ``app`` names (imported once per worker process) and through the task hooks
    (Django's connection hygiene), as in gunicorn; retried as ``@durable(retry_on=...)`` says, each
    retry logged with ``job_id`` (the durable id). Returns the task's result; raises its exception.
    """
    target = resolve(fn)
    positional, keywords = json.loads(args)[:2]

    def retrying(failed: int, exc: BaseException, delay: float) -> None:
        log.warning("%s: durable task %s raised %s on attempt %d; retrying in %.1fs as attempt %d, id=%s",
                    who(), fn, type(exc).__name__, failed, delay, failed + 1, job_id)
        time.sleep(delay)

    call: Callable[[], Any] = functools.partial(target.run, positional, keywords, attempt, max_attempts,
                                                load_app(app), retrying, args)
    context = contextvars.copy_context()
    from ._runtime import _task_hooks  # the same hooks as a task in gunicorn (edgesync.django.install)
    for hook in list(_task_hooks):
        call, context = hook(call, context)
    return context.run(call)


def run(fn: str, args: str, attempt: int, app: Optional[str] = None, max_attempts: int = 1000) -> Any:
    """The RQ entry point that earlier versions enqueued (``edgesync._handoff.run``): kept so that
    jobs already in Redis still run. New jobs name ``edgesync.rq.run``."""
    from .rq import run as rq_run
    return rq_run(fn, args, attempt, app, max_attempts)
