"""Django task results from any worker: with ``durable_journal`` set, every worker reads them.

A status view is served by whichever worker accepts the connection; the task ran in one
of them. The results table (edgesync/_results.py) lives in the journal's SQLite file.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Set

import pytest

from .conftest import Server, wait_for

if importlib.util.find_spec("django.tasks") is None and importlib.util.find_spec("django_tasks") is None:
    pytest.skip("needs django.tasks (Django >= 6) or the django-tasks backport", allow_module_level=True)


def poll_from_both_workers(server: Server, result_id: str) -> List[Dict[str, Any]]:
    """Poll the result until both workers have answered it; every answer must be found."""
    seen: Set[int] = set()
    answers: List[Dict[str, Any]] = []

    def both() -> bool:
        status, body = server.get("/result?id=%s" % result_id)  # a new connection each time
        assert status == 200, "a worker did not find the result: %s %s" % (status, body[-300:])
        answers.append(json.loads(body))
        seen.add(answers[-1]["pid"])
        return len(seen) == 2
    wait_for(both, 30, "both workers to answer", interval=0)
    return answers


def test_with_a_journal_every_worker_reads_every_result(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = server_factory("-w", "2", "--threads", "2", app="tests.apps.djangotasks.wsgi",
                            toml='[edge_runtime]\ndurable_journal = "journal.sqlite"\n', workers_ready=2)
    status, body = server.get("/enqueue?dir=%s" % tmp_path, timeout=5)
    assert status == 200, body
    result_id = json.loads(body)["id"]
    # Pending: both workers see it (READY or RUNNING).
    assert {a["status"] for a in poll_from_both_workers(server, result_id)} <= {"READY", "RUNNING"}
    (tmp_path / "go").touch()
    text = wait_for(lambda: (tmp_path / "done").exists() and (tmp_path / "done").read_text(), 10,
                    "the task to write its file")
    ran_in = int(text.rsplit(" ", 1)[1])
    wait_for(lambda: server.get_json("/result?id=%s" % result_id)["status"] == "SUCCESSFUL", 10,
             "the result to read SUCCESSFUL")
    answers = poll_from_both_workers(server, result_id)
    finished = [a for a in answers if a["status"] == "SUCCESSFUL"]
    assert {a["pid"] for a in finished} == {a["pid"] for a in answers}, answers
    for a in finished:
        assert a["return_value"] == text
        assert a["worker_ids"] == ["%s:%d" % (socket.gethostname()[:40], ran_in)]
    assert (server.workdir / "journal.sqlite").exists()


def test_the_results_table_keeps_the_newest_finished_results_per_alias(tmp_path: Path) -> None:
    from edgesync._results import SharedResults

    table = SharedResults(str(tmp_path / "journal.sqlite"))
    table.put("default", "pending", "{}", None, 2)
    for n in range(5):
        table.put("default", "r%d" % n, json.dumps(n), 1000.0 + n, 2)
    table.put("other", "x", "{}", 1.0, 2)  # another alias keeps its own
    assert [table.get("default", "r%d" % n) for n in range(5)] == [None, None, None, "3", "4"]
    assert table.get("default", "pending") == "{}" and table.get("other", "x") == "{}"
    table.put("other", "y", "{}", 2.0, 0)  # RESULTS_KEPT = 0: none kept
    assert table.get("other", "x") is None and table.get("other", "y") is None
