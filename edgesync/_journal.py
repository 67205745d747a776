"""The durable-task journal: one SQLite file, one row per durable task accepted and not yet done.

design: a task is recorded before ``wait_until`` returns and deleted after it ends;
``attempt`` counts its runs that started and did not end (0 when recorded). A task given
up stays, marked ``given_up`` with its last error, until an operator re-queues or purges it
(``python -m edgesync durable``). A row names its owner: host, pid and the start time of
the process that holds it (pids are reused; the triple is not). Each owner also holds a
lease in ``edgesync_owners`` that it renews every second: a row is claimable when its
owner is provably dead on this host (same host id, that pid gone or reused) or, on another
host or pid namespace, when the owner's lease has expired. Whoever claims takes the rows
with one ``UPDATE``, which SQLite runs under its write lock, so two processes never claim
the same row. ``edgesync_meta`` names the app that owns the file: another app's server
refuses to start on it.

The spool: a write transaction per task state (recorded, started, deleted) was the whole
cost of a durable task (``bench/journal_scale.py``). So each owner process writes them
first into its own file of fixed slots under ``<journal>-runs/``, mapped into memory
(``mmap``, ``MAP_SHARED``): recording a task copies it into a free slot, starting a run
sets the slot's *started* byte, each a copy into a page of the kernel's page cache with no
system call. Like a WAL commit (below), that page outlives the death of the process (not a
power loss). The journal's thread moves what the spool holds into SQLite in one
transaction every ``SPOOL_DELAY_S`` (or each ``SPOOL_BATCH`` ended tasks): the records of
tasks still pending are inserted, the rows of ended tasks deleted; a task that ends before
then never reaches SQLite at all. A claimer reads a dead owner's spool in the same
transaction that takes its rows: its records are inserted, and each started run that did
not end counts one run (which is how a task that kills its process is given up after
``max_attempts`` runs). A task whose process dies after it ended but before its delete was
written runs again, as a re-run. So SQLite lags the live processes by up to
``SPOOL_DELAY_S``: ``python -m edgesync durable list`` may not show a task younger than
that. A task that does not fit a slot, or finds none free, is written to SQLite directly;
while this process's lease is not comfortably valid, a start is counted in SQLite too,
where the owner check makes sure a row another server claimed is not run here as well.

Durability: WAL mode with ``synchronous=NORMAL``. A commit is a write into the WAL
file, with no fsync: it survives the death of the process (SIGKILL, OOM kill, a crash)
because the kernel already holds the page, but a power loss or a kernel crash can lose
the last commits (the file stays consistent). ``synchronous=FULL`` would fsync every
commit: about 230 us instead of 18 us to record a task (p50, measured on local disk).
WAL needs shared memory between the processes that open the file: one machine, a local
filesystem (never NFS, SMB or another network filesystem).

Connections: one per process, opened on first use after fork (a SQLite connection must
never cross a fork) and shared by the process's threads under a lock; see
``bench/durable.py`` for the measurement against one connection per thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import shlex
import sqlite3
import struct
import threading
import time
import urllib.parse
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

#: The schema this code writes (``PRAGMA user_version``); files of version 0 are migrated in place.
VERSION = 1

_TASKS = """
CREATE TABLE IF NOT EXISTS edgesync_tasks (
    id TEXT PRIMARY KEY,
    fn TEXT NOT NULL,             -- import path, module:qualname
    args TEXT NOT NULL,           -- JSON [args, kwargs]
    attempt INTEGER NOT NULL,     -- runs started so far (0 when recorded)
    max_attempts INTEGER NOT NULL,
    owner_pid INTEGER NOT NULL,   -- 0: nobody (released, re-queued or given up)
    owner_start INTEGER NOT NULL, -- the owner's start time (clock ticks since boot)
    accepted REAL NOT NULL,       -- time.time() when wait_until accepted it
    owner_host TEXT NOT NULL DEFAULT '',  -- the owner's host id (see host_id); '' in files of version 0
    given_up REAL,                -- time.time() when it was given up; NULL while pending
    last_error TEXT               -- why it was given up (never its arguments)
) WITHOUT ROWID
"""
# WITHOUT ROWID: the rows live in the primary key's b-tree, so an insert or a delete writes one b-tree
# instead of two (the table and its key's index).
_OWNERS = """
CREATE TABLE IF NOT EXISTS edgesync_owners (
    host TEXT NOT NULL, pid INTEGER NOT NULL, start INTEGER NOT NULL,
    lease REAL NOT NULL,          -- time.time() until which the owner is alive, renewed every second
    PRIMARY KEY (host, pid, start)
) WITHOUT ROWID
"""
_META = "CREATE TABLE IF NOT EXISTS edgesync_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
# Version 0 (edgesync before leases): attempt counted runs handed out, the current one included,
# started or not. Only the earlier ones are known to have started.
_MIGRATE_0 = (
    "ALTER TABLE edgesync_tasks ADD COLUMN owner_host TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE edgesync_tasks ADD COLUMN given_up REAL",
    "ALTER TABLE edgesync_tasks ADD COLUMN last_error TEXT",
    "UPDATE edgesync_tasks SET attempt = MAX(attempt - 1, 0)",
)

#: How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 5.0

#: The default lease (the ``durable_lease_ms`` setting).
LEASE_S = 30.0

#: The spool (see the module docstring) is written to SQLite every SPOOL_DELAY_S, or at once by the
#: SPOOL_BATCH-th task that ends meanwhile.
SPOOL_BATCH = 32
SPOOL_DELAY_S = 0.05

#: A spool: its header (the owner's host id), its slots per process (more pending tasks go to SQLite
#: directly), and the bytes of a slot (a task whose id, function and arguments take more goes to
#: SQLite directly too).
SPOOL_HEADER = 256
SPOOL_SLOTS = 1024
SPOOL_SLOT = 512
# A slot: recorded (1 byte), started (1), then the lengths of id, fn and args, max_attempts,
# accepted (time.time()), and the three texts. Each flag is its own byte, written by one thread.
_SLOT = struct.Struct("<BBBxHxxIId")

_OWNER_SQL = "owner_host = ? AND owner_pid = ? AND owner_start = ?"


class JournalError(RuntimeError):
    """The journal file cannot be used; the message names the file, the cause and what to do."""


class Entry(NamedTuple):
    """A row claimed from a dead owner, to be run again (or given up)."""

    id: str
    fn: str
    args: str
    runs: int  # runs started so far
    max_attempts: int
    dead_owner: str  # whose it was, for the log: "dead process 123", ...


class Row(NamedTuple):
    """A row as the operator sees it (``python -m edgesync durable list``): never its arguments."""

    id: str
    fn: str
    runs: int
    max_attempts: int
    accepted: float
    given_up: Optional[float]
    last_error: Optional[str]
    owner: str


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


def host_id() -> Tuple[str, bool]:
    """This process's host id, and whether it can prove here that a pid of that host is dead.

    The id is the kernel's boot id and the pid namespace (``/proc/self/ns/pid``): two
    containers on one machine, two machines, and one machine before and after a reboot
    all differ, so a pid is compared only with pids of the same namespace. A ``/proc``
    that is not this namespace's (``/proc/self`` is not ``os.getpid()``: a pid namespace
    without its own ``/proc`` mount) proves nothing: then only leases tell.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
        ours = os.readlink("/proc/self") == str(os.getpid())
    except OSError:  # not Linux: the host name, and psutil sees every process of this host
        import socket
        return "host:" + socket.gethostname(), True
    return "%s/%s" % (boot, ns), ours


def _user() -> str:
    try:
        import pwd
        return "%s (uid %d)" % (pwd.getpwuid(os.geteuid()).pw_name, os.geteuid())
    except (ImportError, KeyError):
        return "uid %d" % os.geteuid()


def spool_dir(path: str) -> str:
    """Where the spools of the processes that write journal ``path`` live."""
    return path + "-runs"


def _spool_name(host: str, pid: int, start: int) -> str:
    # The host id holds '/' and ':': a digest names it in a file name (the header holds it whole).
    return "%s-%d-%d" % (hashlib.sha1(host.encode()).hexdigest()[:16], pid, start)


class Spooled(NamedTuple):
    """A task as a dead owner's spool holds it."""

    id: str
    fn: str
    args: str
    max_attempts: int
    accepted: float
    recorded: bool  # its record is in the spool (maybe in SQLite too)
    started: bool  # a run started and had not ended with its row deleted


class Spool:
    """This process's spool (see the module docstring): ``SPOOL_SLOTS`` slots in a file mapped in memory.

    Slots are taken from and given back to a list (``list.pop``/``append`` are atomic);
    a slot's content is written before its flag, and each flag byte has one writer at a
    time, so a reader (a claimer after this process died) sees whole records.
    """

    def __init__(self, path: str, host: str):
        self.path = path
        size = SPOOL_HEADER + SPOOL_SLOTS * SPOOL_SLOT
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: only the pages written take room
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._mm[:SPOOL_HEADER] = host.encode()[:SPOOL_HEADER].ljust(SPOOL_HEADER, b"\0")
        self._free = list(range(SPOOL_SLOTS - 1, -1, -1))

    def put(self, task_id: str, fn: str, args: str, max_attempts: int, accepted: float,
            recorded: bool) -> Optional[int]:
        """Write a task into a free slot (flagged recorded, or started when only its run is marked);
        its slot, or None if it does not fit or no slot is free."""
        tid, f, a = task_id.encode(), fn.encode(), args.encode()
        size = _SLOT.size + len(tid) + len(f) + len(a)
        if size > SPOOL_SLOT or len(tid) > 255 or len(f) > 65535:
            return None
        try:
            slot = self._free.pop()
        except IndexError:
            return None
        at = SPOOL_HEADER + slot * SPOOL_SLOT
        _SLOT.pack_into(self._mm, at, 0, 0, len(tid), len(f), len(a), max_attempts, accepted)
        self._mm[at + _SLOT.size:at + size] = tid + f + a
        self._mm[at + (0 if recorded else 1)] = 1  # the flag last: a reader sees the record whole or not at all
        return slot

    def set(self, slot: int, flag: int, value: int) -> None:
        """Set flag 0 (recorded) or 1 (started) of a slot."""
        self._mm[SPOOL_HEADER + slot * SPOOL_SLOT + flag] = value

    def free(self, slot: int) -> None:
        at = SPOOL_HEADER + slot * SPOOL_SLOT
        self._mm[at:at + 2] = b"\0\0"
        self._free.append(slot)

    def idle(self) -> bool:
        return len(self._free) == SPOOL_SLOTS

    def close(self, remove: bool) -> None:
        """Unmap; ``remove``: and remove the file (nothing in it is pending any more)."""
        self._mm.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def read_spool(path: str, tasks: bool = True) -> Tuple[str, List[Spooled]]:
    """The host id and (``tasks``) the tasks in a spool file; ``("", [])`` if it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read() if tasks else f.read(SPOOL_HEADER)
    except FileNotFoundError:
        return "", []
    host = data[:SPOOL_HEADER].rstrip(b"\0").decode(errors="replace")
    found = []
    for at in range(SPOOL_HEADER, len(data) - _SLOT.size + 1, SPOOL_SLOT):
        recorded, started, n_id, n_fn, n_args, max_attempts, accepted = _SLOT.unpack_from(data, at)
        if not (recorded or started):
            continue
        a = at + _SLOT.size
        b, c = a + n_id, a + n_id + n_fn
        found.append(Spooled(data[a:b].decode(errors="replace"), data[b:c].decode(errors="replace"),
                             data[c:c + n_args].decode(errors="replace"), max_attempts, accepted, bool(recorded),
                             bool(started)))
    return host, found


class Journal:
    """One journal file, as seen from this process. See the module docstring.

    ``app`` (the gunicorn app, ``module:variable``) is written into a new file and must
    match an existing file's; None (outside gunicorn) neither writes nor checks it.
    ``owner=False`` (the operator's command line, the check before fork) opens the file
    without holding a lease, and ``create=False`` fails if the file does not exist.
    """

    def __init__(self, path: str, app: Optional[str] = None, lease_s: float = LEASE_S, *,
                 owner: bool = True, create: bool = True):
        self.path = path
        self.app = app
        self.lease_s = lease_s
        self._is_owner = owner
        self._create = create
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._owner: Tuple[str, int, int] = ("", 0, 0)
        self._proof = False  # whether this process can prove a pid of its host dead
        self._file: Tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file this connection opened
        self._lease_until = 0.0
        self._spool: Optional[Spool] = None
        self._spool_pid = 0  # the process whose spool _spool is (a spool never crosses a fork)
        self._spool_lock = threading.Lock()  # the four below
        self._slots: Dict[str, int] = {}  # task id -> its slot in the spool
        self._unwritten: Dict[str, Tuple[str, str, int, float]] = {}  # recorded in the spool only
        self._ended: List[str] = []  # ended tasks whose rows are in SQLite (or on their way there)
        #: Set when the spool holds something for SQLite: the journal's thread writes it SPOOL_DELAY_S later.
        self.dirty = threading.Event()

    # -- opening -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; the caller holds ``self._lock``."""
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            # A connection inherited through fork belongs to the parent: never use or close it here.
            self._conn = None
            target = self.path if self._create else "file:%s?mode=rw" % urllib.parse.quote(self.path)
            conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False, uri=not self._create)
            try:
                self._setup(conn, pid)
            except BaseException:  # why: the connection is not kept, whatever failed; the error goes on
                conn.close()
                raise
            self._conn, self._pid = conn, pid
        return self._conn

    def _setup(self, conn: sqlite3.Connection, pid: int) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError("cannot use WAL mode (journal_mode is %r)" % mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != VERSION:
            self._migrate(conn)
        if self.app is not None:
            self._check_app(conn)
        st = os.stat(self.path)
        self._file = (st.st_dev, st.st_ino)
        host, self._proof = host_id()
        start = process_start(pid) if self._proof else None
        self._owner = (host, pid, start if start is not None else int(time.time() * 1000))
        if self._is_owner:
            self._renew(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see the new version
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                raise JournalError("%s was written by a newer edgesync (journal version %d; this one reads "
                                   "version %d): upgrade edgesync here" % (self.path, version, VERSION))
            if version == 0:
                old = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'edgesync_tasks'").fetchone()
                if old:
                    for statement in _MIGRATE_0:
                        conn.execute(statement)
                else:
                    conn.execute(_TASKS)
                conn.execute(_OWNERS)
                conn.execute(_META)
                conn.execute("PRAGMA user_version = %d" % VERSION)
            conn.execute("COMMIT")
        except BaseException:  # why: whatever failed, the transaction must not stay open; the error goes on
            conn.execute("ROLLBACK")
            raise

    def _check_app(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM edgesync_meta WHERE key = 'app'").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO edgesync_meta VALUES ('app', ?)", (self.app,))
            row = conn.execute("SELECT value FROM edgesync_meta WHERE key = 'app'").fetchone()
        if row[0] != self.app:
            raise JournalError(
                "durable_journal %s belongs to the app %r, not %r: one journal serves one app, whose "
                "processes can import its tasks (another app would give them up). Give this app its own "
                "durable_journal file; if it is the same app under a new name, run `python -m edgesync durable "
                "adopt %s --journal %s`" % (self.path, row[0], self.app, shlex.quote(str(self.app)), self.path))

    def open(self) -> None:
        """Open (create, migrate) the file now, so that an unusable file fails early: ``JournalError``."""
        try:
            with self._lock:
                self._connection()
        except JournalError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(explain(self.path, exc)) from exc

    def close(self) -> None:
        """Write what the spool holds and close this process's connection (the next call opens it again).

        The spool goes with it when nothing in it is pending; a task still running keeps
        its slot, so that a claimer after this process's exit counts its run.
        """
        try:
            self.flush()
        finally:
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():
                    self._conn.close()
                self._conn = None
            with self._spool_lock:
                if self._spool is not None and self._spool_pid == os.getpid() and self._spool.idle():
                    self._spool.close(remove=True)
                    self._spool, self._spool_pid = None, 0

    def reopen(self) -> None:
        """After ``replaced()``: open the file at the path now, creating it if it is gone.

        A deleted journal may leave its ``-wal`` and ``-shm`` files, which processes that
        have not noticed yet still write: a new file must not start from them. So the
        first process to notice, holding a lock on the directory, moves them out of the
        way and creates the file; the others then find it and just open it.
        """
        # Under this process's lock throughout: no other thread opens the path in between.
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            directory = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                fcntl.flock(directory, fcntl.LOCK_EX)
                if not os.path.exists(self.path):
                    for stale in (self.path + "-wal", self.path + "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(stale)  # its writers keep their open inode; the new file gets its own
                self._connection()
            finally:
                os.close(directory)  # releases the flock

    def replaced(self) -> Optional[str]:
        """None while the path still names the file this process writes; else what happened to it."""
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                return None
            opened = self._file
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        if (st.st_dev, st.st_ino) != opened:
            return "replaced by another file"
        return None

    # -- a task's life ---------------------------------------------------------------------------

    def _my_spool(self) -> Optional[Spool]:
        """This process's spool, made on first use; None for a journal that holds no lease (the CLI)."""
        if self._spool_pid == os.getpid():
            return self._spool
        with self._spool_lock:
            if self._spool_pid != os.getpid():
                self._spool, self._slots, self._unwritten, self._ended = None, {}, {}, []
                if self._is_owner:
                    with self._lock:
                        self._connection()  # this process's owner triple and lease
                    directory = spool_dir(self.path)
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                    self._spool = Spool(os.path.join(directory, _spool_name(*self._owner)), self._owner[0])
                self._spool_pid = os.getpid()
        return self._spool

    def record(self, task_id: str, fn: str, args: str, max_attempts: int, runs: int = 0) -> None:
        """Record a task this process holds, which has started ``runs`` runs so far (0: a new task).

        A task already in the spool is recorded again (a journal found deleted) into SQLite,
        unless its record is still waiting there for the next write.
        """
        if task_id in self._unwritten:
            return
        spool = self._my_spool() if runs == 0 and task_id not in self._slots else None
        if spool is not None:
            accepted = time.time()
            slot = spool.put(task_id, fn, args, max_attempts, accepted, recorded=True)
            if slot is not None:
                with self._spool_lock:
                    self._slots[task_id] = slot
                    self._unwritten[task_id] = (fn, args, max_attempts, accepted)
                if not self.dirty.is_set():
                    self.dirty.set()
                return
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_host, owner_pid, "
                "owner_start, accepted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task_id, fn, args, runs, max_attempts, *self._owner, time.time()))

    def _written(self, task_id: str) -> None:
        """Make sure the task's record is in SQLite (a statement on its row follows)."""
        if task_id in self._unwritten:
            self.flush()

    def start(self, task_id: str) -> Optional[int]:
        """Count a run of a row this process holds in SQLite; its run number, or None if it no longer holds it."""
        self._written(task_id)
        with self._lock:
            conn = self._connection()
            row = conn.execute("UPDATE edgesync_tasks SET attempt = attempt + 1 WHERE id = ? AND given_up IS NULL "
                               "AND " + _OWNER_SQL + " RETURNING attempt", (task_id, *self._owner)).fetchone()
        return None if row is None else int(row[0])

    def mark(self, task_id: str) -> bool:
        """Mark the start of a run of a task this process holds, in the spool; whether it was marked.

        False when it cannot be: this process's lease is not comfortably valid (a server
        sharing the journal may have claimed the row), or the spool has no room. The caller
        then counts the run with ``start``, which checks the row is still held.
        """
        spool = self._my_spool()
        if spool is None or time.time() > self._lease_until - self.lease_s / 3:
            return False
        slot = self._slots.get(task_id)
        if slot is not None:
            spool.set(slot, 1, 1)
            return True
        slot = spool.put(task_id, "", "", 0, 0.0, recorded=False)
        if slot is None:
            return False
        with self._spool_lock:
            self._slots[task_id] = slot
        return True

    def end(self, task_id: str) -> None:
        """The task ended: its row goes (with others, up to ``SPOOL_DELAY_S`` later), then its slot."""
        with self._spool_lock:
            if self._unwritten.pop(task_id, None) is not None:
                # Never written to SQLite: nothing to delete there.
                slot = self._slots.pop(task_id, None)
                if slot is not None and self._spool is not None:
                    self._spool.free(slot)
                return
            self._ended.append(task_id)
            batch = len(self._ended) >= SPOOL_BATCH
        if batch:
            self.flush()
        elif not self.dirty.is_set():
            self.dirty.set()

    def flush(self) -> None:
        """Write what the spool holds to SQLite now: the records of pending tasks, the deletes of ended ones."""
        with self._spool_lock:
            self.dirty.clear()
            unwritten, self._unwritten = self._unwritten, {}
            ended, self._ended = self._ended, []
            spool = self._spool if self._spool_pid == os.getpid() else None
        if not (unwritten or ended):
            return
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if unwritten:
                        conn.executemany(
                            "INSERT OR IGNORE INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_host, "
                            "owner_pid, owner_start, accepted) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
                            [(task_id, fn, args, max_attempts, *self._owner, accepted)
                             for task_id, (fn, args, max_attempts, accepted) in unwritten.items()])
                    if ended:
                        conn.execute("DELETE FROM edgesync_tasks WHERE id IN (%s)" % ",".join("?" * len(ended)), ended)
                    conn.execute("COMMIT")
                except BaseException:  # why: whatever failed, the transaction must not stay open
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:  # why: not written, whatever stopped it: it waits for the next flush, then the error
            with self._spool_lock:
                for task_id, record in unwritten.items():
                    self._unwritten.setdefault(task_id, record)
                self._ended[:0] = ended
                self.dirty.set()
            raise
        with self._spool_lock:
            if spool is not None:
                for task_id in unwritten:
                    slot = self._slots.get(task_id)
                    if slot is not None:
                        spool.set(slot, 0, 0)  # in SQLite now: a claimer need not insert it
                for task_id in ended:
                    slot = self._slots.pop(task_id, None)
                    if slot is not None:
                        spool.free(slot)

    def forget(self, task_id: str) -> None:
        """The task is no longer this process's (given up, handed off): its slot goes, its row stays."""
        with self._spool_lock:
            slot = self._slots.pop(task_id, None)
            if slot is not None and self._spool is not None:
                self._spool.free(slot)

    def delete(self, task_id: str) -> None:
        """Delete the task's record now (it was not accepted after all, or it was handed off)."""
        with self._spool_lock:
            unwritten = self._unwritten.pop(task_id, None) is not None
        if not unwritten:
            with self._lock:
                self._connection().execute("DELETE FROM edgesync_tasks WHERE id = ?", (task_id,))
        self.forget(task_id)

    def set_attempt(self, task_id: str, attempt: int) -> None:
        """The task's runs that ended are ``attempt`` (a retry after an exception)."""
        self._written(task_id)
        with self._lock:
            self._connection().execute("UPDATE edgesync_tasks SET attempt = ? WHERE id = ?", (attempt, task_id))

    def release(self, task_id: str) -> None:
        """Give a claimed row back, unrun (owner 0 is never alive): another claim takes it."""
        self._written(task_id)
        with self._lock:
            self._connection().execute("UPDATE edgesync_tasks SET owner_pid = 0, owner_start = 0, owner_host = '' "
                                       "WHERE id = ?", (task_id,))

    def give_up(self, task_id: str, error: str) -> None:
        """Keep the row, given up: no claim takes it again until an operator re-queues it."""
        self._written(task_id)
        with self._lock:
            self._connection().execute(
                "UPDATE edgesync_tasks SET given_up = ?, last_error = ?, owner_pid = 0, owner_start = 0, "
                "owner_host = '' WHERE id = ?", (time.time(), error[:2000], task_id))
        self.forget(task_id)

    # -- owners and claims -------------------------------------------------------------------------

    def _renew(self, conn: sqlite3.Connection) -> bool:
        now = time.time()
        lapsed = self._lease_until != 0.0 and now > self._lease_until
        if now < self._lease_until - self.lease_s * 2 / 3:
            return False  # renewed less than a third of a lease ago
        self._lease_until = now + self.lease_s
        conn.execute("INSERT INTO edgesync_owners VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET lease = excluded.lease",
                     (*self._owner, self._lease_until))
        return lapsed

    def renew(self) -> bool:
        """Extend this process's lease; True if it had expired (another host may have claimed its rows)."""
        with self._lock:
            conn = self._connection()
            return self._renew(conn)

    def _alive(self, host: str, pid: int, start: int, lease: Optional[float], now: float) -> bool:
        if pid == 0:
            return False
        if self._proof and host in ("", self._owner[0]):  # '': a row of a version-0 file, written on this host
            return process_start(pid) == start
        return lease is not None and lease >= now

    def claim(self, limit: int) -> List[Entry]:
        """Take up to ``limit`` pending tasks whose owner is dead or whose lease expired, oldest first.

        A dead owner's spool is read in the same transaction: its records are inserted
        (they may be in no row yet), its started runs counted; the file goes once the owner
        holds nothing more.
        """
        if limit <= 0:
            return []
        now = time.time()
        with self._lock:
            conn = self._connection()
            owners = {(h, p, s): lease for h, p, s, lease in conn.execute(
                "SELECT DISTINCT t.owner_host, t.owner_pid, t.owner_start, o.lease FROM edgesync_tasks t "
                "LEFT JOIN edgesync_owners o ON o.host = t.owner_host AND o.pid = t.owner_pid "
                "AND o.start = t.owner_start WHERE t.given_up IS NULL").fetchall()}
            me = self._owner
        spools = self._spools(owners, me)
        dead = [owner for owner, lease in owners.items()
                if owner != me and not self._alive(*owner, lease, now)]
        claimed: List[Entry] = []
        for host, pid, start in dead:
            if len(claimed) >= limit:
                break
            who = ("no owner (released or re-queued)" if pid == 0
                   else "dead process %d" % pid if self._proof and host in ("", me[0])
                   else "process %d of host %s, whose lease expired" % (pid, host or "?"))
            path = spools.get((host, pid, start))
            spooled = read_spool(path)[1] if path else []
            started = {t.id for t in spooled if t.started}
            want = limit - len(claimed)
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "INSERT OR IGNORE INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_host, "
                        "owner_pid, owner_start, accepted) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
                        [(t.id, t.fn, t.args, t.max_attempts, host, pid, start, t.accepted)
                         for t in spooled if t.recorded])
                    # A started run that did not end is counted here (see the module docstring).
                    rows = conn.execute(
                        "UPDATE edgesync_tasks SET owner_host = ?, owner_pid = ?, owner_start = ?, "
                        "attempt = attempt + (instr(?, ',' || id || ',') > 0) "
                        "WHERE id IN (SELECT id FROM edgesync_tasks WHERE " + _OWNER_SQL + " AND given_up IS NULL "
                        "ORDER BY accepted LIMIT ?) RETURNING id, fn, args, attempt, max_attempts, accepted",
                        (*me, "," + ",".join(started) + ",", host, pid, start, want)).fetchall()
                    conn.execute("COMMIT")
                except BaseException:  # why: whatever failed, the transaction must not stay open
                    conn.execute("ROLLBACK")
                    raise
            if path and len(rows) < want:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # its tasks are all taken: it holds nothing any more
            # RETURNING comes in the table's order (by id): re-run them in the order they were accepted.
            rows.sort(key=lambda r: r[5])
            claimed.extend(Entry(r[0], r[1], r[2], r[3], r[4], who) for r in rows)
        with self._lock:
            # Owners whose lease expired and who hold nothing any more are forgotten.
            self._connection().execute(
                "DELETE FROM edgesync_owners WHERE lease < ? AND NOT EXISTS (SELECT 1 FROM edgesync_tasks t "
                "WHERE t.owner_host = host AND t.owner_pid = pid AND t.owner_start = start)", (now,))
        return claimed

    def _spools(self, owners: Dict[Tuple[str, int, int], Optional[float]],
                me: Tuple[str, int, int]) -> Dict[Tuple[str, int, int], str]:
        """The spool files of other processes, by owner; their owners join ``owners`` (with their leases)."""
        directory = spool_dir(self.path)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return {}
        mine = _spool_name(*me)
        found: Dict[Tuple[str, int, int], str] = {}
        for name in names:
            try:
                pid, start = (int(x) for x in name.rsplit("-", 2)[1:])
            except ValueError:
                continue  # not a spool
            if name == mine:
                continue
            path = os.path.join(directory, name)
            host, _ = read_spool(path, tasks=False)  # every second, for every live sibling too: its header only
            owner = (host, pid, start)
            found[owner] = path
            if owner not in owners:  # it holds no row (yet): its lease tells whether it lives
                with self._lock:
                    row = self._connection().execute("SELECT lease FROM edgesync_owners WHERE host = ? AND pid = ? "
                                                     "AND start = ?", owner).fetchone()
                owners[owner] = row[0] if row else None
        return found

    def counts(self) -> Dict[str, int]:
        """Pending rows in the whole journal, those this process holds, and the given-up ones."""
        with self._lock:
            conn = self._connection()
            total, mine, given_up = conn.execute(
                "SELECT COALESCE(SUM(given_up IS NULL), 0), COALESCE(SUM(given_up IS NULL AND " + _OWNER_SQL
                + "), 0), COALESCE(SUM(given_up IS NOT NULL), 0) FROM edgesync_tasks", self._owner).fetchone()
        # With this process's records still only in its spool (other processes' are not seen here).
        spooled = len(self._unwritten) if self._spool_pid == os.getpid() else 0
        return {"total": int(total) + spooled, "mine": int(mine) + spooled, "given_up": int(given_up)}

    # -- the operator's view (python -m edgesync durable) -----------------------------------------------

    def owner_app(self) -> Optional[str]:
        with self._lock:
            row = self._connection().execute("SELECT value FROM edgesync_meta WHERE key = 'app'").fetchone()
        return None if row is None else str(row[0])

    def set_owner_app(self, app: Optional[str]) -> None:
        with self._lock:
            conn = self._connection()
            if app is None:
                conn.execute("DELETE FROM edgesync_meta WHERE key = 'app'")
            else:
                conn.execute("INSERT OR REPLACE INTO edgesync_meta VALUES ('app', ?)", (app,))

    def rows(self, given_up: bool) -> List[Row]:
        with self._lock:
            found = self._connection().execute(
                "SELECT id, fn, attempt, max_attempts, accepted, given_up, last_error, owner_host, owner_pid "
                "FROM edgesync_tasks WHERE given_up IS %s ORDER BY COALESCE(given_up, accepted), id"
                % ("NOT NULL" if given_up else "NULL")).fetchall()
        return [Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                    "-" if r[8] == 0 else "pid %d%s" % (r[8], " on " + r[7] if r[7] else "")) for r in found]

    def requeue(self, ids: Optional[Sequence[str]]) -> List[str]:
        """Given-up rows (``ids``, or all) become pending again with a fresh count of runs; the ids."""
        return self._given_up_op("UPDATE edgesync_tasks SET given_up = NULL, attempt = 0, owner_pid = 0, "
                                 "owner_start = 0, owner_host = ''", ids)

    def purge(self, ids: Optional[Sequence[str]]) -> List[str]:
        """Delete given-up rows (``ids``, or all); the ids deleted."""
        return self._given_up_op("DELETE FROM edgesync_tasks", ids)

    def _given_up_op(self, statement: str, ids: Optional[Sequence[str]]) -> List[str]:
        where = " WHERE given_up IS NOT NULL"
        params: Tuple[str, ...] = ()
        if ids is not None:
            where += " AND id IN (%s)" % ",".join("?" * len(ids))
            params = tuple(ids)
        with self._lock:
            rows = self._connection().execute(statement + where + " RETURNING id", params).fetchall()
        return sorted(r[0] for r in rows)


def explain(path: str, exc: BaseException) -> str:
    """``durable_journal <path>: <cause>. <what to do>`` for an error opening the journal."""
    text = str(exc)
    low = text.lower()
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        fix = ("the file is not a usable SQLite journal (corrupt, or another program's file). Move it aside "
               "(it may still hold tasks: inspect it with the sqlite3 tool) and start again: a new journal is "
               "created")
    elif "readonly" in low or "read-only" in low or "unable to open" in low or "permission" in low \
            or isinstance(exc, PermissionError):
        directory = os.path.dirname(path) or "."
        fix = ("the workers, running as %s, must be able to create and write the file, its -wal and -shm files "
               "beside it, so its directory %s must be writable by them and on a writable filesystem: fix the "
               "permissions or the mount, or point durable_journal somewhere writable" % (_user(), directory))
    else:
        fix = "check the file and its directory, or point durable_journal at another file"
    return "durable_journal %s: %s: %s. %s" % (path, type(exc).__name__, text, fix[0].upper() + fix[1:])


def check(path: str, app: Optional[str]) -> Dict[str, int]:
    """Open, verify (``PRAGMA quick_check``), migrate and close the journal; its counts, or ``JournalError``.

    Run in the gunicorn master before any worker forks, as the user the workers run as, so
    that a journal the workers could not use stops the server with one message.
    """
    journal = Journal(path, app, owner=False)
    try:
        journal.open()
        with journal._lock:
            conn = journal._connection()
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise JournalError(explain(path, sqlite3.DatabaseError("database disk image is malformed: %s"
                                                                       % "; ".join(problems[:3]))))
            # A write, as the workers will: a read-only file or filesystem fails here, not in a request.
            conn.execute("INSERT OR REPLACE INTO edgesync_meta VALUES ('checked', ?)", (str(time.time()),))
        return journal.counts()
    except sqlite3.Error as exc:
        raise JournalError(explain(path, exc)) from exc
    finally:
        journal.close()
