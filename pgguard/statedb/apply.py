"""Applying a ``StatePlan`` to a cluster through an administrator's connection (asyncpg).

Idempotent: an existing role gets the new password, an existing database and schema are kept and
their privileges reset as the plan says. ``CREATE DATABASE`` cannot run in a transaction, so every
statement runs on its own. Upstream roles that do not exist in this cluster are skipped: the state
then lives in a cluster of its own and they cannot reach it.
"""

from __future__ import annotations

import asyncpg

from pgguard.dsn import parse_dsn
from pgguard.errors import ConfigError
from pgguard.statedb import setup
from pgguard.statedb.setup import StatePlan


async def apply(plan: StatePlan, admin_dsn: str, *, timeout: float = 30.0) -> list[str]:  # noqa: ASYNC109
    """Run the plan; the statements run, in order (for the operator's record)."""
    ran: list[str] = []
    admin = await _connect(admin_dsn, None, timeout)
    try:
        role_exists = await admin.fetchval(
            "SELECT EXISTS(SELECT 1 FROM pg_roles WHERE rolname = $1)", plan.role
        )
        await _run(admin, setup.role_statement(plan, exists=bool(role_exists)), ran)
        if not await admin.fetchval(
            "SELECT EXISTS(SELECT 1 FROM pg_database WHERE datname = $1)", plan.database
        ):
            await _run(admin, setup.database_statement(plan), ran)
        present = await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
            list(plan.upstream_roles),
        )
        names = {row["rolname"] for row in present}
        here = tuple(r for r in plan.upstream_roles if r in names)
        for statement in setup.cluster_statements(plan, here):
            await _run(admin, statement, ran)
    finally:
        await admin.close()
    state_db = await _connect(admin_dsn, plan.database, timeout)
    try:
        for statement in setup.schema_statements(plan):
            await _run(state_db, statement, ran)
    finally:
        await state_db.close()
    return ran


async def _run(conn: asyncpg.Connection, statement: str, ran: list[str]) -> None:
    try:
        await conn.execute(statement)
    except asyncpg.PostgresError as exc:
        shown = statement.split(" PASSWORD ")[0]
        raise ConfigError(f"{shown} failed: SQLSTATE {exc.sqlstate}: {exc}") from exc
    ran.append(statement)


async def _connect(dsn: str, database: str | None, timeout: float) -> asyncpg.Connection:  # noqa: ASYNC109
    parsed = parse_dsn(dsn)
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn,
            database=database or parsed.dbname or parsed.user,
            timeout=timeout,
            command_timeout=timeout,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ConfigError(
            f"could not connect to {parsed.describe()} (database {database or parsed.dbname}): "
            f"{exc}"
        ) from exc
    return conn
