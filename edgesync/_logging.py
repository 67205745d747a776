"""edgesync's loggers stay alive under an app's logging configuration.

Django configures logging from ``settings.LOGGING`` with ``logging.config.dictConfig``,
whose ``disable_existing_loggers`` defaults to True: every logger that exists then and
that the dict does not name is disabled, ``edgesync`` and ``edgesync.tasks`` among them
(edgesync is imported first, by gunicorn's worker class). That silences every line
edgesync writes, "abandoned task" included, without a word.

Rule: a logger the app's configuration names keeps what it says (a level, handlers, or
``disabled``); an edgesync logger disabled only because it existed is enabled again,
once the app is loaded (the gunicorn worker, ``edgesync.django.EdgeSyncConfig.ready``),
with one WARNING saying so and how to quiet it instead.
"""

from __future__ import annotations

import logging

log = logging.getLogger("edgesync")

_NAMES = ("edgesync", "edgesync.tasks")


def keep_enabled() -> bool:
    """Enable edgesync's loggers again if an app's ``dictConfig`` disabled them; True if it did."""
    disabled = [name for name in _NAMES if logging.getLogger(name).disabled]
    if not disabled:
        return False
    for name in disabled:
        logging.getLogger(name).disabled = False
    log.warning("edgesync: the app's logging configuration disabled the %s logger(s) (Django's LOGGING "
                "has disable_existing_loggers = True unless it says otherwise); enabled them again, so that "
                "lines such as 'abandoned task' are not lost. To quiet them, name them in LOGGING['loggers'] "
                "with a level, e.g. {'edgesync': {'level': 'WARNING'}}", ", ".join(disabled))
    return True
