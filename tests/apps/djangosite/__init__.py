"""A minimal Django project (sqlite) for tests/test_django.py, served by real gunicorn.

Tables come from ``migrate --run-syncdb`` (no migration files). ``DJANGOSITE_HYGIENE=off``
leaves edgesync.django out of INSTALLED_APPS, to show what it prevents.
"""
