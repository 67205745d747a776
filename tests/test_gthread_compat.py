"""gunicorn's own gthread unit tests, run against ``edgesync.Worker``.

gunicorn's sdist ships ``tests/test_gthread.py``. At test time we download the sdist
of the gunicorn version that is installed (never committed: we do not copy
gunicorn's code), extract its ``tests/``, and run that file twice in subprocesses:

1. unmodified, against gunicorn's ``ThreadWorker`` (the baseline);
2. with ``tests/gthread_compat/edgesync_swap.py``, which puts ``edgesync.Worker``
   in place of ``gunicorn.workers.gthread.ThreadWorker``.

Every test that passes for gthread must pass for edgesync, except the ones in
``EXPECTED_DIFFERENCES``, each with the reason, and each must still fail for that
reason (so the list cannot hide a new failure in the same test).

PyPI must be reachable: without it the test fails, unless ``ESTEST_OFFLINE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path
from typing import Dict, Tuple

import pytest

from .support import REPO

PLUGIN_DIR = REPO / "tests" / "gthread_compat"
TEST_FILE = "tests/test_gthread.py"

#: node id -> (why edgesync.Worker differs on purpose, text its failure must contain).
EXPECTED_DIFFERENCES: Dict[str, Tuple[str, str]] = {
    # We replace gthread's ThreadPoolExecutor with our own request threads
    # (_RequestThreads: daemon threads, one slot each, so the limits monitor can read
    # each thread's CPU clock and a stuck thread never blocks the process's exit).
    "TestThreadWorker::test_worker_get_thread_pool": (
        "get_thread_pool() returns edgesync's _RequestThreads, not a ThreadPoolExecutor",
        "_RequestThreads"),
    # The next three put a mock in worker.tpool and expect ThreadPoolExecutor.submit();
    # our enqueue_req() hands the connection over with _RequestThreads.put(conn): one
    # queue put, no Future and no done-callback per request.
    "TestAccept::test_accept_success": (
        "enqueue_req() calls tpool.put(conn), not tpool.submit(handle, conn)",
        "Expected 'submit' to have been called once. Called 0 times"),
    "TestErrorHandling::test_enqueue_req_submits_to_pool": (
        "enqueue_req() calls tpool.put(conn), not tpool.submit(handle, conn)",
        "Expected 'submit' to have been called once. Called 0 times"),
    "TestSlowClientResilience::test_on_pending_socket_readable_sets_data_ready": (
        "enqueue_req() calls tpool.put(conn), not tpool.submit(handle, conn)",
        "Expected 'submit' to have been called once. Called 0 times"),
    # The test counts heartbeats exactly (1 in the main loop + 2 in the drain loop:
    # gthread calls notify() on every loop turn, a system call per finished request).
    # edgesync.Worker calls it once per beat (min(0.5 s, timeout / 2), well within the
    # arbiter's timeout), in the serving loop and in the drain alike: here the whole
    # test fits in one beat.
    "TestSignalHandling::test_graceful_shutdown_drains_connections": (
        "heartbeats once per beat, not on every loop turn",
        "assert 1 == 3"),
}


@pytest.fixture(scope="session")
def gunicorn_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gunicorn's sdist ``tests/`` for the installed version, downloaded once per run."""
    if os.environ.get("ESTEST_OFFLINE") == "1":
        pytest.skip("ESTEST_OFFLINE=1: not downloading gunicorn's sdist from PyPI")
    pinned = version("gunicorn")
    download = tmp_path_factory.mktemp("gunicorn-sdist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         "--disable-pip-version-check", "gunicorn==%s" % pinned, "-d", str(download)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        "could not download gunicorn %s's sdist from PyPI (set ESTEST_OFFLINE=1 to skip this "
        "test on a machine without network):\n%s%s" % (pinned, proc.stdout, proc.stderr))
    archives = list(download.glob("gunicorn-*.tar.gz"))
    assert len(archives) == 1, list(download.iterdir())
    root = tmp_path_factory.mktemp("gunicorn-tests")
    prefix = "gunicorn-%s/tests/" % pinned
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        assert members, "the sdist has no %s" % prefix
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+: refuse odd members outright
            tar.extractall(root, members=members, filter="data")
        else:
            tar.extractall(root, members=members)
    top = root / ("gunicorn-%s" % pinned)
    assert (top / TEST_FILE).is_file(), "gunicorn %s's sdist has no %s" % (pinned, TEST_FILE)
    return top


def run_gthread_tests(top: Path, name: str, *extra: str) -> Tuple[Dict[str, str], Dict[str, str], str]:
    """Run gunicorn's test_gthread.py in a subprocess -> (outcomes, failure texts, output)."""
    report = top / ("%s.xml" % name)
    # EDGESYNC_* variables of the environment would be read as settings:
    # edgesync.Worker would refuse them as unknown keys.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_DIR), str(REPO)])
    env["GTHREAD_COMPAT_MARKER"] = str(top / ("%s.built" % name))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--junitxml", str(report), "--rootdir", str(top), *extra],
        cwd=top, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert report.exists(), "pytest (%s) wrote no report:\n%s" % (name, output)
    outcomes: Dict[str, str] = {}
    failures: Dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        node = "%s::%s" % (case.get("classname", "").rsplit(".", 1)[-1], case.get("name"))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                failures[node] = (child.get("message") or "") + "\n" + (child.text or "")
        outcomes[node] = outcome
    return outcomes, failures, output


@pytest.mark.slow
def test_gunicorn_gthread_tests_pass_against_edgesync_worker(gunicorn_tests: Path) -> None:
    baseline, _, base_out = run_gthread_tests(gunicorn_tests, "gthread")
    ours, failures, our_out = run_gthread_tests(gunicorn_tests, "edgesync", "-p", "edgesync_swap")
    passed_baseline = sorted(n for n, o in baseline.items() if o == "passed")
    # A sanity floor: a broken download or collection must not pass vacuously.
    assert len(passed_baseline) >= 50, base_out
    built = gunicorn_tests / "edgesync.built"
    assert built.exists(), "the swap plugin did not load:\n" + our_out
    assert int(built.read_text()) >= 40, "the tests built few edgesync workers:\n" + our_out
    assert set(EXPECTED_DIFFERENCES) <= set(passed_baseline), (
        "an expected difference is not a gthread pass any more: update EXPECTED_DIFFERENCES")

    regressions = [n for n in passed_baseline if ours.get(n) != "passed" and n not in EXPECTED_DIFFERENCES]
    now_passing = [n for n in EXPECTED_DIFFERENCES if ours.get(n) == "passed"]
    wrong_reason = [n for n, (_, text) in EXPECTED_DIFFERENCES.items()
                    if ours.get(n) != "passed" and text not in failures.get(n, "")]
    print("\ngunicorn %s test_gthread.py: gthread %d passed of %d; edgesync.Worker %d passed; "
          "%d expected differences" % (version("gunicorn"), len(passed_baseline), len(baseline),
                                       sum(o == "passed" for o in ours.values()), len(EXPECTED_DIFFERENCES)))
    for node, (why, _) in EXPECTED_DIFFERENCES.items():
        print("  differs on purpose: %s: %s" % (node, why))
    assert regressions == [], "gthread passes these, edgesync.Worker does not:\n%s\n%s" % (
        "\n".join("%s:\n%s" % (n, failures.get(n, ours.get(n, "missing"))) for n in regressions), our_out)
    assert now_passing == [], "these pass now: remove them from EXPECTED_DIFFERENCES"
    assert wrong_reason == [], "these fail for another reason than the one recorded:\n%s" % (
        "\n".join("%s:\n%s" % (n, failures.get(n, "")) for n in wrong_reason))
