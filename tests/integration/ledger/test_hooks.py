"""The proxy's ledger hooks against a real writer: ordinary statements are noted on the relay's
path and sealed in batches, in order, with bounded memory."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from pgguard.ledger import LedgerWriter, verify
from pgguard.masking import MaskingRules
from pgguard.proxy import ledger_hooks
from pgguard.proxy.connection import Session
from pgguard.proxy.ledger_hooks import LedgerHooks, StatementRecord
from pgguard.wire.backend import BackendTracker
from pgguard.wire.outcomes import Outcome
from tests.integration.ledger.conftest import chain_rows


def completed(record: StatementRecord, tag: str) -> list[Outcome]:
    outcome = Outcome(record)
    outcome.tags.append(tag)
    return [outcome]


async def test_noted_statements_are_sealed_in_order_and_memory_stays_bounded(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    writer = await LedgerWriter.open(
        ledger_dsn, schema=state_schema, spool_dir=tmp_path, instance_id="hooks"
    )
    hooks = LedgerHooks(writer, MaskingRules.load(), "hooks", "pgguard_scram")
    session = Session("hooks-1", "agent", "owner", "postgres", "127.0.0.1:5", BackendTracker())
    count = ledger_hooks._PENDING_MAX + 100
    try:
        # No await in between: the shipper never gets to run, as under a stuck state database.
        for i in range(count):
            sql = b"SELECT %d" % i
            hooks.finished_many(session, completed(StatementRecord("query", sql, None), "SELECT 1"))
            assert len(hooks._pending) < ledger_hooks._PENDING_MAX
        hooks.refused(session, StatementRecord("query", b"DROP TABLE t", None), "42501", "no")
        await writer.flush()
    finally:
        await writer.close()
    rows = await chain_rows(admin, state_schema, writer.chain_id)
    assert len(rows) == count + 1
    assert all(r["statement"] == "SELECT 0" and r["command_tag"] == "SELECT 1" for r in rows[:-1])
    assert (rows[-1]["statement"], rows[-1]["sqlstate"]) == ("DROP TABLE t", "42501")
    assert (await verify(admin, schema=state_schema)).ok
