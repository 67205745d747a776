"""edgesync._config: the [edge_runtime] table from edgesync.toml / EDGESYNC_CONFIG / EDGESYNC_* variables."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from edgesync import _config
from edgesync._config import ConfigError, Settings, describe_source, load_settings

# The README's settings table (the contract), written out again on purpose:
# the test must not read the module's own declaration.
DESIGN_DEFAULTS = {
    "policy": "per_worker",
    "wall_clock_limit_ms": 400000,
    "cpu_soft_limit_ms": 1000,
    "cpu_hard_limit_ms": 2000,
    "memory_limit_mb": 256,
    "request_idle_timeout_ms": 150000,
    "beforeunload_wall_clock_ratio": 90,
    "beforeunload_cpu_ratio": 90,
    "beforeunload_memory_ratio": 90,
    "background_threads": 8,
    "max_pending_tasks": 1000,
    "task_log_interval_ms": 60000,  # issue 24: one INFO summary of successes per minute
    "exit_drain_timeout_ms": 30000,
    # Durable tasks and hand-off (README "Durable tasks"): added after section 5, off by default.
    "durable_journal": "",
    "durable_max_attempts": 3,
    "durable_lease_ms": 30000,
    "handoff": "",
    "handoff_on": "deadline",
    "handoff_redis_url": "redis://127.0.0.1:6379/0",
    "handoff_broker_url": "",  # issue 22: handoff = "celery"
    "handoff_visibility_timeout_ms": 3600000,
    "handoff_queue": "default",
    "replace_before_retire": True,  # issue 10: a replacement serves before a retiring worker stops accepting
    "mold": True,  # issue 23: a mold per code generation forks the workers
    "mold_immortal_heap": True,  # issue 23: the mold's objects immortal (CPython 3.12+) before it forks
}


def write(directory: Path, text: str, name: str = "edgesync.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings({} if environ is None else environ, cwd=tmp_path)
    return str(info.value)


def test_constants() -> None:
    assert (_config.ENV_PREFIX, _config.CONFIG_ENV) == ("EDGESYNC_", "EDGESYNC_CONFIG")
    assert (_config.DEFAULT_FILENAME, _config.TABLE) == ("edgesync.toml", "edge_runtime")
    assert issubclass(ConfigError, RuntimeError)


def test_defaults_equal_design(tmp_path: Path) -> None:
    settings = load_settings({}, cwd=tmp_path)
    assert dataclasses.asdict(settings) == DESIGN_DEFAULTS
    assert settings == Settings()
    assert [f.name for f in dataclasses.fields(Settings)] == list(DESIGN_DEFAULTS)
    # Says where it looked: an edgesync.toml in the wrong directory is not silently ignored.
    assert describe_source({}, cwd=tmp_path) == "defaults (no %s)" % (tmp_path / "edgesync.toml")


def test_full_valid_file(tmp_path: Path) -> None:
    wanted = {
        "policy": "oneshot",
        "wall_clock_limit_ms": 60000,
        "cpu_soft_limit_ms": 0,
        "cpu_hard_limit_ms": 5000,
        "memory_limit_mb": 1024,
        "request_idle_timeout_ms": 0,
        "beforeunload_wall_clock_ratio": 0,
        "beforeunload_cpu_ratio": 100,
        "beforeunload_memory_ratio": 75,
        "background_threads": 1,
        "max_pending_tasks": 10_000_000,
        "task_log_interval_ms": 0,
        "exit_drain_timeout_ms": 5000,
        "durable_journal": "journal.db",
        "durable_max_attempts": 1000,
        "durable_lease_ms": 3000,
        "handoff": "rq",
        "handoff_on": "always",
        "handoff_redis_url": "unix:///run/redis.sock",
        "handoff_broker_url": "amqp://edge:secret@rabbit:5672//",
        "handoff_visibility_timeout_ms": 7200000,
        "handoff_queue": "edge.tasks",
        "replace_before_retire": False,
        "mold": False,
        "mold_immortal_heap": False,
    }
    body = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}".replace("'", '"')
                     for k, v in wanted.items())
    write(tmp_path, f"# comment\n[edge_runtime]\n{body}\n")
    assert dataclasses.asdict(load_settings({}, cwd=tmp_path)) == wanted
    assert describe_source({}, cwd=tmp_path) == "edgesync.toml"


def test_file_in_working_directory_and_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGESYNC_"):
            monkeypatch.delenv(name)
    write(tmp_path, "[edge_runtime]\nbackground_threads = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().background_threads == 3
    monkeypatch.setenv("EDGESYNC_BACKGROUND_THREADS", "5")
    assert load_settings().background_threads == 5
    assert describe_source() == "edgesync.toml + EDGESYNC_BACKGROUND_THREADS"


def test_file_without_the_table_is_an_error_naming_the_table(tmp_path: Path) -> None:
    # Issue 12, item 4: a file whose settings would all be ignored is an error, not defaults.
    write(tmp_path, '[api]\nport = 54321\n\n[other]\npolicy = "nonsense"\n')
    message = load_error(tmp_path)
    assert message == ("edgesync.toml: no [edge_runtime] table, so none of this file would apply (it has [api], "
                       "[other]); put edgesync's settings under [edge_runtime]")


@pytest.mark.parametrize("table", ["edgeruntime", "edge-runtime", "Edge_Runtime", "edge_runtme", "edge_runtimes"])
def test_misspelled_table_suggests_edge_runtime(tmp_path: Path, table: str) -> None:
    write(tmp_path, "[%s]\ncpu_hard_limit_ms = 5000\n" % table)
    message = load_error(tmp_path)
    assert message == ("edgesync.toml: no [edge_runtime] table, so none of this file would apply (it has [%s]); "
                       "did you mean [edge_runtime]?" % table)


def test_settings_outside_any_table_are_an_error(tmp_path: Path) -> None:
    write(tmp_path, 'cpu_hard_limit_ms = 5000\npolicy = "oneshot"\n')
    message = load_error(tmp_path)
    assert message == ("edgesync.toml: cpu_hard_limit_ms, policy outside any table; put them under a "
                       "[edge_runtime] table (a line '[edge_runtime]' above them)")


def test_a_setting_above_the_table_header_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "cpu_hard_limit_ms = 5000\n[edge_runtime]\npolicy = \"oneshot\"\n")
    assert load_error(tmp_path).startswith("edgesync.toml: cpu_hard_limit_ms outside any table; put it under")


def test_nested_table_names_where_it_belongs(tmp_path: Path) -> None:
    write(tmp_path, "[tool.edge_runtime]\ncpu_hard_limit_ms = 5000\n")
    assert load_error(tmp_path).endswith("(it has [tool.edge_runtime]); did you mean [edge_runtime]?")


def test_a_file_of_comments_only_gives_defaults(tmp_path: Path) -> None:
    write(tmp_path, "# [edge_runtime]\n# cpu_hard_limit_ms = 5000\n")
    assert dataclasses.asdict(load_settings({}, cwd=tmp_path)) == DESIGN_DEFAULTS


def test_supabase_config_without_edge_runtime_table_is_an_error(tmp_path: Path) -> None:
    start, end = SUPABASE_CONFIG.index("[edge_runtime]"), SUPABASE_CONFIG.index("[functions.hello]")
    write(tmp_path, SUPABASE_CONFIG[:start] + SUPABASE_CONFIG[end:], name="supabase/config.toml")
    message = load_error(tmp_path, {"EDGESYNC_CONFIG": "supabase/config.toml"})
    assert message.startswith("supabase/config.toml: no [edge_runtime] table, so none of this file would apply")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cpu_hard_limit_ms = -5", "cpu_hard_limit_ms must be an integer >= 0, got -5"),
        ('cpu_hard_limit_ms = "2000"', "cpu_hard_limit_ms must be an integer >= 0, got '2000'"),
        ("cpu_hard_limit_ms = 2.5", "cpu_hard_limit_ms must be an integer >= 0, got 2.5"),
        ("cpu_hard_limit_ms = 2000.0", "cpu_hard_limit_ms must be an integer >= 0, got 2000.0"),
        ("cpu_hard_limit_ms = true", "cpu_hard_limit_ms must be an integer >= 0, got True"),
        ("cpu_hard_limit_ms = [1]", "cpu_hard_limit_ms must be an integer >= 0, got [1]"),
        (
            "cpu_hard_limit_ms = 2147483648",
            "cpu_hard_limit_ms must be an integer from 0 to 2147483647, got 2147483648",
        ),
        ("memory_limit_mb = 1048577", "memory_limit_mb must be an integer from 0 to 1048576, got 1048577"),
        ("beforeunload_cpu_ratio = 150", "beforeunload_cpu_ratio must be an integer from 0 to 100, got 150"),
        ("beforeunload_cpu_ratio = -1", "beforeunload_cpu_ratio must be an integer from 0 to 100, got -1"),
        ("background_threads = 0", "background_threads must be an integer from 1 to 1024, got 0"),
        ("background_threads = false", "background_threads must be an integer from 1 to 1024, got False"),
        ("max_pending_tasks = 0", "max_pending_tasks must be an integer from 1 to 10000000, got 0"),
        ('policy = "x"', "policy must be one of 'per_worker', 'oneshot', got 'x'"),
        ("policy = 1", "policy must be one of 'per_worker', 'oneshot', got 1"),
        ('policy = "Oneshot"', "policy must be one of 'per_worker', 'oneshot', got 'Oneshot'"),
    ],
)
def test_bad_value_in_file(tmp_path: Path, line: str, message: str) -> None:
    write(tmp_path, f"[edge_runtime]\n{line}\n")
    assert load_error(tmp_path) == f"edgesync.toml: [edge_runtime] {message}"


def test_long_value_is_shortened_in_message(tmp_path: Path) -> None:
    write(tmp_path, f'[edge_runtime]\npolicy = "{"x" * 5000}"\n')
    message = load_error(tmp_path)
    assert message.startswith("edgesync.toml: [edge_runtime] policy must be one of")
    assert message.endswith("...") and len(message) < 250


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\ncpu_hard_limt_ms = 5\n")
    assert load_error(tmp_path) == (
        "edgesync.toml: [edge_runtime] unknown key 'cpu_hard_limt_ms'; did you mean 'cpu_hard_limit_ms'?"
    )


def test_unknown_key_without_close_match_lists_keys(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\nzzz = 5\n")
    message = load_error(tmp_path)
    assert message.startswith("edgesync.toml: [edge_runtime] unknown key 'zzz'; accepted: policy, ")
    assert all(key in message for key in DESIGN_DEFAULTS)


def test_broken_toml_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\npolicy = \n")
    message = load_error(tmp_path)
    assert message.startswith("edgesync.toml: invalid TOML: ")
    assert re.search(r"\bline 2\b", message), message


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "9" * 5000,  # int() refuses more than 4300 digits: a ValueError inside tomllib
        "a = " + "[" * 5000 + "]" * 5000,  # exhausts the parser's recursion
    ],
)
def test_toml_the_parser_chokes_on_is_a_config_error(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    assert load_error(tmp_path).startswith("edgesync.toml: invalid TOML: ")


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").write_bytes(b"[edge_runtime]\npolicy = '\xff'\n")
    assert load_error(tmp_path).startswith("edgesync.toml: invalid TOML: ")


@pytest.mark.parametrize(
    ("text", "shown"), [("edge_runtime = 5", "5"), ("[[edge_runtime]]\npolicy = 'oneshot'", "[{'policy': 'oneshot'}]")]
)
def test_table_that_is_not_a_table(tmp_path: Path, text: str, shown: str) -> None:
    write(tmp_path, text + "\n")
    assert load_error(tmp_path) == f"edgesync.toml: [edge_runtime] must be a table, got {shown}"


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "edgesync.toml").mkdir()
    assert load_error(tmp_path).startswith("edgesync.toml: cannot read the config file: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_unreadable_config_file(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\n").chmod(0)
    assert load_error(tmp_path).startswith("edgesync.toml: cannot read the config file: ")


def test_edgesync_config_absolute_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge_runtime]\nbeforeunload_cpu_ratio = 150\n", name="conf/edge.toml")
    message = load_error(tmp_path / "elsewhere", {"EDGESYNC_CONFIG": str(path)})
    assert message == f"{path}: [edge_runtime] beforeunload_cpu_ratio must be an integer from 0 to 100, got 150"
    write(tmp_path, "[edge_runtime]\nbeforeunload_cpu_ratio = 50\n", name="conf/edge.toml")
    environ = {"EDGESYNC_CONFIG": str(path)}
    assert load_settings(environ, cwd=tmp_path).beforeunload_cpu_ratio == 50
    assert describe_source(environ, cwd=tmp_path) == str(path)


def test_edgesync_config_relative_path_is_taken_from_cwd(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\nbackground_threads = 2\n")  # ignored: EDGESYNC_CONFIG wins
    write(tmp_path, "[edge_runtime]\nbackground_threads = 0\n", name="conf/edge.toml")
    message = load_error(tmp_path, {"EDGESYNC_CONFIG": "conf/edge.toml"})
    assert message.startswith("conf/edge.toml: [edge_runtime] background_threads must be")


def test_edgesync_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert load_error(tmp_path, {"EDGESYNC_CONFIG": str(missing)}) == (
        f"environment variable EDGESYNC_CONFIG: config file {str(missing)!r} does not exist"
    )
    message = load_error(tmp_path, {"EDGESYNC_CONFIG": "nope.toml"})
    assert message == (
        f"environment variable EDGESYNC_CONFIG: config file 'nope.toml' (relative to {tmp_path}) does not exist"
    )


def test_edgesync_config_empty(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\n")
    assert load_error(tmp_path, {"EDGESYNC_CONFIG": ""}).startswith("environment variable EDGESYNC_CONFIG is empty")


def test_env_override_wins_over_file(tmp_path: Path) -> None:
    write(tmp_path, '[edge_runtime]\ncpu_hard_limit_ms = 3000\npolicy = "oneshot"\n')
    environ = {"EDGESYNC_CPU_HARD_LIMIT_MS": " 5000\n", "EDGESYNC_MAX_PENDING_TASKS": "1_000", "PATH": "/bin"}
    settings = load_settings(environ, cwd=tmp_path)
    assert (settings.cpu_hard_limit_ms, settings.max_pending_tasks, settings.policy) == (5000, 1000, "oneshot")
    settings = load_settings({"EDGESYNC_POLICY": "per_worker"}, cwd=tmp_path)
    assert (settings.policy, settings.cpu_hard_limit_ms) == ("per_worker", 3000)
    assert describe_source(environ, cwd=tmp_path) == (
        "edgesync.toml + EDGESYNC_CPU_HARD_LIMIT_MS, EDGESYNC_MAX_PENDING_TASKS"
    )


@pytest.mark.parametrize("raw", ["-5", "1.5", "", "  ", "abc", "1e3", "0x10", "true", "2000.0"])
def test_bad_env_integer(tmp_path: Path, raw: str) -> None:
    message = load_error(tmp_path, {"EDGESYNC_CPU_HARD_LIMIT_MS": raw})
    assert message == (
        f"environment variable EDGESYNC_CPU_HARD_LIMIT_MS: cpu_hard_limit_ms must be an integer >= 0, got {raw!r}"
    )


def test_bad_env_policy(tmp_path: Path) -> None:
    assert load_settings({"EDGESYNC_POLICY": "oneshot"}, cwd=tmp_path).policy == "oneshot"
    assert load_settings({"EDGESYNC_POLICY": " oneshot\n"}, cwd=tmp_path).policy == "oneshot"  # as from a .env
    assert load_error(tmp_path, {"EDGESYNC_POLICY": "ONESHOT"}) == (
        "environment variable EDGESYNC_POLICY: policy must be one of 'per_worker', 'oneshot', got 'ONESHOT'"
    )


def test_unknown_env_var_suggests_closest(tmp_path: Path) -> None:
    assert load_error(tmp_path, {"EDGESYNC_CPU_HARD_LIMT_MS": "5"}) == (
        "unknown environment variable 'EDGESYNC_CPU_HARD_LIMT_MS'; did you mean 'EDGESYNC_CPU_HARD_LIMIT_MS'?"
    )
    assert load_error(tmp_path, {"EDGESYNC_cpu_hard_limit_ms": "5"}).endswith(
        "did you mean 'EDGESYNC_CPU_HARD_LIMIT_MS'?"
    )
    assert load_error(tmp_path, {"EDGESYNC_CONFG": "x.toml"}).endswith("did you mean 'EDGESYNC_CONFIG'?")
    message = load_error(tmp_path, {"EDGESYNC_QQQQQQQQQQQQQQ": "5"})
    assert message.startswith("unknown environment variable 'EDGESYNC_QQQQQQQQQQQQQQ'; accepted: EDGESYNC_CONFIG, ")
    assert all(f"EDGESYNC_{key.upper()}" in message for key in DESIGN_DEFAULTS)


def test_cpu_soft_above_hard_in_file(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\ncpu_soft_limit_ms = 3000\ncpu_hard_limit_ms = 2500\n")
    assert load_error(tmp_path) == (
        "edgesync.toml: [edge_runtime] cpu_soft_limit_ms must be <= cpu_hard_limit_ms when both are non-zero"
        " (0 disables one), got cpu_soft_limit_ms = 3000, cpu_hard_limit_ms = 2500"
    )


def test_cpu_soft_above_hard_across_sources(tmp_path: Path) -> None:
    write(tmp_path, "[edge_runtime]\ncpu_soft_limit_ms = 3000\ncpu_hard_limit_ms = 0\n")
    assert load_settings({}, cwd=tmp_path).cpu_soft_limit_ms == 3000  # hard limit off: no ordering
    message = load_error(tmp_path, {"EDGESYNC_CPU_HARD_LIMIT_MS": "2500"})
    assert message == (
        "edgesync.toml: [edge_runtime] cpu_soft_limit_ms must be <= cpu_hard_limit_ms when both are non-zero"
        " (0 disables one), got cpu_soft_limit_ms = 3000,"
        " cpu_hard_limit_ms = 2500 (environment variable EDGESYNC_CPU_HARD_LIMIT_MS)"
    )
    message = load_error(tmp_path / "empty", {"EDGESYNC_CPU_SOFT_LIMIT_MS": "2001"})
    assert message.startswith("environment variable EDGESYNC_CPU_SOFT_LIMIT_MS: cpu_soft_limit_ms must be <=")
    assert message.endswith("got cpu_soft_limit_ms = 2001, cpu_hard_limit_ms = 2000 (default)")
    assert load_settings({"EDGESYNC_CPU_SOFT_LIMIT_MS": "2000"}, cwd=tmp_path / "empty").cpu_soft_limit_ms == 2000


SUPABASE_CONFIG = """\
# A project's supabase/config.toml, as `supabase init` writes it (abridged).
project_id = "my-app"

[api]
enabled = true
port = 54321
schemas = ["public", "graphql_public"]
max_rows = 1000

[db]
port = 54322
major_version = 15

[db.pooler]
enabled = false
pool_mode = "transaction"

[edge_runtime]
enabled = true
# Configure one of the supported request policies: `oneshot`, `per_worker`.
policy = "oneshot"
inspector_port = 8083
deno_version = 1

[edge_runtime.secrets]
STRIPE_KEY = "env(STRIPE_KEY)"

[functions.hello]
verify_jwt = false
"""


def test_supabase_config_is_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, SUPABASE_CONFIG, name="supabase/config.toml")
    settings = load_settings({"EDGESYNC_CONFIG": "supabase/config.toml"}, cwd=tmp_path)
    assert dataclasses.asdict(settings) == {**DESIGN_DEFAULTS, "policy": "oneshot"}
    path.write_text(SUPABASE_CONFIG.replace('policy = "oneshot"', 'policy = "oneshot"\nwall_clock_limt_ms = 1'))
    message = load_error(tmp_path, {"EDGESYNC_CONFIG": "supabase/config.toml"})
    assert message.endswith("unknown key 'wall_clock_limt_ms'; did you mean 'wall_clock_limit_ms'?")


def test_settings_reference_markdown_lists_every_key() -> None:
    table = _config.settings_reference_markdown()
    lines = table.strip().splitlines()
    assert lines[0] == "| key | default | accepted | meaning |"
    assert len(lines) == 2 + len(DESIGN_DEFAULTS)
    for line, (key, default) in zip(lines[2:], DESIGN_DEFAULTS.items(), strict=True):
        shown = f'"{default}"' if isinstance(default, str) else str(default).lower()
        assert line.startswith(f"| `{key}` | `{shown}` | "), line
        assert line.count("|") == 5, line
    assert "integer 0 to 100" in table and '`"oneshot"`' in table
    assert table.count("0 disables") == 8  # every limit and every ratio says what 0 means


def test_boolean_setting_from_file_and_environment(tmp_path: Path) -> None:
    assert load_settings({"EDGESYNC_REPLACE_BEFORE_RETIRE": " Off "}, cwd=tmp_path).replace_before_retire is False
    assert load_settings({"EDGESYNC_REPLACE_BEFORE_RETIRE": "1"}, cwd=tmp_path).replace_before_retire is True
    assert load_error(tmp_path, {"EDGESYNC_REPLACE_BEFORE_RETIRE": "maybe"}) == (
        "environment variable EDGESYNC_REPLACE_BEFORE_RETIRE: replace_before_retire must be true or false, "
        "got 'maybe'")
    write(tmp_path, "[edge_runtime]\nreplace_before_retire = 0\n")
    assert load_error(tmp_path) == "edgesync.toml: [edge_runtime] replace_before_retire must be true or false, got 0"
    write(tmp_path, "[edge_runtime]\nreplace_before_retire = false\n")
    assert load_settings({}, cwd=tmp_path).replace_before_retire is False


def test_settings_constructed_directly() -> None:
    settings = Settings(background_threads=2, policy="oneshot")
    assert (settings.background_threads, settings.policy, settings.max_pending_tasks) == (2, "oneshot", 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.background_threads = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^Settings\(\): cpu_hard_limit_ms must be an integer >= 0, got -5$"):
        Settings(cpu_hard_limit_ms=-5)
    with pytest.raises(ConfigError, match="cpu_soft_limit_ms must be <= cpu_hard_limit_ms"):
        dataclasses.replace(settings, cpu_soft_limit_ms=2001)
    with pytest.raises(ConfigError, match=r"got <int too long to print>$"):
        Settings(memory_limit_mb=10**5000)
