"""WSGI entry point: gunicorn -k edgesync.Worker --chdir examples django_app.wsgi"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")
application = get_wsgi_application()
