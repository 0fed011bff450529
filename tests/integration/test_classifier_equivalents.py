"""Issue 16: the classifier cannot be fooled, through a live proxy to a real PostgreSQL.

(The UESCAPE twins were also refused before the fix, through the proxy: the protected-name
screen of issue 14 keeps every ``U&`` text out of the shared caches. The key's own soundness is
tested without that screen in tests/unit/sql/test_sql_cache_soundness.py.)

Each test runs one bypass the review found (and its nearest variants) through pgguard with the
shipped rules and no approvers, so "judged as privileged" shows as a 42501 refusal; the server
itself then says whether the statement ran (the table still exists, the setting is unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, agent_settings, error_fields, shipped_rules_with


@pytest.fixture(autouse=True)
def notes(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id int)")


def notes_exist(direct_dsn: str) -> bool:
    with psycopg.connect(direct_dsn) as conn:
        return conn.execute("SELECT to_regclass('notes') IS NOT NULL").fetchone() == (True,)


# --- 1. cache poisoning through UESCAPE ----------------------------------------------------------

TWINS = [
    # (harmless twin: no such function, the real call) - the same text but for the escape char
    (
        """SELECT U&"!0070g_read_file" UESCAPE '#' ('/etc/hostname')""",
        """SELECT U&"!0070g_read_file" UESCAPE '!' ('/etc/hostname')""",
    ),
    (
        """SELECT U&"!006Co_export" UESCAPE '#' (1, '/tmp/pgguard-x')""",
        """SELECT U&"!006Co_export" UESCAPE '!' (1, '/tmp/pgguard-x')""",
    ),
    (
        """SELECT U&"!0070g_terminate_backend" UESCAPE '#' (0)""",
        """SELECT U&"!0070g_terminate_backend" UESCAPE '!' (0)""",
    ),
]


@pytest.mark.parametrize(("twin", "real"), TWINS)
def test_a_uescape_twin_does_not_poison_the_cache(
    guarded: ProxyThread, twin: str, real: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(twin)  # allowed: judged harmless, and the server has no such function
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(real)
    with (
        psycopg.connect(guarded.dsn(), autocommit=True) as other,  # nor in another session
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        other.execute(real)


def test_a_uescape_twin_sent_as_a_simple_query_does_not_poison_the_cache(
    guarded: ProxyThread,
) -> None:
    twin, real = TWINS[0]
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.query(twin))
    assert error_fields(raw.recv_until("Z")[0][1]).sqlstate == "42883"
    raw.send(m.query(real))
    assert error_fields(raw.recv_until("Z")[0][1]).sqlstate == "42501"


# --- 2. writes to pg_settings are the SET they amount to ----------------------------------------


def _setting(conn: psycopg.Connection[tuple[object, ...]], name: str) -> object:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize(
    ("statement", "equivalent"),
    [
        (
            "UPDATE pg_settings SET setting = 'replica' WHERE name = 'session_replication_role'",
            "SET session_replication_role = replica",
        ),
        (
            "UPDATE pg_catalog.pg_settings AS s SET setting = 'off' "
            "WHERE s.name = 'row_security' AND true",
            "SET row_security = off",
        ),
        (
            "WITH w AS (UPDATE pg_settings SET setting = 'all' WHERE 'log_statement' = name "
            "RETURNING 1) SELECT * FROM w",
            "SET log_statement = 'all'",
        ),
        (
            "UPDATE pg_settings SET setting = 'on' "
            "WHERE name = lower('DEFAULT_TRANSACTION_READ_ONLY')",
            "SELECT set_config(lower('DEFAULT_TRANSACTION_READ_ONLY'), 'on', false)",
        ),
    ],
)
def test_a_write_to_pg_settings_is_judged_as_the_set_it_is(
    guarded: ProxyThread, statement: str, equivalent: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        before = {
            n: _setting(conn, n)
            for n in ("session_replication_role", "row_security", "log_statement")
        }
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(equivalent)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        assert {n: _setting(conn, n) for n in before} == before
        assert _setting(conn, "default_transaction_read_only") == "off"


def test_an_ordinary_pg_settings_write_still_runs(guarded: ProxyThread) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE pg_settings SET setting = '7MB' WHERE name = 'work_mem'")
        assert _setting(conn, "work_mem") == "7MB"


ATTACK = r"SELECT 'x\', ' ; DROP TABLE notes; SELECT '--'"


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        "SELECT set_config(name, 'off', false) FROM pg_settings "
        "WHERE name = 'standard_conforming_strings'",
        "SET standard_conforming_strings = off",
    ],
)
def test_a_pipelined_lexing_change_cannot_smuggle_a_drop(
    guarded: ProxyThread, direct_dsn: str, change: str
) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.query(change) + m.query(ATTACK))  # one write: the second waits for no reply
    first = raw.recv_until("Z")
    assert error_fields(next(b for t, b in first if t == "E")).sqlstate == "42501"
    second = raw.recv_until("Z")
    assert not any(t == "E" for t, _ in second)  # read with the lexing state the server has
    assert notes_exist(direct_dsn)


@pytest.fixture
def scs_off_database(direct_dsn: str) -> Iterator[str]:
    """allowed_db with standard_conforming_strings off for new sessions (a DBA's choice), and
    its own notes table."""
    allowed = direct_dsn.replace("/postgres", "/allowed_db")
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("ALTER DATABASE allowed_db SET standard_conforming_strings = off")
    with psycopg.connect(allowed, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id int)")
    try:
        yield allowed
    finally:
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute("ALTER DATABASE allowed_db RESET standard_conforming_strings")


@pytest.mark.parametrize(
    ("setup", "undo"),
    [
        ("BEGIN; SAVEPOINT s; SET standard_conforming_strings = on", "ROLLBACK TO SAVEPOINT s"),
        ("BEGIN; SET standard_conforming_strings = on", "ROLLBACK"),
        ("BEGIN; SET LOCAL standard_conforming_strings = on", "COMMIT"),
        (
            "BEGIN; UPDATE pg_settings SET setting = 'on' "
            "WHERE name = 'standard_conforming_strings'",
            "ROLLBACK",
        ),
    ],
)
def test_undoing_a_lexing_change_is_read_as_pending(
    guarded: ProxyThread, scs_off_database: str, setup: str, undo: str
) -> None:
    raw = RawClient.connect(guarded.port)
    login = raw.login(database="allowed_db")
    assert ("S", b"standard_conforming_strings\x00off\x00") in login
    raw.send(m.query(setup))
    replies = raw.recv_until("Z")  # the server confirms: on, for now
    assert ("S", b"standard_conforming_strings\x00on\x00") in replies, replies
    raw.send(m.query(undo) + m.query(ATTACK))  # the undo puts "off" back before the attack
    assert not any(t == "E" for t, _ in raw.recv_until("Z"))
    attack = raw.recv_until("Z")
    assert error_fields(next(b for t, b in attack if t == "E")).sqlstate == "42501"
    with psycopg.connect(scs_off_database) as conn:
        assert conn.execute("SELECT to_regclass('notes') IS NOT NULL").fetchone() == (True,)


# --- 3. routines judged by their bodies ----------------------------------------------------------

ROUTINES = {
    "p_drop": "CREATE OR REPLACE PROCEDURE p_drop() LANGUAGE plpgsql "
    "AS $$ BEGIN DROP TABLE notes; END $$",
    "f_drop": "CREATE OR REPLACE FUNCTION f_drop() RETURNS int LANGUAGE plpgsql "
    "AS $$ BEGIN DROP TABLE notes; RETURN 1; END $$",
    "f_dynamic": "CREATE OR REPLACE FUNCTION f_dynamic() RETURNS int LANGUAGE plpgsql "
    "AS $$ BEGIN EXECUTE 'DROP TABLE ' || 'notes'; RETURN 1; END $$",
    "f_read": "CREATE OR REPLACE FUNCTION f_read() RETURNS text LANGUAGE sql "
    "AS $$ SELECT pg_read_file('/etc/hostname') $$",
    "f_outer": "CREATE OR REPLACE FUNCTION f_outer() RETURNS int LANGUAGE sql "
    "AS $$ SELECT f_drop() $$",
    "f_ok": "CREATE OR REPLACE FUNCTION f_ok() RETURNS int LANGUAGE plpgsql "
    "AS $$ BEGIN RETURN (SELECT count(*) FROM notes); END $$",
}


@pytest.fixture
def routines(direct_dsn: str) -> Iterator[None]:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for definition in ROUTINES.values():
            conn.execute(definition)
    yield
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP ROUTINE IF EXISTS p_drop, f_outer, f_drop, f_dynamic, f_read, f_ok")


@pytest.mark.parametrize(
    "call",
    [
        "CALL p_drop()",
        "SELECT f_drop()",
        "SELECT 1 FROM (SELECT f_dynamic()) AS s",
        "SELECT f_read()",
        "SELECT f_outer()",
        "SELECT f_ok(), public.f_drop()",
    ],
)
def test_a_routine_is_judged_by_its_body(
    guarded: ProxyThread, direct_dsn: str, routines: None, call: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(call)
        assert conn.execute("SELECT f_ok()").fetchone() == (0,)  # a harmless body runs
    assert notes_exist(direct_dsn)


def test_a_replaced_routine_is_read_again(
    guarded: ProxyThread, direct_dsn: str, routines: None
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT f_ok()").fetchone() == (0,)
        with psycopg.connect(direct_dsn, autocommit=True) as owner:
            owner.execute(
                "CREATE OR REPLACE FUNCTION f_ok() RETURNS int LANGUAGE plpgsql "
                "AS $$ BEGIN DROP TABLE notes; RETURN 1; END $$"
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT f_ok()")
    assert notes_exist(direct_dsn)


ALLOW_F_DROP = """
version: 1
rules:
  - id: site.allow-f-drop
    description: The DBA vouches for f_drop.
    match: {functions: [f_drop]}
    action: allow
"""


def test_a_rule_can_allow_a_named_routine(
    upstream_dsn: str, direct_dsn: str, routines: None, tmp_path: Path
) -> None:
    rules = shipped_rules_with(tmp_path, "50-allow.yaml", ALLOW_F_DROP)
    settings = agent_settings(upstream_dsn, policy={"rules_dir": str(rules)})
    gate = PolicyGate(load_engine(settings), upstream=settings.upstream)
    thread = ProxyThread(settings, gate).start()
    try:
        with psycopg.connect(thread.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT f_outer()")  # not named: its body (f_drop's too) is read
            assert conn.execute("SELECT f_drop()").fetchone() == (1,)
    finally:
        thread.stop()
    assert not notes_exist(direct_dsn)


def test_a_call_is_refused_when_the_catalog_cannot_be_read(upstream_dsn: str) -> None:
    settings = agent_settings(upstream_dsn)
    unreachable = agent_settings("postgresql://nobody@127.0.0.1:1/postgres?sslmode=disable")
    gate = PolicyGate(load_engine(settings), upstream=unreachable.upstream)
    thread = ProxyThread(settings, gate).start()
    try:
        with psycopg.connect(thread.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # no function: no look-up
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute("SELECT lower('X')")
            assert "could not read the definitions" in str(info.value)
    finally:
        thread.stop()


# --- 5. rule files in the documented order -------------------------------------------------------

PROTECT = """
version: 1
rules:
  - id: site.protect-notes
    description: Nobody drops notes, approval or not.
    match: {tables: [notes]}
    action: deny
"""


def test_a_site_deny_in_50_protect_overrides_the_default_hold(
    upstream_dsn: str, direct_dsn: str, tmp_path: Path
) -> None:
    rules = shipped_rules_with(tmp_path, "50-protect.yaml", PROTECT)
    settings = agent_settings(upstream_dsn, policy={"rules_dir": str(rules)})
    thread = ProxyThread(settings, PolicyGate(load_engine(settings))).start()
    try:
        with psycopg.connect(thread.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute("DROP TABLE notes")
            assert "site.protect-notes" in str(info.value)
            assert "requires approval" not in str(info.value)
    finally:
        thread.stop()
    assert notes_exist(direct_dsn)
