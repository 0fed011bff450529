"""Return mode (issue 21): a held statement is refused at once with 55000 naming its request;
re-sent with the same text and parameters by the same agent on the same database after the
approval and before the expiry, it runs exactly once, and the ledger names the request."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import auth
from tests.integration.holds.test_ledger import wait_for_entries
from tests.support import PgguardThread

INSERT = "INSERT INTO return_t VALUES ($1, $2)"
PENDING = re.compile(r"^pgguard: approval required, request ([a-z2-7]{16}) is pending$")


async def _refused(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    """Send ``sql``; it must be refused with 55000; the pending request's id."""
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as info:
        await conn.execute(sql, *args)
    error = info.value
    match = PENDING.match(error.message)
    assert match, str(error)
    assert error.detail is not None
    assert "Rules: test.return" in error.detail
    assert error.hint is not None
    assert "again once request" in error.hint
    return match.group(1)


async def _approve(api: httpx.AsyncClient, request_id: str) -> None:
    response = await api.post(
        f"/api/requests/{request_id}/approve", json={"reason": "ok"}, headers=auth("dba1")
    )
    assert response.status_code == 200, response.text


def _count(direct_dsn: str, table: str, key: int) -> int:
    with psycopg.connect(direct_dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (key,)).fetchone()
        assert row is not None
        return int(row[0])


async def test_runs_exactly_once_after_approval_and_not_before(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str, state_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        first = await _refused(conn, INSERT, 7, "x")
        assert await _refused(conn, INSERT, 7, "x") == first  # pending: the same request
        assert _count(direct_dsn, "return_t", 7) == 0  # not before the approval
        await _approve(api, first)
        assert await conn.execute(INSERT, 7, "x") == "INSERT 0 1"
        assert _count(direct_dsn, "return_t", 7) == 1
        again = await _refused(conn, INSERT, 7, "x")  # once: a new send asks anew
        assert again != first
        assert _count(direct_dsn, "return_t", 7) == 1
    finally:
        await conn.close()
    # The two refusals and the run, each naming the request; then the run's outcome.
    refused_1, refused_2, run = await wait_for_entries(
        pgguard, state_dsn, "kind = 'statement' AND request_id = $1", first, count=3
    )
    assert refused_1["sqlstate"] == refused_2["sqlstate"] == "55000"
    assert run["action"] == "hold"
    assert run["sqlstate"] is None
    (outcome,) = await wait_for_entries(
        pgguard, state_dsn, "kind = 'outcome' AND request_id = $1", first
    )
    assert outcome["command_tag"] == "INSERT 0 1"


async def test_another_session_of_the_agent_runs_it_once(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    """The agent came back later on a new connection (asyncpg names statements anew)."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        request = await _refused(conn, INSERT, 17, "y")
    finally:
        await conn.close()
    await _approve(api, request)
    first = await asyncpg.connect(pgguard.dsn())
    second = await asyncpg.connect(pgguard.dsn())
    try:
        results = await asyncio.gather(
            first.execute(INSERT, 17, "y"), second.execute(INSERT, 17, "y"), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in results) == [
            "ObjectNotInPrerequisiteStateError",
            "str",
        ], results
        assert _count(direct_dsn, "return_t", 17) == 1
    finally:
        await first.close()
        await second.close()


async def test_not_for_other_parameters_or_text(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        request = await _refused(conn, INSERT, 8, "x")
        other_value = await _refused(conn, INSERT, 9, "x")
        other_text = await _refused(conn, "INSERT INTO return_t  VALUES ($1, $2)", 8, "x")
        other_type = await _refused(conn, "INSERT INTO return_t VALUES ($1, $2::text)", 8, "x")
        assert len({request, other_value, other_text, other_type}) == 4
        await _approve(api, request)
        assert await _refused(conn, INSERT, 9, "x") == other_value  # still pending
        assert await _refused(conn, "INSERT INTO return_t  VALUES ($1, $2)", 8, "x") == other_text
        assert _count(direct_dsn, "return_t", 9) == 0
        assert _count(direct_dsn, "return_t", 8) == 0
        assert await conn.execute(INSERT, 8, "x") == "INSERT 0 1"
    finally:
        await conn.close()


async def test_not_after_expiry(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        sql = "INSERT INTO return_short_t VALUES (5, 'late')"
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as info:
            await conn.execute(sql)
        match = PENDING.match(info.value.message)
        assert match
        await _approve(api, match.group(1))
        await asyncio.sleep(2.5)  # the rule's hold_timeout is 2 s
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as late:
            await conn.execute(sql)
        assert match.group(1) not in str(late.value)  # a new request, nothing ran
        assert _count(direct_dsn, "return_short_t", 5) == 0
    finally:
        await conn.close()


async def test_simple_query_with_psycopg(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(pgguard.dsn(), autocommit=True) as conn:
        sql = "INSERT INTO return_t VALUES (11, 'simple')"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
            await conn.execute(sql, prepare=False)
        match = PENDING.match(info.value.diag.message_primary or "")
        assert match
        await _approve(api, match.group(1))
        await conn.execute(sql, prepare=False)
        assert _count(direct_dsn, "return_t", 11) == 1


async def test_not_for_another_agent_or_database(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    """The approval of one agent's statement never runs the same text for another agent, nor
    for the same agent on another database."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        request = await _refused(conn, INSERT, 21, "z")
        await _approve(api, request)
    finally:
        await conn.close()
    leaky = await asyncpg.connect(pgguard.dsn(user="leaky", password="leaky-password"))
    try:
        assert await _refused(leaky, INSERT, 21, "z") != request
    finally:
        await leaky.close()
    elsewhere = await asyncpg.connect(pgguard.dsn(dbname="allowed_db"))
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await elsewhere.execute(INSERT, 21, "z")
        assert request not in str(info.value)
    finally:
        await elsewhere.close()
    assert _count(direct_dsn, "return_t", 21) == 0
    conn = await asyncpg.connect(pgguard.dsn())
    try:  # the owner of the approval still has its one run
        assert await conn.execute(INSERT, 21, "z") == "INSERT 0 1"
    finally:
        await conn.close()


async def test_a_forged_approval_runs_nothing(
    pgguard: PgguardThread, direct_dsn: str, state_dsn: str
) -> None:
    """A state-database writer marks a pending return-mode request approved, with a decision
    row of their own: no MAC of pgguard's verifies, so the re-sent statement does not run."""
    schema = pgguard.settings.state.schema_name
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        request = await _refused(conn, INSERT, 31, "forged")
        writer = await asyncpg.connect(state_dsn)
        try:
            await writer.execute(
                f"INSERT INTO {schema}.approval_decisions (request_id, approver_id, "
                "approver_name, verdict, channel, comment, mac) "
                "VALUES ($1, 'mallory', 'Mallory', 'approve', 'api', 'trust me', 'v1:00')",
                request,
            )
            await writer.execute(
                f"UPDATE {schema}.approval_requests SET state = 'approved', decided_at = now() "
                "WHERE id = $1",
                request,
            )
        finally:
            await writer.close()
        assert await _refused(conn, INSERT, 31, "forged") != request
        assert _count(direct_dsn, "return_t", 31) == 0
    finally:
        await conn.close()


async def test_a_cleared_run_mark_is_visible_in_the_ledger(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str, state_dsn: str
) -> None:
    """The documented limit: a writer who clears ``run_at`` of an approved request gets it run
    again - and the ledger then shows two runs naming the one request."""
    schema = pgguard.settings.state.schema_name
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        request = await _refused(conn, INSERT, 41, "again")
        await _approve(api, request)
        assert await conn.execute(INSERT, 41, "again") == "INSERT 0 1"
        writer = await asyncpg.connect(state_dsn)
        try:
            await writer.execute(
                f"UPDATE {schema}.approval_requests SET run_at = NULL WHERE id = $1", request
            )
        finally:
            await writer.close()
        assert await conn.execute(INSERT, 41, "again") == "INSERT 0 1"
    finally:
        await conn.close()
    runs = await wait_for_entries(
        pgguard, state_dsn, "kind = 'outcome' AND request_id = $1", request, count=2
    )
    assert len(runs) == 2
    assert _count(direct_dsn, "return_t", 41) == 2
