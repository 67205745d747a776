"""Run Django's own Tasks tests (its sdist's ``tests/tasks``) against edgesync's backend.

Usage: ``python tests/django_suite/run.py DJANGO_SOURCE_DIR`` (an unpacked Django sdist;
.ci/run downloads it from PyPI). Nothing of Django's is copied into this repository.

The test modules are loaded from the sdist with the backends they name replaced by
``tests.django_suite.backend.WaitingBackend`` (``edgesync.django.TasksBackend`` whose
``enqueue`` waits for the result: the one documented adaptation) and run by Django's
test runner. The tests in ``NOT_APPLICABLE`` are skipped with their reason; every other
test must pass. docs/pythons-and-frameworks.md lists them too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
import unittest
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[2]
ADAPTED = "tests.django_suite.backend.WaitingBackend"
#: The backend Django's tests run tasks with, and what replaces it. The DummyBackend, which
#: never runs a task (test_tasks.py's default: the Task API's own tests), stays.
REPLACED = {"django.tasks.backends.immediate.ImmediateBackend": ADAPTED}
#: The modules run: the ImmediateBackend's tests (a backend that runs the tasks) and the
#: Task API's (whose "immediate" alias runs on this backend). test_dummy_backend.py tests a
#: backend that never runs a task and test_custom_backend.py a backend class of its own:
#: neither says anything about this one.
MODULES = ("test_immediate_backend", "test_tasks")

#: "module.Class.test" -> why it does not apply to edgesync's backend.
NOT_APPLICABLE: Dict[str, str] = {
    "test_immediate_backend.ImmediateBackendTestCase.test_using_correct_backend":
        "asserts the backend is an ImmediateBackend instance",
    "test_immediate_backend.ImmediateBackendTestCase.test_throws_keyboard_interrupt":
        "expects enqueue() to raise the task's KeyboardInterrupt: immediate-only (the task runs "
        "inside enqueue there; here on a background thread, where edgesync records it as the "
        "task's failure)",
    "test_immediate_backend.ImmediateBackendTestCase.test_cannot_get_result":
        "expects get_result() to raise NotImplementedError: this backend implements it (results "
        "of this process; supports_get_result stays False, results are not shared across processes)",
    "test_immediate_backend.ImmediateBackendTestCase.test_cannot_refresh_result":
        "expects refresh() to raise NotImplementedError: this backend implements get_result",
    "test_tasks.TaskTestCase.test_get_backend":
        "asserts the 'immediate' alias's backend is an ImmediateBackend instance",
}


def load(source: Path) -> types.ModuleType:
    """``source`` (Django's tests/tasks) as the package ``tasks``, its backends replaced."""
    package = types.ModuleType("tasks")
    package.__path__ = []  # a package whose modules are added below, from their adapted text
    sys.modules["tasks"] = package
    for name in ("tasks", *MODULES):
        text = (source / (name + ".py")).read_text()
        for old, new in REPLACED.items():
            text = text.replace(old, new)
        spec = importlib.util.spec_from_loader("tasks." + name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(source / (name + ".py"))
        sys.modules["tasks." + name] = module
        setattr(package, name, module)
        exec(compile(text, module.__file__, "exec"), module.__dict__)
    return package


def main(django_source: str) -> int:
    source = Path(django_source) / "tests" / "tasks"
    if not source.is_dir():
        print("run.py: no tests/tasks under %s (an unpacked Django sdist)" % django_source, file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import django
    from django.conf import settings

    db_dir = tempfile.mkdtemp(prefix="edgesync-django-suite-")
    settings.configure(
        DEBUG=False, USE_TZ=True, SECRET_KEY="django-suite",
        INSTALLED_APPS=["edgesync.django.EdgeSyncConfig"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.path.join(db_dir, "db.sqlite3")}},
        TASKS={"default": {"BACKEND": ADAPTED}})
    django.setup()
    package = load(source)
    from django.test.utils import get_runner

    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for name in MODULES:
        suite.addTests(loader.loadTestsFromModule(getattr(package, name)))
    skipped = _skip_not_applicable(suite)
    unknown = sorted(set(NOT_APPLICABLE) - skipped)
    if unknown:
        print("run.py: NOT_APPLICABLE names tests this Django does not have: %s" % unknown, file=sys.stderr)
        return 2
    runner = get_runner(settings)(verbosity=1, interactive=False)
    old = runner.setup_databases()
    try:
        result = runner.run_suite(suite)
    finally:
        runner.teardown_databases(old)
    print("django suite (%s): %d run, %d not applicable (skipped), %d failures, %d errors"
          % (django.get_version(), result.testsRun, len(result.skipped), len(result.failures),
             len(result.errors)))
    return 0 if result.wasSuccessful() else 1


def _skip_not_applicable(suite: unittest.TestSuite) -> set[str]:
    found = set()
    for test in _flatten(suite):
        key = "%s.%s.%s" % (type(test).__module__.split(".", 1)[1], type(test).__qualname__,
                            test._testMethodName)
        if key in NOT_APPLICABLE:
            found.add(key)
            setattr(test, test._testMethodName, unittest.skip("not applicable: " + NOT_APPLICABLE[key])(
                getattr(test, test._testMethodName)))
    return found


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out = []
    for item in suite:
        out.extend(_flatten(item) if isinstance(item, unittest.TestSuite) else [item])
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
