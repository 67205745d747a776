"""Celery as a hand-off target (``handoff = "celery"``): the web side's ``Target`` and the worker's task.

design: the web side sends by name (``send_task("edgesync.run_durable", ...)``) with task id =
the durable id, through a minimal Celery app of its own built from ``handoff_broker_url``
(lazily, on the first send in each process, after fork): it never imports the user's tasks or
Celery app. The worker side is the task :data:`run_durable` of this module, registered as a
shared task, so there are two ways to run it:

- include it in your Celery app: ``Celery("proj", broker=..., include=["edgesync.celery"])``,
  and let the worker consume ``handoff_queue`` (``celery -A proj worker -Q celery,default``);
- standalone: ``celery -A edgesync.celery worker`` started in the app's directory builds its
  app (:func:`standalone_app`, the module's ``app``) from ``edgesync.toml`` there (and
  ``EDGESYNC_*``): the broker, the queue, the visibility timeout.

Either way the task runs as it would in gunicorn (``_handoff.run_handed``): the app's
framework setup (imported by the path the task recorded), ``current_attempt()``, retries.

Delivery (see docs/celery.md): Celery acknowledges a message when a worker takes it unless
the task is ``acks_late``, so a worker that dies mid-task loses it. ``run_durable`` is
``acks_late=True`` (acknowledged after the run, which may then run twice: at least once) and
``reject_on_worker_lost=True`` (a pool child that dies gives the message back at once). A
worker process killed outright acknowledges nothing: on Redis the message comes back after
``visibility_timeout`` (``handoff_visibility_timeout_ms``, Celery's 1 hour by default), which
must exceed the longest run, or a running task is given to a second worker too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Dict, Optional, Tuple

from celery import Celery, shared_task

from ._config import ConfigError, load_settings
from ._handoff import SEND_TIMEOUT_S, Handed, run_handed, safe_url
from ._identity import who

log = logging.getLogger("edgesync")

__all__ = ["TASK_NAME", "Target", "run_durable", "standalone_app"]

#: The name the web side sends and the worker runs: stable across versions (messages wait in brokers).
TASK_NAME = "edgesync.run_durable"


def _run_durable(self: Any, fn: str, args: str, attempt: int, app: Optional[str] = None,
                 max_attempts: int = 1000) -> None:
    """Run a handed-off durable task on a Celery worker (see ``edgesync.rq.run``); its result is not kept.

    A message the broker gives out again (its worker died mid-run: ``redelivered``) runs as the next
    attempt, so ``current_attempt() > 1`` says "this may have run before", as a re-run from the journal
    does; past ``max_attempts`` it is given up. The broker says only that it was given out before, not
    how often: a task that kills its worker every time comes back as the same next attempt.
    """
    task_id = str(self.request.id or "-")
    if (self.request.delivery_info or {}).get("redelivered"):
        attempt += 1
        if attempt > max_attempts:
            log.error("%s: gave up durable task %s: its %d attempt(s) all ended with their process, id=%s",
                      who(), fn, max_attempts, task_id)
            return
    run_handed(task_id, fn, args, attempt, app, max_attempts)


#: The Celery task ``edgesync.run_durable``, in every Celery app of the process (a shared task).
run_durable = shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
                          ignore_result=True)(_run_durable)


def _is_redis(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def _make_app(name: str, settings: Any, sender: bool) -> Celery:
    """A Celery app for ``settings``: its broker, queue and (on Redis) visibility timeout.

    ``sender``: the web side's app, whose sends give up after about ``SEND_TIMEOUT_S`` (a broker
    that does not answer must not hold a view); a worker's keeps Celery's blocking reads.
    """
    url = settings.handoff_broker_url
    app = Celery(name, broker=url, backend=None, set_as_current=False)
    transport: Dict[str, Any] = {}
    if _is_redis(url):
        visibility = max(1, settings.handoff_visibility_timeout_ms // 1000)
        # kombu sweeps unacknowledged messages every interval * throttle seconds (10 * 10 by default):
        # at most 10 s here, so a message comes back within its visibility timeout plus 10 s.
        transport = {"visibility_timeout": visibility, "unacked_restore_interval": max(1, min(10, visibility // 4)),
                     "unacked_restore_throttle": 1}
        if sender:
            transport.update(socket_timeout=SEND_TIMEOUT_S, socket_connect_timeout=SEND_TIMEOUT_S)
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.handoff_queue,
        worker_prefetch_multiplier=1,  # acks_late: a message a worker holds but does not run waits for it
    )
    if sender:
        app.conf.broker_connection_timeout = SEND_TIMEOUT_S  # AMQP's connect timeout (Celery's: 4 s)
    return app


class Target:
    """Sends durable tasks to one Celery queue (``handoff_broker_url``, ``handoff_queue``) by name."""

    engine = "celery"

    def __init__(self, settings: Any):
        self.settings = settings
        self.url: str = settings.handoff_broker_url
        self.queue_name: str = settings.handoff_queue
        self._lock = threading.Lock()
        self._app: Optional[Tuple[int, Celery]] = None

    def _celery(self) -> Celery:
        app = self._app
        if app is not None and app[0] == os.getpid():
            return app[1]
        with self._lock:
            made = _make_app("edgesync-sender", self.settings, sender=True)
            self._app = (os.getpid(), made)
            return made

    def describe(self) -> str:
        return "celery queue %r at %s" % (self.queue_name, safe_url(self.url))

    def where(self, task_id: str) -> str:
        return "handed to celery queue %r as task %s" % (self.queue_name, task_id)

    def send(self, task: Handed) -> str:
        """Send ``task`` as Celery task ``task.id``; returns it. Raises kombu's error when the broker is down."""
        result = self._celery().send_task(
            TASK_NAME, args=(task.fn, task.args, task.attempt, task.app, task.max_attempts), task_id=task.id,
            queue=self.queue_name, shadow=task.fn,  # Celery's lines name the durable function
            # One quick retry: a pooled connection that went stale (Redis restarted) reconnects once.
            retry=True, retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.2})
        return str(result.id)


_standalone: Optional[Celery] = None
_standalone_lock = threading.Lock()


def standalone_app() -> Celery:
    """The app of ``celery -A edgesync.celery worker``: built once from ``edgesync.toml`` in the working
    directory (and ``EDGESYNC_*``), which is put on ``sys.path`` as gunicorn does, so the worker imports
    the app by the path each task recorded. ConfigError without a ``handoff_broker_url``."""
    global _standalone
    with _standalone_lock:
        if _standalone is None:
            settings = load_settings()
            if not settings.handoff_broker_url:
                raise ConfigError(
                    "celery -A edgesync.celery: no broker: set handoff_broker_url in [edge_runtime] of "
                    "edgesync.toml in %s (the directory the worker starts in), or EDGESYNC_HANDOFF_BROKER_URL"
                    % os.getcwd())
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            _standalone = _make_app("edgesync", settings, sender=False)
        return _standalone


def __getattr__(name: str) -> Any:
    # `celery -A edgesync.celery` looks for the module's `app`: built on that first look, never when a
    # user's app includes this module.
    if name == "app":
        return standalone_app()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
