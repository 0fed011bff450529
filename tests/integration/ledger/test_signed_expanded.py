"""Signed checkpoints over expanded rows (``ledger_rows``), which `verify` walks a run at a time
without an object per row, telling the checkpoint audit about most rows in bulk: the attacks of
test_signed, done to rows instead of packs, are still caught.

The chain: a full entry, then 20 packed ones flushed 3 at a time with a checkpoint due every 3
entries, every pack expanded - so checkpoints at #3, #6, ..., #21 (and a final one at #21)
fall inside one run of expanded rows, #2..#21.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from pgguard.ledger import KeyRing, LedgerWriter, VerifyReport, verify
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.chain import envelope_hash
from pgguard.ledger.expander import backlog, expand_all
from pgguard.ledger.keys import load_or_create_signing_key
from pgguard.ledger.packed import SESSION_KEYS, record_ref
from tests.integration.ledger.conftest import Ledger, entry, record_packed

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


@pytest.fixture
async def ledger(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, key_file: Path, tmp_path: Path
) -> Ledger:
    anchor_file = tmp_path / "anchors.jsonl"
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="expanded",
        signing_key_file=key_file,
        checkpoint_entries=3,
        checkpoint_seconds=3600,
        anchor_file=anchor_file,
    )
    s = f'"{state_schema}"'
    await admin.execute(
        f"TRUNCATE {s}.ledger_entries, {s}.ledger_packs, {s}.ledger_rows, {s}.ledger_checkpoints"
    )
    first = entry(statement="SELECT full")
    writer.record(first)
    ids = [first.entry_id]
    for i in range(20):
        ids.append(record_packed(writer, statement=f"SELECT {i}"))
        if len(ids) % 3 == 0:
            await writer.flush()
    await writer.close()
    await expand_all(admin, state_schema)
    assert (await backlog(admin, state_schema)).entries == 0
    keys = KeyRing([load_or_create_signing_key(key_file).public_key()])
    return Ledger(writer.chain_id, ids, anchor_file, keys)


async def check(admin: asyncpg.Connection, schema: str, ledger: Ledger) -> VerifyReport:
    anchored = read_anchors(ledger.anchor_file)[0]
    return await verify(admin, schema=schema, keys=ledger.keys, anchors=anchored)


def covers(report: VerifyReport, kind: str, seq: int) -> bool:
    return any(
        p.kind == kind and p.seq <= seq <= (p.last_seq if p.last_seq is not None else p.seq)
        for p in report.problems
    )


def row_hash(row: dict[str, object], prev_entry_id: str, prev_hash: str) -> str:
    """What the attacker recomputes for an expanded row: its packed array from its columns."""
    session = {key: row[key] for key in SESSION_KEYS}
    text = {
        "statement": row["statement"],
        "fingerprint": row["fingerprint"],
        "categories": list(row["categories"]),  # type: ignore[call-overload]
        "rule_ids": list(row["rule_ids"]),  # type: ignore[call-overload]
        "action": row["action"],
    }
    received = (row["received_at"] - EPOCH) // US  # type: ignore[operator]
    completed = (row["completed_at"] - EPOCH) // US  # type: ignore[operator]
    fields = [
        row["seq"],
        row["entry_id"],
        prev_entry_id,
        prev_hash,
        record_ref(session),  # type: ignore[arg-type]
        record_ref(text),  # type: ignore[arg-type]
        received,
        completed,
        row["command_tag"],
        row["rows"],
        row["sqlstate"],
        row["error_message"],
        completed - received,
    ]
    return envelope_hash(prev_hash, orjson.dumps(fields))


async def rehash_rows(
    admin: asyncpg.Connection,
    schema: str,
    chain_id: str,
    change: Callable[[list[dict[str, object]]], list[dict[str, object]]],
) -> None:
    """Change the chain's expanded rows (#2 on), renumber them and recompute every link and
    hash after the full entry #1, as a database writer can."""
    table = f'"{schema}".ledger_rows'
    rows = [
        dict(r)
        for r in await admin.fetch(
            f"SELECT * FROM {table} WHERE chain_id = $1 ORDER BY seq", chain_id
        )
    ]
    head = await admin.fetchrow(
        f'SELECT entry_id, hash FROM "{schema}".ledger_entries WHERE chain_id = $1 AND seq = 1',
        chain_id,
    )
    rows = change(rows)
    prev_id, prev_hash = head["entry_id"], head["hash"]
    for seq, row in enumerate(rows, start=2):
        row.update(seq=seq, prev_entry_id=prev_id, prev_hash=prev_hash)
        row["hash"] = row_hash(row, prev_id, prev_hash)
        prev_id, prev_hash = str(row["entry_id"]), str(row["hash"])
    names = list(rows[0])
    async with admin.transaction():
        await admin.execute(f"DELETE FROM {table} WHERE chain_id = $1", chain_id)
        await admin.executemany(
            f"INSERT INTO {table} ({', '.join(names)}) "
            f"VALUES ({', '.join(f'${i}' for i in range(1, len(names) + 1))})",
            [[row[n] for n in names] for row in rows],
        )


async def hash_only_passes(admin: asyncpg.Connection, schema: str) -> bool:
    return (await verify(admin, schema=schema)).ok


async def test_untouched_expanded_ledger_verifies(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    assert (await admin.fetchval(f'SELECT count(*) FROM "{state_schema}".ledger_rows')) == 20
    report = await check(admin, state_schema, ledger)
    assert report.ok, report.problems
    assert report.warnings == []
    assert report.entries == 21
    assert report.checkpoints == 8  # #3, #6, ..., #21 and the final one
    assert report.chains[ledger.chain_id].last_seq == 21


async def test_rehashed_rewrite_of_an_expanded_row_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    def edit(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        rows[5 - 2]["statement"] = "SELECT harmless"  # entry #5
        return rows

    await rehash_rows(admin, state_schema, ledger.chain_id, edit)
    assert await hash_only_passes(admin, state_schema)  # the attack beats the bare hash chain
    report = await check(admin, state_schema, ledger)
    # #4..#6 lie between the last good checkpoint (#3) and the failing one (#6); every later
    # checkpoint fails as well, each for its own run
    assert covers(report, "modified", 5)
    assert not covers(report, "modified", 3)
    run = next(p for p in report.problems if p.kind == "modified")
    assert (run.entry_id, run.last_entry_id, run.count) == (ledger.ids[3], ledger.ids[5], 3)


async def test_rehashed_delete_of_an_expanded_row_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await rehash_rows(
        admin, state_schema, ledger.chain_id, lambda rows: rows[: 10 - 2] + rows[11 - 2 :]
    )  # entry #10 gone, the rest renumbered
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger)
    assert covers(report, "modified", 10)
    assert not covers(report, "modified", 9)  # #9 is signed intact
    assert "truncated" in {p.kind for p in report.problems}  # #21 is signed, the chain ends at #20


async def test_truncated_expanded_tail_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_rows WHERE seq > 18')
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger)
    assert {p.kind for p in report.problems} == {"truncated"}
    assert {p.entry_id for p in report.problems} == {ledger.ids[20]}


async def test_expanded_row_appended_after_the_final_checkpoint_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    def append(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [*rows, {**rows[-1], "entry_id": "appended", "statement": "SELECT later"}]

    await rehash_rows(admin, state_schema, ledger.chain_id, append)
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger)
    assert [(p.kind, p.seq, p.entry_id) for p in report.problems] == [("inserted", 22, "appended")]


async def test_edited_expanded_row_inside_a_run_is_reported_and_the_run_goes_on(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.execute(
        f"UPDATE \"{state_schema}\".ledger_rows SET owner = 'mallory' WHERE seq = 8"
    )
    report = await check(admin, state_schema, ledger)
    # its own hash fails; the links around it hold, and so do the checkpoints after it
    assert [(p.kind, p.seq, p.entry_id) for p in report.problems] == [
        ("modified", 8, ledger.ids[7])
    ]
    assert report.entries == 21
