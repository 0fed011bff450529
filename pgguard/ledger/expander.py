"""Expanding packs into indexed rows, off the proxy's path (asyncpg).

Owns: `LedgerExpander` (a background task of the ledger writer), `expand_all` and `Backlog` /
`backlog` (what is not expanded yet: the lag `pgguard ledger show` reports).

Why: the proxy ships ordinary statements many to a ``ledger_packs`` row, the cheapest write the
state database can take; an auditor needs each entry addressable by indexed columns. The
expander calls ``<schema>.ledger_expand(n)`` (migration 4 in `pgguard.ledger.store`), which
moves the oldest ``n`` packs into ``ledger_rows`` in one transaction: an entry is always in
exactly one of the two tables, and the ``ledger`` view shows both. Packs that wait are still
read (and verified) as packs, only slower.

Invariants: nothing here runs per statement or on the proxy's path - one call per
`INTERVAL` seconds on a connection of its own, back to back while a full batch of packs is
waiting; packs younger than `MIN_AGE` seconds wait for a later round. The lag is bounded by
`MIN_AGE` + `INTERVAL` plus the backlog divided by the expansion rate (27,000-42,000 entries/s
measured on the loaded benchmark machine). A failure is logged and retried with a backoff;
it never reaches the writer (the packs simply wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pgguard.approvals.schema import checked_schema

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between expansion rounds while nothing is waiting
# Packs younger than this (seconds) are left for the next round: a pack just shipped stays
# readable as a pack for a moment (what tests and `verify` of a fresh pack see), and a round
# takes more packs at once.
MIN_AGE = 5.0
MAX_PACKS = 50  # packs per transaction (a pack holds up to batch_size entries)
_MAX_BACKOFF = 30.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """The packed entries not expanded yet."""

    entries: int
    packs: int
    oldest: datetime | None  # when the oldest waiting pack was stored


async def backlog(conn: asyncpg.Connection, schema: str) -> Backlog:
    """What waits in ``ledger_packs`` (a small table: the expander keeps it short)."""
    quoted = checked_schema(schema)
    row = await conn.fetchrow(
        f"SELECT coalesce(sum(entries), 0)::bigint AS entries, count(*) AS packs, "
        f"min(stored_at) AS oldest FROM {quoted}.ledger_packs"
    )
    assert row is not None
    return Backlog(entries=row["entries"], packs=row["packs"], oldest=row["oldest"])


async def expand_all(
    conn: asyncpg.Connection,
    schema: str,
    *,
    max_packs: int = MAX_PACKS,
    timeout: float | None = None,  # noqa: ASYNC109 - per call, not one deadline
) -> int:
    """Expand every waiting pack, ``max_packs`` per transaction; the entries moved."""
    sql = f"SELECT {checked_schema(schema)}.ledger_expand($1)"
    total = 0
    while True:
        moved = await conn.fetchval(sql, max_packs, timeout=timeout)
        if not moved:
            return total
        total += moved


class LedgerExpander:
    """The background task that keeps ``ledger_packs`` short (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pgguard",
        timeout: float = 5.0,
        interval: float = INTERVAL,
        max_packs: int = MAX_PACKS,
        min_age: float = MIN_AGE,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self._dsn = dsn
        self._sql = f"SELECT {checked_schema(schema)}.ledger_expand($1, $2 * interval '1 s')"
        self._min_age = min_age
        self._timeout = timeout
        self._interval = interval
        self._max_packs = max_packs
        self._server_settings = dict(server_settings or {})
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.expanded = 0  # entries moved since start

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pgguard-ledger-expander")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def expand_once(self) -> int:
        """One transaction: up to ``max_packs`` packs moved; the entries moved."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                server_settings={**self._server_settings, "application_name": "pgguard-expander"},
            )
        moved: int = await self._conn.fetchval(
            self._sql, self._max_packs, self._min_age, timeout=self._timeout
        )
        self.expanded += moved
        return moved

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                moved = await self.expand_once()
                backoff = 0.0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The schema may not exist yet (the writer migrates it), or the database is
                # away: the packs wait, and are read as packs meanwhile. A round that ran out
                # of time (big packs: batch_size is up to 100,000) takes fewer packs next time.
                if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
                    self._max_packs = max(1, self._max_packs // 2)
                backoff = min(_MAX_BACKOFF, max(self._interval, backoff * 2))
                log.warning("ledger expander: %s: %s; retrying", type(exc).__name__, exc)
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                await asyncio.sleep(backoff)
                continue
            # A round that may have been full (a pack holds at least one entry) means more may
            # be waiting: go on at once, so the lag stays bounded under a backlog.
            if moved < self._max_packs:
                await asyncio.sleep(self._interval)
