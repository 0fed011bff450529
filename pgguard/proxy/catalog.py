"""pgguard's own short, read-only look-ups in the upstream database (never an agent's session).

Owns: `own_connection` (a fresh upstream connection to one database, as pgguard's upstream role,
inside a READ ONLY transaction with short statement and lock timeouts), `function_name` (what
a FunctionCall message's OID names) and `user_routines` (the catalog entries of user-defined
routines a statement may call, read to judge their bodies). Used by the row estimates of review
payloads, the FunctionCall judgement and `pgguard.proxy.routines`.

Invariant: nothing here runs an agent's text; every failure is the caller's "don't know" (None),
which the callers turn into a refusal (fail closed) or into "no estimate".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from pgguard.settings import UpstreamSettings

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0


@asynccontextmanager
async def own_connection(
    settings: UpstreamSettings, database: str, application_name: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a READ ONLY transaction; raises on any failure (callers catch)."""
    dsn = settings.parsed()
    async with asyncio.timeout(TIMEOUT_S):
        conn = await asyncpg.connect(
            host=dsn.host,
            port=dsn.port,
            user=dsn.user,
            password=dsn.password,
            database=database,
            ssl=None if dsn.is_unix_socket else settings.effective_sslmode(),
            server_settings={"application_name": application_name},
        )
        try:
            async with conn.transaction(readonly=True):
                await conn.execute("SET LOCAL statement_timeout = '500ms'")
                await conn.execute("SET LOCAL lock_timeout = '200ms'")
                yield conn
        finally:
            await conn.close(timeout=1)


async def function_name(
    settings: UpstreamSettings, database: str, oid: int
) -> tuple[str, str] | None:
    """(schema, name) of the function with this OID in ``database``, or None when unknown."""
    try:
        async with own_connection(settings, database, "pgguard-catalog") as conn:
            row = await conn.fetchrow(
                "SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p "
                "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = $1",
                oid,
            )
    except Exception as exc:  # unknown means refused by the caller
        log.warning("could not resolve function OID %d: %s", oid, type(exc).__name__)
        return None
    return None if row is None else (str(row["nspname"]), str(row["proname"]))


@dataclass(frozen=True, slots=True)
class Routine:
    """One user-defined routine (``pg_proc`` row, oid >= 16384) a statement may call."""

    oid: int
    xmin: int
    name: str
    language: str
    kind: str  # f function, p procedure, a aggregate, w window
    security_definer: bool
    config: tuple[str, ...]
    source: str | None
    definition: str | None  # pg_get_functiondef; None for aggregates


FIRST_USER_OID = 16384  # FirstNormalObjectId: below it, built-in objects


ROUTINES_QUERY = (
    "SELECT p.oid, p.xmin::text::bigint AS xmin, p.proname, l.lanname, "
    "p.prokind::text AS prokind, p.prosecdef, p.proconfig, p.prosrc, "
    "CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid) END AS def "
    "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
    "WHERE p.proname = ANY($1::text[]) AND p.oid >= $2"
)


async def catalog_connection(settings: UpstreamSettings, database: str) -> asyncpg.Connection:
    """A long-lived connection for `user_routines`: every transaction READ ONLY, with short
    statement and lock timeouts (kept by `pgguard.proxy.routines` while sessions use it)."""
    dsn = settings.parsed()
    async with asyncio.timeout(TIMEOUT_S):
        return await asyncpg.connect(
            host=dsn.host,
            port=dsn.port,
            user=dsn.user,
            password=dsn.password,
            database=database,
            ssl=None if dsn.is_unix_socket else settings.effective_sslmode(),
            server_settings={
                "application_name": "pgguard-catalog",
                "default_transaction_read_only": "on",
                "statement_timeout": "500ms",
                "lock_timeout": "200ms",
            },
        )


async def user_routines(conn: asyncpg.Connection, names: list[str]) -> list[Routine]:
    """Every user-defined routine named one of `names`, in any schema; raises on failure
    (the caller refuses: a routine that cannot be read is not known to be harmless)."""
    async with asyncio.timeout(TIMEOUT_S):
        rows = await conn.fetch(ROUTINES_QUERY, names, FIRST_USER_OID)
    return [
        Routine(
            oid=int(row["oid"]),
            xmin=int(row["xmin"]),
            name=str(row["proname"]),
            language=str(row["lanname"]),
            kind=str(row["prokind"]),
            security_definer=bool(row["prosecdef"]),
            config=tuple(row["proconfig"] or ()),
            source=row["prosrc"],
            definition=row["def"],
        )
        for row in rows
    ]
