"""Fixtures for the operations tests: pgguard (proxy, approvals, HTTP) reaching its upstream and
its state database through relays a test can switch off (`Forwarder`)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.statedb import setup
from tests.integration.holds.helpers import hold_settings
from tests.integration.ops.forwarder import Forwarder
from tests.support import PgguardThread, shipped_rules_with

STATE_PLAN = setup.StatePlan(password="state-password")  # as tests/conftest.py applies it

OPS_RULES = """
version: 1
rules:
  - id: test.reload-target
    description: What a reload changes (allow here; the tests rewrite it).
    match: {tables: [reload_t]}
    action: allow
"""


@pytest.fixture(scope="module")
def upstream_relay(need_embedded: EmbeddedPostgres) -> Iterator[Forwarder]:
    relay = Forwarder("127.0.0.1", need_embedded.port).start()
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture(scope="module")
def state_relay(state_dsn: str, state_pg: EmbeddedPostgres) -> Iterator[Forwarder]:
    relay = Forwarder("127.0.0.1", state_pg.port).start()
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture(scope="module")
def ops_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_rules_with(tmp_path_factory.mktemp("rules"), "zz-ops.yaml", OPS_RULES)


@pytest.fixture(scope="module")
def ops_pgguard(
    need_embedded: EmbeddedPostgres,
    upstream_relay: Forwarder,
    state_relay: Forwarder,
    ops_rules: Path,
) -> Iterator[PgguardThread]:
    upstream = need_embedded.tcp_dsn().replace(
        f":{need_embedded.port}/", f":{upstream_relay.port}/"
    )
    state = setup.state_dsn(
        STATE_PLAN, parse_dsn(f"postgresql://x@127.0.0.1:{state_relay.port}/postgres")
    )
    schema = f"pgguard_ops_{secrets.token_hex(4)}"
    thread = PgguardThread(hold_settings(upstream, state, ops_rules, schema)).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
async def ops_api(ops_pgguard: PgguardThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ops_pgguard.http_url, timeout=15) as client:
        yield client


@pytest.fixture(autouse=True)
def ops_tables(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for name in ("hold_t", "reload_t"):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE TABLE {name} (id int, email text)")
            conn.execute(f"INSERT INTO {name} VALUES (1, 'ada@example.com')")
