import os

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = ["tests.apps.djangosite"]
if os.environ.get("DJANGOSITE_HYGIENE") != "off":
    INSTALLED_APPS.append("edgesync.django.EdgeSyncConfig")
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.apps.djangosite.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJANGO_DB"]}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TIME_ZONE = "UTC"
USE_TZ = True
if os.environ.get("DJANGOSITE_LOGGING") == "standard":
    # The shape of most projects' LOGGING: disable_existing_loggers is left to its default (True).
    LOGGING = {"version": 1, "handlers": {"console": {"class": "logging.StreamHandler"}},
               "root": {"handlers": ["console"], "level": "WARNING"}}
