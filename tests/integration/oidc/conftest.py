"""Fixtures for the OIDC sign-in tests: a local identity provider and a pgguard that trusts it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.integration.oidc.helpers import OIDC_RULES, new_provider, oidc_settings
from tests.oidc_provider import OidcProvider
from tests.support import PgguardThread, shipped_rules_with


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_rules_with(tmp_path_factory.mktemp("rules"), "zz-oidc.yaml", OIDC_RULES)


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with new_provider() as running:
        yield running


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, provider: OidcProvider
) -> Iterator[PgguardThread]:
    schema = f"pgguard_oidc_{secrets.token_hex(4)}"  # one per test module
    thread = PgguardThread(
        oidc_settings(upstream_dsn, state_dsn, rules_dir, schema, provider)
    ).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def tables(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS oidc_t")
        conn.execute("CREATE TABLE oidc_t (id int, email text)")
        conn.execute("INSERT INTO oidc_t VALUES (1, 'ada@example.com')")


@pytest.fixture
async def api(pgguard: PgguardThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        yield client
