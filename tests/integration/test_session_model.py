"""Issue 15: what runs is what was judged, with hand-written protocol messages.

Each test sends a message sequence the security review used to run a privileged statement
unjudged, through a live proxy to a real PostgreSQL, and asks the server itself (the table still
exists) whether the statement ran. Privileged statements are refused here (no approvers), so
"judged" shows as a 42501/55000 refusal and an untouched table.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, error_fields


def bind(portal: str, statement: str) -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0)
    return m.message(ord("B"), body)


def execute(portal: str = "") -> bytes:
    return m.message(ord("E"), portal.encode() + b"\0" + struct.pack("!i", 0))


def close(kind: str, name: str) -> bytes:
    return m.message(ord("C"), kind.encode() + name.encode() + b"\0")


SYNC = m.message(ord("S"))


@pytest.fixture(autouse=True)
def victim(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS model_victim")
        conn.execute("DROP TABLE IF EXISTS model_scratch")
        conn.execute("CREATE TABLE model_victim (id int)")


def victim_exists(direct_dsn: str) -> bool:
    with psycopg.connect(direct_dsn) as conn:
        found = conn.execute("SELECT to_regclass('model_victim') IS NOT NULL").fetchone()
        return found == (True,)


def types(replies: list[tuple[str, bytes]]) -> list[str]:
    return [t for t, _ in replies]


def read_until_closed(raw: RawClient) -> list[tuple[str, bytes]]:
    replies: list[tuple[str, bytes]] = []
    try:
        while True:
            replies.append(raw.recv_message())
    except ConnectionError:
        return replies


def first_error(replies: list[tuple[str, bytes]]) -> tuple[str, str]:
    body = next(b for t, b in replies if t == "E")
    fields = error_fields(body)
    return fields.sqlstate, fields.message


def test_skipped_close_and_parse_do_not_change_what_runs(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """The review's sequence: the server skipped Close s and Parse s after an error."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s", "DROP TABLE model_victim") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "Z"]
    raw.send(m.parse("x", "SELEC broken") + close("S", "s") + m.parse("s", "SELECT 1") + SYNC)
    replies = raw.recv_until("Z")
    assert replies[0][0] == "E"  # the server skipped the Close and the Parse
    raw.send(bind("", "s") + execute() + SYNC)
    replies = raw.recv_until("Z")
    sqlstate, _ = first_error(replies)
    assert sqlstate in ("42501", "55000")
    assert "C" not in types(replies)
    assert victim_exists(direct_dsn)


def test_skipped_unnamed_parse_does_not_change_what_runs(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """The nearest variant with the unnamed statement, which a skipped Parse does not replace."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("", "DROP TABLE model_victim") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "Z"]
    raw.send(m.parse("x", "SELEC broken") + m.parse("", "SELECT 1") + SYNC)
    assert raw.recv_until("Z")[0][0] == "E"
    raw.send(bind("", "") + execute() + SYNC)
    replies = raw.recv_until("Z")
    assert first_error(replies)[0] in ("42501", "55000")
    assert victim_exists(direct_dsn)


def test_a_rejected_reparse_is_judged_by_the_text_the_server_kept(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """Parse s1 = DROP; Parse s1 = CREATE (rejected: the name exists); Bind s1; Execute."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s1", "DROP TABLE model_victim") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "Z"]
    raw.send(m.parse("s1", "SELECT 1") + SYNC)  # harmless text, rejected by the server
    replies = raw.recv_until("Z")
    assert first_error(replies)[0] == "42P05"
    raw.send(bind("", "s1") + execute() + SYNC)
    replies = raw.recv_until("Z")
    sqlstate, _ = first_error(replies)
    assert sqlstate == "42501"  # judged as the DROP it is: a single, certain text
    assert victim_exists(direct_dsn)


def test_a_reparse_after_a_confirmed_close_is_its_new_text(guarded: ProxyThread) -> None:
    """No false refusals: Close, then Parse the name again, then run it."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s", "DROP TABLE model_victim") + SYNC)
    raw.recv_until("Z")
    raw.send(close("S", "s") + m.parse("s", "SELECT 41 + 1") + bind("", "s") + execute() + SYNC)
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
    assert ("C", b"SELECT 1\0") in replies


def test_a_query_after_unsynced_extended_messages_is_refused(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """The ledger-desync sequence: a Query the server would skip after a failed Parse."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("x", "SELEC broken") + m.query("DROP TABLE model_victim"))
    replies = read_until_closed(raw)
    errors = [error_fields(b) for t, b in replies if t == "E"]
    assert any(e.sqlstate == "08P01" and "without a Sync" in e.message for e in errors)
    assert victim_exists(direct_dsn)


DESCRIBE_S1 = m.message(ord("D"), b"Ss1\0")
FLUSH = m.message(ord("H"))


def test_a_query_after_answered_unsynced_messages_runs(guarded: ProxyThread) -> None:
    """asyncpg's prepare is Parse, Describe, Flush; once the answers are in, it sends a simple
    Query with no Sync in between (``execute()`` without arguments, ``copy_records_to_table``).
    The server runs it, and its ReadyForQuery ends the extended group too."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s1", "SELECT 41 + 1") + DESCRIBE_S1 + FLUSH)
    assert types(raw.recv_until("T")) == ["1", "t", "T"]
    raw.send(m.query("SELECT 'after'"))
    replies = raw.recv_until("Z")
    assert types(replies) == ["T", "D", "C", "Z"]
    assert replies[1][1].endswith(b"after")
    # The statement parsed before the Query is still the server's, and pgguard knows it.
    raw.send(bind("", "s1") + execute() + SYNC)
    replies = raw.recv_until("Z")
    assert types(replies) == ["2", "D", "C", "Z"]
    assert replies[1][1].endswith(b"42")


def test_a_query_pipelined_before_the_answers_is_still_refused(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """The nearest variant: the same messages in one write, so the Query reaches pgguard before
    the server has answered the Parse - it could still be skipped, so it is refused."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s1", "SELECT 1") + DESCRIBE_S1 + FLUSH + m.query("DROP TABLE model_victim"))
    replies = read_until_closed(raw)
    errors = [error_fields(b) for t, b in replies if t == "E"]
    assert any(e.sqlstate == "08P01" and "without a Sync" in e.message for e in errors)
    assert victim_exists(direct_dsn)


def test_a_query_after_an_answered_failure_is_refused(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """All answered, but one with an error: the server would skip the Query (ignore_till_sync),
    so the ledger could not number its replies; refused as before."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s1", "SELEC broken") + FLUSH)
    assert types(raw.recv_until("E")) == ["E"]
    raw.send(m.query("DROP TABLE model_victim"))
    replies = read_until_closed(raw)
    errors = [error_fields(b) for t, b in replies if t == "E"]
    assert any(e.sqlstate == "08P01" and "without a Sync" in e.message for e in errors)
    assert victim_exists(direct_dsn)


async def test_asyncpg_execute_and_copy_after_prepare(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """Found by asyncpg's own suite through pgguard (bench/driver_suites.py): both used to end
    the session with 08P01."""
    with psycopg.connect(direct_dsn, autocommit=True) as setup:  # DDL would be held
        setup.execute("CREATE TABLE model_scratch (a int, b text)")
    conn = await asyncpg.connect(guarded.dsn())
    try:
        stmt = await conn.prepare("SELECT $1::int + 1")
        assert await conn.execute("SELECT 2") == "SELECT 1"
        assert await stmt.fetchval(1) == 2
        records = [(i, f"row {i}") for i in range(100)]
        assert await conn.copy_records_to_table("model_scratch", records=records) == "COPY 100"
        assert await conn.fetchval("SELECT sum(a) FROM model_scratch") == sum(range(100))
    finally:
        await conn.close()


def _bound_in_a_transaction(raw: RawClient, portal: str, sql: str) -> None:
    raw.send(m.query("BEGIN"))
    raw.recv_until("Z")
    raw.send(m.parse("", sql) + bind(portal, "") + SYNC)  # bound, never Executed
    assert types(raw.recv_until("Z")) == ["1", "2", "Z"]


@pytest.mark.parametrize(
    "runner",
    [
        m.query("FETCH ALL FROM p1"),
        m.query("MOVE FORWARD ALL IN p1"),
        m.query("select 1; fetch 1 from P1"),  # folded to p1, after an allowed statement
        m.parse("f", "FETCH ALL FROM p1") + bind("", "f") + execute() + SYNC,
    ],
    ids=["fetch", "move", "second-statement", "extended-fetch"],
)
def test_sql_fetch_of_a_protocol_portal_is_judged(
    guarded: ProxyThread, direct_dsn: str, runner: bytes
) -> None:
    """The review's first attack: FETCH runs a portal pgguard only judged at Execute."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    _bound_in_a_transaction(raw, "p1", "SELECT count(*) FROM (SELECT 1) s, pg_stat_file('.')")
    raw.send(runner)
    replies = raw.recv_until("Z")
    sqlstate, message = first_error(replies)
    assert sqlstate == "42501", message
    assert "D" not in types(replies)  # no row of the portal came back
    assert victim_exists(direct_dsn)


def test_sql_fetch_of_an_ordinary_portal_still_works(guarded: ProxyThread) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    _bound_in_a_transaction(raw, "p2", "SELECT 7 AS n")
    raw.send(m.query("FETCH ALL FROM p2"))
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
    assert "D" in types(replies)


# --- the FunctionCall message (issue 15, deliverable 3) -----------------------------------------


def function_call(oid: int, *args: bytes) -> bytes:
    body = struct.pack("!Ih", oid, 1) + struct.pack("!h", 0) + struct.pack("!h", len(args))
    for arg in args:
        body += struct.pack("!i", len(arg)) + arg
    return m.message(m.F_FUNCTION_CALL, body + struct.pack("!h", 0))


def oid_of(direct_dsn: str, signature: str) -> int:
    with psycopg.connect(direct_dsn) as conn:
        row = conn.execute("SELECT %s::regprocedure::oid", (signature,)).fetchone()
        assert row is not None
        return int(row[0])


def test_a_function_call_is_judged_as_the_select_it_amounts_to(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(function_call(oid_of(direct_dsn, "pg_catalog.now()")))
    replies = raw.recv_until("Z")
    assert types(replies) == ["V", "Z"]
    # A server-side file read by OID is what SELECT pg_read_file(...) is: privileged.
    raw.send(function_call(oid_of(direct_dsn, "pg_catalog.pg_read_file(text)"), b"/etc/hostname"))
    replies = raw.recv_until("Z")
    sqlstate, message = first_error(replies)
    assert sqlstate == "42501", message
    assert "V" not in types(replies)
    # Resolved once per session: the second call of now() needs no look-up and still works.
    raw.send(function_call(oid_of(direct_dsn, "pg_catalog.now()")))
    assert types(raw.recv_until("Z")) == ["V", "Z"]


def test_a_function_call_of_an_unknown_oid_is_refused(guarded: ProxyThread) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(function_call(4_000_000_000))
    replies = raw.recv_until("Z")
    sqlstate, message = first_error(replies)
    assert sqlstate == "42501"
    assert "no function has OID" in message
    raw.send(m.query("SELECT 1"))
    assert "E" not in types(raw.recv_until("Z"))


def test_psql_large_object_import_and_export_work(guarded: ProxyThread, tmp_path: Path) -> None:
    """libpq's client-side large-object API (psql's \\lo_import / \\lo_export) uses
    FunctionCall messages for lo_creat, lo_open, lowrite, loread and lo_close."""
    source = tmp_path / "in.bin"
    source.write_bytes(bytes(range(256)) * 64)
    target = tmp_path / "out.bin"
    script = (
        "BEGIN;\n"
        f"\\lo_import {source}\n"
        f"\\lo_export :LASTOID {target}\n"
        "SELECT lo_unlink(:LASTOID);\n"
        "COMMIT;\n"
    )
    result = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", guarded.dsn()],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == source.read_bytes()


def test_an_execute_waits_for_the_answers_that_decide_what_it_runs(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    """Pipelined without waiting: [Parse x (fails); Close s; Parse s = SELECT] [Bind s;
    Execute]. Until the first group is answered the portal may run the DROP or the SELECT;
    pgguard waits for the answer (the Close and Parse were skipped) and judges the DROP."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s", "DROP TABLE model_victim") + SYNC)
    raw.recv_until("Z")
    raw.send(
        m.parse("x", "SELEC broken")
        + close("S", "s")
        + m.parse("s", "SELECT 1")
        + SYNC
        + bind("", "s")
        + execute()
        + SYNC
    )
    first = raw.recv_until("Z")
    assert first[0][0] == "E"
    second = raw.recv_until("Z")
    sqlstate, message = first_error(second)
    assert sqlstate == "42501", message  # judged as the DROP, certain once answered
    assert victim_exists(direct_dsn)


def test_a_pipelined_close_and_reparse_runs_the_new_text(guarded: ProxyThread) -> None:
    """No false refusal: the same pipeline without the failing message runs the new text."""
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.parse("s", "DROP TABLE model_victim") + SYNC)
    raw.recv_until("Z")
    raw.send(close("S", "s") + m.parse("s", "SELECT 42") + SYNC + bind("", "s") + execute() + SYNC)
    assert "E" not in types(raw.recv_until("Z"))
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
    assert ("C", b"SELECT 1\0") in replies
