"""The ledger through the real path (issue 6): every statement and decision, with outcomes.

Statements go through pgguard from a real client; the entries are read back from the state
database, exported with ``pgguard ledger export`` and checked with ``pgguard ledger verify``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pgguard.ledger import verify
from tests.integration.holds.helpers import OWNER, auth, wait_for_request
from tests.support import PgguardThread


async def entries(pgguard: PgguardThread, state_dsn: str, where: str, *args: Any) -> list[Any]:
    schema = pgguard.settings.state.schema_name
    conn = await asyncpg.connect(state_dsn)
    try:
        return list(
            await conn.fetch(f"SELECT * FROM {schema}.ledger WHERE {where} ORDER BY seq", *args)
        )
    finally:
        await conn.close()


async def wait_for_entries(
    pgguard: PgguardThread, state_dsn: str, where: str, *args: Any, count: int = 1
) -> list[Any]:
    found: list[Any] = []

    async def enough() -> bool:
        nonlocal found
        found = await entries(pgguard, state_dsn, where, *args)
        return len(found) >= count

    async with asyncio.timeout(10):
        while True:
            if await enough():
                return found
            await asyncio.sleep(0.1)


async def test_allowed_statement_with_its_outcome(pgguard: PgguardThread, state_dsn: str) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.execute("INSERT INTO hold_t VALUES (77, 'zed@example.com')")
        await conn.fetch("SELECT count(*) FROM hold_t WHERE id = $1", 77)
    finally:
        await conn.close()
    (insert,) = await wait_for_entries(
        pgguard, state_dsn, "kind = 'statement' AND statement LIKE 'INSERT INTO hold_t%'"
    )
    assert insert["agent"] == "agent"
    assert insert["owner"] == OWNER
    assert insert["action"] == "allow"
    assert insert["command_tag"] == "INSERT 0 1"
    assert insert["rows"] == 1
    assert insert["sqlstate"] is None
    assert insert["duration_ms"] >= 0
    assert "zed@example.com" not in insert["statement"]  # masked
    assert insert["upstream_role"]
    (select,) = await wait_for_entries(
        pgguard,
        state_dsn,
        "kind = 'statement' AND statement LIKE 'SELECT count(*) FROM hold_t%'",
    )
    assert select["command_tag"] == "SELECT 1"


async def test_ordinary_statements_are_packed_masked_and_verifiable(
    pgguard: PgguardThread, state_dsn: str
) -> None:
    """Ordinary statements go many to a row of ledger_packs; the view shows each as a row, the
    raw pack holds no literal value, and verify walks packs and full entries as one chain."""
    conn = await asyncpg.connect(pgguard.dsn(), statement_cache_size=0)
    try:
        for i in range(5):
            await conn.execute(
                f"SELECT id FROM hold_t WHERE email = 'packed-secret-{i}@corp.example'"
            )
    finally:
        await conn.close()
    found = await wait_for_entries(
        pgguard,
        state_dsn,
        "packed AND statement LIKE 'SELECT id FROM hold_t WHERE email%'",
        count=5,
    )
    assert {f["statement"] for f in found} == {"SELECT id FROM hold_t WHERE email = '?'"}
    assert all(f["command_tag"] == "SELECT 0" and f["agent"] == "agent" for f in found)
    assert len({f["entry_id"] for f in found}) == 5
    schema = pgguard.settings.state.schema_name
    admin = await asyncpg.connect(state_dsn)
    try:
        bodies = [r["body"] for r in await admin.fetch(f"SELECT body FROM {schema}.ledger_packs")]
        assert bodies
        assert not any("packed-secret" in body for body in bodies)
        report = await verify(admin, schema=schema)
        assert report.ok, report.problems
    finally:
        await admin.close()


async def test_packed_statement_with_unusual_text_keeps_the_view_readable(
    pgguard: PgguardThread, state_dsn: str
) -> None:
    """Non-ASCII, quoted identifiers and a failing statement in a pack: the view still reads
    (it casts every pack body to jsonb), and verify passes."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.execute("""SELECT 'h\u00e9llo \u2603' AS "na\u00efve \u2603 col" """)
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("""SELECT "\u2603 no such column" FROM hold_t""")
    finally:
        await conn.close()
    found = await wait_for_entries(
        pgguard, state_dsn, "packed AND statement LIKE '%\u2603%'", count=2
    )
    assert {f["sqlstate"] for f in found} == {None, "42703"}
    assert not any("h\u00e9llo" in f["statement"] for f in found)  # the literal is masked
    admin = await asyncpg.connect(state_dsn)
    try:
        report = await verify(admin, schema=pgguard.settings.state.schema_name)
        assert report.ok, report.problems
    finally:
        await admin.close()


async def test_failed_statement_records_its_error(pgguard: PgguardThread, state_dsn: str) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1/0 FROM hold_t")
    finally:
        await conn.close()
    (failed,) = await wait_for_entries(
        pgguard, state_dsn, "statement LIKE '%FROM hold_t' AND sqlstate = '22012'"
    )
    assert failed["sqlstate"] == "22012"
    assert "division by zero" in failed["error_message"]


async def test_approved_statement_is_durable_with_its_approver(
    pgguard: PgguardThread, api: httpx.AsyncClient, state_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(
            conn.execute("COPY hold_t TO STDOUT /* reason='audit test' */")
        )
        request = await wait_for_request(api, "COPY hold_t")
        await api.post(
            f"/api/requests/{request['id']}/approve", json={"reason": "fine"}, headers=auth("dba1")
        )
        await asyncio.wait_for(running, 10)
    finally:
        await conn.close()
    (statement,) = await wait_for_entries(
        pgguard, state_dsn, "kind = 'statement' AND request_id = $1", request["id"]
    )
    assert statement["action"] == "hold"
    assert statement["categories"] == ["export"]
    assert statement["reason"] == "audit test"
    approvers = (
        json.loads(statement["approvers"])
        if isinstance(statement["approvers"], str)
        else statement["approvers"]
    )
    assert approvers[0]["id"] == "dba1"
    assert approvers[0]["name"] == "Dana DBA"
    assert approvers[0]["channel"] == "api"
    assert approvers[0]["comment"] == "fine"
    (outcome,) = await wait_for_entries(
        pgguard, state_dsn, "kind = 'outcome' AND statement_entry_id = $1", statement["entry_id"]
    )
    assert outcome["command_tag"] == "COPY 1"
    # Durable before forwarding: the decision's entry precedes its outcome in the chain.
    assert statement["chain_id"] == outcome["chain_id"]
    assert statement["seq"] < outcome["seq"]


@pytest.mark.parametrize("how", ["deny", "expire"])
async def test_refused_statements_are_recorded(
    pgguard: PgguardThread, api: httpx.AsyncClient, state_dsn: str, how: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    # short_t exports expire after 1 s (a test rule); hold_t ones wait for the denial.
    table = "hold_t" if how == "deny" else "short_t"
    try:
        running = asyncio.create_task(conn.execute(f"COPY {table} TO STDOUT"))
        request = await wait_for_request(api, f"COPY {table}")
        if how == "deny":
            await api.post(
                f"/api/requests/{request['id']}/deny", json={"reason": "no"}, headers=auth("dba2")
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
    finally:
        await conn.close()
    (entry,) = await wait_for_entries(pgguard, state_dsn, "request_id = $1", request["id"])
    assert entry["sqlstate"] == "42501"
    assert entry["action"] == "hold"
    assert ("denied" if how == "deny" else "expired") in entry["error_message"]


async def test_sessions_and_auth_failures_are_recorded(
    pgguard: PgguardThread, state_dsn: str
) -> None:
    conn = await asyncpg.connect(pgguard.dsn(application_name="ledger-app"))
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pgguard.dsn(password="wrong"))
    started = await wait_for_entries(
        pgguard, state_dsn, "kind = 'session_start' AND application_name = 'ledger-app'"
    )
    ended = await wait_for_entries(
        pgguard, state_dsn, "kind = 'session_end' AND session_id = $1", started[0]["session_id"]
    )
    assert ended
    failures = await wait_for_entries(
        pgguard, state_dsn, "kind = 'auth_failure' AND agent = 'agent'"
    )
    assert failures[0]["client_address"].startswith("127.0.0.1")


async def test_export_and_verify_from_the_cli(
    pgguard: PgguardThread, state_dsn: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.execute("SELECT 'cli-export-marker' FROM hold_t")
    finally:
        await conn.close()
    await wait_for_entries(
        pgguard, state_dsn, "statement LIKE '%FROM hold_t' AND command_tag = 'SELECT 1'"
    )
    config = tmp_path / "pgguard.toml"
    schema = pgguard.settings.state.schema_name
    upstream = pgguard.settings.upstream.dsn.get_secret_value()
    config.write_text(  # the instance's data_dir: verify checks its key's checkpoints
        f'data_dir = "{pgguard.settings.data_dir.resolve()}"\n'
        f'[upstream]\ndsn = "{upstream}"\n[state]\ndsn = "{state_dsn}"\nschema = "{schema}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    cli = [sys.executable, "-m", "pgguard.cli", "ledger"]
    exported = await asyncio.to_thread(
        subprocess.run,
        [*cli, "export", "--format", "jsonl", "--agent", "agent", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert rows
    assert all(row["agent"] == "agent" for row in rows)
    verified = await asyncio.to_thread(
        subprocess.run,
        [*cli, "verify", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified" in verified.stdout


async def test_approved_statement_is_refused_when_the_ledger_cannot_record_it(
    upstream_dsn: str, state_dsn: str, rules_dir: Path
) -> None:
    """Fail closed: neither the state database nor the spool can take the decision's entry."""
    import secrets

    from tests.integration.holds.helpers import hold_settings

    schema = f"pgguard_noledger_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        rules_dir,
        schema,
        ledger={"spool_dir": f"/proc/pgguard-spool-{secrets.token_hex(4)}"},  # cannot exist
        state_timeout=1.0,
    )
    thread = PgguardThread(settings).start()
    admin = await asyncpg.connect(state_dsn)
    try:
        # From now on the state database refuses every ledger row (approvals still work).
        await admin.execute(
            f"ALTER TABLE {schema}.ledger_entries ADD CONSTRAINT refuse CHECK (false) NOT VALID"
        )
        conn = await asyncpg.connect(thread.dsn())
        async with httpx.AsyncClient(base_url=thread.http_url, timeout=10) as api:
            try:
                running = asyncio.create_task(conn.execute("COPY hold_t TO STDOUT"))
                request = await wait_for_request(api, "COPY hold_t")
                approved = await api.post(
                    f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
                )
                assert approved.json()["state"] == "approved"
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                    await asyncio.wait_for(running, 20)
                assert "ledger cannot record it" in str(info.value)
            finally:
                await conn.close()
    finally:
        await admin.execute(f"ALTER TABLE {schema}.ledger_entries DROP CONSTRAINT refuse")
        await admin.close()
        thread.stop()
