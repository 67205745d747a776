"""The repository keeps its promises: README commands, CI, the generated parts of the docs.

README.md opens with two commands (serve the main example; run the tests) that
.ci/run must agree with; the docs' settings table and lifecycle diagram are
generated from the code's declarations. These tests fail the moment one drifts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import gunicorn.config

from edgesync._config import settings_reference_markdown
from edgesync._lifecycle import _IGNORE, TRANSITIONS, Trigger

from .conftest import REPO

SERVE_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -e '.[flask]' && .venv/bin/gunicorn "
                 "-k edgesync.Worker -b 127.0.0.1:8000 --chdir examples flask_app:app")
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                ".venv/bin/python -m pytest -m \"slow or not slow\"")

README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"


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


def between(text: str, name: str) -> str:
    start, end = "<!-- %s:start -->\n" % name, "<!-- %s:end -->" % name
    assert start in text and end in text, "the %s markers are missing" % name
    return text.split(start, 1)[1].split(end, 1)[0]


def test_docs_settings_table_is_the_generated_one() -> None:
    table = between((DOCS / "configuration.md").read_text(), "settings-table")
    assert table == settings_reference_markdown(), (
        "docs/configuration.md's settings table is out of date: paste the output of "
        "`python -c 'from edgesync._config import settings_reference_markdown as m; print(m(), end=\"\")'` "
        "between the settings-table markers")


def lifecycle_mermaid() -> str:
    """The state diagram of ``_lifecycle.TRANSITIONS``: one arrow per (state, next state), its triggers."""
    edges: dict[tuple[str, str], List[Trigger]] = {}
    for (state, _cause), row in TRANSITIONS.items():
        for trigger, target in row.items():
            if target == _IGNORE:
                continue
            assert isinstance(target, tuple)
            triggers = edges.setdefault((state.value, target[0].value), [])
            if trigger not in triggers:
                triggers.append(trigger)
    order = list(Trigger)
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> serving"]
    lines += ["    %s --> %s: %s" % (a, b, ", ".join(t.value for t in sorted(ts, key=order.index)))
              for (a, b), ts in edges.items()]
    lines += ["    unloaded --> [*]", "```", ""]
    return "\n".join(lines)


def test_docs_lifecycle_diagram_is_the_transition_table() -> None:
    diagram = between((DOCS / "model.md").read_text(), "lifecycle-diagram")
    assert diagram == lifecycle_mermaid(), (
        "docs/model.md's lifecycle diagram no longer matches _lifecycle.TRANSITIONS; it should read:\n"
        + lifecycle_mermaid())


def test_docs_benchmark_page_keeps_the_marker_and_shows_the_current_picture() -> None:
    from bench.scenarios import PICTURE

    page = (DOCS / "benchmarks.md").read_text()
    assert "<!-- bench-table -->" in page.split("## Current figures", 1)[1]
    # bench/scenarios.py draws scenario 6's picture where the page shows it.
    assert PICTURE.parent == DOCS / "img" and "](img/%s)" % PICTURE.name in page
    assert PICTURE.is_file()


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


def test_runtime_metrics_docstring_names_every_key(tmp_path: Path) -> None:
    import edgesync
    import edgesync.testing

    doc = edgesync.runtime_metrics.__doc__ or ""
    with edgesync.testing.runtime(durable_journal=str(tmp_path / "journal.db")) as rt:
        metrics = rt.metrics()
    assert isinstance(metrics["durable"], dict)
    named = set(metrics) | set(metrics["durable"])
    assert sorted(k for k in named if "``%s``" % k not in doc) == []
    assert sorted(k for k in metrics["tasks"] if not re.search(r"\b%s\b" % k, doc)) == []
