"""Fixtures for the Teams bot tests: the Microsoft stand-in and one pgguard pointed at it."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.bot_connector_stub import BotConnectorStub
from tests.integration.bot.helpers import bot_settings
from tests.integration.holds.helpers import TEST_RULES
from tests.support import PgguardThread, shipped_rules_with

TABLES = ("hold_t", "quorum_t", "dba_only_t")


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_rules_with(tmp_path_factory.mktemp("rules"), "zz-test.yaml", TEST_RULES)


@pytest.fixture(scope="module")
def stub() -> Iterator[BotConnectorStub]:
    with BotConnectorStub() as running:
        yield running


@pytest.fixture(scope="module")
def state_schema() -> str:
    return f"pgguard_bot_{secrets.token_hex(4)}"  # one per test module


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, stub: BotConnectorStub, state_schema: str
) -> Iterator[PgguardThread]:
    spool = Path(tempfile.mkdtemp(prefix="pgguard-spool-"))
    settings = bot_settings(
        upstream_dsn, state_dsn, rules_dir, state_schema, spool, stub.bot_settings()
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def tables(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for name in TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE TABLE {name} (id int, email text)")
            conn.execute(f"INSERT INTO {name} VALUES (1, 'ada@example.com')")


@pytest.fixture
async def api(pgguard: PgguardThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        yield client
