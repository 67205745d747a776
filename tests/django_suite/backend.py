"""The one adaptation Django's Tasks tests need: an ``enqueue`` that returns a finished result.

Django's tests of its ImmediateBackend read the result ``enqueue()`` returns as finished:
that backend runs the task inside ``enqueue``. ``edgesync.django.TasksBackend`` runs it
after the response, on a background thread. ``WaitingBackend`` is that backend, unchanged,
whose ``enqueue`` then waits (with a deadline) for the task to finish and refreshes the
result, as a caller of a background backend polls ``get_result``. Nothing else differs.
"""

from __future__ import annotations

import time
from typing import Any

import edgesync.django

#: How long a test's task may take (they take milliseconds).
DEADLINE_S = 30.0


class WaitingBackend(edgesync.django.TasksBackend):  # type: ignore[misc, name-defined]
    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        result = super().enqueue(task, args, kwargs)
        deadline = time.monotonic() + DEADLINE_S
        while not result.is_finished:
            if time.monotonic() >= deadline:
                raise AssertionError("task %s did not finish within %.0fs" % (result.id, DEADLINE_S))
            time.sleep(0.005)
            result.refresh()
        return result
