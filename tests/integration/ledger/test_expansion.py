"""Packs expanded into ``ledger_rows`` (issue 19): the view, `verify` and the writer's
exactly-once shipping keep working across the move, and tampering with an expanded row is
reported by entry id."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pgguard.ledger import LedgerWriter, verify
from pgguard.ledger.expander import LedgerExpander, backlog, expand_all
from tests.integration.ledger.conftest import entry, record_packed

VIEW_COLUMNS = (
    "chain_id, seq, hash, prev_hash, prev_entry_id, entry_id, kind, instance_id, session_id, "
    "received_at, decided_at, agent, owner, client_address, application_name, database, "
    "upstream_role, statement, fingerprint, categories, rule_ids, action, request_id, "
    "approvers, reason, statement_entry_id, completed_at, command_tag, rows, sqlstate, "
    "error_message, duration_ms, detail, packed"
)


@pytest.fixture
async def ids(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[str]:
    """A fresh chain of 9 entries (4 packed, 1 full, 4 packed), not expanded yet."""
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="expand",
    )
    s = f'"{state_schema}"'
    await admin.execute(f"TRUNCATE {s}.ledger_entries, {s}.ledger_packs, {s}.ledger_rows")
    recorded = [record_packed(writer, statement=f"SELECT {i}") for i in range(4)]
    full = entry(statement="SELECT full")
    writer.record(full)
    recorded.append(full.entry_id)
    await writer.flush()
    recorded += [record_packed(writer, statement=f"SELECT {i}") for i in range(4, 8)]
    await writer.close()
    return recorded


async def view(admin: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    return list(
        await admin.fetch(f'SELECT {VIEW_COLUMNS} FROM "{schema}".ledger ORDER BY chain_id, seq')
    )


async def test_expansion_moves_packs_and_the_view_is_unchanged(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    before = await view(admin, state_schema)
    assert (await backlog(admin, state_schema)).entries == 8
    assert await expand_all(admin, state_schema, max_packs=1) == 8
    after = await view(admin, state_schema)
    assert [dict(r) for r in after] == [dict(r) for r in before]
    assert [r["entry_id"] for r in after] == ids
    left = await backlog(admin, state_schema)
    assert (left.entries, left.packs, left.oldest) == (0, 0, None)
    assert await admin.fetchval(f'SELECT count(*) FROM "{state_schema}".ledger_rows') == 8
    report = await verify(admin, schema=state_schema)
    assert report.ok, report.problems
    assert report.entries == 9


async def test_expander_leaves_young_packs(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    assert await admin.fetchval(f"SELECT \"{state_schema}\".ledger_expand(10, '1 hour')") == 0
    assert (await backlog(admin, state_schema)).packs == 2


async def test_half_expanded_chain_verifies(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.fetchval(f'SELECT "{state_schema}".ledger_expand(1)')  # the first pack only
    assert (await backlog(admin, state_schema)).packs == 1
    report = await verify(admin, schema=state_schema)
    assert report.ok, report.problems
    assert report.entries == 9


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("agent", "'someone-else'"),
        ("statement", "'SELECT innocent'"),
        ("categories", "ARRAY['ddl']"),
        ("received_at", "received_at + interval '1 microsecond'"),
        ("completed_at", "completed_at - interval '1 second'"),
        ("rows", "rows + 1"),
        ("command_tag", "'DELETE 1'"),
        # every other column the entry's hash covers (verify re-derives it from each)
        ("instance_id", "'inst-z'"),
        ("session_id", "'sess-z'"),
        ("owner", "'mallory@example.com'"),
        ("client_address", "'10.0.0.1:1'"),
        ("application_name", "'psql'"),
        ("database", "'other'"),
        ("upstream_role", "'postgres'"),
        ("fingerprint", "'fp-other'"),
        ("rule_ids", "ARRAY[]::text[]"),
        ("action", "'hold'"),
        ("sqlstate", "'42501'"),
        ("error_message", "'denied'"),
    ],
)
async def test_edited_expanded_row_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str, column: str, value: str
) -> None:
    await expand_all(admin, state_schema)
    await admin.execute(
        f'UPDATE "{state_schema}".ledger_rows SET {column} = {value} WHERE entry_id = $1', ids[6]
    )
    report = await verify(admin, schema=state_schema)
    assert ("modified", ids[6]) in {(p.kind, p.entry_id) for p in report.problems}


async def test_deleted_and_inserted_expanded_rows_are_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    await expand_all(admin, state_schema)
    rows = f'"{state_schema}".ledger_rows'
    await admin.execute(f"DELETE FROM {rows} WHERE entry_id = $1", ids[2])
    report = await verify(admin, schema=state_schema)
    assert "deleted" in {p.kind for p in report.problems}
    # the nearest variant: a row copied into another chain position (a duplicate seq)
    await admin.execute(
        f"INSERT INTO {rows} SELECT chain_id, 20, hash, prev_hash, prev_entry_id, entry_id, "
        "instance_id, session_id, received_at, agent, owner, client_address, application_name, "
        "database, upstream_role, statement, fingerprint, categories, rule_ids, action, "
        f"completed_at, command_tag, rows, sqlstate, error_message, stored_at FROM {rows} "
        "WHERE entry_id = $1",
        ids[7],
    )
    report = await verify(admin, schema=state_schema)
    assert not report.ok
    assert any(p.seq == 20 for p in report.problems)


async def test_writer_ships_exactly_once_after_its_packs_moved(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The writer's watermark (read once per connection) finds packs moved to ledger_rows: a
    reconnect does not ship them again."""
    s = f'"{state_schema}"'
    await admin.execute(f"TRUNCATE {s}.ledger_entries, {s}.ledger_packs, {s}.ledger_rows")
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="expand-twice",
        expand=True,
    )
    try:
        for i in range(5):
            record_packed(writer, statement=f"SELECT {i}")
        await writer.flush()
        await expand_all(admin, state_schema)
        await writer._store._drop()  # a lost connection: the watermark is read again
        for i in range(5, 8):
            record_packed(writer, statement=f"SELECT {i}")
        await writer.flush()
    finally:
        await writer.close()
    await expand_all(admin, state_schema)
    seqs = [r["seq"] for r in await admin.fetch(f"SELECT seq FROM {s}.ledger ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) == 8
    assert (await verify(admin, schema=state_schema)).ok


async def test_background_expander_catches_up(
    ids: list[str], ledger_dsn: str, admin: asyncpg.Connection, state_schema: str
) -> None:
    expander = LedgerExpander(ledger_dsn, schema=state_schema, interval=0.05, min_age=0)
    expander.start()
    try:
        for _ in range(100):
            if (await backlog(admin, state_schema)).packs == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await expander.close()
    assert (await backlog(admin, state_schema)).packs == 0
    assert expander.expanded == 8
    assert (await verify(admin, schema=state_schema)).ok
