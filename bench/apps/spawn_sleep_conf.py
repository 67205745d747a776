"""A gunicorn config file for a side-by-side: edgesync.Worker with gunicorn's own ``spawn_workers``.

edgesync's master forks without the ``time.sleep(0.1 * random.random())`` that
gunicorn's ``Arbiter.spawn_workers`` takes after each fork. ``bench/births.py``
loads ``gunicorn -c bench/apps/spawn_sleep_conf.py -k edgesync.Worker`` side by side
with a plain edgesync server, to measure what that sleep costs births.
"""

from __future__ import annotations

import types
from typing import Any


def when_ready(server: Any) -> None:
    from gunicorn.arbiter import Arbiter

    server.spawn_workers = types.MethodType(Arbiter.spawn_workers, server)
