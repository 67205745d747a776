"""The durable contract where a task leaves its first run: real gunicorn, real signals, a real journal.

Each case reconciles every durable id the app accepted (tests/test_durable_faults.py's
tally): completed at least once, never two runs of one id alive at once, none lost; and
prints its figures (``-s``). What each case shows:

- an attempt is a run: tasks queued behind a task that kills its worker still run;
- a given-up task is kept, and an operator lists, re-queues and purges it;
- a journal the workers could not use stops the server before it forks;
- a journal deleted while serving is recreated with every pending task;
- one journal, one app: another app refuses to start on it;
- servers in two pid namespaces sharing a journal never take each other's live tasks;
- ``max_pending_tasks = 1`` still re-runs a dead worker's task;
- a task whose function a deploy no longer declares ``@durable`` is given up, and the rest run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from .fault_suite import all_done, durable_tally, plant, runs_at_once, stop_cleanly
from .support import REPO, Server, journal_runs, journal_tasks, wait_for

COLUMNS = "id, fn, attempt, given_up IS NOT NULL, last_error"

APP = "tests.apps.durable_seams:app"

pytestmark = pytest.mark.slow


def start(server_factory: Callable[..., Server], env: Dict[str, str], *args: str, workers: int = 2,
          app: str = APP) -> Server:
    server = server_factory("--workers", str(workers), "--threads", "4", *args, app=app, env=env,
                            workers_ready=workers)
    if "EVENTS_FILE" in env:  # servers one after another on one journal share their record of events
        server.events_path = Path(env["EVENTS_FILE"])
    return server


def cli(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesync", "durable", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd or REPO)


def check_log(server: Server) -> None:
    log = server.log
    assert "WORKER TIMEOUT" not in log
    assert "Reason:" not in log, "the master halted:\n" + log
    assert "Traceback (most recent call last)" not in log, log


# -- an attempt is a run; given up is kept ------------------------------------------------------------


def test_tasks_queued_behind_a_task_that_kills_its_worker_still_run(server_factory: Callable[..., Server],
                                                                     tmp_path: Path) -> None:
    flag = tmp_path / "poison-on"
    flag.touch()
    journal = tmp_path / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal), "EDGESYNC_BACKGROUND_THREADS": "1",
           "EDGESYNC_DURABLE_MAX_ATTEMPTS": "2", "POISON_FLAG": str(flag)}
    server = start(server_factory, env)
    victim = server.worker_pids()[0]
    # One thread per worker: the poison runs first, four innocent tasks wait behind it, on every worker
    # that claims them (the poison kills each one: its 2 runs, then it is given up). Every task gets 2 runs.
    poison = plant(server, victim, "fn=poison&delay=1.5")
    innocent = plant(server, victim, "fn=work&first=0.05&rerun=0.05&n=4")
    server.wait_for_log(r"gave up durable task \w+ \(tests\.apps\.durable_seam_tasks:poison\) after 2 run\(s\): "
                        r"its 2 run\(s\) all ended with their process", timeout=30)
    wait_for(all_done(server, also=lambda t: set(poison)), 30, "the four innocent tasks to complete")
    stop_cleanly(server)
    check_log(server)
    tally = durable_tally(server)
    tally.kept = set(poison)
    tally.show("4 tasks queued behind a task that kills its worker")
    assert set(innocent) <= set(tally.done) and tally.at_once == set()
    starts = [e for e in server.events("durable_start") if e["id"] in innocent]
    assert sorted(e["attempt"] for e in starts) == [1, 1, 1, 1], "each innocent task ran once: its first run"
    (row,) = journal_tasks(journal, COLUMNS)
    assert row[1:4] == ("tests.apps.durable_seam_tasks:poison", 2, 1)


def test_tasks_queued_across_two_restarts_are_not_given_up(server_factory: Callable[..., Server],
                                                           tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal), "EVENTS_FILE": str(tmp_path / "events.jsonl"),
           "EDGESYNC_BACKGROUND_THREADS": "1", "EDGESYNC_DURABLE_MAX_ATTEMPTS": "2"}
    server = start(server_factory, env, workers=1)
    planted = plant(server, server.worker_pids()[0], "first=4&rerun=4&n=10")
    for restart in range(2):  # the whole server dies with one task running, the others queued behind it
        server.wait_for_events("durable_start", count=restart + 1)
        server.kill()
        if restart == 0:
            server = start(server_factory, env, workers=1)
    # The first task was running both times: its 2 runs; the nine behind it never started: no run.
    assert sorted(journal_runs(journal, by="id").values()) == [0] * 9 + [2]
    final = start(server_factory, {**env, "EDGESYNC_BACKGROUND_THREADS": "16"})
    final.wait_for_log(r"gave up durable task \w+ \(tests\.apps\.durable_tasks:work\) after 2 run\(s\)")
    wait_for(all_done(final, also=lambda t: {planted[0]}), 30, "the nine other tasks to complete")
    stop_cleanly(final)
    check_log(final)
    tally = durable_tally(final)
    tally.kept = {planted[0]}
    tally.show("10 tasks queued across two restarts (max_attempts = 2)")
    assert final.log.count("gave up durable task") == 1
    assert tally.lost == set() and tally.at_once == set() and set(planted[1:]) <= set(tally.done)
    assert [r[2:4] for r in journal_tasks(journal, COLUMNS)] == [(2, 1)]


def test_a_given_up_task_is_kept_listed_requeued_and_purged(server_factory: Callable[..., Server],
                                                            tmp_path: Path) -> None:
    from .support import StatsdListener
    flag = tmp_path / "poison-on"
    flag.touch()
    journal = tmp_path / "journal.db"
    statsd = StatsdListener()
    try:
        server = start(server_factory, {"EDGESYNC_DURABLE_JOURNAL": str(journal), "POISON_FLAG": str(flag)},
                       "--statsd-host", "127.0.0.1:%d" % statsd.port, "--statsd-prefix", "app")
        (poison,) = plant(server, server.worker_pids()[0], "fn=poison&delay=0.2")
        server.wait_for_log(r"gave up durable task .* kept in .*journal\.db: see `python -m edgesync durable list`")
        statsd.wait_for("app.edgesync.durable.given_up:1|c", "app.edgesync.durable.journal_given_up:1|g")
        metrics = server.get_json("/metrics")["durable"]
        assert metrics["journal_given_up"] == 1 and metrics["journal_pending"] == 0
        assert poison not in server.log, "a task's arguments are never logged"

        listed = cli("list", "--journal", str(journal))
        assert listed.returncode == 0, listed
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["ID", "FUNCTION", "RUNS", "GIVEN", "UP", "(UTC)", "LAST", "ERROR"]
        assert re.match(r"\w+ +tests\.apps\.durable_seam_tasks:poison +2/2 +[\d-]+ [\d:]+ +its 2 run\(s\) all "
                        r"ended with their process", lines[1]), listed.stdout
        assert lines[-1] == "1 given-up task(s) in %s (app %s)" % (journal, APP)
        assert poison not in listed.stdout
        durable_id = lines[1].split()[0]

        # The cause is fixed (the flag is gone): re-queued, a live worker runs it, and it is done.
        flag.unlink()
        requeued = cli("requeue", durable_id, "--journal", str(journal))
        assert requeued.returncode == 0 and requeued.stdout.startswith("re-queued %s\n" % durable_id), requeued
        server.wait_for_events("durable_done", where=lambda e: e["id"] == poison)
        wait_for(lambda: journal_tasks(journal, COLUMNS) == [], 10, "the re-queued task's row to go")
        assert cli("list", "--journal", str(journal)).stdout.endswith("0 given-up task(s) in %s (app %s)\n"
                                                                      % (journal, APP))

        # Given up again, then purged for good.
        flag.touch()
        plant(server, server.worker_pids()[0], "fn=poison&delay=0.2")
        wait_for(lambda: [r for r in journal_tasks(journal, COLUMNS) if r[3]], 30, "the second task to be given up")
        assert cli("requeue", "--journal", str(journal)).returncode == 2  # ids or --all
        wrong = cli("purge", "no-such-id", "--journal", str(journal))
        assert wrong.returncode == 1 and "no given-up task no-such-id" in wrong.stderr
        purged = cli("purge", "--all", "--journal", str(journal))
        assert purged.returncode == 0 and purged.stdout.endswith("1 task(s) purged\n"), purged
        assert journal_tasks(journal, COLUMNS) == []
        stop_cleanly(server)
    finally:
        statsd.close()


# -- the journal: checked before fork, owned by one app ---------------------------------------------------


def run_gunicorn(workdir: Path, env: Dict[str, str], *args: str, prefix: Sequence[str] = (),
                 app: str = APP) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    return subprocess.run([*prefix, sys.executable, "-m", "gunicorn", "-k", "edgesync.Worker", "-b", "127.0.0.1:0",
                           "--no-control-socket", "--pythonpath", str(REPO), *args, app],
                          cwd=workdir, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a root-owned directory, a read-only bind mount)")


@pytest.mark.parametrize("case", ["corrupt", "read_only_mount", "user_nobody"])
def test_a_journal_the_workers_cannot_use_stops_the_server(tmp_path: Path, case: str) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    journal = directory / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal)}
    args: List[str] = []
    prefix: Sequence[str] = ()
    if case == "corrupt":
        journal.write_bytes(os.urandom(8192))
        cause, fix = "DatabaseError: file is not a database", "Move it aside"
    elif case == "read_only_mount":
        root_only()
        conn = sqlite3.connect(journal)  # a journal that exists, on a filesystem mounted read-only
        conn.execute("CREATE TABLE t (x)")
        conn.close()
        prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory)]
        cause, fix = "OperationalError: ", "on a writable filesystem"
    else:
        root_only()
        directory.chmod(0o700)  # root's; the workers run as nobody
        args = ["--user", "nobody", "--group", "nogroup" if _group_exists("nogroup") else "nobody"]
        cause, fix = "OperationalError: unable to open database file", "running as nobody (uid "
    proc = run_gunicorn(tmp_path, env, *args, prefix=prefix)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Booting worker" not in out, "no worker forks:\n" + out
    line = [x for x in out.splitlines() if x.startswith("Error: durable_journal %s: " % journal)]
    assert line, out
    assert cause in line[0] and fix in line[0], line[0]


def _group_exists(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_a_journal_of_another_app_refuses_to_serve(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal), "EVENTS_FILE": str(tmp_path / "events.jsonl")}
    first = start(server_factory, env)
    planted = plant(first, first.worker_pids()[0], "first=60&rerun=0.05&n=3")
    first.wait_for_events("durable_start", count=3)
    first.kill()  # the whole server dies (SIGKILL to its process group) with 3 tasks in the journal
    other = run_gunicorn(tmp_path, {"EDGESYNC_DURABLE_JOURNAL": str(journal)}, app="tests.apps.durable:app")
    out = other.stdout + other.stderr
    assert other.returncode != 0 and "Booting worker" not in out, out
    assert ("Error: durable_journal %s belongs to the app %r, not 'tests.apps.durable:app': one journal serves "
            "one app" % (journal, APP)) in out, out
    assert "python -m edgesync durable adopt tests.apps.durable:app --journal %s" % journal in out
    assert [r[3:] for r in journal_tasks(journal, COLUMNS)] == [(0, None)] * 3, "the other app touched nothing"
    assert sorted(journal_runs(journal, by="id").values()) == [1] * 3, "the other app touched nothing"
    # The app itself, started again, re-runs them.
    again = start(server_factory, env)
    wait_for(all_done(again), 30, "the three tasks to be re-run")
    stop_cleanly(again)
    tally = durable_tally(again)
    tally.show("another app refused; the app re-ran its tasks")
    assert tally.lost == set() and tally.at_once == set() and set(planted) <= tally.reruns


@pytest.mark.parametrize("files", ["journal.db", "journal.db*"])
def test_a_journal_deleted_while_serving_is_recreated(server_factory: Callable[..., Server], tmp_path: Path,
                                                      files: str) -> None:
    journal = tmp_path / "journal.db"
    server = start(server_factory, {"EDGESYNC_DURABLE_JOURNAL": str(journal)})
    workers = server.worker_pids()
    planted = [i for pid in workers for i in plant(server, pid, "first=60&rerun=0.05&n=2")]
    server.wait_for_events("durable_start", count=4)
    for path in tmp_path.glob(files):
        if path.is_file():  # the journal and its -wal and -shm files (its run marks are a directory)
            path.unlink()
    lines = server.wait_for_log(r"the durable journal .*journal\.db was (deleted|replaced by another file) while "
                                r"this process was writing it: .* recorded its 2 pending durable task\(s\) there "
                                r"again", count=2, timeout=10)
    assert {int(x.split("] worker ")[1].split(":")[0]) for x in lines} == set(workers)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for(all_done(server), 30, "every task to be re-run from the new journal")
    stop_cleanly(server)
    check_log(server)
    tally = durable_tally(server)
    tally.show("journal deleted (%s) while serving, then both workers SIGKILLed" % files)
    assert tally.lost == set() and tally.at_once == set() and set(planted) <= tally.reruns


# -- sharing a journal across pid namespaces ------------------------------------------------------------


# A gunicorn master in its own pid namespace, as in a container.
IN_ITS_OWN_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def test_servers_in_two_pid_namespaces_never_take_each_others_live_tasks(server_factory: Callable[..., Server],
                                                                         tmp_path: Path) -> None:
    root_only()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("unshare --pid cannot run here")
    journal = tmp_path / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal), "EVENTS_FILE": str(tmp_path / "events.jsonl"),
           "EDGESYNC_DURABLE_LEASE_MS": "3000"}
    here = start(server_factory, env)  # a server in this pid namespace
    workdir = tmp_path / "container"
    workdir.mkdir()
    there = Server(workdir, APP, ["--workers", "2", "--threads", "4"], env,
                   launcher=IN_ITS_OWN_PID_NAMESPACE).start(workers_ready=2)
    there.events_path = here.events_path = tmp_path / "events.jsonl"
    try:
        inside = there.worker_pids()
        assert max(inside) < 100, "pids of a fresh namespace: %s" % inside
        # Live tasks over there, longer than 2 leases: never claimed here.
        alive = plant(there, inside[0], "first=7&rerun=0.05&n=3")
        wait_for(all_done(here), 30, "the namespaced server's tasks to complete")
        assert "re-running" not in here.log + there.log
        # A task that ended less than DELETE_DELAY_S before its server died runs again: not the case here.
        wait_for(lambda: journal_tasks(journal, "id") == [], 5, "the ended tasks' rows to be deleted")
        # Then that whole server dies with tasks running: this one re-runs them once their lease expired.
        dying = plant(there, there.worker_pids()[0], "first=60&rerun=0.05&n=3")
        there.wait_for_events("durable_start", count=3, where=lambda e: e["id"] in dying)
        there.kill()
        line = here.wait_for_log(r"re-running 3 durable task\(s\) of process \d+ of host \S+, whose lease expired",
                                 timeout=15)
        wait_for(all_done(here), 30, "the dead server's tasks to be re-run here")
    finally:
        there.kill()
    stop_cleanly(here)
    check_log(here)
    ours = set(here.worker_pids())
    tally = durable_tally(here)
    tally.at_once = runs_at_once(here.events(), alive=lambda pid: pid in ours)
    tally.show("two servers in two pid namespaces on one journal")
    assert tally.lost == set() and tally.at_once == set() and tally.twice == set()
    assert set(alive) <= set(tally.done) and not set(alive) & tally.reruns
    assert set(dying) <= tally.reruns, line


# -- claiming ---------------------------------------------------------------------------------------------


def test_max_pending_tasks_1_still_reruns_a_dead_workers_task(server_factory: Callable[..., Server],
                                                              tmp_path: Path) -> None:
    env = {"EDGESYNC_DURABLE_JOURNAL": str(tmp_path / "journal.db"), "EDGESYNC_MAX_PENDING_TASKS": "1",
           "EDGESYNC_BACKGROUND_THREADS": "1"}
    server = start(server_factory, env)
    victim = server.worker_pids()[0]
    planted = plant(server, victim, "first=60&rerun=0.05")
    server.wait_for_events("durable_start")  # its first run, which the SIGKILL ends
    os.kill(victim, signal.SIGKILL)
    wait_for(all_done(server), 15, "the dead worker's task to be re-run")
    stop_cleanly(server)
    tally = durable_tally(server)
    tally.show("max_pending_tasks = 1, a worker SIGKILLed")
    assert tally.lost == set() and set(planted) <= tally.reruns


def test_a_task_a_deploy_no_longer_declares_durable_is_given_up_and_the_rest_run(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    env = {"EDGESYNC_DURABLE_JOURNAL": str(journal), "EVENTS_FILE": str(tmp_path / "events.jsonl")}
    before = start(server_factory, env, workers=1)
    pid = before.worker_pids()[0]
    dropped = plant(before, pid, "fn=dropped&first=60")
    planted = plant(before, pid, "first=60&rerun=0.05&n=2")
    before.wait_for_events("durable_start", count=3)
    before.kill()
    after = start(server_factory, {**env, "UNDECLARE_DURABLE": "1"})  # the deploy removed @durable
    after.wait_for_log(r"gave up durable task \w+ \(tests\.apps\.durable_seam_tasks:dropped\) after 1 run\(s\): "
                       r"tests\.apps\.durable_seam_tasks:dropped is no longer a @durable function")
    wait_for(all_done(after, also=lambda t: set(dropped)), 30, "the other two tasks to be re-run")
    stop_cleanly(after)
    check_log(after)
    tally = durable_tally(after)
    tally.kept = set(dropped)
    tally.show("a deploy removed @durable from one of 3 tasks")
    assert set(planted) <= tally.reruns and tally.lost == set() and tally.at_once == set()
    assert [r[1:4] for r in journal_tasks(journal, COLUMNS)] == [("tests.apps.durable_seam_tasks:dropped", 1, 1)]
