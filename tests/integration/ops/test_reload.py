"""Reloading a running pgguard: validate everything, then swap at once, or keep the old config.

Real sessions through the proxy, a real held statement, real rule files rewritten on disk.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg
import httpx
import pytest

from pgguard.web.ops import ReloadResult
from tests.integration.holds.helpers import auth, hold_settings, wait_for_request
from tests.integration.ops.conftest import OPS_RULES
from tests.support import PgguardThread


def set_action(rules: Path, action: str) -> None:
    (rules / "zz-ops.yaml").write_text(OPS_RULES.replace("action: allow", f"action: {action}"))


def reload(pgguard: PgguardThread) -> ReloadResult:
    result = pgguard.call(pgguard.running.reload())
    assert isinstance(result, ReloadResult)
    return result


async def test_a_reload_changes_the_next_statement_and_a_held_one_survives(
    ops_pgguard: PgguardThread, ops_api: httpx.AsyncClient, ops_rules: Path
) -> None:
    set_action(ops_rules, "allow")
    assert reload(ops_pgguard).reloaded
    reader = await asyncpg.connect(ops_pgguard.dsn())  # a session open across the reload
    holder = await asyncpg.connect(ops_pgguard.dsn())
    try:
        assert await reader.fetchval("SELECT count(*) FROM reload_t") == 1
        held = asyncio.create_task(holder.execute("DROP TABLE hold_t"))
        request = await wait_for_request(ops_api, "hold_t")
        set_action(ops_rules, "deny")
        result = reload(ops_pgguard)
        assert result.reloaded, result.message
        assert result.restart_needed == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"test\.reload-target"):
            await reader.fetchval("SELECT count(*) FROM reload_t")
        # The same text again (a per-session cache must not answer with the old rules).
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"test\.reload-target"):
            await reader.fetchval("SELECT count(*) FROM reload_t")
        assert not held.done()
        still = await ops_api.get(f"/api/requests/{request['id']}", headers=auth("dba1"))
        assert still.json()["state"] == "pending"
        answer = await ops_api.post(
            f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
        )
        assert answer.status_code == 200
        assert await asyncio.wait_for(held, 10) == "DROP TABLE"
    finally:
        await reader.close()
        await holder.close()
        set_action(ops_rules, "allow")
        reload(ops_pgguard)


async def test_a_bad_reload_keeps_the_old_configuration(
    ops_pgguard: PgguardThread, ops_api: httpx.AsyncClient, ops_rules: Path
) -> None:
    set_action(ops_rules, "allow")
    assert reload(ops_pgguard).reloaded
    conn = await asyncpg.connect(ops_pgguard.dsn())
    try:
        set_action(ops_rules, "explode")  # not an action: the rules do not validate
        result = reload(ops_pgguard)
        assert not result.reloaded
        assert "zz-ops.yaml:7" in result.message
        assert "action" in result.message
        assert await conn.fetchval("SELECT count(*) FROM reload_t") == 1  # the old rule still
        response = await ops_api.post("/api/reload", headers=auth("dba1"))
        assert response.status_code == 409
        assert "old configuration stays" in response.json()["message"]
        # The nearest variant: the configuration itself is bad (no agents at all).
        set_action(ops_rules, "deny")
        settings = ops_pgguard.running.settings
        ops_pgguard.running.source = lambda: settings.model_copy(update={"agents": []})
        result = reload(ops_pgguard)
        assert not result.reloaded
        assert "agents" in result.message
        assert await conn.fetchval("SELECT count(*) FROM reload_t") == 1  # rules not swapped
    finally:
        ops_pgguard.running.source = None
        await conn.close()
        set_action(ops_rules, "allow")
        reload(ops_pgguard)


async def test_settings_that_need_a_restart_are_kept_and_named(
    ops_pgguard: PgguardThread,
) -> None:
    running = ops_pgguard.running
    settings = running.settings
    port = ops_pgguard.port
    moved = settings.model_copy(update={"listen": settings.listen.model_copy(update={"port": 1})})
    running.source = lambda: moved
    try:
        result = reload(ops_pgguard)
    finally:
        running.source = None
    assert result.reloaded
    assert result.restart_needed == ["listen"]
    assert "need a restart" in result.message
    assert running.settings.listen.port == settings.listen.port
    conn = await asyncpg.connect(ops_pgguard.dsn())  # still served where it was
    try:
        assert ops_pgguard.port == port
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_a_statement_held_at_shutdown_is_recorded_as_pgguard_shut_down(
    upstream_dsn: str, state_dsn: str, ops_rules: Path
) -> None:
    schema = f"pgguard_shut_{secrets.token_hex(4)}"
    pgguard = PgguardThread(hold_settings(upstream_dsn, state_dsn, ops_rules, schema)).start()
    stopped = False
    try:
        conn = await asyncpg.connect(pgguard.dsn())
        async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as api:
            held = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
            request = await wait_for_request(api, "hold_t")
        await asyncio.to_thread(pgguard.stop)
        stopped = True
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await asyncio.wait_for(held, 10)
        conn.terminate()
    finally:
        if not stopped:
            pgguard.stop()
    state = await asyncpg.connect(state_dsn)
    try:
        row = await state.fetchrow(
            f"SELECT state, state_reason FROM {schema}.approval_requests WHERE id = $1",
            request["id"],
        )
    finally:
        await state.close()
    assert row is not None
    assert (row["state"], row["state_reason"]) == ("cancelled", "pgguard shut down")
