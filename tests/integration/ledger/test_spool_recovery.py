"""The state database goes down and comes back, pgguard restarts: nothing lost, nothing doubled.

Uses a dedicated embedded server so it can be stopped and started without disturbing others.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from pgguard.embedded import EmbeddedPostgres
from pgguard.ledger import KeyRing, LedgerWriter, verify
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.keys import load_or_create_signing_key
from tests.integration.ledger.conftest import entry, record_packed


@pytest.fixture(scope="module")
def own_pg(embedded_pg: EmbeddedPostgres | None) -> Iterator[EmbeddedPostgres]:
    if embedded_pg is None:
        pytest.skip("needs the embedded server binaries")
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-ledger-")) / "data")
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


async def test_spool_survives_outage_and_restart(own_pg: EmbeddedPostgres, tmp_path: Path) -> None:
    dsn = own_pg.unix_dsn()
    spool_dir = tmp_path / "spool"
    key_file, anchors = tmp_path / "data" / "ledger-signing.pem", tmp_path / "anchors.jsonl"
    recorded: list[str] = []

    def record(writer: LedgerWriter, n: int) -> None:
        # Full and packed entries alternate: both kinds take the spool and come back in order.
        for i in range(n):
            if i % 2:
                recorded.append(record_packed(writer, statement=f"SELECT {i}"))
                continue
            e = entry(statement=f"SELECT {i}")
            recorded.append(e.entry_id)
            writer.record(e)

    first = await LedgerWriter.open(
        dsn,
        schema="pgguard",
        spool_dir=spool_dir,
        instance_id="a",
        timeout=1.0,
        flush_interval=0.05,
        max_queue=100,
        batch_size=50,
        signing_key_file=key_file,
        checkpoint_entries=40,  # checkpoints before, during and after the outage
        anchor_file=anchors,
    )
    record(first, 120)
    await first.flush()
    own_pg.stop()
    record(first, 250)  # more than max_queue: overflows to the spool
    held = entry(action="hold", request_id="r1")
    recorded.append(held.entry_id)
    await first.record_durable(held)  # durable through the spool while the database is down
    record(first, 30)
    await first.close()  # database still down: the rest goes to the spool

    second = await LedgerWriter.open(
        dsn,
        schema="pgguard",
        spool_dir=spool_dir,
        instance_id="a",
        timeout=1.0,
        flush_interval=0.05,
        signing_key_file=key_file,
        anchor_file=anchors,
    )
    assert second.stats().spool_mode
    record(second, 10)
    own_pg.restart()
    await second.flush()
    await second.close()
    assert list(spool_dir.glob("*.jsonl")) == []

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        ids = [r["entry_id"] for r in await conn.fetch("SELECT entry_id FROM pgguard.ledger")]
        assert len(ids) == len(set(ids)) == len(recorded)
        assert set(ids) == set(recorded)
        order = await conn.fetch(
            "SELECT entry_id FROM pgguard.ledger WHERE chain_id = $1 ORDER BY seq",
            first.chain_id,
        )
        assert [r["entry_id"] for r in order] == recorded[: len(order)]
        report = await verify(conn)
        assert report.ok, report.problems
        assert len(report.chains) == 2
        # Checkpoints took the same way as the entries, in order, and every one is anchored.
        public = KeyRing([load_or_create_signing_key(key_file).public_key()])
        anchored, damaged = read_anchors(anchors)
        assert not damaged
        signed = await verify(conn, keys=public, anchors=anchored)
        assert signed.ok, signed.problems
        assert signed.warnings == []
        assert signed.checkpoints == len(anchored) > 2
    finally:
        await conn.close(timeout=10)
