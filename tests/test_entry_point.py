"""The ``gunicorn.workers`` entry point: ``-k egg:edgesync-wsgi#edgesync`` is edgesync.Worker."""

from __future__ import annotations

import json
from typing import Callable

import pytest
from gunicorn.util import load_class

import edgesync

from .support import Server

SHORT_NAME = "egg:edgesync-wsgi#edgesync"


def test_short_name_resolves_to_the_worker_class() -> None:
    assert load_class(SHORT_NAME, section="gunicorn.workers") is edgesync.Worker


@pytest.mark.slow
def test_short_name_boots_and_serves(server_factory: Callable[..., Server]) -> None:
    # Later arguments win: this -k replaces the fixture's "-k edgesync.Worker".
    server = server_factory("-k", SHORT_NAME)
    assert "Using worker: %s" % SHORT_NAME in server.log
    assert "edgesync: settings from defaults" in server.log  # edgesync's check_config ran
    metrics = json.loads(server.get("/metrics")[1])
    assert metrics["state"] == "serving"
    assert server.get("/task?id=ep&sleep=0")[0] == 200
    server.wait_for_events("task_done", where=lambda e: e["id"] == "ep")
