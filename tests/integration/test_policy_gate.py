"""The classifier and rules in the proxy's gate, through real clients (issue 3, point 7).

Until approvals exist, ``hold`` refuses like ``deny`` (42501, saying approval is required).
Every refusal is checked on the server too: the statement did not run, and the transaction state
the client sees is the one the server has.
"""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from tests.support import ProxyThread, RawClient, agent_settings, error_fields


@pytest.fixture(autouse=True)
def victim_table(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS gate_victim")
        conn.execute("CREATE TABLE gate_victim (id int, secret text)")
        conn.execute("INSERT INTO gate_victim VALUES (1, 'a'), (2, 'b')")


def victim_exists(direct_dsn: str) -> bool:
    with psycopg.connect(direct_dsn) as conn:
        return conn.execute("SELECT to_regclass('gate_victim') IS NOT NULL").fetchone() == (True,)


def test_ordinary_statements_pass(guarded: ProxyThread) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM gate_victim").fetchone() == (2,)
        conn.execute("INSERT INTO gate_victim VALUES (%s, %s)", (3, "c"))
        conn.execute("UPDATE gate_victim SET secret = 'z' WHERE id = 3")
        assert conn.execute("SELECT secret FROM gate_victim WHERE id = 3").fetchone() == ("z",)


def test_held_ddl_is_refused_with_42501_and_does_not_run(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DROP TABLE gate_victim")
        assert "requires approval" in str(info.value)
        assert "default-hold" in str(info.value) or "rule" in str(info.value)
        diag = info.value.diag  # issue 21: every refusal says what happened and what to do
        assert diag.message_detail is not None
        assert "nobody can approve" in diag.message_detail
        assert diag.message_hint is not None
        assert "enable approvals" in diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert victim_exists(direct_dsn)


def test_unparseable_is_denied_naming_the_rule(guarded: ProxyThread) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(b"Q\x00\x00\x00\x0eSELEC 1 +\x00")
    replies = raw.recv_until("Z")
    fields = error_fields(replies[0][1])
    assert fields.sqlstate == "42501"
    assert "denies" in fields.message
    assert "rule" in fields.message
    assert replies[-1] == ("Z", b"I")


def test_refusal_inside_a_transaction_fails_it_on_both_sides(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    with psycopg.connect(guarded.dsn()) as conn:
        conn.execute("INSERT INTO gate_victim VALUES (10, 'in-txn')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE gate_victim")
        assert conn.info.transaction_status.name == "INERROR"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.commit()  # the server rolls back a failed transaction
    with psycopg.connect(direct_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM gate_victim").fetchone() == (2,)


def test_multi_statement_string_takes_the_strictest(guarded: ProxyThread, direct_dsn: str) -> None:
    with (
        psycopg.connect(guarded.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT 1; DELETE FROM gate_victim; DROP TABLE gate_victim")
    with psycopg.connect(direct_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM gate_victim").fetchone() == (2,)


async def test_extended_protocol_execute_is_refused(guarded: ProxyThread) -> None:
    victim = await asyncpg.connect(guarded.dsn())
    killer = await asyncpg.connect(guarded.dsn())
    try:
        pid = victim.get_server_pid()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert await victim.fetchval("SELECT 42") == 42
        # The refused pipeline leaves the session usable and outside any transaction.
        assert await killer.fetchval("SELECT $1::int + 1", 1) == 2
    finally:
        await victim.close()
        await killer.close()


def test_extended_protocol_in_a_transaction(guarded: ProxyThread, direct_dsn: str) -> None:
    with psycopg.connect(guarded.dsn()) as conn:
        conn.execute("INSERT INTO gate_victim VALUES (%s, %s)", (20, "x"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT lo_export(%s, %s)", (1, "/tmp/pgguard-export"))
        assert conn.info.transaction_status.name == "INERROR"
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM gate_victim").fetchone() == (2,)


def test_protocol_prepared_statement_executed_by_sql_name(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    from pgguard.wire import messages as m

    # Parse a named statement (allowed: parsing runs nothing), then EXECUTE it from SQL.
    raw.send(m.parse("sneaky", "DROP TABLE gate_victim") + m.message(ord("S")))
    assert [t for t, _ in raw.recv_until("Z")] == ["1", "Z"]
    raw.send(m.query("EXECUTE sneaky"))
    replies = raw.recv_until("Z")
    assert replies[0][0] == "E"
    assert error_fields(replies[0][1]).sqlstate == "42501"
    assert victim_exists(direct_dsn)


def test_sql_prepare_then_protocol_bind_is_judged(guarded: ProxyThread, direct_dsn: str) -> None:
    from pgguard.wire import messages as m

    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.query("PREPARE innocent AS SELECT 1"))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")
    bind = m.message(ord("B"), b"\x00innocent\x00\x00\x00\x00\x00\x00\x00")
    execute = m.message(ord("E"), b"\x00\x00\x00\x00\x00")
    raw.send(bind + execute + m.message(ord("S")))
    kinds = [t for t, _ in raw.recv_until("Z")]
    assert kinds == ["2", "D", "C", "Z"]


def test_startup_options_are_judged(guarded: ProxyThread) -> None:
    with psycopg.connect(guarded.dsn(), options="-c work_mem=8MB") as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(guarded.dsn(), options="-c role=pg_read_server_files")
    assert 'refuses the startup setting "role"' in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(guarded.dsn(), options="-F")
    assert "unsupported switch" in str(info.value)


@pytest.fixture(scope="module")
def lexdb(direct_dsn: str) -> str:
    """A database whose sessions start with standard_conforming_strings = off."""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS lexdb")
        conn.execute("CREATE DATABASE lexdb")
        conn.execute("ALTER DATABASE lexdb SET standard_conforming_strings = off")
    return "lexdb"


def test_backslash_text_is_held_when_the_server_lexes_differently(
    guarded: ProxyThread, lexdb: str, direct_dsn: str
) -> None:
    direct_lexdb = direct_dsn.replace("/postgres?", f"/{lexdb}?")
    with psycopg.connect(direct_lexdb, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lex_victim (id int)")
    with psycopg.connect(guarded.dsn(dbname=lexdb), autocommit=True) as conn:
        assert conn.info.parameter_status("standard_conforming_strings") == "off"
        assert conn.execute("SELECT 'plain text'").fetchone() == ("plain text",)
        # libpg_query reads one string literal; this server reads a DROP after a string.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 'a\\''; DROP TABLE lex_victim; --'")
        assert conn.execute("SELECT count(*) FROM lex_victim").fetchone() == (0,)


def test_pipelined_statement_after_lexing_change_is_held(guarded: ProxyThread) -> None:
    from pgguard.wire import messages as m

    query = "SELECT 'back\\slash'"
    raw = RawClient.connect(guarded.port)
    raw.login()
    # Both in one packet: the SELECT is classified before the server has confirmed RESET ALL,
    # so it is read in the "pending" lexing state, where a backslash is a hazard.
    raw.send(m.query("RESET ALL") + m.query(query))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")
    second = raw.recv_until("Z")
    assert second[0][0] == "E"
    assert error_fields(second[0][1]).sqlstate == "42501"
    # Sent again once the server has answered, the same text is read in the confirmed state.
    raw.send(m.query(query))
    assert [t for t, _ in raw.recv_until("Z")] == ["T", "D", "C", "Z"]


def test_observe_mode_lets_everything_through_and_says_so(
    upstream_dsn: str, direct_dsn: str
) -> None:
    settings = agent_settings(upstream_dsn, policy={"mode": "observe"})
    thread = ProxyThread(settings, PolicyGate(load_engine(settings))).start()
    try:
        welcome = RawClient.connect(thread.port).login()
        notices = [error_fields(body).message for kind, body in welcome if kind == "N"]
        assert any("observe" in n.lower() for n in notices), notices
        with psycopg.connect(thread.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLE gate_victim")
        assert not victim_exists(direct_dsn)
    finally:
        thread.stop()


def test_execute_of_a_sql_prepared_name_is_judged_by_what_it_names_now(
    guarded: ProxyThread,
) -> None:
    """A text that runs a SQL-prepared statement is never remembered: what the name runs can
    change between two Executes of the same portal text."""
    from pgguard.wire import messages as m

    raw = RawClient.connect(guarded.port)
    raw.login()
    bind = m.message(ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00")
    execute = m.message(ord("E"), b"\x00\x00\x00\x00\x00")
    sync = m.message(ord("S"))
    raw.send(m.query("PREPARE flip AS SELECT 1"))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")
    raw.send(m.parse("", "EXECUTE flip") + bind + execute + sync)
    assert [t for t, _ in raw.recv_until("Z")] == ["1", "2", "D", "C", "Z"]
    raw.send(m.query("DEALLOCATE flip"))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")
    # Refused, and still taken as flip's meaning by the gate (it cannot know what the server
    # did): the next EXECUTE flip must be refused by pgguard (42501), not reach the server
    # (which would answer 26000, no such statement).
    raw.send(m.query("PREPARE flip AS SELECT lo_export(1, '/tmp/pgguard-flip')"))
    assert error_fields(raw.recv_until("Z")[0][1]).sqlstate == "42501"
    raw.send(m.parse("", "EXECUTE flip") + bind + execute + sync)
    replies = raw.recv_until("Z")
    assert [t for t, _ in replies] == ["1", "2", "E", "Z"]
    assert error_fields(replies[2][1]).sqlstate == "42501"
