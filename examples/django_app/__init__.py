"""A minimal Django project whose views hand ORM work to edgesync (see docs/django.md)."""
