"""Apps that the benchmark servers run (``bench.apps.flask_app:app``)."""
