"""edgesync's benchmark suite: run ``python bench/run.py`` (see bench/README.md)."""
