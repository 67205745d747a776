"""Hand-off of durable tasks to RQ over Redis (``handoff = "rq"``).

design: a durable task is an import path plus JSON arguments, so it can run on any
machine that can import the app. RQ enqueues by import path; edgesync enqueues its own
``edgesync._handoff.run`` with the task's path, arguments, attempt number and the import
path of the app that accepted it, so the task runs on an RQ worker as it would in
gunicorn: ``edgesync.current_attempt()``, the app's framework setup (a Flask app
context, Django's connection hygiene: ``_context.run_in_app`` and the task hooks) and
its retries. The RQ job id is the task's durable id: one id from ``wait_until`` to the
RQ worker.

A target is what a durable task can be handed to: ``describe()`` and ``enqueue(...)``.
A Celery target would enqueue with ``task_id`` = the durable id the same way.

The Redis client is created on first use in each process (after fork); ``rq`` and
``redis`` are imported only when a hand-off target is configured.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import threading
import time
from typing import Any, Optional, Tuple

from ._context import load_app
from ._durable import resolve
from ._identity import who

log = logging.getLogger("edgesync")

#: How long one enqueue may wait for Redis (connect and answer).
REDIS_TIMEOUT_S = 2.0


class RQTarget:
    """Enqueues durable tasks on one RQ queue."""

    def __init__(self, url: str, queue: str):
        self.url = url
        self.queue_name = queue
        self._lock = threading.Lock()
        self._queue: Optional[Tuple[int, Any]] = None

    def _rq_queue(self) -> Any:
        q = self._queue
        if q is not None and q[0] == os.getpid():
            return q[1]
        with self._lock:
            import redis
            import rq
            conn = redis.Redis.from_url(self.url, socket_timeout=REDIS_TIMEOUT_S,
                                        socket_connect_timeout=REDIS_TIMEOUT_S)
            queue = rq.Queue(self.queue_name, connection=conn)
            self._queue = (os.getpid(), queue)
            return queue

    def describe(self) -> str:
        return "rq queue %r at %s" % (self.queue_name, self.url)

    def where(self, task_id: str) -> str:
        """Where a task handed off went, for its log line."""
        return "handed to rq queue %r as job %s" % (self.queue_name, task_id)

    def enqueue(self, task_id: str, fn: str, args: str, attempt: int, max_attempts: int = 1000,
                app: Optional[str] = None) -> str:
        """Put the task on the queue as job ``task_id``; returns the RQ job id. Raises what redis raises."""
        job = self._rq_queue().enqueue_call(
            "edgesync._handoff.run", args=(fn, args, attempt, app, max_attempts), job_id=task_id,
            description="%s (edgesync durable task %s, attempt %d)" % (fn, task_id, attempt))
        return str(job.id)


def run(fn: str, args: str, attempt: int, app: Optional[str] = None, max_attempts: int = 1000) -> Any:
    """Run a handed-off durable task (on the RQ worker): ``fn(*args, **kwargs)`` at ``attempt``.

    Inside the app ``app`` names (imported once per RQ worker process) and through the task
    hooks (Django's connection hygiene), as in gunicorn; retried as ``@durable(retry_on=...)`` says.
    """
    target = resolve(fn)
    positional, keywords = json.loads(args)[:2]
    job_id = _current_job_id()

    def retrying(failed: int, exc: BaseException, delay: float) -> None:
        log.warning("%s: durable task %s raised %s on attempt %d; retrying in %.1fs as attempt %d, id=%s",
                    who(), fn, type(exc).__name__, failed, delay, failed + 1, job_id)
        time.sleep(delay)

    call = functools.partial(target.run, positional, keywords, attempt, max_attempts, load_app(app), retrying,
                             args)
    context = contextvars.copy_context()
    from ._runtime import _task_hooks  # the same hooks as a task in gunicorn (edgesync.django.install)
    for hook in list(_task_hooks):
        call, context = hook(call, context)  # type: ignore[assignment]
    return context.run(call)


def _current_job_id() -> str:
    try:
        from rq import get_current_job
        job = get_current_job()
        return str(job.id) if job is not None else "-"
    except Exception:  # outside an RQ job (called directly): no id to show
        return "-"

