"""LedgerWriter against a real PostgreSQL: every field lands, batches, fail-closed, reading back."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from pgguard.ledger import (
    Chain,
    LedgerFilters,
    LedgerStore,
    LedgerStoreUnavailable,
    LedgerUnavailable,
    LedgerWriter,
    query,
    verify,
)
from pgguard.ledger.packed import PackedEntry, PackedOutcome, Ref, epoch_us, text_record
from tests.integration.ledger.conftest import SESSION, T0, chain_rows, entry

APPROVER = {"id": "bob@example.com", "name": "Bob", "channel": "teams", "comment": "fine"}


@pytest.fixture(scope="module")
async def writer(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LedgerWriter]:
    opened = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="inst-a",
        flush_interval=0.05,
    )
    try:
        yield opened
    finally:
        await opened.close()


async def rows_by_id(admin: asyncpg.Connection, schema: str) -> dict[str, asyncpg.Record]:
    rows = await admin.fetch(f'SELECT * FROM "{schema}".ledger_entries')
    return {r["entry_id"]: r for r in rows}


async def test_every_kind_of_statement_lands_with_its_fields(
    writer: LedgerWriter, admin: asyncpg.Connection, state_schema: str
) -> None:
    allowed = entry()
    approved = entry(
        action="hold",
        categories=("export",),
        rule_ids=("export.copy",),
        statement="COPY finance.invoices TO STDOUT",
        request_id="req-approved",
        approvers=(APPROVER,),
        reason="nightly export",
        detail={"tables": ["finance.invoices"]},
    )
    denied = entry(
        action="deny",
        categories=("ddl",),
        request_id="req-denied",
        approvers=({**APPROVER, "comment": "no"},),
    )
    expired = entry(action="deny", request_id="req-expired", detail={"state": "expired"})
    session = entry(kind="session_start", statement="", action="")
    auth = entry(kind="auth_failure", statement="", action="", detail={"reason": "bad password"})
    writer.record(session)
    writer.record(allowed)
    await writer.record_durable(approved)  # durable before it is forwarded
    await writer.record_durable(denied)
    await writer.record_durable(expired)
    done = T0 + timedelta(seconds=1)
    ok = entry(
        kind="outcome",
        statement_entry_id=approved.entry_id,
        completed_at=done,
        command_tag="COPY 42",
        rows=42,
        duration_ms=12.5,
    )
    failed_stmt = entry(statement="SELECT 1/0")
    failed = entry(
        kind="outcome",
        statement_entry_id=failed_stmt.entry_id,
        completed_at=done,
        sqlstate="22012",
        error_message="division by zero",
        duration_ms=0.7,
    )
    for e in (failed_stmt, ok, failed, auth):
        writer.record(e)
    await writer.flush()

    rows = await rows_by_id(admin, state_schema)
    r = rows[approved.entry_id]
    assert (r["kind"], r["action"], r["request_id"], r["reason"]) == (
        "statement",
        "hold",
        "req-approved",
        "nightly export",
    )
    assert (r["agent"], r["owner"], r["client_address"], r["application_name"]) == (
        "agent",
        "alice@example.com",
        "127.0.0.1:5555",
        "etl",
    )
    assert (r["database"], r["upstream_role"], r["instance_id"], r["session_id"]) == (
        "postgres",
        "pgguard_scram",
        "inst-a",
        "sess-1",
    )
    assert r["statement"] == "COPY finance.invoices TO STDOUT"
    assert r["fingerprint"] == "fp-select"
    assert list(r["categories"]) == ["export"]
    assert list(r["rule_ids"]) == ["export.copy"]
    assert json.loads(r["approvers"]) == [APPROVER]
    assert json.loads(r["detail"]) == {"tables": ["finance.invoices"]}
    assert r["received_at"] == T0
    assert r["decided_at"] == T0 + timedelta(milliseconds=5)
    assert json.loads(rows[denied.entry_id]["approvers"])[0]["comment"] == "no"
    assert json.loads(rows[expired.entry_id]["detail"]) == {"state": "expired"}
    o = rows[ok.entry_id]
    assert (o["statement_entry_id"], o["command_tag"], o["rows"], o["duration_ms"]) == (
        approved.entry_id,
        "COPY 42",
        42,
        12.5,
    )
    assert o["completed_at"] == done
    f = rows[failed.entry_id]
    assert (f["sqlstate"], f["error_message"]) == ("22012", "division by zero")
    assert rows[session.entry_id]["kind"] == "session_start"
    assert json.loads(rows[auth.entry_id]["detail"]) == {"reason": "bad password"}
    chain = [r for r in rows.values() if r["chain_id"] == writer.chain_id]
    assert sorted(r["seq"] for r in chain) == list(range(1, len(chain) + 1))

    joined = [
        row
        async for row in query(admin, LedgerFilters(request_id="req-approved"), schema=state_schema)
    ]
    assert len(joined) == 1
    assert joined[0].outcome is not None
    assert joined[0].outcome.command_tag == "COPY 42"
    by_approver = [
        row async for row in query(admin, LedgerFilters(approver="Bob"), schema=state_schema)
    ]
    assert {row.entry.request_id for row in by_approver} == {"req-approved", "req-denied"}
    exports = [
        row
        async for row in query(
            admin, LedgerFilters(category="export", action="hold"), schema=state_schema
        )
    ]
    assert [row.entry.entry_id for row in exports] == [approved.entry_id]
    assert (await verify(admin, schema=state_schema)).ok


async def test_batches_land_exactly_once(
    writer: LedgerWriter, admin: asyncpg.Connection, state_schema: str
) -> None:
    before = await admin.fetchval(f'SELECT count(*) FROM "{state_schema}".ledger_entries')
    for i in range(1234):
        writer.record(entry(statement=f"SELECT {i}", session_id="batch"))
    await writer.flush()
    count = await admin.fetchval(f'SELECT count(*) FROM "{state_schema}".ledger_entries')
    assert count - before == 1234
    assert (await verify(admin, schema=state_schema)).ok


async def test_a_pack_shipped_twice_is_stored_once(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection
) -> None:
    """An answer lost after the commit makes the writer ship the same entries again (from the
    spool, perhaps cut into other batches): the packs' watermark keeps them stored once."""
    chain = Chain("twice:1")
    text = text_record("SELECT ?", "fp", ["read"], ["read.default"], "allow")
    sealed = [chain.seal_packed(SESSION, text, (1, 2, "SELECT 1", 1, None, None)) for _ in range(6)]
    store = LedgerStore(ledger_dsn, schema=state_schema)
    again = LedgerStore(ledger_dsn, schema=state_schema)  # knows nothing of what is stored
    try:
        await store.insert(sealed[:4])
        await store.insert(sealed[2:])  # overlaps the first batch
        await store.insert(sealed)
        await again.insert(sealed[1:])
    finally:
        await store.close()
        await again.close()
    stored = await admin.fetch(
        f'SELECT entry_id FROM "{state_schema}".ledger WHERE chain_id = $1 ORDER BY seq',
        chain.chain_id,
    )
    assert [r["entry_id"] for r in stored] == [s.entry_id for s in sealed]


def closed_port_dsn() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://nobody:x@127.0.0.1:{port}/postgres"


async def test_privileged_statement_refused_when_nothing_can_record_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    writer = await LedgerWriter.open(
        closed_port_dsn(), spool_dir=blocker / "spool", instance_id="x", timeout=0.5
    )
    try:
        with pytest.raises(LedgerUnavailable) as info:
            await writer.record_durable(entry(action="hold"))
        assert info.value.sqlstate == "58030"
        writer.record(entry())  # never raises
    finally:
        await writer.close()


async def test_durable_goes_to_the_spool_when_the_database_is_unreachable(tmp_path: Path) -> None:
    writer = await LedgerWriter.open(
        closed_port_dsn(), spool_dir=tmp_path, instance_id="x", timeout=0.5
    )
    try:
        await writer.record_durable(entry(action="hold"))
        assert writer.stats().spool_mode
        spooled = await asyncio.to_thread(lambda: next(tmp_path.glob("*.jsonl")).read_bytes())
        assert b'"action":"hold"' in spooled
    finally:
        await writer.close()


async def test_record_only_queues_and_the_shipper_stores_everything(writer: LedgerWriter) -> None:
    # record() runs on the relay's path: it must never wait for the database. Its speed is the
    # benchmarks' business (bench/pgbench_compare.py), not a timed assertion here.
    before = writer.stats()
    for _ in range(5000):
        writer.record(entry())
    queued = writer.stats()
    assert queued.shipped == before.shipped  # nothing reached the database without an await
    assert (queued.recorded, queued.queued) == (before.recorded + 5000, before.queued + 5000)
    await writer.flush()
    done = writer.stats()
    assert (done.shipped, done.queued, done.spooled) == (before.shipped + 5000, 0, before.spooled)


async def test_a_feeders_entries_keep_their_place_in_the_chain(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """What a feeder holds (the proxy's noted ordinary statements) is sealed before anything
    recorded after it: a full entry, a durable one, or the final flush."""
    writer = await LedgerWriter.open(
        ledger_dsn, schema=state_schema, spool_dir=tmp_path, instance_id="feeder"
    )
    held: list[tuple[Ref, Ref, PackedOutcome]] = []

    def feeder() -> None:
        items = held[:]
        held.clear()
        writer.record_packed_many(items)

    def note(tag: str) -> None:
        received = epoch_us(T0.timestamp())
        held.append((SESSION, text, (received, received + 10, tag, 1, None, None)))

    text = text_record("SELECT ?", "fp", ["read"], ["read.default"], "allow")
    writer.add_feeder(feeder)
    try:
        note("SELECT 1")
        note("SELECT 2")
        writer.record(entry(statement="full after two noted"))
        note("SELECT 3")
        await writer.record_durable(entry(statement="durable after the third", action="hold"))
        note("SELECT 4")
        assert writer.stats().recorded == 6  # stats feeds too
        await writer.flush()
    finally:
        await writer.close()
    rows = await chain_rows(admin, state_schema, writer.chain_id)
    assert [(r["statement"], r["command_tag"]) for r in rows if r["statement"] != "SELECT ?"] == [
        ("full after two noted", None),
        ("durable after the third", None),
    ]
    assert [r["command_tag"] or r["statement"] for r in rows] == [
        "SELECT 1",
        "SELECT 2",
        "full after two noted",
        "SELECT 3",
        "durable after the third",
        "SELECT 4",
    ]
    assert (await verify(admin, schema=state_schema)).ok


class AnswerLost(LedgerStore):
    """A store whose next pack insert commits but whose answer never arrives."""

    lose_next = False

    async def _insert_pack(
        self, conn: asyncpg.Connection, chain_id: str, entries: list[PackedEntry]
    ) -> int:
        last = await super()._insert_pack(conn, chain_id, entries)
        if self.lose_next:
            self.lose_next = False
            raise ConnectionResetError("the answer was lost")
        return last


async def test_a_pack_whose_answer_was_lost_is_stored_once(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection
) -> None:
    """The store follows each chain's stored watermark itself (one round trip per batch); after
    a failure it asks the database again instead of trusting what it followed."""
    chain = Chain("lost:1")
    text = text_record("SELECT ?", "fp", ["read"], ["read.default"], "allow")
    sealed = [chain.seal_packed(SESSION, text, (1, 2, "SELECT 1", 1, None, None)) for _ in range(6)]
    store = AnswerLost(ledger_dsn, schema=state_schema)
    try:
        await store.insert(sealed[:2])
        await store.insert(sealed[2:4])  # from the followed watermark
        store.lose_next = True
        with pytest.raises(LedgerStoreUnavailable):
            await store.insert(sealed[4:])  # stored, but the store cannot know it
        await store.insert(sealed[2:])  # shipped again, as the writer does: stored once
    finally:
        await store.close()
    stored = await admin.fetch(
        f'SELECT entry_id FROM "{state_schema}".ledger WHERE chain_id = $1 ORDER BY seq',
        chain.chain_id,
    )
    assert [r["entry_id"] for r in stored] == [s.entry_id for s in sealed]
    assert (await verify(admin, schema=state_schema)).ok
