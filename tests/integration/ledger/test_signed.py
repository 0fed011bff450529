"""Signed checkpoints against an attacker who can write the state database (issue 14, item 4).

Each attack is done as a database writer would: rows rewritten with every later hash recomputed
(`attacker.rewrite_chain`), rows and checkpoints deleted. The hash chain alone misses each of
them (asserted with a hash-only verify); the checkpoints, and the anchor file for what is
deleted wholesale, catch them.

The chain: three rounds of 3 packed entries and 1 full one, flushed after each round, with a
checkpoint due every 3 entries - so checkpoints at #4, #8, #12 and a final one at #12.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pgguard.ledger import KeyRing, LedgerWriter, VerifyReport, verify
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.checkpoint import CheckpointSigner
from pgguard.ledger.keys import load_or_create_signing_key
from pgguard.ledger.store import checkpoint_values
from tests.integration.ledger.attacker import Item, rewrite_chain
from tests.integration.ledger.conftest import Ledger, entry, record_packed


@pytest.fixture(scope="module")
def keys(key_file: Path) -> KeyRing:
    return KeyRing([load_or_create_signing_key(key_file).public_key()])


async def write_chain(
    dsn: str,
    schema: str,
    key_file: Path,
    anchor_file: Path,
    spool: Path,
    *,
    instance_id: str = "signed",
) -> tuple[str, list[str]]:
    writer = await LedgerWriter.open(
        dsn,
        schema=schema,
        spool_dir=spool,
        instance_id=instance_id,
        signing_key_file=key_file,
        checkpoint_entries=3,
        checkpoint_seconds=3600,
        anchor_file=anchor_file,
    )
    ids: list[str] = []
    for round_ in range(3):
        ids += [record_packed(writer, statement=f"SELECT {round_}{i}") for i in range(3)]
        full = entry(statement=f"SELECT full {round_}")
        writer.record(full)
        ids.append(full.entry_id)
        await writer.flush()
    await writer.close()
    return writer.chain_id, ids


@pytest.fixture
async def ledger(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
) -> Ledger:
    """A fresh signed chain (the tables are emptied first)."""
    anchor_file = tmp_path / "anchors.jsonl"
    chain_id, ids = await write_chain(
        ledger_dsn, state_schema, key_file, anchor_file, tmp_path / "spool"
    )
    await _truncate_others(admin, state_schema, chain_id)
    return Ledger(chain_id, ids, anchor_file, keys)


async def _truncate_others(admin: asyncpg.Connection, schema: str, keep: str) -> None:
    for table in ("ledger_entries", "ledger_packs", "ledger_checkpoints"):
        await admin.execute(f'DELETE FROM "{schema}".{table} WHERE chain_id <> $1', keep)


async def check(
    admin: asyncpg.Connection, schema: str, ledger: Ledger, *, anchors: bool
) -> VerifyReport:
    found = read_anchors(ledger.anchor_file)[0] if anchors else None
    return await verify(admin, schema=schema, keys=ledger.keys, anchors=found)


def kinds(report: VerifyReport) -> set[str]:
    return {p.kind for p in report.problems}


def covers(report: VerifyReport, kind: str, seq: int) -> bool:
    """Some problem of ``kind`` names the entry at ``seq`` (alone or in a run)."""
    return any(
        p.kind == kind and p.seq <= seq <= (p.last_seq if p.last_seq is not None else p.seq)
        for p in report.problems
    )


async def hash_only_passes(admin: asyncpg.Connection, schema: str) -> bool:
    return (await verify(admin, schema=schema)).ok


# --- the untouched ledger ---------------------------------------------------------------------


async def test_untouched_signed_ledger_verifies(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    report = await check(admin, state_schema, ledger, anchors=True)
    assert report.ok, report.problems
    assert report.signed
    assert report.warnings == []
    assert report.entries == 12
    rows = await admin.fetch(
        f'SELECT seq, final, head_entry_id FROM "{state_schema}".ledger_checkpoints '
        "ORDER BY seq, final"
    )
    assert [(r["seq"], r["final"]) for r in rows] == [
        (4, False),
        (8, False),
        (12, False),
        (12, True),
    ]
    assert [r["head_entry_id"] for r in rows] == [ledger.ids[i] for i in (3, 7, 11, 11)]
    anchored, damaged = read_anchors(ledger.anchor_file)
    assert damaged == []
    assert [(c.seq, c.checkpoint.final) for c in anchored] == [
        (4, False),
        (8, False),
        (12, False),
        (12, True),
    ]


# --- (a) rewrite with recomputed hashes -------------------------------------------------------


@pytest.mark.parametrize("victim", [5, 7], ids=["packed", "full"])
async def test_rewrite_with_recomputed_hashes_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str, victim: int
) -> None:
    def edit(items: list[Item]) -> list[Item]:
        items[victim].set_statement("SELECT harmless")
        return items

    await rewrite_chain(admin, state_schema, ledger.chain_id, edit)
    assert await hash_only_passes(admin, state_schema)  # the attack beats the bare hash chain
    report = await check(admin, state_schema, ledger, anchors=False)
    assert not report.ok
    # entries #5..#8 lie between the last good checkpoint (#4) and the failing one (#8)
    assert covers(report, "modified", victim + 1)
    assert not covers(report, "modified", 4)
    run = next(p for p in report.problems if p.kind == "modified" and p.seq == 5)
    assert (run.entry_id, run.last_entry_id, run.count) == (ledger.ids[4], ledger.ids[7], 4)


# --- (b) delete with recomputed hashes --------------------------------------------------------


async def test_delete_with_recomputed_hashes_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await rewrite_chain(
        admin, state_schema, ledger.chain_id, lambda items: items[:5] + items[6:]
    )  # entry #6 gone, the rest renumbered
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger, anchors=False)
    assert not report.ok
    assert covers(report, "modified", 6)
    assert "truncated" in kinds(report)  # #12 is signed, the chain now ends at #11


# --- (c) a truncated tail ---------------------------------------------------------------------


async def delete_last_round(admin: asyncpg.Connection, schema: str, chain_id: str) -> None:
    await admin.execute(f'DELETE FROM "{schema}".ledger_packs WHERE first_seq = 9')
    await admin.execute(f'DELETE FROM "{schema}".ledger_entries WHERE seq = 12')


async def test_truncated_tail_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await delete_last_round(admin, state_schema, ledger.chain_id)
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger, anchors=False)
    assert kinds(report) == {"truncated"}
    assert {p.entry_id for p in report.problems} == {ledger.ids[11]}


async def test_truncated_tail_with_its_checkpoints_is_caught_by_the_anchor_file(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await delete_last_round(admin, state_schema, ledger.chain_id)
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_checkpoints WHERE seq = 12')
    # Without the anchor file the chain now looks open, and a warning is all there is to see.
    blind = await check(admin, state_schema, ledger, anchors=False)
    assert blind.ok
    assert [w.kind for w in blind.warnings] == ["unanchored"]
    report = await check(admin, state_schema, ledger, anchors=True)
    assert kinds(report) == {"truncated", "checkpoint_deleted"}
    assert {p.entry_id for p in report.problems if p.kind == "truncated"} == {ledger.ids[11]}


# --- (d) a deleted whole chain ----------------------------------------------------------------


async def test_deleted_chain_is_caught_by_the_anchor_file(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    for table in ("ledger_entries", "ledger_packs", "ledger_checkpoints"):
        await admin.execute(
            f'DELETE FROM "{state_schema}".{table} WHERE chain_id = $1', ledger.chain_id
        )
    assert (await check(admin, state_schema, ledger, anchors=False)).ok  # nothing left to see
    report = await check(admin, state_schema, ledger, anchors=True)
    assert "chain_missing" in kinds(report)
    missing = next(p for p in report.problems if p.kind == "chain_missing")
    assert (missing.chain_id, missing.seq, missing.entry_id) == (
        ledger.chain_id,
        12,
        ledger.ids[11],
    )


async def test_deleted_entries_of_a_chain_whose_checkpoints_remain_are_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    for table in ("ledger_entries", "ledger_packs"):
        await admin.execute(f'DELETE FROM "{state_schema}".{table}')
    report = await check(admin, state_schema, ledger, anchors=False)
    assert kinds(report) == {"chain_missing"}


# --- (e) forged checkpoint rows ---------------------------------------------------------------


async def test_forged_checkpoint_row_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    """The attacker rewrites an entry, then edits the checkpoint to the new head hash."""

    def edit(items: list[Item]) -> list[Item]:
        items[9].set_statement("SELECT harmless")
        return items

    items = await rewrite_chain(admin, state_schema, ledger.chain_id, edit)
    new_head = items[-1]
    assert new_head.row is not None
    table = f'"{state_schema}".ledger_checkpoints'
    for row in await admin.fetch(f"SELECT seq, final, payload FROM {table} WHERE seq = 12"):
        payload = json.loads(row["payload"])
        payload["head_hash"] = new_head.row["hash"]
        await admin.execute(
            f"UPDATE {table} SET payload = $3, head_hash = $4 WHERE seq = $1 AND final = $2",
            row["seq"],
            row["final"],
            json.dumps(payload, sort_keys=True, separators=(",", ":")),
            new_head.row["hash"],
        )
    report = await check(admin, state_schema, ledger, anchors=False)
    assert "bad_signature" in kinds(report)
    assert covers(report, "unanchored", 10)  # the forged checkpoints cover nothing


async def test_checkpoints_signed_with_another_key_are_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    """Nearest variant: the attacker signs well-formed checkpoints of the rewritten chain with
    a key of their own (the key id in the payload is theirs)."""

    def edit(items: list[Item]) -> list[Item]:
        items[2].set_statement("SELECT harmless")
        return items

    items = await rewrite_chain(admin, state_schema, ledger.chain_id, edit)
    forger = CheckpointSigner(Ed25519PrivateKey.generate(), "signed", state_schema)
    table = f'"{state_schema}".ledger_checkpoints'
    await admin.execute(f"DELETE FROM {table}")
    last = items[-1]
    assert last.row is not None
    forged = forger.sign(ledger.chain_id, 12, last.row["hash"], last.entry_id, final=True)
    await admin.execute(
        f"INSERT INTO {table} (chain_id, seq, final, head_hash, head_entry_id, signed_at, "
        "instance_id, key_id, payload, signature) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        *checkpoint_values(forged),
    )
    report = await check(admin, state_schema, ledger, anchors=False)
    assert "bad_signature" in kinds(report)
    assert covers(report, "unanchored", 3)


# --- (f) deleted checkpoint rows --------------------------------------------------------------


async def test_deleted_checkpoint_rows_are_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_checkpoints WHERE seq >= 8')
    # Without the anchor file: #5..#12 are covered by no checkpoint, and they are not recent.
    blind = await check(admin, state_schema, ledger, anchors=False)
    assert kinds(blind) == {"unanchored"}
    assert covers(blind, "unanchored", 5)
    assert covers(blind, "unanchored", 12)
    report = await check(admin, state_schema, ledger, anchors=True)
    assert kinds(report) == {"checkpoint_deleted"}
    assert sorted(p.seq for p in report.problems) == [8, 12, 12]


# --- appended after the end, and the open chain -----------------------------------------------


async def test_entry_appended_after_the_final_checkpoint_is_caught(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str
) -> None:
    def append(items: list[Item]) -> list[Item]:
        last = items[-1]
        assert last.row is not None
        assert last.envelope is not None
        forged_envelope = json.loads(json.dumps(last.envelope))
        forged_envelope["entry"]["entry_id"] = "f" * 32
        forged = Item("f" * 32, packed=False, row=dict(last.row), envelope=forged_envelope)
        assert forged.row is not None
        forged.row["entry_id"] = "f" * 32
        return [*items, forged]

    await rewrite_chain(admin, state_schema, ledger.chain_id, append)
    assert await hash_only_passes(admin, state_schema)
    report = await check(admin, state_schema, ledger, anchors=True)
    assert kinds(report) == {"inserted"}
    assert report.problems[0].entry_id == "f" * 32


async def test_open_chain_recent_tail_is_a_warning_and_an_old_one_a_problem(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
) -> None:
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="open",
        signing_key_file=key_file,
        checkpoint_entries=1000,
        checkpoint_seconds=3600,
        anchor_file=tmp_path / "anchors.jsonl",
    )
    try:
        await _truncate_others(admin, state_schema, writer.chain_id)
        writer.record(entry(received_at=datetime.now(UTC)))
        await writer.flush()
        report = await verify(admin, schema=state_schema, keys=keys, open_grace=10)
        assert report.ok, report.problems
        assert [w.kind for w in report.warnings] == ["unanchored"]
        # the same tail, an hour later
        late = await verify(
            admin,
            schema=state_schema,
            keys=keys,
            open_grace=10,
            now=datetime.now(UTC).timestamp() + 3600,
        )
        assert kinds(late) == {"unanchored"}
    finally:
        await writer.close()
    closed = await verify(admin, schema=state_schema, keys=keys)
    assert closed.ok
    assert closed.warnings == []


async def test_checkpoints_go_to_the_spool_while_the_database_is_down(
    state_schema: str,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
    ledger_dsn: str,
    admin: asyncpg.Connection,
) -> None:
    """Written with the database unreachable: checkpoints reach the anchor file at once and the
    table when a later writer ships the spool."""
    spool = tmp_path / "spool"
    anchor_file = tmp_path / "anchors.jsonl"
    writer = await LedgerWriter.open(
        "postgresql://nobody@127.0.0.1:1/none",
        schema=state_schema,
        spool_dir=spool,
        instance_id="down",
        timeout=0.5,
        signing_key_file=key_file,
        checkpoint_entries=2,
        checkpoint_seconds=3600,
        anchor_file=anchor_file,
    )
    for i in range(5):
        record_packed(writer, statement=f"SELECT {i}")
        if i % 2:
            await writer.flush()
    await writer.close()
    anchored = [(c.seq, c.checkpoint.final) for c in read_anchors(anchor_file)[0]]
    assert anchored == [(2, False), (4, False), (5, True)]
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_checkpoints')
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_packs')
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_entries')
    shipper = await LedgerWriter.open(
        ledger_dsn, schema=state_schema, spool_dir=spool, instance_id="up"
    )
    await shipper.flush()
    await shipper.close()
    report = await verify(
        admin, schema=state_schema, keys=keys, anchors=read_anchors(anchor_file)[0]
    )
    assert report.ok, report.problems
    assert report.checkpoints == 3


async def test_a_quiet_chain_is_checkpointed_after_checkpoint_seconds(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
) -> None:
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="quiet",
        flush_interval=0.05,
        signing_key_file=key_file,
        checkpoint_entries=1000,
        checkpoint_seconds=0.3,
        anchor_file=tmp_path / "anchors.jsonl",
    )
    try:
        record_packed(writer)
        record_packed(writer)
        table = f'"{state_schema}".ledger_checkpoints'
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await admin.fetchval(
                f"SELECT count(*) FROM {table} WHERE chain_id = $1", writer.chain_id
            ):
                break
        rows = await admin.fetch(
            f"SELECT seq, final FROM {table} WHERE chain_id = $1", writer.chain_id
        )
        assert [(r["seq"], r["final"]) for r in rows] == [(2, False)]
        for _ in range(100):  # the anchor line follows once the row is durable
            found = (
                read_anchors(tmp_path / "anchors.jsonl")[0]
                if (tmp_path / "anchors.jsonl").exists()
                else []
            )
            if found:
                break
            await asyncio.sleep(0.05)
        assert [(c.seq, c.checkpoint.final) for c in found] == [(2, False)]
    finally:
        await writer.close()


async def test_checkpoints_of_another_ledger(
    ledger: Ledger, admin: asyncpg.Connection, state_schema: str, key_file: Path
) -> None:
    """An anchor file serving several ledgers (schemas) is fine; a checkpoint row copied in from
    another ledger is not."""
    elsewhere = CheckpointSigner(load_or_create_signing_key(key_file), "signed", "other_schema")
    with ledger.anchor_file.open("ab") as f:
        f.write(elsewhere.sign("other-chain", 3, "c" * 64, "d" * 32, final=True).line())
    report = await check(admin, state_schema, ledger, anchors=True)
    assert report.ok, report.problems
    assert report.other_ledgers == 1
    copied = elsewhere.sign(ledger.chain_id, 12, "c" * 64, "d" * 32, final=True)
    await admin.execute(f'DELETE FROM "{state_schema}".ledger_checkpoints WHERE seq = 12 AND final')
    await admin.execute(
        f'INSERT INTO "{state_schema}".ledger_checkpoints (chain_id, seq, final, head_hash, '
        "head_entry_id, signed_at, instance_id, key_id, payload, signature) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        *checkpoint_values(copied),
    )
    report = await check(admin, state_schema, ledger, anchors=False)
    assert kinds(report) == {"bad_signature"}
    assert "other_schema" in report.problems[0].detail


async def test_unsigned_tail_rewritten_while_pgguard_runs_is_exposed_by_the_next_checkpoint(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
) -> None:
    """The window before a checkpoint: the attacker rewrites (and rehashes) entries nobody has
    signed yet; pgguard signs its own copy of the head, so the next checkpoint exposes it."""
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="window",
        signing_key_file=key_file,
        checkpoint_entries=1000,
        checkpoint_seconds=3600,
    )
    try:
        await _truncate_others(admin, state_schema, writer.chain_id)
        for i in range(4):
            record_packed(writer, statement=f"SELECT {i}")
        await writer.flush()  # shipped, not signed

        def edit(items: list[Item]) -> list[Item]:
            items[1].set_statement("SELECT harmless")
            return items

        await rewrite_chain(admin, state_schema, writer.chain_id, edit)
        record_packed(writer, statement="SELECT after")
    finally:
        await writer.close()  # the final checkpoint signs pgguard's own head
    report = await verify(admin, schema=state_schema, keys=keys)
    assert covers(report, "modified", 2)


async def test_checkpoints_are_posted_to_the_anchor_url(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, key_file: Path, tmp_path: Path
) -> None:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        writer = await LedgerWriter.open(
            ledger_dsn,
            schema=state_schema,
            spool_dir=tmp_path / "spool",
            instance_id="post",
            signing_key_file=key_file,
            anchor_url=f"http://127.0.0.1:{port}/anchors?token=secret",
        )
        record_packed(writer)
        await writer.close()
    finally:
        server.close()
    (line,) = received
    posted = json.loads(line)
    assert posted["checkpoint"]["final"] is True
    assert posted["checkpoint"]["chain_id"] == writer.chain_id
    assert posted["signature"]


async def test_an_unreachable_anchor_url_does_not_stop_the_ledger(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    key_file: Path,
    keys: KeyRing,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="nopost",
        signing_key_file=key_file,
        anchor_url="http://127.0.0.1:1/anchors?token=secret",
        timeout=1.0,
    )
    await _truncate_others(admin, state_schema, writer.chain_id)
    record_packed(writer)
    await writer.close()
    assert (await verify(admin, schema=state_schema, keys=keys)).ok
    failures = [r.getMessage() for r in caplog.records if "posting checkpoint" in r.getMessage()]
    assert failures
    assert not any("secret" in message for message in failures)  # the URL's token is not logged


async def test_instances_with_their_own_keys_and_anchor_files(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two instances, each with its own key and anchor file: verify takes both keys and both
    files; without one instance's key its checkpoints prove nothing."""
    keys, anchor_files = [], []
    for name in ("a", "b"):
        key_file = tmp_path / name / "ledger-signing.pem"
        anchor_file = tmp_path / name / "anchors.jsonl"
        chain_id, _ = await write_chain(
            ledger_dsn,
            state_schema,
            key_file,
            anchor_file,
            tmp_path / name / "spool",
            instance_id=name,
        )
        if name == "a":
            await admin.execute(
                f'DELETE FROM "{state_schema}".ledger_checkpoints WHERE chain_id <> $1', chain_id
            )
            for table in ("ledger_entries", "ledger_packs"):
                await admin.execute(
                    f'DELETE FROM "{state_schema}".{table} WHERE chain_id <> $1', chain_id
                )
        keys.append(load_or_create_signing_key(key_file).public_key())
        anchor_files.append(anchor_file)
    anchored = [c for path in anchor_files for c in read_anchors(path)[0]]
    both = await verify(admin, schema=state_schema, keys=KeyRing(keys), anchors=anchored)
    assert both.ok, both.problems
    assert len(both.chains) == 2
    assert both.checkpoints == 8
    only_a = await verify(admin, schema=state_schema, keys=KeyRing(keys[:1]), anchors=anchored)
    assert kinds(only_a) == {"bad_signature", "unanchored"}
    assert {p.chain_id for p in only_a.problems} == {c for c in both.chains if c.startswith("b:")}
