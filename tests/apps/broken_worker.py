"""A worker class whose construction fails in a worker the mold forked, and only there.

gunicorn builds each ``Worker`` object in the master, before the fork; a mold's worker
builds its own after the fork (``edgesync._gunicorn.child.new_worker``). This one raises
in that second construction while ``BROKEN_WORKER_FILE`` exists, to test what the
worker then logs.
"""

from __future__ import annotations

import os
from typing import Any

import edgesync


class BrokenWorker(edgesync.Worker):  # type: ignore[misc]
    def __init__(self, age: int, ppid: int, *args: Any, **kwargs: Any) -> None:
        if os.getpid() != ppid and os.path.exists(os.environ["BROKEN_WORKER_FILE"]):
            raise RuntimeError("this worker cannot be built (%s exists)" % os.environ["BROKEN_WORKER_FILE"])
        super().__init__(age, ppid, *args, **kwargs)
