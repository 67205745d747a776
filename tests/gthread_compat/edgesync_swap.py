"""pytest plugin: run gunicorn's own ``tests/test_gthread.py`` against ``edgesync.Worker``.

Loaded with ``-p edgesync_swap`` (this directory on ``PYTHONPATH``) by
``tests/test_gthread_compat.py``, which runs gunicorn's test file twice in
subprocesses: once unmodified (the gthread baseline) and once with this plugin.

test_gthread.py looks the class up as ``gthread.ThreadWorker`` each time it builds
a worker, so replacing that module attribute before collection is enough; nothing
in the test file is changed, and no assertion is touched.

The worker under test is ``CompatWorker``, ``edgesync.Worker`` plus the set-up that
``init_process`` does in a real worker process and that gunicorn's unit tests skip
(they build a worker and call ``run()``/``accept()``/``handle()`` directly):

- the ``Runtime`` exists from construction (``init_process`` creates it after fork,
  before anything else runs; the unit tests never fork);
- the limits monitor that ``run()`` starts is stopped when ``run()`` returns (a real
  worker process exits there; the pytest process goes on to the next test).
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.workers import gthread

import edgesync
from edgesync import _runtime

ORIGINAL_THREAD_WORKER = gthread.ThreadWorker


class CompatWorker(edgesync.Worker):
    """``edgesync.Worker`` with its runtime created as ``init_process`` would create it."""

    #: How many workers the tests built: reported to the driver (see pytest_sessionfinish).
    built = 0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        CompatWorker.built += 1
        self.runtime = _runtime.Runtime(self.settings, on_change=self._wake)

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.monitor is not None:
                self.monitor.stop()


def pytest_configure(config: Any) -> None:
    gthread.ThreadWorker = CompatWorker


def pytest_unconfigure(config: Any) -> None:
    gthread.ThreadWorker = ORIGINAL_THREAD_WORKER


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    # Proof for the driver that the tests really built edgesync workers.
    marker = os.environ.get("GTHREAD_COMPAT_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write("%d\n" % CompatWorker.built)
