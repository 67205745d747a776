"""``python -m edgesync durable list|requeue|purge|adopt``: the durable journal, for an operator.

design: each command opens the journal (``--journal PATH``, else ``durable_journal``
from ``edgesync.toml`` / ``EDGESYNC_CONFIG`` / ``EDGESYNC_DURABLE_JOURNAL``, read as the
server reads them) without creating it and without holding a lease, does one
statement, and prints what it did. Given-up tasks are listed by id, function, runs and
last error, never with their arguments (they may hold personal data; they stay in the
row). A re-queued task is pending again with a fresh count of runs: a live server of
the app claims it within a second. Exit status: 0 done, 1 nothing matched or the journal
is unusable, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence, TextIO

from ._config import ConfigError, load_settings
from ._journal import Journal, JournalError, Row

_DESCRIPTION = """\
Inspect and repair the durable-task journal of an edgesync server.

  python -m edgesync durable list [--pending]       given-up tasks (or pending ones)
  python -m edgesync durable requeue ID... | --all  run given-up tasks again
  python -m edgesync durable purge ID... | --all    delete given-up tasks for good
  python -m edgesync durable adopt APP              hand the journal to APP (a renamed app)

The journal is --journal PATH, else durable_journal in [edge_runtime] of edgesync.toml
in this directory (or the file EDGESYNC_CONFIG names, or EDGESYNC_DURABLE_JOURNAL).
"""


class _Usage(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgesync", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", metavar="durable", required=True)
    durable = groups.add_parser("durable", help="the durable-task journal")
    commands = durable.add_subparsers(dest="command", metavar="COMMAND", required=True)
    journal = argparse.ArgumentParser(add_help=False)
    journal.add_argument("--journal", metavar="PATH", help="the journal file (default: durable_journal)")
    listing = commands.add_parser("list", parents=[journal], help="list given-up tasks (--pending: pending ones)")
    listing.add_argument("--pending", action="store_true", help="list pending tasks instead")
    for name, what in (("requeue", "run given-up tasks again (a fresh count of runs)"),
                       ("purge", "delete given-up tasks for good")):
        cmd = commands.add_parser(name, parents=[journal], help=what)
        cmd.add_argument("ids", nargs="*", metavar="ID", help="task ids (from `list`)")
        cmd.add_argument("--all", action="store_true", help="every given-up task")
    adopt = commands.add_parser("adopt", parents=[journal], help="make APP the journal's owner (a renamed app)")
    adopt.add_argument("app", metavar="APP", help="the gunicorn app, as on its command line (module:variable)")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    parser = _parser()
    opts = parser.parse_args(argv)
    try:
        return _run(opts, out)
    except _Usage as exc:
        parser.print_usage(sys.stderr)
        print("python -m edgesync: error: %s" % exc, file=sys.stderr)
        return 2
    except (JournalError, ConfigError) as exc:
        print("python -m edgesync: %s" % exc, file=sys.stderr)
        return 1


def _journal_path(opts: argparse.Namespace) -> str:
    if opts.journal:
        return str(os.path.abspath(opts.journal))
    settings = load_settings()
    if not settings.durable_journal:
        raise _Usage("no journal: pass --journal PATH, or run in the app's directory, where edgesync.toml (or "
                     "EDGESYNC_CONFIG, or EDGESYNC_DURABLE_JOURNAL) sets durable_journal")
    return os.path.abspath(settings.durable_journal)


def _run(opts: argparse.Namespace, out: TextIO) -> int:
    if opts.command in ("requeue", "purge") and bool(opts.ids) == bool(opts.all):
        raise _Usage("%s takes task ids or --all (one of them)" % opts.command)
    path = _journal_path(opts)
    if not os.path.exists(path):
        raise JournalError("durable_journal %s does not exist: no server has recorded a task there. Pass the "
                           "server's --journal PATH, or run in the app's directory" % path)
    journal = Journal(path, owner=False, create=False)
    try:
        journal.open()
        if opts.command == "list":
            rows = journal.rows(given_up=not opts.pending)
            _print_rows(rows, opts.pending, out)
            print("%d %s task(s) in %s (app %s)" % (len(rows), "pending" if opts.pending else "given-up", path,
                                                   journal.owner_app() or "not recorded"), file=out)
            return 0
        if opts.command == "adopt":
            before = journal.owner_app()
            journal.set_owner_app(opts.app)
            print("%s now belongs to the app %r (was %r)" % (path, opts.app, before), file=out)
            return 0
        ids: Optional[List[str]] = None if opts.all else list(opts.ids)
        done = journal.requeue(ids) if opts.command == "requeue" else journal.purge(ids)
        verb = "re-queued" if opts.command == "requeue" else "purged"
        for task_id in done:
            print("%s %s" % (verb, task_id), file=out)
        missing = sorted(set(ids or ()) - set(done))
        for task_id in missing:
            print("python -m edgesync: no given-up task %s in %s (see `durable list`; pending tasks are "
                  "neither re-queued nor purged)" % (task_id, path), file=sys.stderr)
        print("%d task(s) %s%s" % (len(done), verb, " (a live server of the app runs them within a second)"
                                   if verb == "re-queued" and done else ""), file=out)
        return 1 if missing else 0
    finally:
        journal.close()


def _print_rows(rows: List[Row], pending: bool, out: TextIO) -> None:
    if not rows:
        return
    header = ("ID", "FUNCTION", "RUNS", "ACCEPTED (UTC)", "OWNER") if pending else \
        ("ID", "FUNCTION", "RUNS", "GIVEN UP (UTC)", "LAST ERROR")
    lines = [header]
    for r in rows:
        when = _utc(r.accepted if pending else (r.given_up or 0.0))
        lines.append((r.id, r.fn, "%d/%d" % (r.runs, r.max_attempts), when, r.owner if pending else r.last_error or ""))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths, strict=True)) + "  " + line[4], file=out)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
