"""The jobs' entry points are public and stable: new RQ jobs name ``edgesync.rq.run``, and jobs that
earlier versions left in Redis (``edgesync._handoff.run``, with 3 or 5 arguments) still run.

Real redis-server and ``rq worker`` (tests/test_handoff.py's fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest

from edgesync._config import Settings
from edgesync._handoff import Handed, target_for

from .support import QUEUE, Redis, RQWorker, wait_for

pytestmark = pytest.mark.slow

FN = "tests.apps.durable_tasks:work"


def done(events: Path) -> List[dict]:  # type: ignore[type-arg]
    if not events.exists():
        return []
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "durable_done"]


def test_new_jobs_name_the_public_entry_point_and_old_ones_still_run(redis_server: Redis,
                                                                    tmp_path: Path) -> None:
    import rq
    target = target_for(Settings(handoff="rq", handoff_redis_url=redis_server.url, handoff_queue=QUEUE))
    assert target is not None and target.engine == "rq"
    args = lambda task_id: json.dumps([[task_id, 0.01], {}])  # noqa: E731
    assert target.send(Handed("9f3c1a7e5b20d4c8e1", FN, args("new"), 1, 3, None)) == "9f3c1a7e5b20d4c8e1"
    queue = rq.Queue(QUEUE, connection=redis_server.client)
    assert queue.fetch_job("9f3c1a7e5b20d4c8e1").func_name == "edgesync.rq.run"
    # What earlier versions enqueued: (fn, args, attempt), then (fn, args, attempt, app, max_attempts).
    queue.enqueue_call("edgesync._handoff.run", args=(FN, args("old3"), 1), job_id="edgesync-old3")
    queue.enqueue_call("edgesync._handoff.run", args=(FN, args("old5"), 2, None, 3), job_id="old5")
    events = tmp_path / "events.jsonl"
    worker = RQWorker(redis_server, events, tmp_path)
    try:
        wait_for(lambda: len(done(events)) == 3, 60, "the RQ worker to run the three jobs")
    finally:
        worker.stop()
    assert sorted((e["id"], e["attempt"], e["where"]) for e in done(events)) == [
        ("new", 1, "rq"), ("old3", 1, "rq"), ("old5", 2, "rq")]
