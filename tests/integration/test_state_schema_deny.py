"""pgguard refuses every statement that names its own state, through the real proxy (issue 14).

The attacks of issue 14 are run by an agent through pgguard against a database that holds a
copy of pgguard's state schema (as the misconfigured default, state in the upstream database,
does): each is refused with 42501 naming `builtin.state-schema`, in enforce mode and in observe
mode, and the state is unchanged afterwards; ordinary statements, including ones on look-alike
names, pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, agent_settings, error_fields

DB = "statedeny_db"
RULE = "builtin.state-schema"

ATTACKS = [
    "UPDATE pgguard.approval_requests SET state = 'approved', decided_at = now() WHERE id = 'r1'",
    "INSERT INTO pgguard.approval_decisions (request_id, approver) VALUES ('r1', 'mallory')",
    "LOCK TABLE pgguard.approval_requests",
    "SET search_path = pgguard, public",
    "LISTEN pgguard_approvals",
    "SELECT pg_notify('pgguard_approvals', 'r1')",
    "SELECT 'pgguard.approval_requests'::regclass",
    # nearest variants
    "UPDATE \"pgguard\".approval_requests SET state = 'approved'",
    "UPDATE PGGUARD . approval_requests SET state = 'approved'",
    "WITH d AS (DELETE FROM pgguard.approval_decisions RETURNING 1) SELECT count(*) FROM d",
    "SELECT set_config('search_path', 'public,pgguard', false)",
    "SELECT 1; UPDATE pgguard.approval_requests SET state = 'denied'",
    "DO $$ BEGIN UPDATE pgguard.approval_requests SET state = 'approved'; END $$",
]


@pytest.fixture(scope="module")
def state_copy(direct_dsn: str) -> str:
    """A database with pgguard's state tables in schema `pgguard`, and a look-alike table."""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    dsn = direct_dsn.replace("/postgres?", f"/{DB}?")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgguard")
        conn.execute(
            "CREATE TABLE pgguard.approval_requests "
            "(id text PRIMARY KEY, state text NOT NULL, decided_at timestamptz)"
        )
        conn.execute("CREATE TABLE pgguard.approval_decisions (request_id text, approver text)")
        conn.execute("INSERT INTO pgguard.approval_requests (id, state) VALUES ('r1', 'pending')")
        conn.execute("CREATE TABLE public.pgguard_notes (id int, pgguard text)")
    return dsn


@pytest.fixture(autouse=True)
def fresh_state(state_copy: str) -> None:
    with psycopg.connect(state_copy, autocommit=True) as conn:
        conn.execute("UPDATE pgguard.approval_requests SET state = 'pending', decided_at = NULL")
        conn.execute("TRUNCATE pgguard.approval_decisions, public.pgguard_notes")


def state_of(dsn: str) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT state FROM pgguard.approval_requests WHERE id = 'r1'),"
            " (SELECT count(*) FROM pgguard.approval_decisions)"
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture(scope="module", params=["enforce", "observe"])
def guarded(request: pytest.FixtureRequest, upstream_dsn: str) -> Iterator[ProxyThread]:
    settings = agent_settings(upstream_dsn, policy={"mode": request.param})
    thread = ProxyThread(settings, PolicyGate(load_engine(settings))).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.mark.parametrize("sql", ATTACKS)
def test_attack_is_refused_and_the_state_is_untouched(
    guarded: ProxyThread, state_copy: str, sql: str
) -> None:
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        assert RULE in str(info.value)
        assert info.value.diag.message_detail is not None
        assert "pgguard" in info.value.diag.message_detail
        # The session goes on, unchanged: no listener, no search_path change.
        assert conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert "pgguard" not in str(conn.execute("SHOW search_path").fetchone())
    assert state_of(state_copy) == ("pending", 0)


def test_attack_inside_a_transaction_fails_it(guarded: ProxyThread, state_copy: str) -> None:
    with psycopg.connect(guarded.dsn(dbname=DB)) as conn:
        conn.execute("INSERT INTO pgguard_notes VALUES (1, 'x')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("LOCK TABLE pgguard.approval_requests IN ACCESS EXCLUSIVE MODE")
        assert conn.info.transaction_status.name == "INERROR"
        conn.rollback()
    # The lock was never taken: another session updates the table at once.
    with psycopg.connect(state_copy, autocommit=True) as other:
        other.execute("SET lock_timeout = '2s'")
        other.execute("UPDATE pgguard.approval_requests SET decided_at = NULL")


def test_refused_notify_reaches_no_listener(guarded: ProxyThread, state_copy: str) -> None:
    with psycopg.connect(state_copy, autocommit=True) as listener:
        listener.execute("LISTEN pgguard_approvals")
        with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as conn:
            for sql in (
                "NOTIFY pgguard_approvals, 'r1'",
                "SELECT pg_notify('pgguard_approvals', 'r1')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
            conn.execute("NOTIFY some_other_channel, 'x'")  # ordinary channels still work
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []


async def test_extended_protocol_is_refused_at_parse(guarded: ProxyThread, state_copy: str) -> None:
    conn = await asyncpg.connect(guarded.dsn(dbname=DB))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute(
                "UPDATE pgguard.approval_requests SET state = $1 WHERE id = $2", "approved", "r1"
            )
        assert RULE in str(info.value)
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
    finally:
        await conn.close()
    assert state_of(state_copy) == ("pending", 0)


def test_raw_simple_query_gets_a_well_formed_error(guarded: ProxyThread) -> None:
    raw = RawClient.connect(guarded.port)
    raw.login(database=DB)
    raw.send(m.query("UPDATE pgguard.approval_requests SET state = 'approved'"))
    replies = raw.recv_until("Z")
    assert [kind for kind, _ in replies] == ["E", "Z"]
    fields = error_fields(replies[0][1])
    assert fields.sqlstate == "42501"
    assert RULE in fields.message
    assert replies[-1] == ("Z", b"I")


def test_startup_search_path_naming_the_schema_is_refused(guarded: ProxyThread) -> None:
    for options in ("-c search_path=pgguard", "-c search_path=public,pgguard"):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(guarded.dsn(dbname=DB), options=options)
        assert 'refuses the startup setting "search_path"' in str(info.value)
        assert RULE in str(info.value)
    with psycopg.connect(guarded.dsn(dbname=DB), options="-c search_path=public") as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("public",)


async def test_startup_parameter_naming_the_schema_is_refused(guarded: ProxyThread) -> None:
    """asyncpg sends server_settings as StartupMessage parameters, not through `options`."""
    for value in ("pgguard", "public, pgguard"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncpg.connect(guarded.dsn(dbname=DB), server_settings={"search_path": value})
        assert RULE in str(info.value)
    conn = await asyncpg.connect(guarded.dsn(dbname=DB), server_settings={"search_path": "public"})
    try:
        assert await conn.fetchval("SHOW search_path") == "public"
    finally:
        await conn.close()


def test_ordinary_statements_and_look_alikes_pass(guarded: ProxyThread, state_copy: str) -> None:
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgguard_notes (id, pgguard) VALUES (%s, %s)", (1, "pgguard denied it")
        )
        conn.execute("INSERT INTO pgguard_notes (id, pgguard) VALUES (2, 'pgguard denied it')")
        assert conn.execute("SELECT count(pgguard) FROM pgguard_notes").fetchone() == (2,)
        assert conn.execute("SELECT 'public.pgguard_notes'::regclass::text").fetchone() == (
            "pgguard_notes",
        )
        conn.execute("SET search_path = public")
        conn.execute("LISTEN my_channel")
        conn.execute("UNLISTEN *")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert state_of(state_copy) == ("pending", 0)


def test_observe_mode_observes_everything_else(upstream_dsn: str, state_copy: str) -> None:
    settings = agent_settings(upstream_dsn, policy={"mode": "observe"})
    thread = ProxyThread(settings, PolicyGate(load_engine(settings))).start()
    try:
        with psycopg.connect(thread.dsn(dbname=DB), autocommit=True) as conn:
            conn.execute("CREATE TABLE observed_ddl (x int)")  # would be held; observed only
            conn.execute("DROP TABLE observed_ddl")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE pgguard.approval_requests SET state = 'approved'")
    finally:
        thread.stop()
    assert state_of(state_copy) == ("pending", 0)
