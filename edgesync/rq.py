"""RQ as a hand-off target (``handoff = "rq"``): the web side's ``Target`` and the job's entry point.

design: RQ enqueues by import path. edgesync enqueues its own :func:`run` (``edgesync.rq.run``,
a public name that stays, since jobs sit in Redis across deploys) with the task's path, JSON
arguments, attempt number, the import path of its app and its attempt cap, as job id = the
durable id. An ``rq worker`` that can import the app (same code, same working directory or
``PYTHONPATH``) runs it with the first run's framework setup (``_handoff.run_handed``).

The Redis client is created on first send in each process (after fork); ``rq`` and ``redis``
are imported then, never when edgesync is imported.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional, Tuple

from ._handoff import SEND_TIMEOUT_S, Handed, run_handed, safe_url

__all__ = ["Target", "run"]

#: What the jobs name: this module's :func:`run`.
ENTRY_POINT = "edgesync.rq.run"


class Target:
    """Enqueues durable tasks on one RQ queue (``handoff_redis_url``, ``handoff_queue``)."""

    engine = "rq"

    def __init__(self, settings: Any):
        self.url: str = settings.handoff_redis_url
        self.queue_name: str = settings.handoff_queue
        self._lock = threading.Lock()
        self._queue: Optional[Tuple[int, Any]] = None

    def _rq_queue(self) -> Any:
        q = self._queue
        if q is not None and q[0] == os.getpid():
            return q[1]
        with self._lock:
            import redis
            import rq
            conn = redis.Redis.from_url(self.url, socket_timeout=SEND_TIMEOUT_S,
                                        socket_connect_timeout=SEND_TIMEOUT_S)
            queue = rq.Queue(self.queue_name, connection=conn)
            self._queue = (os.getpid(), queue)
            return queue

    def describe(self) -> str:
        return "rq queue %r at %s" % (self.queue_name, safe_url(self.url))

    def where(self, task_id: str) -> str:
        return "handed to rq queue %r as job %s" % (self.queue_name, task_id)

    def send(self, task: Handed) -> str:
        """Enqueue ``task`` as job ``task.id``; returns the RQ job id. Raises what redis raises."""
        job = self._rq_queue().enqueue_call(
            ENTRY_POINT, args=(task.fn, task.args, task.attempt, task.app, task.max_attempts), job_id=task.id,
            description="%s (edgesync durable task %s, attempt %d)" % (task.fn, task.id, task.attempt))
        return str(job.id)


def run(fn: str, args: str, attempt: int, app: Optional[str] = None, max_attempts: int = 1000) -> Any:
    """Run a handed-off durable task on an RQ worker: the job every hand-off to RQ enqueues.

    ``fn(*args, **kwargs)`` (``args``: JSON text of ``[positional, keywords]``) as ``attempt``,
    inside the app ``app`` names, through the task hooks, retried as its ``@durable`` says.
    """
    return run_handed(_current_job_id(), fn, args, attempt, app, max_attempts)


def _current_job_id() -> str:
    try:
        from rq import get_current_job
        job = get_current_job()
        return str(job.id) if job is not None else "-"
    except Exception:  # outside an RQ job (called directly): no id to show
        return "-"
