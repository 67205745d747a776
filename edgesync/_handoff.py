"""Hand-off of durable tasks to RQ over Redis (``handoff = "rq"``).

design: a durable task is an import path plus JSON arguments, so it can run on any
machine that can import the app. RQ enqueues by import path; edgesync enqueues its own
``edgesync._handoff.run`` with the task's path, arguments and attempt number, so the task
sees ``edgesync.current_attempt()`` on an RQ worker as it would in gunicorn. The RQ job
id is ``edgesync-<task id>``: one id from ``wait_until`` to the RQ worker.

The Redis client is created on first use in each process (after fork); ``rq`` and
``redis`` are imported only when a hand-off target is configured.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Optional, Tuple

from ._durable import attempt_scope, resolve

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

    def enqueue(self, task_id: str, fn: str, args: str, attempt: int) -> str:
        """Put the task on the queue; returns the RQ job id. Raises what redis raises."""
        job = self._rq_queue().enqueue_call(
            "edgesync._handoff.run", args=(fn, args, attempt), job_id="edgesync-" + task_id,
            description="%s (edgesync durable task %s, attempt %d)" % (fn, task_id, attempt))
        return str(job.id)


def run(fn: str, args: str, attempt: int) -> Any:
    """Run a handed-off durable task (on the RQ worker): ``fn(*args, **kwargs)`` at ``attempt``."""
    target = resolve(fn)
    positional, keywords = json.loads(args)[:2]
    with attempt_scope(attempt, args, fn):
        return target.__wrapped__(*positional, **keywords)

