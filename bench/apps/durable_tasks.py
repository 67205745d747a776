"""Tasks for bench/durable.py: the same no-op, plain and durable (durable tasks must be importable)."""

from __future__ import annotations

import edgesync


def send_email_plain(to: str, order: int) -> None:
    return None


@edgesync.durable
def send_email(to: str, order: int) -> None:
    return None
