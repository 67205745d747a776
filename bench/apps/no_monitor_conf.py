"""A gunicorn config file for an experiment: edgesync.Worker whose limits monitor never runs.

Scenario 3 loads ``gunicorn -c bench/apps/no_monitor_conf.py -k edgesync.Worker`` side by
side with a normal edgesync worker, to measure everything the monitor thread costs,
including what "all limits 0" keeps (the thread still wakes every interval and
takes the GIL). Diagnostic only: nothing is enforced in such a worker.
"""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    import edgesync._gunicorn.worker as w

    class _Idle(w.Monitor):  # type: ignore[misc,name-defined]
        def start(self) -> None:
            pass

    w.Monitor = _Idle  # type: ignore[attr-defined]
