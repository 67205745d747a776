"""The journal file itself: migration of old files, leases across hosts, the operator's command line.

No gunicorn here (tests/test_durable_seams.py has the servers): real SQLite files, real
child processes, the command line run as ``python -m edgesync``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from edgesync import _recovery
from edgesync._journal import Journal, JournalError, check, host_id
from edgesync.testing import runtime

from .apps import durable_tasks
from .support import REPO, wait_for

DEAD_PID = 2**22 + 1  # above pid_max here: never alive

# The schema of the journal files edgesync wrote before version 1 (user_version 0).
VERSION_0 = """
CREATE TABLE IF NOT EXISTS edgesync_tasks (
    id TEXT PRIMARY KEY,
    fn TEXT NOT NULL,
    args TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL,
    accepted REAL NOT NULL
) WITHOUT ROWID
"""


@pytest.fixture(autouse=True)
def fresh_tasks() -> Iterator[None]:
    durable_tasks.ran.clear()
    durable_tasks.gate.set()
    yield
    durable_tasks.ran.clear()


def test_a_journal_of_the_previous_version_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(VERSION_0)
    # What the old code left: attempt counted the runs handed out, the current one (maybe never started) too.
    now = time.time()
    conn.executemany("INSERT INTO edgesync_tasks VALUES (?, 'tests.apps.durable_tasks:note', ?, ?, 3, ?, 1, ?)",
                     [("a", '[["a",{}],{}]', 1, DEAD_PID, now), ("b", '[["b",{}],{}]', 3, DEAD_PID, now)])
    conn.commit()
    conn.close()
    assert check(str(path), None) == {"total": 2, "mine": 0, "given_up": 0}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    assert conn.execute("SELECT id, attempt, owner_host, given_up FROM edgesync_tasks ORDER BY id").fetchall() == [
        ("a", 0, "", None), ("b", 2, "", None)]
    conn.close()
    with runtime(durable_journal=str(path)) as rt:
        assert _recovery._keeper(rt.runtime).claim_once() == 2
        wait_for(lambda: len(durable_tasks.ran) == 2, 10, "both migrated tasks to run")
        rt.wait(5)
    assert sorted((r["id"], r["attempt"]) for r in durable_tasks.ran) == [("a", 1), ("b", 3)]


def test_a_journal_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(JournalError, match=r"new\.db was written by a newer edgesync \(journal version 7"):
        check(str(path), None)


def insert(path: Path, task_id: str, host: str, pid: int, lease: float) -> None:
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO edgesync_tasks (id, fn, args, attempt, max_attempts, owner_host, owner_pid, "
                 "owner_start, accepted) VALUES (?, 'tests.apps.durable_tasks:note', ?, 1, 3, ?, ?, 5, ?)",
                 (task_id, '[["%s",{}],{}]' % task_id, host, pid, time.time()))
    conn.execute("INSERT INTO edgesync_owners VALUES (?, ?, 5, ?)", (host, pid, lease))
    conn.commit()
    conn.close()


def test_an_owner_of_another_host_is_alive_while_its_lease_lasts(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    check(str(path), None)
    here, proof = host_id()
    assert proof and here.count("/pid:[") == 1
    # Pids of another pid namespace or machine mean nothing here: a pid that is not visible here (or is
    # this very process's) must not decide. The lease does.
    insert(path, "live", "other-boot/pid:[1]", DEAD_PID, time.time() + 60)
    insert(path, "expired", "other-boot/pid:[1]", os.getpid(), time.time() - 1)
    journal = Journal(str(path))
    try:
        claimed = journal.claim(10)
        assert [(e.id, e.runs, e.dead_owner) for e in claimed] == [
            ("expired", 1, "process %d of host other-boot/pid:[1], whose lease expired" % os.getpid())]
        assert journal.claim(10) == []
        assert journal.counts() == {"total": 2, "mine": 1, "given_up": 0}
    finally:
        journal.close()


def test_an_owner_in_a_real_pid_namespace_is_judged_by_its_lease(tmp_path: Path) -> None:
    if os.geteuid() != 0 or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                           capture_output=True).returncode != 0:
        pytest.skip("unshare --pid needs root here")
    path = tmp_path / "j.db"
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from edgesync._journal import Journal, host_id\n"
              "j = Journal(%r, lease_s=3.0); j.record('ns', 'tests.apps.durable_tasks:note', '[[\"ns\"],{}]', 3)\n"
              "print(host_id()[0], j._owner[1], flush=True); sys.stdin.readline()\n"
              "print(j.start('ns'), flush=True)\n" % (str(REPO), str(path)))
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        host, pid = proc.stdout.readline().split()
        assert host != host_id()[0] and int(pid) < 10  # pid 1 or so, over there: alive, but not visible here
        journal = Journal(str(path))
        assert journal.claim(10) == [], "a live owner in another namespace keeps its task"
        wait_for(lambda: journal.claim(10), 8, "the lease (3 s, not renewed) to expire")
        # The owner wakes up (it was stopped): its task is another process's now, it must not start it.
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "None\n"
        journal.close()
    finally:
        proc.kill()
        proc.communicate(timeout=5)


# -- python -m edgesync durable ------------------------------------------------------------------------


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "edgesync", "durable", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env=clean)


def test_the_command_line_finds_the_journal_as_the_server_does(tmp_path: Path) -> None:
    none = cli(tmp_path, "list")
    assert none.returncode == 2 and "no journal: pass --journal PATH" in none.stderr
    (tmp_path / "edgesync.toml").write_text('[edge_runtime]\ndurable_journal = "j.db"\n')
    missing = cli(tmp_path, "list")
    assert missing.returncode == 1 and "durable_journal %s does not exist" % (tmp_path / "j.db") in missing.stderr
    assert not (tmp_path / "j.db").exists(), "the command line never creates a journal"
    check(str(tmp_path / "j.db"), "shop:app")
    listed = cli(tmp_path, "list", "--pending")
    assert (listed.returncode, listed.stdout) == (0, "0 pending task(s) in %s (app shop:app)\n" % (tmp_path / "j.db"))
    with pytest.raises(JournalError, match="belongs to the app 'shop:app', not 'blog:app'"):
        check(str(tmp_path / "j.db"), "blog:app")
    adopted = cli(tmp_path, "adopt", "blog:app")
    assert adopted.returncode == 0 and "now belongs to the app 'blog:app' (was 'shop:app')" in adopted.stdout
    check(str(tmp_path / "j.db"), "blog:app")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"x" * 4096)
    bad = cli(tmp_path, "list", "--journal", str(garbage))
    assert bad.returncode == 1 and "file is not a database" in bad.stderr and "Move it aside" in bad.stderr
    assert cli(tmp_path, "purge", "x", "--all").returncode == 2
