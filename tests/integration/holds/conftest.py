"""Fixtures for the approval tests: one pgguard (proxy, approvals, API) with a stand-in Teams."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import TEST_RULES, hold_settings
from tests.support import PgguardThread, shipped_rules_with
from tests.teams_stub import TeamsStub


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_rules_with(tmp_path_factory.mktemp("rules"), "zz-test.yaml", TEST_RULES)


@pytest.fixture(scope="module")
async def teams() -> AsyncIterator[TeamsStub]:
    async with TeamsStub() as stub:
        yield stub


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, teams: TeamsStub
) -> Iterator[PgguardThread]:
    schema = f"pgguard_holds_{secrets.token_hex(4)}"  # one per test module
    settings = hold_settings(
        upstream_dsn, state_dsn, rules_dir, schema, teams={"webhook_url": teams.url}
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def tables(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for name in (
            "hold_t",
            "quorum_t",
            "dba_only_t",
            "short_t",
            "remember_t",
            "return_t",
            "return_short_t",
        ):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE TABLE {name} (id int, email text)")
            conn.execute(f"INSERT INTO {name} VALUES (1, 'ada@example.com')")


@pytest.fixture
async def api(pgguard: PgguardThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        yield client
