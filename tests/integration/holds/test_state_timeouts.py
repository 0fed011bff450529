"""Issue 14, deliverable 6: state operations never hang the proxy.

A state-database session that holds a lock on pgguard's tables (the review's ``LOCK TABLE
pgguard.approval_requests``) makes a hold fail within ``[state] lock_timeout`` - closed: the
statement is refused, not forwarded - while other sessions' ordinary statements go on.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import hold_settings
from tests.support import PgguardThread


@pytest.fixture(scope="module")
def locked_pgguard(upstream_dsn: str, state_dsn: str, rules_dir: Path) -> Iterator[PgguardThread]:
    schema = f"pgguard_locks_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        rules_dir,
        schema,
        state_timeout=20.0,  # far above the lock timeout: what ends the wait is the server
        state={"lock_timeout": 0.5, "statement_timeout": 30.0},
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


async def test_a_locked_approval_table_refuses_the_hold_quickly(
    locked_pgguard: PgguardThread, direct_dsn: str
) -> None:
    schema = locked_pgguard.settings.state.schema_name
    locker = await asyncpg.connect(locked_pgguard.settings.state_dsn())
    conn = await asyncpg.connect(locked_pgguard.dsn())
    other = await asyncpg.connect(locked_pgguard.dsn())
    try:
        await locker.execute("BEGIN")
        await locker.execute(f"LOCK TABLE {schema}.approval_requests")
        started = time.monotonic()
        held = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        # Meanwhile another session is served as usual.
        assert await asyncio.wait_for(other.fetchval("SELECT count(*) FROM hold_t"), 5) == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncio.wait_for(held, 10)
        elapsed = time.monotonic() - started
        assert "could not be recorded" in str(info.value)
        assert info.value.detail is not None
        assert "state database did not answer" in info.value.detail
        assert info.value.hint is not None
        assert "new request" in info.value.hint
        assert elapsed < 5, f"the hold waited {elapsed:.1f} s on a lock"
    finally:
        await locker.execute("ROLLBACK")
        for c in (locker, conn, other):
            await c.close()
    with psycopg.connect(direct_dsn) as direct:
        assert direct.execute("SELECT to_regclass('hold_t')").fetchone() != (None,)


async def test_a_locked_ledger_table_does_not_hold_up_an_approved_statement(
    locked_pgguard: PgguardThread, direct_dsn: str
) -> None:
    """The approved statement's entry must be durable before it runs: with the ledger's table
    locked by someone else, it goes to the spool after [state] lock_timeout, not after the
    20 s call timeout, and nothing is lost once the lock is gone."""
    from tests.integration.holds.helpers import auth, wait_for_request

    schema = locked_pgguard.settings.state.schema_name
    locker = await asyncpg.connect(locked_pgguard.settings.state_dsn())
    conn = await asyncpg.connect(locked_pgguard.dsn())
    try:
        async with httpx.AsyncClient(base_url=locked_pgguard.http_url, timeout=10) as api:
            held = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
            request = await wait_for_request(api, "hold_t")
            await locker.execute("BEGIN")
            await locker.execute(f"LOCK TABLE {schema}.ledger_entries")
            started = time.monotonic()
            response = await api.post(
                f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
            )
            assert response.status_code == 200
            assert await asyncio.wait_for(held, 15) == "DROP TABLE"
            elapsed = time.monotonic() - started
            assert elapsed < 8, f"the approved statement waited {elapsed:.1f} s on the lock"
        await locker.execute("ROLLBACK")
        locked_pgguard.call(locked_pgguard.running.ledger.flush())
        recorded = await locker.fetchval(
            f"SELECT count(*) FROM {schema}.ledger WHERE request_id = $1", request["id"]
        )
        assert recorded >= 1
    finally:
        for c in (locker, conn):
            await c.close()
    with psycopg.connect(direct_dsn) as direct:
        assert direct.execute("SELECT to_regclass('hold_t')").fetchone() == (None,)
