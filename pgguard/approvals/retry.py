"""Retry timing for pgguard's calls to Microsoft (Teams webhook, Bot Connector, token endpoint).

Owns: `full_jitter` (exponential backoff with full jitter) and `retry_after` (the server's
``Retry-After``, as delta-seconds or an HTTP-date).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 5.0


def full_jitter(attempts: int) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, base * 2**(attempts - 1))]."""
    return random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempts - 1)))


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP-date), or None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
