"""pgguard: a PostgreSQL wire-protocol proxy that puts a human in the loop of AI agents'
database access."""

from __future__ import annotations

__version__ = "0.1.0"
