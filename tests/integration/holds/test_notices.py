"""The agent knows what is happening (issue 21): a NOTICE when its statement is held, reminders
while it waits, and DETAIL/HINT on every refusal - through psql, asyncpg and psycopg's own
notice hooks, each NOTICE arriving BEFORE anyone decides."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from pgguard.wire import messages as m
from tests.integration.holds.helpers import (
    PUBLIC_URL,
    auth,
    eventually,
    hold_settings,
    wait_for_request,
)
from tests.support import OWNER, PgguardThread, RawClient
from tests.teams_stub import TeamsStub

PREFIX = "pgguard: held for approval as request "


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, teams: TeamsStub
) -> Iterator[PgguardThread]:
    schema = f"pgguard_notices_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        rules_dir,
        schema,
        teams={"webhook_url": teams.url},
        holds={"notice_interval": 0.4},
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


async def _decide(api: httpx.AsyncClient, request_id: str, verdict: str, who: str = "dba1") -> None:
    response = await api.post(
        f"/api/requests/{request_id}/{verdict}", json={"reason": "not today"}, headers=auth(who)
    )
    assert response.status_code == 200, response.text


async def test_asyncpg_log_listener_gets_the_notice_before_the_decision(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    notices: list[asyncpg.PostgresLogMessage] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message))
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await eventually(lambda: len(notices) >= 3)  # the first, then reminders every 0.4 s
        assert not running.done()  # nobody has decided yet
        first = notices[0]
        assert first.severity == "NOTICE"
        assert first.message == PREFIX + request["id"]
        assert first.detail is not None
        assert "Categories: ddl" in first.detail
        assert "Who can approve:" in first.detail
        assert OWNER in first.detail
        assert "Expires at" in first.detail
        assert first.hint is not None
        assert f"{PUBLIC_URL}/requests/{request['id']}" in first.hint
        reminder = notices[1]
        assert reminder.message.startswith(PREFIX + request["id"] + ": still waiting")
        await _decide(api, request["id"], "approve")
        assert await asyncio.wait_for(running, 10) == "DROP TABLE"
    finally:
        await conn.close()


async def test_psycopg_notice_handler_gets_the_notice_before_the_decision(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    async with await psycopg.AsyncConnection.connect(pgguard.dsn(), autocommit=True) as conn:
        # A Diagnostic is only valid inside the handler: keep its fields.
        notices: list[tuple[str | None, str | None, str | None, str | None]] = []
        conn.add_notice_handler(
            lambda d: notices.append(
                (d.message_primary, d.sqlstate, d.message_detail, d.message_hint)
            )
        )
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await eventually(lambda: bool(notices))
        assert not running.done()
        message, sqlstate, detail, hint = notices[0]
        assert message == PREFIX + request["id"]
        assert sqlstate == "00000"
        assert "Categories: ddl" in (detail or "")
        assert f"/requests/{request['id']}" in (hint or "")
        await _decide(api, request["id"], "deny", "dba2")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            await asyncio.wait_for(running, 10)
        diag = info.value.diag
        assert diag.message_detail is not None
        assert "not today" in diag.message_detail
        assert "Drew DBA" in diag.message_detail
        assert diag.message_hint is not None
        assert "new request" in diag.message_hint


def test_psql_prints_the_notice_on_stderr_while_it_waits(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    psql = subprocess.Popen(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-c", "DROP TABLE hold_t", pgguard.dsn()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert psql.stderr is not None
        line = psql.stderr.readline()  # blocks until psql prints the NOTICE (or exits)
        assert line.startswith("NOTICE:  " + PREFIX), line
        request_id = line.strip().removeprefix("NOTICE:  " + PREFIX)
        assert psql.poll() is None  # still waiting for the decision
        detail = psql.stderr.readline()
        assert detail.startswith("DETAIL:  Categories: ddl"), detail
        pgguard.call(_decide_sync(pgguard, request_id))
        _out, err = psql.communicate(timeout=20)
        assert psql.returncode == 1
        assert f"ERROR:  pgguard: request {request_id} was denied" in err
        assert "DETAIL:  Request " in err
        assert "HINT:  " in err
    finally:
        if psql.poll() is None:
            psql.kill()


async def _decide_sync(pgguard: PgguardThread, request_id: str) -> None:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as api:
        await _decide(api, request_id, "deny")


async def test_expiry_carries_detail_and_hint(pgguard: PgguardThread) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncio.wait_for(conn.execute("DROP TABLE short_t"), 20)
        error = info.value
        assert "expired without a decision" in str(error)
        assert error.detail is not None
        assert "Nobody decided" in error.detail
        assert "test.short" in error.detail
        assert error.hint is not None
        assert "new request" in error.hint
    finally:
        await conn.close()


async def test_every_refusal_has_detail_and_hint(pgguard: PgguardThread) -> None:
    """A policy deny (here the fallback deny of a text PostgreSQL cannot parse) explains
    itself too."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute("SELEKT 1")
        assert info.value.detail
        assert info.value.hint
    finally:
        await conn.close()


async def test_notice_never_splits_a_server_message(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    """A large reply still streams (the client is not reading) when the next statement is
    held: pgguard's NOTICE goes between whole server messages, never inside the DataRow."""
    client = RawClient.connect(pgguard.port)
    try:
        assert client.login()[-1][0] == "Z"
        size = 8_000_000
        client.send(m.query(f"SELECT repeat('x', {size})") + m.query("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await asyncio.sleep(1)  # the hold's NOTICE is due while the reply is stuck
        first = await asyncio.to_thread(client.recv_until, "Z")
        assert [t for t, _ in first if t != "N"] == ["T", "D", "C", "Z"]
        (row,) = [body for t, body in first if t == "D"]
        assert len(row) == 2 + 4 + size
        notices = [body for t, body in first if t == "N"]
        if not notices:  # not due yet mid-reply: it comes right after
            kind, body = await asyncio.to_thread(client.recv_message)
            assert kind == "N"
            notices = [body]
        assert m.decode_error_fields(notices[0]).message == PREFIX + request["id"]
        await _decide(api, request["id"], "deny")
        rest = await asyncio.to_thread(client.recv_until, "Z")
        assert [t for t, _ in rest if t != "N"] == ["E", "Z"]
    finally:
        client.close()


async def test_a_cancel_says_what_happened(pgguard: PgguardThread, api: httpx.AsyncClient) -> None:
    async with await psycopg.AsyncConnection.connect(pgguard.dsn(), autocommit=True) as conn:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            await asyncio.wait_for(running, 10)
        diag = info.value.diag
        assert diag.message_detail is not None
        assert f"request {request['id']}" in diag.message_detail
        assert diag.message_hint is not None
        assert "new request" in diag.message_hint
