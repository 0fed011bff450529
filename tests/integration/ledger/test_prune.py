"""`pgguard ledger prune` (issue 19): old entries go, the signed checkpoint at the cut stays,
and `verify` still proves everything after it - and a cut nobody can prove is reported.

Attacks tried: deleting a chain's start and writing a prune record at a seq no checkpoint signs;
the same at a signed seq with a forged head; deleting a pruned chain's remaining start (a gap
after the cut)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

from pgguard.cli_ledger import register
from pgguard.ledger import KeyRing, LedgerWriter, verify
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.keys import load_public_key
from pgguard.ledger.prune import prune
from tests.integration.ledger.conftest import T0, entry, record_packed

DAY = timedelta(days=1)


@pytest.fixture
async def ledger(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path: Path,
) -> Path:
    """One chain over 10 days (6 entries a day, ordinary ones packed in between), signed every
    4 entries; its config file (data_dir holds the key and the anchor file)."""
    s = f'"{state_schema}"'
    await admin.execute(  # a fresh ledger for each test (the schema is the module's)
        f"DO $$ BEGIN IF to_regclass('{state_schema}.ledger_prunes') IS NOT NULL THEN "
        f"TRUNCATE {s}.ledger_entries, {s}.ledger_packs, {s}.ledger_rows, "
        f"{s}.ledger_checkpoints, {s}.ledger_prunes; END IF; END $$"
    )
    data = tmp_path / "data"
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="prune",
        signing_key_file=data / "ledger-signing.pem",
        anchor_file=data / "ledger-anchors.jsonl",
        checkpoint_entries=4,
    )
    for day in range(10):
        for i in range(5):
            writer.record(entry(received_at=T0 + day * DAY + timedelta(minutes=i)))
            await writer.flush()  # checkpoints are signed between shipping rounds
        record_packed(writer)  # received at T0: packed entries keep their own times
        await writer.flush()
    await writer.close()
    path = tmp_path / "pgguard.toml"
    path.write_text(
        f'data_dir = "{data}"\n\n[upstream]\ndsn = "{ledger_dsn}"\n\n'
        f'[state]\ndsn = "{ledger_dsn}"\nschema = "{state_schema}"\n'
    )
    return path


def keys(config: Path) -> KeyRing:
    return KeyRing([load_public_key(config.parent / "data" / "ledger-signing.pub.pem")])


def anchors(config: Path) -> list:  # type: ignore[type-arg]
    found, _ = read_anchors(config.parent / "data" / "ledger-anchors.jsonl")
    return found


def run(*args: str) -> tuple[int, str, str]:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None: ...

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.stdout, result.stderr


async def count(admin: asyncpg.Connection, schema: str) -> int:
    return int(await admin.fetchval(f'SELECT count(*) FROM "{schema}".ledger'))


async def test_prune_keeps_the_proof(
    ledger: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    total = await count(admin, state_schema)
    before = await verify(admin, schema=state_schema, keys=keys(ledger), anchors=anchors(ledger))
    assert before.ok, before.problems
    cuts = await prune(admin, schema=state_schema, before=T0 + 5 * DAY, keys=keys(ledger))
    (cut,) = cuts
    assert cut.removed > 0
    left = await count(admin, state_schema)
    assert left == total - cut.removed
    oldest = await admin.fetchval(
        f"SELECT min(received_at) FROM \"{state_schema}\".ledger WHERE kind <> 'statement' "
        "OR NOT packed"
    )
    assert oldest >= T0 + 4 * DAY  # cut at a checkpoint at most a day's entries before the date
    # the cut's checkpoint stays; older ones are gone
    kept = await admin.fetch(f'SELECT seq FROM "{state_schema}".ledger_checkpoints ORDER BY seq')
    assert kept[0]["seq"] == cut.seq
    # verify proves the rest: with the keys and the anchor file (which still lists the
    # pruned checkpoints), and with the hash chain alone
    report = await verify(admin, schema=state_schema, keys=keys(ledger), anchors=anchors(ledger))
    assert report.ok, report.problems
    assert report.entries == left
    assert report.pruned[cut.chain_id].seq == cut.seq
    assert (await verify(admin, schema=state_schema)).ok
    # a second prune with the same date cuts nothing more
    assert await prune(admin, schema=state_schema, before=T0 + 5 * DAY, keys=keys(ledger)) == []


async def test_prune_cli(ledger: Path, admin: asyncpg.Connection, state_schema: str) -> None:
    code, out, _ = await asyncio.to_thread(
        run, "ledger", "prune", "-c", str(ledger), "--before", "2024-05-04", "--dry-run"
    )
    assert code == 0, out
    assert "would cut" in out
    total = await count(admin, state_schema)
    assert total == await count(admin, state_schema)  # a dry run deletes nothing
    code, out, _ = await asyncio.to_thread(
        run, "ledger", "prune", "-c", str(ledger), "--before", "2024-05-04", "--json"
    )
    assert code == 0, out
    (cut,) = json.loads(out)["cuts"]
    assert cut["removed"] > 0
    code, out, err = await asyncio.to_thread(run, "ledger", "verify", "-c", str(ledger))
    assert code == 0, err
    assert "pruned:" in err
    code, _, err = await asyncio.to_thread(run, "ledger", "prune", "-c", str(ledger))
    assert code == 2
    assert "retention_days" in err


async def prefix_deleted_with_record(
    admin: asyncpg.Connection, schema: str, seq: int, head_hash: str | None = None
) -> None:
    """What someone with write access to the state schema would do to pass a deletion off as
    a prune: delete #1..#seq and record a cut there."""
    # (cuts nothing without keys, but expands the packs: their entries are rows to delete)
    await prune(admin, schema=schema, before=T0, keys=KeyRing([]))
    s = f'"{schema}"'
    head = await admin.fetchrow(f"SELECT hash, entry_id FROM {s}.ledger WHERE seq = $1", seq)
    assert head is not None
    await admin.execute(f"DELETE FROM {s}.ledger_entries WHERE seq <= $1", seq)
    await admin.execute(f"DELETE FROM {s}.ledger_rows WHERE seq <= $1", seq)
    await admin.execute(f"DELETE FROM {s}.ledger_checkpoints WHERE seq < $1", seq)
    await admin.execute(
        f"INSERT INTO {s}.ledger_prunes (chain_id, seq, head_hash, head_entry_id, before, "
        "removed) SELECT chain_id, $1, $2, $3, now(), $1 FROM "
        f"(SELECT DISTINCT chain_id FROM {s}.ledger) c",
        seq,
        head_hash or head["hash"],
        head["entry_id"],
    )


async def test_forged_prune_at_an_unsigned_seq_is_reported(
    ledger: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    signed = {
        r["seq"] for r in await admin.fetch(f'SELECT seq FROM "{state_schema}".ledger_checkpoints')
    }
    seq = next(n for n in range(10, 40) if n not in signed)
    await prefix_deleted_with_record(admin, state_schema, seq)
    report = await verify(admin, schema=state_schema, keys=keys(ledger), anchors=anchors(ledger))
    assert not report.ok
    assert ("deleted", seq) in {(p.kind, p.seq) for p in report.problems}


async def test_forged_prune_with_a_wrong_head_is_reported(
    ledger: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    seq = min(
        r["seq"]
        for r in await admin.fetch(f'SELECT seq FROM "{state_schema}".ledger_checkpoints')
        if r["seq"] > 8
    )
    await prefix_deleted_with_record(admin, state_schema, seq, head_hash="0" * 64)
    report = await verify(admin, schema=state_schema, keys=keys(ledger), anchors=anchors(ledger))
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert "deleted" in kinds  # no checkpoint has that head


async def test_gap_after_a_real_cut_is_reported(
    ledger: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    (cut,) = await prune(admin, schema=state_schema, before=T0 + 5 * DAY, keys=keys(ledger))
    s = f'"{state_schema}"'
    await admin.execute(f"DELETE FROM {s}.ledger_entries WHERE seq = $1", cut.seq + 1)
    await admin.execute(f"DELETE FROM {s}.ledger_rows WHERE seq = $1", cut.seq + 1)
    report = await verify(admin, schema=state_schema, keys=keys(ledger), anchors=anchors(ledger))
    assert not report.ok
    assert "deleted" in {p.kind for p in report.problems}
    hash_only = await verify(admin, schema=state_schema)
    assert "deleted" in {p.kind for p in hash_only.problems}
