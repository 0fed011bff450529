"""Every example query of the README's ledger section runs against a real ledger and finds
what it is about (issue 19: the documentation is checked, not trusted)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from pgguard.ledger import LedgerWriter
from pgguard.ledger.packed import epoch_us, session_record, text_record
from tests.integration.ledger.conftest import entry

README = Path(__file__).resolve().parents[3] / "README.md"
BOB = {"id": "bob", "name": "Bob Chen", "channel": "web", "comment": "ok"}


def readme_queries() -> list[tuple[str, str]]:
    """(title, SQL): each ``Example: …`` line of README.md followed by a ```sql block."""
    text = README.read_text(encoding="utf-8")
    return [
        (m.group(1).strip(), m.group(2).strip())
        for m in re.finditer(r"^Example: (.+?)\n+```sql\n(.*?)```", text, re.M | re.S)
    ]


def test_the_readme_has_its_example_queries() -> None:
    titles = [title for title, _ in readme_queries()]
    assert len(titles) >= 6
    assert "who approved exports last week?" in titles


@pytest.fixture(scope="module")
async def ledger(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """Recent entries of agent etl-bot: ordinary statements (one failing), an approved export
    with its request id, a refused statement; some packs expanded, some not."""
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path_factory.mktemp("spool"),
        instance_id="readme",
    )
    now = datetime.now(UTC) - timedelta(seconds=5)
    session = session_record(
        {
            "instance_id": "readme",
            "session_id": "s-1",
            "agent": "etl-bot",
            "owner": "ops@example.com",
            "client_address": "10.0.0.7:5432",
            "application_name": "etl",
            "database": "sales",
            "upstream_role": "pgguard_scram",
        }
    )
    read = text_record("SELECT * FROM t WHERE id = ?", "fp", ["read"], ["read.default"], "allow")
    at = epoch_us(now.timestamp())
    for i in range(3):
        writer.record_packed(session, read, (at + i, at + i + 900, "SELECT 1", 1, None, None))
    writer.record_packed(session, read, (at, at + 500, None, None, "42P01", "no such table"))
    await writer.flush()
    common = {"agent": "etl-bot", "received_at": now, "session_id": "s-1"}
    held = entry(
        **common,
        action="hold",
        categories=("export",),
        request_id="req-4f1c2a9e",
        approvers=(BOB,),
        decided_at=now,
        statement="COPY customers TO STDOUT",
    )
    await writer.record_durable(held)
    writer.record(
        entry(
            **common,
            kind="outcome",
            statement_entry_id=held.entry_id,
            request_id="req-4f1c2a9e",
            completed_at=now,
            command_tag="COPY 12",
            rows=12,
        )
    )
    writer.record(entry(**common, action="deny", categories=("ddl",), statement="DROP TABLE t"))
    for i in range(3):
        writer.record_packed(session, read, (at + i, at + i + 900, "SELECT 1", 1, None, None))
    await writer.close()
    await admin.fetchval(f'SELECT "{state_schema}".ledger_expand(1)')  # one pack stays packed
    return state_schema


@pytest.mark.parametrize(("title", "sql"), readme_queries(), ids=[t for t, _ in readme_queries()])
async def test_readme_query_finds_its_entries(
    ledger: str, admin: asyncpg.Connection, title: str, sql: str
) -> None:
    assert "pgguard.ledger" in sql  # the default schema, as the README spells it
    rows = await admin.fetch(sql.replace("pgguard.", f'"{ledger}".'), timeout=10)
    assert rows, f"README example {title!r} found nothing"
