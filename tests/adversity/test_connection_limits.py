"""One agent cannot take every upstream slot: per-agent and total limits, refused with 53300.

Through the real proxy with real drivers; the limits are small so the attack is cheap.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgguard.policy import SHIPPED_RULES_DIR
from pgguard.proxy.capacity import STATE_CONNECTIONS
from tests.integration.holds.helpers import hold_settings
from tests.support import AGENT, AGENT_PASSWORD, OWNER, PgguardThread, ProxyThread, agent_settings

AGENTS = [
    {"name": AGENT, "password": AGENT_PASSWORD, "owner": OWNER, "max_sessions": 3},
    {"name": "other", "password": "other-password", "owner": "bob@example.com", "max_sessions": 4},
]


@pytest.fixture
def limited(upstream_dsn: str) -> Iterator[ProxyThread]:
    settings = agent_settings(upstream_dsn, agents=AGENTS, limits={"max_upstream_sessions": 5})
    thread = ProxyThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


def connect(
    proxy: ProxyThread, user: str = AGENT, password: str = AGENT_PASSWORD
) -> psycopg.Connection:
    conn = psycopg.connect(proxy.dsn(user=user, password=password), connect_timeout=10)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    return conn


def refused(proxy: ProxyThread, user: str = AGENT, password: str = AGENT_PASSWORD) -> str:
    """The refusal's message; asyncpg, because it reports the server's SQLSTATE of a login."""

    async def attempt() -> None:
        conn = await asyncpg.connect(proxy.dsn(user=user, password=password), timeout=10)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as caught:
        asyncio.run(attempt())
    assert caught.value.sqlstate == "53300"
    return str(caught.value)


def test_an_agent_is_held_to_its_max_sessions_and_others_still_connect(
    limited: ProxyThread,
) -> None:
    with ExitStack() as stack:
        mine = [stack.enter_context(connect(limited)) for _ in range(3)]
        message = refused(limited)
        assert "max_sessions" in message
        assert "agent agent" in message
        # The other agent is not affected by the first one's flood.
        theirs = stack.enter_context(connect(limited, "other", "other-password"))
        assert theirs.execute("SELECT 2").fetchone() == (2,)
        # The sessions that were admitted keep working.
        assert all(c.execute("SELECT 3").fetchone() == (3,) for c in mine)
        mine.pop().close()
        # The slot came back when the session ended.
        stack.enter_context(connect(limited))


def test_the_total_is_enforced_and_names_its_setting(limited: ProxyThread) -> None:
    with ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(connect(limited))
        for _ in range(2):
            stack.enter_context(connect(limited, "other", "other-password"))
        message = refused(limited, "other", "other-password")
        assert "max_upstream_sessions" in message


def test_without_max_sessions_one_agent_gets_half(upstream_dsn: str) -> None:
    agents = [{**a, "max_sessions": None} for a in AGENTS]
    settings = agent_settings(upstream_dsn, agents=agents, limits={"max_upstream_sessions": 4})
    proxy = ProxyThread(settings).start()
    try:
        with ExitStack() as stack:
            for _ in range(2):
                stack.enter_context(connect(proxy))
            assert "max_sessions" in refused(proxy)
            stack.enter_context(connect(proxy, "other", "other-password"))
    finally:
        proxy.stop()


def test_the_default_total_leaves_pgguard_its_own_connections(
    upstream_dsn: str, state_dsn: str, direct_dsn: str
) -> None:
    settings = hold_settings(
        upstream_dsn, state_dsn, Path(SHIPPED_RULES_DIR), f"pgguard_cap_{secrets.token_hex(4)}"
    )
    thread = PgguardThread(settings).start()
    try:
        with psycopg.connect(direct_dsn) as conn:
            row = conn.execute(
                "SELECT current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int,"
                " coalesce(current_setting('reserved_connections', true), '0')::int"
            ).fetchone()
        assert row is not None
        slots = thread.running.proxy.ctx.slots
        assert slots.total == row[0] - row[1] - row[2] - STATE_CONNECTIONS
        assert slots.per_agent[AGENT] == slots.total // 2
    finally:
        thread.stop()
