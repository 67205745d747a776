"""Property tests: whatever TOML or environment a user writes, load_settings returns valid Settings or
raises ConfigError naming the offending key, and never anything else."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesync._config import ConfigError, Settings, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# The contract, written out independently of the module's declaration (the README's settings table).
CHOICES = {"policy": ("per_worker", "oneshot"), "handoff": ("", "rq", "celery"),
           "handoff_on": ("deadline", "deadline_or_queue_full", "always")}
RANGES = {
    "wall_clock_limit_ms": (0, 2**31 - 1),
    "cpu_soft_limit_ms": (0, 2**31 - 1),
    "cpu_hard_limit_ms": (0, 2**31 - 1),
    "memory_limit_mb": (0, 1_048_576),
    "request_idle_timeout_ms": (0, 2**31 - 1),
    "beforeunload_wall_clock_ratio": (0, 100),
    "beforeunload_cpu_ratio": (0, 100),
    "beforeunload_memory_ratio": (0, 100),
    "background_threads": (1, 1024),
    "max_pending_tasks": (1, 10_000_000),
    "task_log_interval_ms": (0, 2**31 - 1),
    "exit_drain_timeout_ms": (0, 2**31 - 1),
    "durable_max_attempts": (1, 1000),
    "durable_lease_ms": (3000, 2**31 - 1),
    "handoff_visibility_timeout_ms": (1000, 2**31 - 1),
}
TEXTS = {"durable_journal": r"[^\x00]*", "handoff_redis_url": r"(redis|rediss|unix)://\S+",
         "handoff_broker_url": r"((redis|rediss|sentinel|amqp|amqps|pyamqp)://\S+)?",
         "handoff_queue": r"[A-Za-z0-9_.:-]+"}
KEYS = ["policy", *list(RANGES)[:-3], "durable_journal", "durable_max_attempts", "durable_lease_ms", "handoff",
        "handoff_on", "handoff_redis_url", "handoff_broker_url", "handoff_visibility_timeout_ms", "handoff_queue",
        "replace_before_retire", "mold", "mold_immortal_heap"]
BOOLEANS = {"replace_before_retire", "mold", "mold_immortal_heap"}
DEFAULTS = dataclasses.asdict(Settings())
SUPABASE_KEYS = {"enabled", "inspector_port", "deno_version", "secrets"}

# tmp_path is shared by the examples of one test; each example rewrites the file, so that is safe.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def acceptable(key: str, value: object, base: Path | None = None) -> bool:
    """`base`: the directory the file or environment is read from (a path's directory must exist there)."""
    if key in TEXTS:
        if not (isinstance(value, str) and re.fullmatch(TEXTS[key], value)):
            return False
        return key != "durable_journal" or not value or base is None or os.path.isdir(
            os.path.dirname(os.path.join(base, value)) or base)
    if key in CHOICES:
        return isinstance(value, str) and value in CHOICES[key]
    if key in BOOLEANS:
        return isinstance(value, bool)
    low, high = RANGES[key]
    return type(value) is int and low <= value <= high


def cpu_pair_ok(values: dict[str, Any]) -> bool:
    soft, hard = values["cpu_soft_limit_ms"], values["cpu_hard_limit_ms"]
    return not (soft and hard and soft > hard)


def handoff_problem(values: dict[str, Any], given: Iterable[str]) -> str | None:
    """The key a hand-off rule reports, or None: celery needs a broker URL; a broker URL with rq (and no
    handoff_redis_url) is a mix-up. (rq, redis and celery are installed with the test extra.)"""
    if values["handoff"] == "celery" and not values["handoff_broker_url"]:
        return "handoff = 'celery' needs handoff_broker_url"
    if values["handoff"] == "rq" and values["handoff_broker_url"] and "handoff_redis_url" not in given:
        return "handoff_broker_url = "
    return None


def assert_valid(result: Settings) -> None:
    values = dataclasses.asdict(result)
    assert list(values) == KEYS
    assert all(acceptable(key, value) for key, value in values.items()), values
    assert cpu_pair_ok(values), values


# --- a tiny TOML writer (tomli-w is not a dependency) ------------------------------------------------


def toml_string(text: str) -> str:
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(table: dict[str, Any]) -> str:
    return "[edge_runtime]\n" + "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())


# --- strategies -----------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # TOML files are UTF-8: no surrogates
OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: datetime.timezone(datetime.timedelta(minutes=m)))
NEAR_BOUNDS = st.sampled_from(
    [-1, 0, 1, 2, 8, 90, 100, 101, 1000, 1024, 1025, 2000, 2001, 1_048_576, 1_048_577, 10_000_000, 10_000_001,
     2**31 - 1, 2**31, 2**63 - 1, -(2**63)]
)
SCALARS = st.one_of(
    st.integers(),
    NEAR_BOUNDS,
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(["per_worker", "oneshot", "Per_Worker", " oneshot", "1000"]),
    st.booleans(),
    st.datetimes(timezones=st.none() | OFFSETS),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)
ANY_KEY = st.sampled_from(KEYS) | st.sampled_from(sorted(SUPABASE_KEYS)) | TEXT


@given(VALUES.filter(lambda v: "nan" not in toml_value(v)))
@FAST
def test_the_writer_round_trips(value: Any) -> None:
    assert tomllib.loads(toml_table({"k": value}))["edge_runtime"]["k"] == value


@given(key=st.sampled_from(KEYS), value=VALUES)
@FAST
def test_any_value_for_a_known_key(tmp_path: Path, key: str, value: Any) -> None:
    (tmp_path / "edgesync.toml").write_text(toml_table({key: value}), encoding="utf-8")
    expected_ok = (acceptable(key, value, tmp_path) and cpu_pair_ok({**DEFAULTS, key: value})
                   and handoff_problem({**DEFAULTS, key: value}, [key]) is None)
    try:
        result = load_settings({}, cwd=tmp_path)
    except ConfigError as exc:
        assert not expected_ok, exc
        assert key in str(exc)
        assert str(exc).startswith("edgesync.toml: [edge_runtime] ")
    else:
        assert expected_ok, result
        assert getattr(result, key) == value
        assert_valid(result)


@given(table=st.dictionaries(ANY_KEY, VALUES, max_size=5))
@FAST
def test_any_table(tmp_path: Path, table: dict[str, Any]) -> None:
    (tmp_path / "edgesync.toml").write_text(toml_table(table), encoding="utf-8")
    # The first problem in file order is the one reported; the CPU ordering rule is checked last.
    expected = None
    for key, value in table.items():
        if key in SUPABASE_KEYS:
            continue
        if key not in KEYS:
            expected = f"edgesync.toml: [edge_runtime] unknown key {key!r}; "
        elif not acceptable(key, value, tmp_path):
            expected = f"edgesync.toml: [edge_runtime] {key} must be "
        else:
            continue
        break
    if expected is None and not cpu_pair_ok({**DEFAULTS, **table}):
        expected = "edgesync.toml: [edge_runtime] cpu_soft_limit_ms must be <= cpu_hard_limit_ms"
    rule = handoff_problem({**DEFAULTS, **table}, table) if expected is None else None
    if rule is not None:
        expected = "edgesync.toml: [edge_runtime] " + rule
    try:
        result = load_settings({}, cwd=tmp_path)
    except ConfigError as exc:
        assert expected is not None and str(exc).startswith(expected), (exc, table)
    else:
        assert expected is None, result
        assert_valid(result)
        assert all(getattr(result, k) == v for k, v in table.items() if k in KEYS)


@given(value=VALUES)
@FAST
def test_any_value_for_the_table_itself(tmp_path: Path, value: Any) -> None:
    (tmp_path / "edgesync.toml").write_text(f"edge_runtime = {toml_value(value)}\n", encoding="utf-8")
    try:
        result = load_settings({}, cwd=tmp_path)
    except ConfigError as exc:
        assert "[edge_runtime]" in str(exc)
    else:
        assert isinstance(value, dict)
        assert_valid(result)


@given(content=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
@FAST
def test_any_file_content(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "edgesync.toml").write_bytes(content)
    try:
        result = load_settings({}, cwd=tmp_path)
    except ConfigError as exc:
        assert str(exc).startswith("edgesync.toml: "), exc
    else:
        assert_valid(result)


ENV_TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=20) | st.sampled_from(
    ["0", " 1 ", "+5", "-0", "1_000", "2000", "2001", "100", "101", "1.5", "1e3", "per_worker", "oneshot\n",
     "true", " False ", "YES", "off", "maybe"]
)


def env_parse(key: str, raw: str) -> object:
    if key in CHOICES or key in TEXTS:
        return raw.strip()
    if key in BOOLEANS:
        return {"true": True, "1": True, "yes": True, "on": True,
                "false": False, "0": False, "no": False, "off": False}.get(raw.strip().lower())
    try:
        return int(raw.strip())
    except ValueError:
        return None


@given(key=st.sampled_from(KEYS), raw=ENV_TEXT)
@FAST
def test_any_environment_value(tmp_path: Path, key: str, raw: str) -> None:
    name = "EDGESYNC_" + key.upper()
    value = env_parse(key, raw)
    expected_ok = (acceptable(key, value, tmp_path) and cpu_pair_ok({**DEFAULTS, key: value})
                   and handoff_problem({**DEFAULTS, key: value}, [key]) is None)
    try:
        result = load_settings({name: raw}, cwd=tmp_path)
    except ConfigError as exc:
        assert not expected_ok, exc
        assert key in str(exc) and name in str(exc)
    else:
        assert expected_ok, result
        assert getattr(result, key) == value
        assert_valid(result)


@given(suffix=st.text(st.characters(blacklist_characters="\x00="), max_size=20))
@FAST
def test_any_environment_name(tmp_path: Path, suffix: str) -> None:
    name = "EDGESYNC_" + suffix
    known = {"EDGESYNC_CONFIG", *("EDGESYNC_" + k.upper() for k in KEYS)}
    try:
        value = {"POLICY": "oneshot", "REPLACE_BEFORE_RETIRE": "true"}.get(suffix, "7")
        load_settings({name: value}, cwd=tmp_path)
    except ConfigError as exc:
        if name == "EDGESYNC_CONFIG":
            assert "EDGESYNC_CONFIG" in str(exc)
        else:
            assert name not in known and str(exc).startswith(f"unknown environment variable {name!r}; ")
    else:
        assert name in known
