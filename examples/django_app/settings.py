"""Settings of the example Django project: sqlite, no admin, tasks run by edgesync.

    .venv/bin/python -m django migrate --settings django_app.settings --pythonpath examples
    .venv/bin/gunicorn -k edgesync.Worker -b 127.0.0.1:8000 --chdir examples django_app.wsgi
"""

import importlib.util
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "an-example-key-never-use-it-in-production")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django_app",
    # Closes the database connections of background threads the way Django's
    # request signals do for request threads.
    "edgesync.django.EdgeSyncConfig",
]
if importlib.util.find_spec("django.tasks") is None:
    INSTALLED_APPS.append("django_tasks")  # Django < 6: the Tasks backport

# record_visit.enqueue(...) runs the task on this worker's background threads,
# after the response, within edgesync's limits; results live in this process only
# and a task still pending when the process dies is lost. When work must survive
# that, or run on other machines, change the backend here, not the tasks:
#   "django_tasks_db.DatabaseBackend"  (pip install django-tasks-db, add
#       "django_tasks_db" to INSTALLED_APPS, migrate, run `manage.py db_worker`)
#   "django_tasks_rq.RQBackend"  (pip install django-tasks-rq, add "django_tasks_rq",
#       define RQ_QUEUES, run `manage.py rqworker --job-class django_tasks_rq.Job`)
# DJANGO_TASKS_BACKEND overrides it without editing this file.
TASKS = {
    "default": {"BACKEND": os.environ.get("DJANGO_TASKS_BACKEND", "edgesync.django.TasksBackend")},
}
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_app.urls"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", BASE_DIR / "db.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TIME_ZONE = "UTC"  # Django's default (America/Chicago) would also change the log timestamps
USE_TZ = True
