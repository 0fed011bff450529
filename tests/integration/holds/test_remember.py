"""Remembered approvals cover only what does the same thing (issue 16, deliverable 4).

The review's near-misses, end to end: approve a statement with ``remember:``, then send one that
libpg_query's fingerprint cannot tell from it but which does something else. It must wait for
its own approval. A positive control shows the remembered approval does work for the same
statement, so a pass is not a broken remember.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import TEST_RULES, auth, hold_settings, wait_for_request
from tests.support import PgguardThread, shipped_rules_with
from tests.teams_stub import TeamsStub

REMEMBER_RULES = (
    TEST_RULES
    + """
  - id: test.remember-code-and-grants
    description: Approvals of DO blocks, GRANTs and set_config calls are remembered.
    match: {kinds: [DoStmt, GrantStmt, VariableSetStmt]}
    action: hold
    remember: 60
  - id: test.remember-notes-writes
    description: Approvals of writes to remember_notes (routine bodies too) are remembered.
    match: {tables: [remember_notes]}
    action: hold
    remember: 60
  - id: test.remember-set-config
    description: Approvals of set_config calls are remembered.
    match: {functions: [set_config]}
    action: hold
    remember: 60
"""
)


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_rules_with(tmp_path_factory.mktemp("rules"), "zz-test.yaml", REMEMBER_RULES)


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, teams: TeamsStub
) -> Iterator[PgguardThread]:
    schema = f"pgguard_remember_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn, state_dsn, rules_dir, schema, teams={"webhook_url": teams.url}
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def roles(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for role in ("analyst", "intruder"):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f"CREATE ROLE {role}")
        conn.execute("DROP TABLE IF EXISTS remember_notes")
        conn.execute("CREATE TABLE remember_notes (id int)")


async def approve_remembered(conn: asyncpg.Connection, api: httpx.AsyncClient, sql: str) -> None:
    """Run `sql`, approve its request, and check that a repeat is approved from memory."""
    running = asyncio.create_task(conn.execute(sql))
    request = await wait_for_request(api, sql[:10])
    assert request["remembered_from"] is None
    await api.post(f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1"))
    await asyncio.wait_for(running, 10)
    await asyncio.wait_for(conn.execute(sql), 5)  # positive control: remembered


async def is_held(conn: asyncpg.Connection, api: httpx.AsyncClient, sql: str, needle: str) -> bool:
    running = asyncio.create_task(conn.execute(sql))
    try:
        request = await wait_for_request(api, needle)
        held = not running.done() and request["remembered_from"] is None
        await api.post(
            f"/api/requests/{request['id']}/deny", json={"reason": "no"}, headers=auth("dba1")
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
        return held
    finally:
        running.cancel()


@pytest.mark.parametrize(
    ("approved", "near_miss", "needle"),
    [
        (
            "DO $$ BEGIN PERFORM 0; END $$",
            "DO $$ BEGIN EXECUTE 'DROP TABLE remember_notes'; END $$",
            "EXECUTE",
        ),
        (
            "GRANT SELECT ON remember_notes TO analyst",
            "GRANT SELECT ON remember_notes TO intruder",
            "intruder",
        ),
        (
            "SELECT set_config('application_name', 'x', false)",
            "SELECT set_config('session_replication_role', 'replica', false)",
            "24 chars",
        ),
        ("SET application_name = 'y'", "SET session_replication_role = 'replica'", "SET session"),
    ],
)
async def test_a_remembered_approval_does_not_cover_a_near_miss(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    direct_dsn: str,
    approved: str,
    near_miss: str,
    needle: str,
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await approve_remembered(conn, api, approved)
        assert await is_held(conn, api, near_miss, needle)
    finally:
        await conn.close()
    with psycopg.connect(direct_dsn) as direct:
        assert direct.execute("SELECT to_regclass('remember_notes') IS NOT NULL").fetchone() == (
            True,
        )
        grants = direct.execute(
            "SELECT count(*) FROM information_schema.role_table_grants "
            "WHERE table_name = 'remember_notes' AND grantee = 'intruder'"
        ).fetchone()
        assert grants == (0,)


async def test_a_remembered_routine_call_does_not_cover_a_replaced_routine(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    define = (
        "CREATE OR REPLACE FUNCTION f_rem() RETURNS int LANGUAGE sql "
        "AS $$ DELETE FROM remember_notes WHERE id = {} RETURNING 1 $$"
    )
    with psycopg.connect(direct_dsn, autocommit=True) as owner:
        owner.execute(define.format("-1"))
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await approve_remembered(conn, api, "SELECT f_rem()")
        with psycopg.connect(direct_dsn, autocommit=True) as owner:
            owner.execute(define.format("id"))  # same tables, same categories: another body
        assert await is_held(conn, api, "SELECT f_rem()", "f_rem")
    finally:
        await conn.close()
        with psycopg.connect(direct_dsn, autocommit=True) as owner:
            owner.execute("DROP FUNCTION IF EXISTS f_rem()")
