"""Issue 14: a state-database writer cannot forge a decision (signed approvals, end to end).

An agent's statement is held through the real proxy; a "writer" with direct write access to the
state database (a DBA, a stolen state password) then edits pgguard's approval tables as the
security review did. PostgreSQL is the oracle: the held table must still exist, the statement
must not have run, and the ledger must carry an ``integrity_alert`` naming the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import auth, wait_for_request
from tests.support import PgguardThread


@pytest.fixture
async def writer(pgguard: PgguardThread) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the state database with write access to pgguard's tables."""
    conn = await asyncpg.connect(pgguard.settings.state_dsn())
    try:
        yield conn
    finally:
        await conn.close()


def tables(pgguard: PgguardThread) -> tuple[str, str]:
    schema = pgguard.settings.state.schema_name
    return f"{schema}.approval_requests", f"{schema}.approval_decisions"


def table_exists(direct_dsn: str, name: str) -> bool:
    with psycopg.connect(direct_dsn) as direct:
        return direct.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)


async def integrity_alerts(pgguard: PgguardThread, request_id: str) -> list[Any]:
    pgguard.call(pgguard.running.ledger.flush())
    schema = pgguard.settings.state.schema_name
    conn = await asyncpg.connect(pgguard.settings.state_dsn())
    try:
        return list(
            await conn.fetch(
                f"SELECT * FROM {schema}.ledger WHERE kind = 'integrity_alert' AND request_id = $1",
                request_id,
            )
        )
    finally:
        await conn.close()


async def still_held(running: asyncio.Task[Any], seconds: float = 2.5) -> bool:
    """True when the statement is still waiting after the poll and NOTIFY paths had their turn."""
    await asyncio.sleep(seconds)
    return not running.done()


async def stored_state(
    writer: asyncpg.Connection, requests: str, request_id: str, state: str
) -> None:
    """Wait until the request's state is stored (the client is answered before that)."""
    async with asyncio.timeout(10):
        while True:
            stored = await writer.fetchval(
                f"SELECT state FROM {requests} WHERE id = $1", request_id
            )
            if stored == state:
                return
            await asyncio.sleep(0.05)


async def cancel(running: asyncio.Task[Any]) -> None:
    running.cancel()
    with pytest.raises((asyncio.CancelledError, asyncpg.QueryCanceledError)):
        await running


async def test_update_to_approved_releases_nothing(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    writer: asyncpg.Connection,
    direct_dsn: str,
) -> None:
    """The review's attack: UPDATE approval_requests SET state='approved' for one's own request."""
    requests, decisions = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await writer.execute(
            f"UPDATE {requests} SET state = 'approved', decided_at = now() WHERE id = $1",
            request["id"],
        )
        await writer.execute(f"NOTIFY pgguard_approvals, '{request['id']}'")
        assert await still_held(running)
        # The nearest variant: add a decision row too, as an approver would have left it.
        await writer.execute(
            f"INSERT INTO {decisions} (request_id, approver_id, approver_name, verdict, channel, "
            "comment, mac) VALUES ($1, 'dba1', 'Dana DBA', 'approve', 'api', '', 'v1:' || "
            "repeat('0', 64))",
            request["id"],
        )
        assert await still_held(running)
        await cancel(running)
    finally:
        await conn.close()
    assert table_exists(direct_dsn, "hold_t")
    alerts = await integrity_alerts(pgguard, request["id"])
    assert alerts, "the forged approval is on the record"
    assert all(a["agent"] == "agent" for a in alerts)


async def test_forged_state_then_local_expiry_refuses(
    pgguard: PgguardThread, api: httpx.AsyncClient, writer: asyncpg.Connection, direct_dsn: str
) -> None:
    """A row moved out of pending by someone else ends the hold as expired, never as run."""
    requests, _ = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE short_t"))
        request = await wait_for_request(api, "short_t")
        await writer.execute(
            f"UPDATE {requests} SET state = 'approved', decided_at = now() WHERE id = $1",
            request["id"],
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncio.wait_for(running, 15)
        assert "expired" in str(info.value)
    finally:
        await conn.close()
    assert table_exists(direct_dsn, "short_t")


async def test_forged_denial_does_not_end_another_agents_hold(
    pgguard: PgguardThread, api: httpx.AsyncClient, writer: asyncpg.Connection
) -> None:
    requests, _ = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await writer.execute(
            f"UPDATE {requests} SET state = 'denied', decided_at = now() WHERE id = $1",
            request["id"],
        )
        await writer.execute(f"NOTIFY pgguard_approvals, '{request['id']}'")
        assert await still_held(running)
        await cancel(running)
    finally:
        await conn.close()
    assert await integrity_alerts(pgguard, request["id"])


async def test_forged_second_approval_does_not_meet_the_quorum(
    pgguard: PgguardThread, api: httpx.AsyncClient, writer: asyncpg.Connection
) -> None:
    """One real approval plus a forged decision row must not make min_approvals: 2."""
    _, decisions = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.fetch("COPY quorum_t TO STDOUT"))
        request = await wait_for_request(api, "quorum_t")
        await writer.execute(
            f"INSERT INTO {decisions} (request_id, approver_id, approver_name, verdict, channel, "
            "comment) VALUES ($1, 'dba2', 'Drew DBA', 'approve', 'api', '')",
            request["id"],
        )
        url = f"/api/requests/{request['id']}/approve"
        first = await api.post(url, json={}, headers=auth("dba1"))
        assert first.status_code == 200
        assert first.json()["state"] == "pending"
        assert await still_held(running, 1.5)
        # A copy of dba1's genuine decision MAC under dba2's name verifies no better.
        await writer.execute(
            f"UPDATE {decisions} SET mac = (SELECT mac FROM {decisions} WHERE request_id = $1 "
            "AND approver_id = 'dba1') WHERE request_id = $1 AND approver_id = 'dba2'",
            request["id"],
        )
        await writer.execute(
            f"UPDATE {tables(pgguard)[0]} SET state = 'approved', decided_at = now() WHERE id = $1",
            request["id"],
        )
        assert await still_held(running)
        await cancel(running)
    finally:
        await conn.close()
    assert await integrity_alerts(pgguard, request["id"])


async def test_lowered_quorum_is_refused_by_the_deciding_instance(
    pgguard: PgguardThread, api: httpx.AsyncClient, writer: asyncpg.Connection
) -> None:
    requests, _ = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.fetch("COPY quorum_t TO STDOUT"))
        request = await wait_for_request(api, "quorum_t")
        await writer.execute(
            f"UPDATE {requests} SET min_approvals = 1 WHERE id = $1", request["id"]
        )
        response = await api.post(
            f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
        )
        assert response.status_code == 409
        assert "integrity" in response.json()["detail"]
        assert await still_held(running, 1.0)
        await cancel(running)
    finally:
        await conn.close()


async def test_forged_remembered_approval_is_not_used(
    pgguard: PgguardThread, api: httpx.AsyncClient, writer: asyncpg.Connection, direct_dsn: str
) -> None:
    """An INSERTed approved row with remember_s and the future statement's fingerprint."""
    requests, _ = tables(pgguard)
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        first = asyncio.create_task(conn.execute("DROP TABLE remember_t"))
        pending = await wait_for_request(api, "remember_t")
        await cancel(first)
        await stored_state(writer, requests, pending["id"], "cancelled")
        # Copy the genuine row as an attacker would, approved and remembered for an hour.
        await writer.execute(
            f"INSERT INTO {requests} SELECT 'forged' || substr(id, 7), 'approved', agent, owner, "
            "database, client_address, application_name, statement, parameters, fingerprint, "
            "categories, rule_ids, reason, approver_groups, min_approvals, 3600, expires_in_s, "
            "session_id, instance_id, touches, now(), expires_at, now(), NULL, 'approved', "
            f"statement_digest, request_mac, state_mac FROM {requests} WHERE id = $1",
            pending["id"],
        )
        again = asyncio.create_task(conn.execute("DROP TABLE remember_t"))
        held = await wait_for_request(api, "remember_t")
        assert held["id"] != pending["id"]
        assert held["remembered_from"] is None
        assert await still_held(again, 1.0)
        await cancel(again)
    finally:
        await conn.close()
    assert table_exists(direct_dsn, "remember_t")
