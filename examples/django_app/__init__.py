"""A minimal Django project whose views hand ORM work to edgesync (see README.md)."""
