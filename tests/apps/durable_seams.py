"""A WSGI app for tests/test_durable_seams.py: tests/apps/durable.py's, with a choice of durable task (another app).

``/durable?fn=work|poison|dropped&first=&rerun=&delay=&n=&only=<pid>`` schedules ``n``
tasks (ids ``<pid>_<n>``, unique across the server) and records ``accepted`` for each
once ``wait_until`` returned; ``only=<pid>``: another worker answers 409. Also
``/ok``, ``/pid``, ``/metrics``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from . import durable_seam_tasks, durable_tasks
from .durable import make_app


def _task(q: Dict[str, str], task_id: str) -> Tuple[Any, Tuple[Any, ...]]:
    fn = q.get("fn", "work")
    first, rerun = float(q.get("first", "0.01")), float(q.get("rerun", "0.01"))
    if fn == "poison":
        return durable_seam_tasks.poison, (task_id, float(q.get("delay", "0.2")))
    if fn == "dropped":
        return durable_seam_tasks.dropped, (task_id, first, rerun)
    return durable_tasks.work, (task_id, first, rerun)


app = make_app(_task)
