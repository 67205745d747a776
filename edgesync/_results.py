"""Task results every worker of a server can read: a table in the durable journal's SQLite file.

design: a Django ``TaskResult`` lives in the worker that runs its task; a status view
served by another worker would not find it. When ``durable_journal`` is set, each
result is also written here, as one JSON document per (backend alias, result id),
whenever it changes (enqueued, started, finished), and a worker that does not hold a
result reads it here. The table is this module's own (``edgesync_task_results``),
in the same file as the journal's, through a connection of its own: one per process,
opened on first use after fork (a SQLite connection never crosses a fork), shared
by the process's threads under a lock. WAL mode, ``synchronous=NORMAL``, as the
journal (a commit survives the death of the process, not a power loss).

Retention, per backend alias: the ``kept`` most recently finished results (the
backend's ``RESULTS_KEPT``); a result not finished and not updated for
``STALE_S`` (its worker died before the task ended) is deleted then too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Dict, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edgesync_task_results (
    backend TEXT NOT NULL,   -- the TASKS alias
    id TEXT NOT NULL,        -- the result id
    doc TEXT NOT NULL,       -- the result, JSON
    finished REAL,           -- time.time() when it finished; NULL until then
    updated REAL NOT NULL,   -- time.time() of the last write
    PRIMARY KEY (backend, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edgesync_task_results_finished ON edgesync_task_results (backend, finished);
"""

#: How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 5.0
#: An unfinished result not updated for this long is taken for one whose worker died.
STALE_S = 24 * 3600.0


class SharedResults:
    """The results table of one SQLite file, for this process."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; the caller holds ``self._lock``."""
        if self._conn is None or self._pid != os.getpid():
            # One inherited through fork belongs to the parent: never use or close it here.
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise RuntimeError("edgesync: cannot open the durable_journal %r for task results: %s"
                                   % (self.path, exc)) from exc
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def put(self, backend: str, result_id: str, doc: str, finished: Optional[float], kept: int) -> None:
        """Write one result; once it is finished, keep only the ``kept`` newest finished ones."""
        now = time.time()
        with self._lock:
            conn = self._connection()
            conn.execute("INSERT OR REPLACE INTO edgesync_task_results VALUES (?, ?, ?, ?, ?)",
                         (backend, result_id, doc, finished, now))
            if finished is None:
                return
            if kept == 0:
                conn.execute("DELETE FROM edgesync_task_results WHERE backend = ? AND finished IS NOT NULL",
                             (backend,))
            else:
                conn.execute(
                    "DELETE FROM edgesync_task_results WHERE backend = ? AND finished < ("
                    " SELECT finished FROM edgesync_task_results WHERE backend = ? AND finished IS NOT NULL"
                    " ORDER BY finished DESC LIMIT 1 OFFSET ?)", (backend, backend, kept - 1))
            conn.execute("DELETE FROM edgesync_task_results WHERE finished IS NULL AND updated < ?",
                         (now - STALE_S,))

    def get(self, backend: str, result_id: str) -> Optional[str]:
        """The JSON document of one result, or None."""
        with self._lock:
            row = self._connection().execute(
                "SELECT doc FROM edgesync_task_results WHERE backend = ? AND id = ?",
                (backend, result_id)).fetchone()
        return None if row is None else str(row[0])


_tables: Dict[str, SharedResults] = {}
_tables_lock = threading.Lock()


def shared_results(path: str) -> SharedResults:
    """The results table in the SQLite file at ``path`` (absolute), one object per file."""
    with _tables_lock:
        table = _tables.get(path)
        if table is None:
            table = _tables[path] = SharedResults(path)
        return table


def _after_fork_in_child() -> None:
    global _tables_lock
    _tables_lock = threading.Lock()
    for table in _tables.values():
        table._lock = threading.Lock()  # a lock held at the fork stays held in the child


os.register_at_fork(after_in_child=_after_fork_in_child)
