"""The durable-task journal: one SQLite file, one row per durable task accepted and not yet done.

design: a row is inserted before ``wait_until`` returns and deleted when the task ends.
A row names its owner: the pid and the start time of the process that holds it (pids
are reused; the pair is not). A row whose owner is dead was accepted and never
completed: any live process that opens the same file claims it with one ``UPDATE``,
which SQLite runs under its write lock, so two processes never claim the same row.

Durability: WAL mode with ``synchronous=NORMAL``. A commit is a write into the WAL
file, with no fsync: it survives the death of the process (SIGKILL, OOM kill, a crash)
because the kernel already holds the page, but a power loss or a kernel crash can lose
the last commits (the file stays consistent). ``synchronous=FULL`` would fsync every
commit, about 230 us instead of 18 us on the request path.

Connections: one per process, opened on first use after fork (a SQLite connection must
never cross a fork) and shared by the process's threads under a lock; see
``bench/durable.py`` for the measurement against one connection per thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edgesync_tasks (
    id TEXT PRIMARY KEY,
    fn TEXT NOT NULL,             -- import path, module:qualname
    args TEXT NOT NULL,           -- JSON [args, kwargs]
    attempt INTEGER NOT NULL,     -- runs handed to a worker so far (1 when recorded)
    max_attempts INTEGER NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL, -- the owner's start time (clock ticks since boot)
    accepted REAL NOT NULL        -- time.time() when wait_until accepted it
) WITHOUT ROWID
"""
# WITHOUT ROWID: the rows live in the primary key's b-tree, so an insert or a delete writes one b-tree
# instead of two (the table and its key's index): 22 us instead of 32 us per insert, measured here.

#: How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 5.0


class Entry(NamedTuple):
    """A row claimed from a dead owner, to be run again (or given up)."""

    id: str
    fn: str
    args: str
    attempt: int
    max_attempts: int
    dead_pid: int


def process_start(pid: int) -> Optional[int]:
    """The start time of live process ``pid`` in clock ticks since boot; None if it is gone.

    A zombie (killed, not yet reaped by the gunicorn arbiter) counts as gone. Without
    ``/proc`` (not Linux), psutil's creation time in milliseconds.
    """
    if not _PROC:
        return _psutil_start(pid)
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22, starttime


_PROC = os.path.isdir("/proc/self")


def _psutil_start(pid: int) -> Optional[int]:
    import psutil
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.create_time() * 1000)
    except psutil.Error:
        return None


class Journal:
    """One journal file, as seen from this process. See the module docstring."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._owner: Tuple[int, int] = (0, 0)

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; the caller holds ``self._lock``."""
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            # A connection inherited through fork belongs to the parent: never use or close it here.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            start = process_start(pid)
            self._owner = (pid, start if start is not None else int(time.time()))
            self._conn, self._pid = conn, pid
        return self._conn

    def open(self) -> None:
        """Open (and create) the file now, so that a bad path fails early, with the path in the error."""
        try:
            with self._lock:
                self._connection()
        except sqlite3.Error as exc:
            raise RuntimeError("edgesync: cannot open the durable_journal %r: %s" % (self.path, exc)) from exc

    def record(self, task_id: str, fn: str, args: str, max_attempts: int, attempt: int = 1) -> None:
        with self._lock:
            conn = self._connection()
            conn.execute("INSERT INTO edgesync_tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (task_id, fn, args, attempt, max_attempts, self._owner[0], self._owner[1],
                          time.time()))

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._connection().execute("DELETE FROM edgesync_tasks WHERE id = ?", (task_id,))

    def set_attempt(self, task_id: str, attempt: int) -> None:
        """The task's next run is ``attempt`` (a retry after an exception)."""
        with self._lock:
            self._connection().execute("UPDATE edgesync_tasks SET attempt = ? WHERE id = ?", (attempt, task_id))

    def release(self, task_id: str) -> None:
        """Give a claimed row back, unrun (owner 0 is never alive): another claim takes it."""
        with self._lock:
            self._connection().execute(
                "UPDATE edgesync_tasks SET owner_pid = 0, owner_start = 0, attempt = attempt - 1 WHERE id = ?",
                (task_id,))

    def claim(self, limit: int) -> List[Entry]:
        """Take up to ``limit`` rows whose owner is dead; each comes back with its attempt counted."""
        if limit <= 0:
            return []
        with self._lock:
            conn = self._connection()
            owners = conn.execute("SELECT DISTINCT owner_pid, owner_start FROM edgesync_tasks").fetchall()
            me = self._owner
        dead = [(pid, start) for pid, start in owners
                if (pid, start) != me and process_start(pid) != start]
        claimed: List[Entry] = []
        for pid, start in dead:
            if len(claimed) >= limit:
                break
            with self._lock:
                rows = self._connection().execute(
                    "UPDATE edgesync_tasks SET owner_pid = ?, owner_start = ?, attempt = attempt + 1 "
                    "WHERE id IN (SELECT id FROM edgesync_tasks WHERE owner_pid = ? AND owner_start = ? "
                    "ORDER BY accepted LIMIT ?) RETURNING id, fn, args, attempt, max_attempts",
                    (me[0], me[1], pid, start, limit - len(claimed))).fetchall()
            claimed.extend(Entry(r[0], r[1], r[2], r[3], r[4], pid) for r in rows)
        return claimed

    def counts(self) -> Dict[str, int]:
        """Rows in the whole journal, and those this process holds."""
        with self._lock:
            conn = self._connection()
            total, mine = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(owner_pid = ? AND owner_start = ?), 0) FROM edgesync_tasks",
                self._owner).fetchone()
        return {"total": int(total), "mine": int(mine)}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
