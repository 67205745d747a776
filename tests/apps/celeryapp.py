"""A user's own Celery app that includes ``edgesync.celery`` (the worker side of ``handoff = "celery"``).

``celery -A tests.apps.celeryapp worker -Q <queue>``: broker from ``$CELERY_BROKER_URL``. The app
knows nothing of edgesync's tasks but the include: the web side sends ``edgesync.run_durable`` by name.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("userapp", broker=os.environ["CELERY_BROKER_URL"], backend=None, include=["edgesync.celery"])
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery")
