"""The repository keeps its promises: README commands, CI, the generated settings table.

README.md opens with two commands (serve the main example; run the tests) that
.ci/run and the settings declaration must agree with; these tests fail the
moment one of them drifts.
"""

from __future__ import annotations

import re
from typing import List

import gunicorn.config

from edgesync._config import settings_reference_markdown

from .conftest import REPO

SERVE_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -e '.[flask]' && .venv/bin/gunicorn "
                 "-k edgesync.Worker -b 127.0.0.1:8000 --chdir examples flask_app:app")
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                ".venv/bin/python -m pytest -m \"slow or not slow\"")

README = (REPO / "README.md").read_text()


def fenced_blocks(text: str) -> List[str]:
    return [m.group(2).strip("\n") for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def test_readme_opens_with_the_serve_and_test_commands() -> None:
    assert fenced_blocks(README)[:2] == [SERVE_COMMAND, TEST_COMMAND]
    # Nothing runnable before them: only the title and the tagline.
    before = README[:README.index("```")].strip().splitlines()
    assert before[0] == "# edgesync" and len([line for line in before if line.strip()]) == 2, before


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines()
    assert "mypy" in ci and "ruff check" in ci


def test_readme_settings_table_is_the_generated_one() -> None:
    start, end = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"
    table = README.split(start, 1)[1].split(end, 1)[0]
    assert table == settings_reference_markdown(), (
        "README.md's settings table is out of date: paste the output of "
        "`python -c 'from edgesync._config import settings_reference_markdown as m; print(m(), end=\"\")'` "
        "between the settings-table markers")


def test_readme_keeps_the_benchmark_marker() -> None:
    assert "<!-- bench-table -->" in README.split("## Benchmarks", 1)[1]


def test_example_gunicorn_conf_names_real_settings_and_sets_none() -> None:
    text = (REPO / "gunicorn.conf.py").read_text()
    namespace: dict[str, object] = {}
    exec(compile(text, "gunicorn.conf.py", "exec"), namespace)
    # gunicorn loads ./gunicorn.conf.py from where it starts: an active setting here
    # would change what the README's commands do.
    assert [k for k in namespace if not k.startswith("__")] == []
    named = re.findall(r"^# (\w+) = ", text, re.M)
    assert {"worker_class", "workers", "threads", "graceful_timeout", "max_requests",
            "max_requests_jitter", "statsd_host", "statsd_prefix"} <= set(named)
    assert set(named) - {s.name for s in gunicorn.config.KNOWN_SETTINGS} == set()
