"""Every example runs under real gunicorn with the command the docs give for it.

The commands are read from the "Examples" section of docs/getting-started.md, not
copied here, so the docs cannot drift from what is tested. Only the bind address changes (the OS
picks the port) and ``.venv/bin/python`` becomes this interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from .support import REPO, Server, call, readme_commands, run_example, wait_for

EXAMPLES = {"flask_app:app", "fetch_and_log:app", "plain_wsgi:app", "django_app.wsgi"}


def test_readme_has_one_command_per_example() -> None:
    assert set(readme_commands()) == EXAMPLES
    for app in EXAMPLES:
        module = app.split(":")[0].split(".")[0]
        assert (REPO / "examples" / (module + ".py")).exists() or (REPO / "examples" / module).is_dir(), app


@pytest.mark.slow
def test_flask_app_long_task_and_progress_saved_at_termination(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    progress_file = tmp_path / "progress.jsonl"
    server = run_example(server_factory, "flask_app:app", {"PROGRESS_FILE": str(progress_file)})
    assert server.get("/")[0] == 200

    status, short = call(server, "POST", "/jobs", {"steps": "2"})
    assert (status, short["steps"]) == (202, 2)
    wait_for(lambda: call(server, "GET", "/jobs/" + short["job"])[1]["done"] == 2, 15, "the short job")
    server.wait_for_log(r"job %s: all 2 steps done" % short["job"])

    status, long = call(server, "POST", "/jobs", {"steps": "100"})
    assert status == 202
    wait_for(lambda: call(server, "GET", "/jobs/" + long["job"])[1]["done"] >= 1, 15, "the long job to start")
    assert server.stop() == 0  # SIGTERM: beforeunload (termination), then a drain cut short

    saved = [json.loads(line) for line in progress_file.read_text().splitlines()]
    assert [s["reason"] for s in saved] == ["termination"]
    assert saved[0]["progress"][short["job"]] == 2
    assert 1 <= saved[0]["progress"][long["job"]] < 100
    assert "abandoned task flask_app.long_running_task (running" in server.log


@pytest.mark.slow
def test_fetch_and_log_fetches_its_own_json_after_answering(server_factory: Callable[..., Server]) -> None:
    server = run_example(server_factory, "fetch_and_log:app", {})
    assert server.get("/") == (202, b"Request accepted\n")
    server.wait_for_log(r"fetched http://127\.0\.0\.1:%d/json: 200 .*Sample Slide Show" % server.port)


@pytest.mark.slow
def test_plain_wsgi_writes_its_audit_line_after_answering(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    server = run_example(server_factory, "plain_wsgi:app", {"AUDIT_FILE": str(audit)})
    assert server.get("/hello") == (200, b"Hello from a plain WSGI app\n")

    def audited() -> List[Dict[str, Any]]:
        lines = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
        return [x for x in lines if x["path"] == "/hello"]
    assert wait_for(audited, 10, "the audit line")[0]["method"] == "GET"


@pytest.mark.slow
def test_django_app_view_hands_an_orm_write_to_a_task(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    server = run_example(server_factory, "django_app.wsgi", {"DJANGO_DB": str(tmp_path / "db.sqlite3")})
    assert server.get("/") == (202, b"Request accepted\n")

    def recorded() -> Any:
        visits = call(server, "GET", "/visits")[1]
        return visits["count"] == 1 and visits
    assert wait_for(recorded, 10, "the visit row")["latest"][0]["path"] == "/"
