"""`verify` against a real ledger: intact passes; each kind of tampering is reported by entry id."""

from __future__ import annotations

import json

import asyncpg
import pytest

from pgguard.ledger import LedgerWriter, envelope_hash, verify
from pgguard.ledger.chain import canonical_bytes
from tests.integration.ledger.conftest import entry


@pytest.fixture
async def chain(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[asyncpg.Record]:
    """A fresh 8-entry chain (the table is emptied first); its rows in seq order."""
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="tamper",
    )
    await admin.execute(f'TRUNCATE "{state_schema}".ledger_entries')
    for i in range(8):
        writer.record(entry(statement=f"SELECT {i}"))
    await writer.close()
    return await admin.fetch(
        f'SELECT * FROM "{state_schema}".ledger_entries WHERE chain_id = $1 ORDER BY seq',
        writer.chain_id,
    )


async def problems(admin: asyncpg.Connection, schema: str) -> set[tuple[str, str]]:
    report = await verify(admin, schema=schema)
    assert not report.ok
    return {(p.kind, p.entry_id) for p in report.problems}


async def test_untouched_ledger_verifies(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    report = await verify(admin, schema=state_schema)
    assert report.ok
    assert report.entries == 8
    assert len(report.chains) == 1


async def test_updated_statement_column_is_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    victim = chain[3]["entry_id"]
    await admin.execute(
        f'UPDATE "{state_schema}".ledger_entries SET statement = $2 WHERE entry_id = $1',
        victim,
        "SELECT harmless",
    )
    assert ("modified", victim) in await problems(admin, state_schema)


async def test_updated_content_is_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    victim = chain[2]["entry_id"]
    await admin.execute(
        f"UPDATE \"{state_schema}\".ledger_entries SET statement = 'x', "
        "content = jsonb_set(content, '{entry,statement}', '\"x\"') WHERE entry_id = $1",
        victim,
    )
    assert ("modified", victim) in await problems(admin, state_schema)


async def test_rehashed_rewrite_is_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    row = chain[4]
    envelope = json.loads(row["content"])
    envelope["entry"]["statement"] = "SELECT nothing"
    new_hash = envelope_hash(row["prev_hash"], canonical_bytes(envelope))
    await admin.execute(
        f'UPDATE "{state_schema}".ledger_entries SET statement = $2, content = $3::jsonb, '
        "hash = $4 WHERE entry_id = $1",
        row["entry_id"],
        "SELECT nothing",
        json.dumps(envelope),
        new_hash,
    )
    assert ("modified", row["entry_id"]) in await problems(admin, state_schema)


async def test_deleted_row_is_reported_by_its_id(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    victim = chain[5]["entry_id"]
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_entries WHERE entry_id = $1', victim)
    assert ("deleted", victim) in await problems(admin, state_schema)


async def test_inserted_row_is_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    # A forger appends an entry that claims to follow entry #3, with a correct sha256 of its own.
    after = chain[2]
    last = chain[-1]
    envelope = json.loads(last["content"])
    envelope["seq"] = last["seq"] + 1
    envelope["prev_hash"] = after["hash"]
    envelope["prev_entry_id"] = after["entry_id"]
    envelope["entry"]["entry_id"] = "f" * 32
    envelope["entry"]["statement"] = "GRANT ALL ON ALL TABLES IN SCHEMA public TO agent"
    forged_hash = envelope_hash(after["hash"], canonical_bytes(envelope))
    table = f'"{state_schema}".ledger_entries'
    await admin.execute(
        f"INSERT INTO {table} SELECT chain_id, $2, $3, $4, $5, $6, kind, instance_id, "
        "session_id, received_at, decided_at, agent, owner, client_address, application_name, "
        "database, upstream_role, $7, fingerprint, categories, rule_ids, action, request_id, "
        "approvers, reason, statement_entry_id, completed_at, command_tag, rows, sqlstate, "
        f"error_message, duration_ms, detail, $8::jsonb FROM {table} WHERE entry_id = $1",
        last["entry_id"],
        envelope["seq"],
        after["hash"],
        after["entry_id"],
        forged_hash,
        "f" * 32,
        envelope["entry"]["statement"],
        json.dumps(envelope),
    )
    assert ("inserted", "f" * 32) in await problems(admin, state_schema)


async def test_swapped_contents_are_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    a, b = chain[2], chain[5]
    table = f'"{state_schema}".ledger_entries'
    await admin.execute(
        f"UPDATE {table} SET content = $2::jsonb WHERE entry_id = $1", a["entry_id"], b["content"]
    )
    await admin.execute(
        f"UPDATE {table} SET content = $2::jsonb WHERE entry_id = $1", b["entry_id"], a["content"]
    )
    found = await problems(admin, state_schema)
    assert {("reordered", a["entry_id"]), ("reordered", b["entry_id"])} <= found


async def test_swapped_rows_are_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    a, b = chain[1], chain[6]
    table = f'"{state_schema}".ledger_entries'
    async with admin.transaction():
        await admin.execute(f"UPDATE {table} SET seq = 1000000 WHERE entry_id = $1", a["entry_id"])
        await admin.execute(
            f"UPDATE {table} SET seq = $2 WHERE entry_id = $1", b["entry_id"], a["seq"]
        )
        await admin.execute(
            f"UPDATE {table} SET seq = $2 WHERE entry_id = $1", a["entry_id"], b["seq"]
        )
    found = await problems(admin, state_schema)
    assert {("reordered", a["entry_id"]), ("reordered", b["entry_id"])} <= found


async def test_column_too_deep_to_read_back_is_reported(
    chain: list[asyncpg.Record], admin: asyncpg.Connection, state_schema: str
) -> None:
    """A jsonb column rewritten with nesting Python cannot read back is reported, not a crash."""
    victim = chain[4]["entry_id"]
    deep = "[" * 1500 + "]" * 1500
    await admin.execute(
        f'UPDATE "{state_schema}".ledger_entries SET detail = $2::jsonb WHERE entry_id = $1',
        victim,
        deep,
    )
    assert ("modified", victim) in await problems(admin, state_schema)
