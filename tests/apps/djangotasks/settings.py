import importlib.util

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = ["tests.apps.djangotasks"]
if importlib.util.find_spec("django.tasks") is None:
    INSTALLED_APPS.append("django_tasks")  # the backport, on Django < 6
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.apps.djangotasks.urls"
DATABASES: dict[str, dict[str, str]] = {}
TIME_ZONE = "UTC"
USE_TZ = True
TASKS = {
    "default": {"BACKEND": "edgesync.django.TasksBackend", "QUEUES": ["default", "emails"]},
    "small": {"BACKEND": "edgesync.django.TasksBackend", "OPTIONS": {"RESULTS_KEPT": 2}},
}
