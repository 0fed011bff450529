"""The agent's own statement_timeout applies to a hold (issue 21): the hold ends with 57014, as
the server would cancel, and the request becomes cancelled with that reason. The timeout is
followed from SET statements pgguard judged, from start-up options, and - when neither says -
from the server's default for the database."""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import auth, wait_for_request
from tests.support import PgguardThread

REQUEST_ID = re.compile(r"Request ([a-z2-7]{16}) was still pending")


async def _cancelled_request(api: httpx.AsyncClient, detail: str | None) -> dict[str, object]:
    assert detail is not None
    match = REQUEST_ID.search(detail)
    assert match, detail
    response = await api.get(f"/api/requests/{match.group(1)}", headers=auth("dba1"))
    assert response.status_code == 200
    request: dict[str, object] = response.json()
    return request


async def test_set_statement_timeout_ends_the_hold_with_57014(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.execute("SET statement_timeout = '1s'")
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await asyncio.wait_for(conn.execute("DROP TABLE hold_t"), 20)
        assert time.monotonic() - started < 5
        assert "statement timeout" in info.value.message
        request = await _cancelled_request(api, info.value.detail)
        assert request["state"] == "cancelled"
        assert "statement_timeout (1 s)" in str(request["state_reason"])
        assert await conn.fetchval("SELECT count(*) FROM hold_t") == 1  # nothing ran
    finally:
        await conn.close()


async def test_reset_gives_the_hold_its_full_time(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    """The nearest variant: after RESET the earlier SET no longer applies."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.execute("SET statement_timeout = '1s'")
        await conn.execute("RESET statement_timeout")
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await asyncio.sleep(2)
        assert not running.done()
        response = await api.post(
            f"/api/requests/{request['id']}/approve", json={"reason": "ok"}, headers=auth("dba1")
        )
        assert response.status_code == 200
        assert await asyncio.wait_for(running, 10) == "DROP TABLE"
    finally:
        await conn.close()


async def test_set_local_applies_inside_its_transaction(pgguard: PgguardThread) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 800")
            with pytest.raises(asyncpg.QueryCanceledError):
                await asyncio.wait_for(conn.execute("DROP TABLE hold_t"), 20)
    finally:
        await conn.close()


async def test_startup_option_statement_timeout(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    dsn = pgguard.dsn(options="-c%20statement_timeout%3D1s")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            await asyncio.wait_for(conn.execute("DROP TABLE hold_t"), 20)
        request = await _cancelled_request(api, info.value.diag.message_detail)
        assert request["state"] == "cancelled"


async def test_server_default_is_asked_when_pgguard_cannot_know(
    pgguard: PgguardThread, direct_dsn: str
) -> None:
    """A database default (ALTER DATABASE ... SET) pgguard never saw: read from the server."""
    with psycopg.connect(direct_dsn, autocommit=True) as admin:
        admin.execute("ALTER DATABASE allowed_db SET statement_timeout = '1s'")
    try:
        conn = await asyncpg.connect(pgguard.dsn(dbname="allowed_db"))
        try:  # DDL: held whether or not the table exists
            with pytest.raises(asyncpg.QueryCanceledError):
                await asyncio.wait_for(conn.execute("DROP TABLE IF EXISTS hold_t"), 20)
        finally:
            await conn.close()
    finally:
        with psycopg.connect(direct_dsn, autocommit=True) as admin:
            admin.execute("ALTER DATABASE allowed_db RESET statement_timeout")
