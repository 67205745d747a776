"""A Django project whose tasks use edgesync.django.TasksBackend (tests/test_django_tasks.py).

The same settings serve both the in-process tests (``django.setup()`` in the test
module) and the real gunicorn of the integration test. No database: the tasks
write files and return values.
"""
