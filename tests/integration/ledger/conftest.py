"""Fixtures for the ledger tests: a private state schema per module, dropped at the end."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from pgguard.ledger import KeyRing, LedgerEntry, LedgerWriter
from pgguard.ledger.keys import load_or_create_signing_key
from pgguard.ledger.packed import epoch_us, session_record, text_record

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

BASE = LedgerEntry(
    kind="statement",
    instance_id="inst-a",
    session_id="sess-1",
    received_at=T0,
    decided_at=T0 + timedelta(milliseconds=5),
    agent="agent",
    owner="alice@example.com",
    client_address="127.0.0.1:5555",
    application_name="etl",
    database="postgres",
    upstream_role="pgguard_scram",
    statement="SELECT * FROM t WHERE id = ?",
    fingerprint="fp-select",
    categories=("read",),
    rule_ids=("read.default",),
    action="allow",
)


def entry(**changes: object) -> LedgerEntry:
    """A fresh entry (new id) based on BASE."""
    changes.setdefault("entry_id", secrets.token_hex(16))
    return replace(BASE, **changes)  # type: ignore[arg-type]


SESSION = session_record(
    {
        "instance_id": "inst-a",
        "session_id": "sess-1",
        "agent": "agent",
        "owner": "alice@example.com",
        "client_address": "127.0.0.1:5555",
        "application_name": "etl",
        "database": "postgres",
        "upstream_role": "pgguard_scram",
    }
)


def record_packed(
    writer: LedgerWriter, statement: str = "SELECT * FROM t WHERE id = ?", tag: str = "SELECT 1"
) -> str:
    """Record an ordinary statement in the packed form, as the proxy does; its entry id."""
    text = text_record(statement, "fp-select", ["read"], ["read.default"], "allow")
    received = epoch_us(T0.timestamp())
    return writer.record_packed(SESSION, text, (received, received + 1500, tag, 1, None, None))


async def chain_rows(admin: asyncpg.Connection, schema: str, chain_id: str) -> list[asyncpg.Record]:
    """One chain's entries from the ``ledger`` view (full and packed alike), in seq order."""
    rows: list[asyncpg.Record] = await admin.fetch(
        f'SELECT * FROM "{schema}".ledger WHERE chain_id = $1 ORDER BY seq', chain_id
    )
    return rows


@pytest.fixture(scope="session")
def ledger_dsn(state_dsn: str) -> str:
    """The state database the ledger tests write to: the one place that names it."""
    return state_dsn


@pytest.fixture(scope="module")
def state_schema() -> str:
    return f"pgguard_ledger_test_{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
async def admin(ledger_dsn: str, state_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to inspect and tamper with the ledger; drops the schema at the end."""
    conn = await asyncpg.connect(ledger_dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{state_schema}" CASCADE', timeout=10)
        await conn.close(timeout=10)


@dataclass
class Ledger:
    """A signed chain made for a test: its entry ids by seq - 1, its anchors and keys."""

    chain_id: str
    ids: list[str]
    anchor_file: Path
    keys: KeyRing


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "data" / "ledger-signing.pem"
    load_or_create_signing_key(path)
    return path
