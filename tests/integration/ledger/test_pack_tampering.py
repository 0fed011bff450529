"""`verify` on packed entries (ordinary statements, many to a row of ``ledger_packs``).

The chain mixes both kinds, as the proxy writes it: packed entries around one full entry. Each
kind of tampering with a pack's body is reported by entry id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from pgguard.ledger import LedgerWriter, envelope_hash, verify
from pgguard.ledger.packed import record_ref
from tests.integration.ledger.conftest import entry, record_packed

Body = dict[str, Any]


@pytest.fixture
async def ids(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[str]:
    """A fresh chain of 9 entries: 4 packed, 1 full, 4 packed (one pack each side); its ids."""
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="packs",
    )
    await admin.execute(f'TRUNCATE "{state_schema}".ledger_entries, "{state_schema}".ledger_packs')
    recorded = [record_packed(writer, statement=f"SELECT {i}") for i in range(4)]
    full = entry(statement="SELECT full")
    writer.record(full)
    recorded.append(full.entry_id)
    await writer.flush()  # so the next four make a pack of their own
    recorded += [record_packed(writer, statement=f"SELECT {i}") for i in range(4, 8)]
    await writer.close()
    return recorded


async def edit_pack(
    admin: asyncpg.Connection, schema: str, first_seq: int, change: Callable[[Body], None]
) -> None:
    table = f'"{schema}".ledger_packs'
    body = json.loads(
        await admin.fetchval(f"SELECT body FROM {table} WHERE first_seq = $1", first_seq)
    )
    change(body)
    await admin.execute(
        f"UPDATE {table} SET body = $2 WHERE first_seq = $1", first_seq, json.dumps(body)
    )


async def problems(admin: asyncpg.Connection, schema: str) -> set[tuple[str, str]]:
    report = await verify(admin, schema=schema)
    assert not report.ok
    return {(p.kind, p.entry_id) for p in report.problems}


async def test_untouched_mixed_chain_verifies(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    report = await verify(admin, schema=state_schema)
    assert report.ok, report.problems
    assert report.entries == 9
    (head,) = report.chains.values()
    assert head.last_seq == 9
    viewed = await admin.fetch(f'SELECT entry_id, packed FROM "{state_schema}".ledger ORDER BY seq')
    assert [r["entry_id"] for r in viewed] == ids
    assert [r["packed"] for r in viewed] == [True] * 4 + [False] + [True] * 4


async def test_edited_field_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    def change(body: Body) -> None:
        body["entries"][2][8] = "SELECT 1000"  # the command tag

    await edit_pack(admin, state_schema, 1, change)
    assert ("modified", ids[2]) in await problems(admin, state_schema)


async def test_edited_shared_record_is_reported_for_its_entries(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    def change(body: Body) -> None:
        session_ref = body["entries"][0][4]
        body["refs"][session_ref]["agent"] = "someone-else"

    await edit_pack(admin, state_schema, 6, change)
    found = await problems(admin, state_schema)
    assert {("modified", i) for i in ids[5:]} <= found


async def test_rehashed_rewrite_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    def change(body: Body) -> None:
        fields = body["entries"][1]
        fields[8] = "SELECT 0"
        new_ref_text = {
            "statement": "SELECT nothing",
            "fingerprint": "f",
            "categories": [],
            "rule_ids": [],
            "action": "allow",
        }
        fields[5] = record_ref(new_ref_text)
        body["refs"][fields[5]] = new_ref_text
        canonical = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        body["hashes"][1] = envelope_hash(fields[3], canonical)

    await edit_pack(admin, state_schema, 1, change)
    assert ("modified", ids[1]) in await problems(admin, state_schema)


async def test_deleted_entry_is_reported_by_its_id(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    def change(body: Body) -> None:
        del body["entries"][2]
        del body["hashes"][2]

    await edit_pack(admin, state_schema, 6, change)
    assert ("deleted", ids[7]) in await problems(admin, state_schema)


async def test_deleted_pack_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_packs WHERE first_seq = 1')
    found = await problems(admin, state_schema)
    assert ("deleted", ids[3]) in found  # named by the full entry that followed it


async def test_inserted_entry_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    forged_id = "e" * 32

    def change(body: Body) -> None:
        after = body["entries"][1]
        forged = list(body["entries"][3])
        forged[0] = 10  # a seq past the end, claiming to follow entry #2
        forged[1] = forged_id
        forged[2] = after[1]
        forged[3] = body["hashes"][1]
        canonical = json.dumps(forged, separators=(",", ":"), ensure_ascii=False).encode()
        body["entries"].append(forged)
        body["hashes"].append(envelope_hash(forged[3], canonical))

    await edit_pack(admin, state_schema, 6, change)
    # A careful forger widens the pack's range too (else it is reported as out of place).
    await admin.execute(
        f'UPDATE "{state_schema}".ledger_packs SET last_seq = 10, entries = 5 WHERE first_seq = 6'
    )
    assert ("inserted", forged_id) in await problems(admin, state_schema)


async def test_swapped_entries_are_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    def change(body: Body) -> None:
        entries, hashes = body["entries"], body["hashes"]
        entries[0], entries[3] = entries[3], entries[0]
        hashes[0], hashes[3] = hashes[3], hashes[0]

    await edit_pack(admin, state_schema, 6, change)
    found = await problems(admin, state_schema)
    assert {("reordered", ids[5]), ("reordered", ids[8])} <= found


async def test_unreadable_pack_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.execute(
        f"UPDATE \"{state_schema}\".ledger_packs SET body = 'not json' WHERE first_seq = 1"
    )
    found = await problems(admin, state_schema)
    assert any(kind == "modified" and entry_id.startswith("pack ") for kind, entry_id in found)


async def test_pack_too_deep_to_read_back_is_reported(
    ids: list[str], admin: asyncpg.Connection, state_schema: str
) -> None:
    """A hand-written body nested beyond what can be re-encoded is a finding, not a crash."""
    deep = "[" * 600 + "]" * 600

    def change(body: Body) -> None:
        body["refs"][body["entries"][0][4]] = {"agent": "DEEP"}

    await edit_pack(admin, state_schema, 6, change)
    table = f'"{state_schema}".ledger_packs'
    await admin.execute(
        f"UPDATE {table} SET body = replace(body, $2, $1) WHERE first_seq = 6",
        deep,
        '"DEEP"',
    )
    assert deep in await admin.fetchval(f"SELECT body FROM {table} WHERE first_seq = 6")
    found = await problems(admin, state_schema)
    assert any(kind == "modified" and entry_id.startswith("pack ") for kind, entry_id in found)
