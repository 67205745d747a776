"""Settings of the example Django project: sqlite, no admin, edgesync.django installed.

    .venv/bin/python -m django migrate --settings django_app.settings --pythonpath examples
    .venv/bin/gunicorn -k edgesync.Worker -b 127.0.0.1:8000 --chdir examples django_app.wsgi
"""

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
