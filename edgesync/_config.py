"""The ``[edge_runtime]`` settings: declared once, read from TOML and the environment, validated.

Rule: every setting is declared exactly once, as a field of :class:`Settings` whose spec (doc, accepted
values) lives in the field's metadata.  Parsing, validation, error messages and the docs' table are all
derived from those declarations; the only places that name individual keys are the cross-field rules
:func:`_check_cpu_pair` and :func:`_check_handoff`.  Every problem with the configuration is raised as
:class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

# The version check (not try/except ImportError) is the form mypy understands; 3.10 needs tomli.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - only on Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV", "DEFAULT_FILENAME", "ENV_PREFIX", "TABLE", "ConfigError", "Settings",
    "describe_source", "load_settings", "settings_reference_markdown",
]

ENV_PREFIX = "EDGESYNC_"
CONFIG_ENV = "EDGESYNC_CONFIG"
DEFAULT_FILENAME = "edgesync.toml"
TABLE = "edge_runtime"

# Sanity ceilings, not part of the advertised contract: a millisecond limit must fit a C int, and a
# memory limit above 1 TiB is a typo (someone wrote bytes or KiB).
_MAX_MS = 2**31 - 1
_MAX_MB = 1_048_576

# Keys that Supabase's `supabase/config.toml` puts in its [edge_runtime] table to configure the Supabase
# CLI itself.  They mean nothing to edgesync, but a user may point EDGESYNC_CONFIG at that very file, so
# they are accepted and ignored rather than reported as unknown.
_SUPABASE_KEYS = frozenset({"enabled", "inspector_port", "deno_version", "secrets"})

_T = TypeVar("_T", bool, int, str)


class ConfigError(RuntimeError):
    """The configuration is unusable; the message names the source, the key, the value and what is accepted."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What one setting accepts: a choice of strings, true or false, a string matching a pattern, or an
    integer range."""

    doc: str
    choices: tuple[str, ...]
    minimum: int
    maximum: int
    open_ended: bool  # True: `maximum` is a sanity ceiling, mentioned only when a value exceeds it
    text: str = ""  # non-empty: a free-form string that fully matches `pattern`; `text` says what is accepted
    pattern: str = ""
    is_path: bool = False  # a file path whose directory must exist (checked when the base directory is known)
    boolean: bool = False

    def problem(self, value: object) -> str | None:
        """Return what is accepted (e.g. ``"an integer >= 0"``) when `value` is not, else None."""
        if self.boolean:
            return None if isinstance(value, bool) else "true or false"
        if self.text:
            if isinstance(value, str) and re.fullmatch(self.pattern, value):
                return None
            return self.text
        if self.choices:
            if isinstance(value, str) and value in self.choices:
                return None
            return "one of " + ", ".join(map(repr, self.choices))
        # bool is an int subclass, but `true` for a millisecond limit is a mistake, not 1.
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if number is not None and self.minimum <= number <= self.maximum:
            return None
        if self.open_ended and (number is None or number < self.minimum):
            return f"an integer >= {self.minimum}"
        return f"an integer from {self.minimum} to {self.maximum}"


def _setting(
    default: _T,
    *,
    doc: str,
    choices: tuple[str, ...] = (),
    minimum: int = 0,
    maximum: int = 0,
    open_ended: bool = False,
    text: str = "",
    pattern: str = "",
    is_path: bool = False,
) -> _T:
    """Declare one setting: a dataclass field with its default and its :class:`_Spec` in the metadata."""
    spec = _Spec(doc, choices, minimum, maximum, open_ended, text, pattern, is_path,
                 boolean=isinstance(default, bool))
    assert spec.problem(default) is None, f"default {default!r} violates its own spec"
    return dataclasses.field(default=default, metadata={"edgesync": spec})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated ``[edge_runtime]`` table; ``dataclasses.asdict(settings)`` is the whole table.

    Construct it with :func:`load_settings`, or directly with keyword overrides (tests): every instance,
    however made, satisfies the declared ranges and the CPU soft <= hard rule, else :class:`ConfigError`.
    """

    policy: str = _setting(
        "per_worker",
        doc="'per_worker': an instance serves many requests; 'oneshot': one request per instance, "
        "background work cut off.",
        choices=("per_worker", "oneshot"),
    )
    wall_clock_limit_ms: int = _setting(
        400000, doc="Instance age (counted from when the worker serves, its boot excluded) that terminates it "
            "(it retires at 20-50%, each worker away from its siblings' retires). 0 disables.",
        maximum=_MAX_MS, open_ended=True,
    )
    cpu_soft_limit_ms: int = _setting(
        1000, doc="CPU time of one invocation after which the instance retires. 0 disables.",
        maximum=_MAX_MS, open_ended=True,
    )
    cpu_hard_limit_ms: int = _setting(
        2000, doc="CPU time at which one invocation is cancelled (HTTP 546). 0 disables.",
        maximum=_MAX_MS, open_ended=True,
    )
    memory_limit_mb: int = _setting(
        256, doc="RSS growth above the ready baseline that terminates the instance (it retires at 50%). "
        "0 disables.",
        maximum=_MAX_MB, open_ended=True,
    )
    request_idle_timeout_ms: int = _setting(
        150000, doc="Time a request may take before it is answered 504. 0 disables.",
        maximum=_MAX_MS, open_ended=True,
    )
    beforeunload_wall_clock_ratio: int = _setting(
        90, doc="Percent of wall_clock_limit_ms at which beforeunload (wall_clock) fires. 0 disables it.",
        maximum=100,
    )
    beforeunload_cpu_ratio: int = _setting(
        90, doc="Percent of cpu_hard_limit_ms at which beforeunload (cpu) fires. 0 disables it.",
        maximum=100,
    )
    beforeunload_memory_ratio: int = _setting(
        90, doc="Percent of memory_limit_mb at which beforeunload (memory) fires. 0 disables it.",
        maximum=100,
    )
    background_threads: int = _setting(
        8, doc="Threads running wait_until tasks in each instance.", minimum=1, maximum=1024,
    )
    max_pending_tasks: int = _setting(
        1000, doc="Queued plus running wait_until tasks before wait_until raises QueueFull.",
        minimum=1, maximum=10_000_000,
    )
    task_log_interval_ms: int = _setting(
        60000, doc="Time between two INFO lines 'N tasks succeeded in the last ...s (p50, p99, max)' of the "
        "edgesync.tasks logger; each success is a DEBUG line. 0: one INFO line per success instead.",
        maximum=_MAX_MS, open_ended=True,
    )
    exit_drain_timeout_ms: int = _setting(
        30000, doc="Outside gunicorn (flask run, a script): how long the exit drain waits for tasks. "
        "Under gunicorn, graceful_timeout bounds every drain. 0: abandon them at once (logged).",
        maximum=_MAX_MS, open_ended=True,
    )
    # -- durable tasks (@edgesync.durable) and hand-off ------------------------------------------------
    durable_journal: str = _setting(
        "", doc="SQLite file recording durable tasks until they complete (relative to the working "
        "directory); \"\" keeps them in memory only.",
        text='a file path, or "" (off)', pattern=r"[^\x00]*", is_path=True,
    )
    durable_max_attempts: int = _setting(
        3, doc="Runs of a durable task (first run plus re-runs after its worker died; a run counts when the "
        "task starts) before it is given up (kept in the journal), unless @durable(max_attempts=...) says otherwise.",
        minimum=1, maximum=1000,
    )
    durable_lease_ms: int = _setting(
        30000, doc="How long a worker's hold on its durable tasks lasts without renewal (renewed every second): "
        "a server that shares the journal from another container or host re-runs them only after it expired.",
        minimum=3000, maximum=_MAX_MS,
    )
    handoff: str = _setting(
        "", doc="Where durable tasks are handed (see handoff_on): 'rq' (RQ over handoff_redis_url), 'celery' "
        "(Celery over handoff_broker_url; the worker side is edgesync.celery); '': nowhere.",
        choices=("", "rq", "celery"),
    )
    handoff_on: str = _setting(
        "deadline", doc="When durable tasks go to the hand-off target: 'deadline' (pending when the instance "
        "unloads), 'deadline_or_queue_full' (also instead of QueueFull), 'always' (wait_until enqueues).",
        choices=("deadline", "deadline_or_queue_full", "always"),
    )
    handoff_redis_url: str = _setting(
        "redis://127.0.0.1:6379/0", doc="The Redis that RQ uses, for handoff = 'rq'.",
        text="a redis://, rediss:// or unix:// URL", pattern=r"(redis|rediss|unix)://\S+",
    )
    handoff_broker_url: str = _setting(
        "", doc="The broker Celery uses, for handoff = 'celery' (required then): Redis or RabbitMQ.",
        text='a redis://, rediss://, sentinel://, amqp://, amqps:// or pyamqp:// URL, or "" (off)',
        pattern=r"((redis|rediss|sentinel|amqp|amqps|pyamqp)://\S+)?",
    )
    handoff_visibility_timeout_ms: int = _setting(
        3600000, doc="handoff = 'celery' on Redis: how long a task whose worker died unacknowledged waits "
        "before Redis gives it to another worker; keep it above the longest task, or a running task is "
        "given out twice. Read by the standalone edgesync.celery worker (your own app: broker_transport_options).",
        minimum=1000, maximum=_MAX_MS, open_ended=True,
    )
    handoff_queue: str = _setting(
        "default", doc="The RQ or Celery queue durable tasks are handed to.",
        text="a queue name (letters, digits, _ . : -)", pattern=r"[A-Za-z0-9_.:-]+",
    )
    replace_before_retire: bool = _setting(
        True, doc="A retiring instance keeps accepting until the arbiter's replacement for it serves "
        "(at most 30 s, and 75% of wall_clock_limit_ms); false: it stops at once and gunicorn "
        "replaces it once it has exited.",
    )
    mold: bool = _setting(
        True, doc="true: workers are forked by a mold, a process that imports the app once per code "
        "generation (a HUP starts a new one) and forks each worker already loaded (Linux; not with "
        "--reload; given up, with one warning, for an app whose import starts threads or calls wait_until); "
        "a worker's birth then costs a fork, not an import. false: each worker imports the app itself (or is "
        "forked by the master with --preload), as gunicorn does. Read once, at start.",
    )
    mold_immortal_heap: bool = _setting(
        True, doc="true: on CPython 3.12+ (with the GIL), the mold makes every object its import left "
        "immortal (PEP 683) before it forks, so its workers never write those objects' reference counts "
        "and copy fewer of its pages: a cheaper birth, a smaller worker. Such an object is never freed: "
        "when a worker drops one, its __del__ and weakref callbacks do not run. false: the mold only "
        "freezes its heap (gc.freeze). Read once, at start.",
    )

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        for key, value in values.items():
            _check("Settings():", key, value)
        _check_cpu_pair(values, dict.fromkeys(values, "Settings():"))
        _check_handoff(values, dict.fromkeys(values, "Settings():"))


_SPECS: dict[str, _Spec] = {f.name: f.metadata["edgesync"] for f in dataclasses.fields(Settings)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}
_ENV_NAMES: dict[str, str] = {ENV_PREFIX + key.upper(): key for key in _SPECS}
# How an environment variable spells a boolean (TOML has its own true and false).
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
             "off": False}


def _show(value: object) -> str:
    """``repr(value)`` for a message, shortened: a typo must not print a whole file back."""
    try:
        text = repr(value)
    except ValueError:  # an int longer than sys.get_int_max_str_digits()
        return f"<{type(value).__name__} too long to print>"
    return text if len(text) <= 100 else text[:97] + "..."


def _check(where: str, key: str, value: object, shown: str | None = None, base: str | None = None) -> None:
    """Raise ConfigError unless `value` is accepted for `key`; `shown` is the raw text, if any.

    `base` is the directory relative paths are taken from (unknown for ``Settings()``).
    """
    spec = _SPECS[key]
    accepted = spec.problem(value)
    got = _show(value) if shown is None else _show(shown)
    if accepted is not None:
        raise ConfigError(f"{where} {key} must be {accepted}, got {got}")
    if spec.is_path and value and base is not None:
        folder = os.path.dirname(os.path.join(base, str(value))) or base
        if not os.path.isdir(folder):
            raise ConfigError(f"{where} {key} must be a path in an existing directory, got {got} "
                              f"({folder!r} does not exist: create it, or name a file in an existing one)")


def _check_cpu_pair(values: Mapping[str, Any], where: Mapping[str, str]) -> None:
    """Raise ConfigError if both CPU limits are on and soft > hard (the soft retire could never come first)."""
    soft, hard = values["cpu_soft_limit_ms"], values["cpu_hard_limit_ms"]
    if not (soft and hard and soft > hard):
        return
    rule = "cpu_soft_limit_ms must be <= cpu_hard_limit_ms when both are non-zero (0 disables one)"
    w_soft = where.get("cpu_soft_limit_ms", "default")
    w_hard = where.get("cpu_hard_limit_ms", "default")
    lead = w_soft if w_soft != "default" else w_hard  # both default is impossible: defaults are valid

    def note(w: str) -> str:
        return "" if w == lead else f" ({w.rstrip(':')})"

    raise ConfigError(
        f"{lead} {rule}, got cpu_soft_limit_ms = {soft}{note(w_soft)}, cpu_hard_limit_ms = {hard}{note(w_hard)}"
    )


def _check_handoff(values: Mapping[str, Any], where: Mapping[str, str]) -> None:
    """Raise ConfigError if the hand-off target named lacks its broker URL or its client library."""
    engine = values["handoff"]
    lead = where.get("handoff", "default")
    if engine == "celery" and not values["handoff_broker_url"]:
        also = (" (handoff_redis_url is RQ's)" if "handoff_redis_url" in where and where["handoff_redis_url"]
                != "Settings():" else "")
        raise ConfigError(f"{lead} handoff = 'celery' needs handoff_broker_url, the broker's URL (redis://host:6379/0 "
                          f"or amqp://user:password@host:5672//), got none{also}")
    if engine == "rq" and values["handoff_broker_url"] and "handoff_redis_url" not in where:
        raise ConfigError(f"{where.get('handoff_broker_url', lead)} handoff_broker_url = "
                          f"{_show(values['handoff_broker_url'])} is Celery's: handoff = 'rq' reads its Redis from "
                          "handoff_redis_url")
    needs = {"rq": ("rq", "redis"), "celery": ("celery",) + (("redis",) if str(values["handoff_broker_url"]).startswith(
        ("redis", "rediss", "sentinel")) else ())}.get(engine, ())
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{lead} handoff = {engine!r} needs the {' and '.join(missing)} package(s), which are not installed: "
            f"pip install 'edgesync-wsgi[{engine}]', or set handoff = ''"
        )


def _unknown(what: str, name: str, known: Iterable[str]) -> ConfigError:
    """An error for an unknown name that suggests the closest known one, or lists them all."""
    # Case-folded, so EDGESYNC_cpu_hard_limit_ms and Policy find their key.
    folded = {k.casefold(): k for k in known}
    close = difflib.get_close_matches(name.casefold(), list(folded), n=1)
    hint = f"did you mean {folded[close[0]]!r}?" if close else "accepted: " + ", ".join(folded.values())
    return ConfigError(f"{what} {name!r}; {hint}")  # never shortened: the name is what to fix


def _config_file(env: Mapping[str, str], base: str) -> str | None:
    """The config file's path as given (EDGESYNC_CONFIG, else edgesync.toml if present), or None."""
    if CONFIG_ENV in env:
        return env[CONFIG_ENV]
    return DEFAULT_FILENAME if os.path.exists(os.path.join(base, DEFAULT_FILENAME)) else None


def _read_table(label: str, base: str) -> dict[str, Any]:
    """The validated edgesync keys of the file's [edge_runtime] table; {} when the table is absent."""
    try:
        with open(os.path.join(base, label), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(data.decode("utf-8"))
    # TOMLDecodeError and UnicodeDecodeError are ValueErrors, and so is tomllib's failure on an integer
    # longer than sys.get_int_max_str_digits(); deeply nested arrays exhaust the parser's recursion.
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc
    _check_placement(label, document)
    table = document.get(TABLE, {})  # other tables belong to other tools (Supabase's config.toml)
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: [{TABLE}] must be a table, got {_show(table)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _SUPABASE_KEYS:
            continue
        if key not in _SPECS:
            raise _unknown(f"{label}: [{TABLE}] unknown key", key, _SPECS)
        _check(f"{label}: [{TABLE}]", key, value, base=base)
        values[key] = value
    return values


def _check_placement(label: str, document: Mapping[str, Any]) -> None:
    """Raise ConfigError when the file holds settings edgesync would not read (issue: silent defaults).

    Settings outside any table, or a non-empty file without an [edge_runtime] table, would otherwise
    run on defaults while the log says the file was read.  A file of comments only is fine.
    """
    stray = [key for key, value in document.items() if key in _SPECS and not isinstance(value, dict)]
    if stray:
        them = "them" if len(stray) > 1 else "it"
        raise ConfigError(f"{label}: {', '.join(stray)} outside any table; put {them} under a [{TABLE}] table "
                          f"(a line '[{TABLE}]' above {them})")
    if TABLE in document or not document:
        return
    tables = list(_table_names(document))
    shown = tables or [_show(key) for key in document]
    listed = ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")

    def norm(name: str) -> str:
        return name.casefold().replace("-", "_").replace(" ", "_")

    close = [t for t in tables if difflib.get_close_matches(norm(t.strip("[]").split(".")[-1]), [TABLE], 1, 0.8)]
    hint = f"did you mean [{TABLE}]?" if close else f"put edgesync's settings under [{TABLE}]"
    raise ConfigError(f"{label}: no [{TABLE}] table, so none of this file would apply (it has {listed}); {hint}")


def _table_names(document: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    """``[name]`` of every table that holds a value, nested ones dotted, in file order."""
    for key, value in document.items():
        if isinstance(value, dict):
            if any(not isinstance(v, dict) for v in value.values()) or not value:
                yield f"[{prefix}{key}]"
            yield from _table_names(value, f"{prefix}{key}.")


def load_settings(
    environ: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None
) -> Settings:
    """Read the config file and ``EDGESYNC_*`` overrides into a validated :class:`Settings`.

    The file is ``$EDGESYNC_CONFIG`` (which must exist) if set, else ``edgesync.toml`` in `cwd` if it
    exists, else none.  ``EDGESYNC_<KEY>`` variables override single keys and win over the file.
    `environ` defaults to ``os.environ``, `cwd` to ``os.getcwd()``; relative paths are taken from `cwd`.
    Raises ConfigError, and nothing else, for any problem: one message naming where the value came
    from, the key, the value and what is accepted.  Reads the file on every call (no cache).
    """
    env = os.environ if environ is None else environ
    base = os.getcwd() if cwd is None else os.fspath(cwd)
    if CONFIG_ENV in env and not env[CONFIG_ENV]:
        raise ConfigError(f"environment variable {CONFIG_ENV} is empty; unset it or name a TOML file")
    label = _config_file(env, base)
    if label is not None and not os.path.exists(os.path.join(base, label)):
        relative = "" if os.path.isabs(label) else f" (relative to {base})"
        raise ConfigError(
            f"environment variable {CONFIG_ENV}: config file {label!r}{relative} does not exist"
        )
    values = _read_table(label, base) if label is not None else {}
    where = {key: f"{label}: [{TABLE}]" for key in values}
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n != CONFIG_ENV):
        if name not in _ENV_NAMES:
            raise _unknown("unknown environment variable", name, [CONFIG_ENV, *_ENV_NAMES])
        key, raw = _ENV_NAMES[name], env[name]
        value: object = raw.strip()
        if _SPECS[key].boolean:
            value = _BOOLEANS.get(raw.strip().lower(), raw)
        elif not (_SPECS[key].choices or _SPECS[key].text):
            try:
                value = int(raw.strip())
            except ValueError:  # '', '1.5', '1e3', 'abc': reported below with the raw text
                pass
        where[key] = f"environment variable {name}:"
        _check(where[key], key, value, shown=raw, base=base)
        values[key] = value
    _check_cpu_pair({**_DEFAULTS, **values}, where)
    _check_handoff({**_DEFAULTS, **values}, where)
    return Settings(**values)


def describe_source(
    environ: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None
) -> str:
    """Where :func:`load_settings` takes its settings from, for log lines; reads no file, validates nothing.

    E.g. ``"edgesync.toml"``, the path in ``$EDGESYNC_CONFIG`` as given, or ``"defaults (no /srv/app/edgesync.toml)"``
    (the absolute path looked at, so a file in the wrong directory is noticed), followed by
    ``" + EDGESYNC_X, ..."`` when environment variables override keys.
    """
    env = os.environ if environ is None else environ
    label = _config_file(env, os.getcwd() if cwd is None else os.fspath(cwd))
    overrides = sorted(n for n in env if n.startswith(ENV_PREFIX) and n != CONFIG_ENV)
    where = os.path.abspath(os.path.join(os.getcwd() if cwd is None else os.fspath(cwd), DEFAULT_FILENAME))
    source = f"defaults (no {where})" if label is None else label
    return source + (" + " + ", ".join(overrides) if overrides else "")


def settings_reference_markdown() -> str:
    """A Markdown table (key | default | accepted | meaning) of every setting, for docs/configuration.md."""
    rows = ["| key | default | accepted | meaning |", "|---|---|---|---|"]
    for key, spec in _SPECS.items():
        default = _DEFAULTS[key]
        shown = f'"{default}"' if isinstance(default, str) else str(default)
        if spec.boolean:
            shown, accepted = str(default).lower(), "`true`, `false`"
        elif spec.text:
            accepted = spec.text
        elif spec.choices:
            accepted = ", ".join(f'`"{c}"`' for c in spec.choices)
        elif spec.open_ended:
            accepted = f"integer >= {spec.minimum} (at most {spec.maximum})"
        else:
            accepted = f"integer {spec.minimum} to {spec.maximum}"
        rows.append(f"| `{key}` | `{shown}` | {accepted} | {spec.doc} |")
    return "\n".join(rows) + "\n"
