"""Where a statement names pgguard's own state schema or channels (pgguard.sql.statenames).

Every position PostgreSQL resolves is tried with its nearest variants (case, quoting, U&
escapes, blanks and comments around the dot, string continuation, multi-statement text, CTEs,
subqueries, function arguments, DO and function bodies); look-alikes that name nothing of
pgguard's must stay clean.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard.sql.catalog import Catalog
from pgguard.sql.classify import classify_text
from pgguard.sql.parse import ParseFailure, parse_statements
from pgguard.sql.statenames import NO_PROTECTED_NAMES, ProtectedNames, fold, state_references


@pytest.fixture(scope="module")
def guarded(catalog: Catalog) -> Catalog:
    return replace(catalog, protected=ProtectedNames())


def refs(sql: str, catalog: Catalog) -> tuple[str, ...]:
    return tuple(r for facts in classify_text(sql, catalog) for r in facts.state_refs)


QUALIFIED = [
    "UPDATE pgguard.approval_requests SET state = 'approved' WHERE id = 'r1'",
    "INSERT INTO pgguard.approval_decisions (request_id) VALUES ('r1')",
    "DELETE FROM pgguard.ledger WHERE id > 10",
    "LOCK TABLE pgguard.approval_requests",
    "BEGIN; LOCK TABLE pgguard.approval_requests IN ACCESS EXCLUSIVE MODE; COMMIT",
    "SELECT * FROM pgguard.approval_requests",
    'SELECT * FROM "pgguard".approval_requests',
    "SELECT * FROM PGGUARD.approval_requests",
    "SELECT * FROM PgGuard . approval_requests",
    "SELECT * FROM pgguard /* hidden */ . approval_requests",
    "SELECT * FROM pgguard -- hidden\n.approval_requests",
    "SELECT * FROM postgres.pgguard.approval_requests",
    'SELECT * FROM U&"\\0070gguard".approval_requests',
    "SELECT * FROM U&\"!0070gguard\" UESCAPE '!'.approval_requests",
    "TABLE pgguard.approval_requests",
    "COPY pgguard.approval_requests TO STDOUT",
    "COPY pgguard.approval_requests FROM STDIN",
    "TRUNCATE pgguard.ledger",
    "SELECT 1; UPDATE pgguard.approval_requests SET state = 'denied'",
    "WITH x AS (DELETE FROM pgguard.approval_decisions RETURNING 1) SELECT count(*) FROM x",
    "SELECT * FROM t WHERE id IN (SELECT id FROM pgguard.approval_requests)",
    "SELECT length((SELECT max(statement) FROM pgguard.approval_requests))",
    "SELECT pgguard.approval_requests.state FROM pgguard.approval_requests",
    "SELECT pgguard.t.c",
    "SELECT pgguard.t.*",
    "SELECT pgguard.f(1)",
    "CALL pgguard.p()",
    "SELECT NULL::pgguard.some_type",
    "SELECT 1 OPERATOR(pgguard.+) 2",
    "SELECT 'a' COLLATE pgguard.c",
    "CREATE TABLE copy_of (LIKE pgguard.approval_requests)",
    "CREATE VIEW v AS SELECT * FROM pgguard.approval_requests",
    "CREATE TABLE pgguard.extra (x int)",
    "ALTER TABLE pgguard.approval_requests DISABLE TRIGGER ALL",
    "DROP TABLE pgguard.approval_requests",
    "DROP FUNCTION pgguard.f(int)",
    "CREATE TRIGGER t BEFORE UPDATE ON pgguard.approval_requests "
    "FOR EACH ROW EXECUTE FUNCTION public.f()",
    "CREATE RULE r AS ON INSERT TO pgguard.approval_requests DO INSTEAD NOTHING",
    "COMMENT ON TABLE pgguard.approval_requests IS 'x'",
    "GRANT SELECT ON pgguard.approval_requests TO PUBLIC",
    "ALTER SEQUENCE pgguard.ledger_id_seq RESTART",
    "EXPLAIN ANALYZE UPDATE pgguard.approval_requests SET state = 'approved'",
    "PREPARE p AS UPDATE pgguard.approval_requests SET state = 'approved'",
    "DECLARE c CURSOR FOR SELECT * FROM pgguard.approval_requests",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql "
    "BEGIN ATOMIC SELECT count(*) FROM pgguard.approval_requests; END",
    "MERGE INTO pgguard.approval_requests r USING t ON r.id = t.id "
    "WHEN MATCHED THEN UPDATE SET state = 'approved'",
]


@pytest.mark.parametrize("sql", QUALIFIED)
def test_qualified_names_in_the_state_schema(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


SCHEMA_ITSELF = [
    "CREATE SCHEMA pgguard",
    "CREATE SCHEMA IF NOT EXISTS pgguard",
    "CREATE SCHEMA AUTHORIZATION pgguard",
    "ALTER SCHEMA pgguard RENAME TO old_state",
    "ALTER SCHEMA public RENAME TO pgguard",
    "ALTER SCHEMA pgguard OWNER TO agent",
    "DROP SCHEMA pgguard CASCADE",
    "DROP SCHEMA IF EXISTS other, PGGUARD",
    "COMMENT ON SCHEMA pgguard IS 'x'",
    "SECURITY LABEL ON SCHEMA pgguard IS 'x'",
    "GRANT USAGE ON SCHEMA pgguard TO agent",
    "REVOKE ALL ON SCHEMA pgguard FROM PUBLIC",
    "GRANT ALL ON ALL TABLES IN SCHEMA pgguard TO agent",
    "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgguard TO agent",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA pgguard GRANT SELECT ON TABLES TO agent",
    "IMPORT FOREIGN SCHEMA pgguard FROM SERVER loopback INTO public",
    "IMPORT FOREIGN SCHEMA public FROM SERVER loopback INTO pgguard",
    "ALTER TABLE public.t SET SCHEMA pgguard",
    "ALTER FUNCTION public.f() SET SCHEMA pgguard",
    "CREATE EXTENSION hstore SCHEMA pgguard",
    "ALTER EXTENSION hstore SET SCHEMA pgguard",
    "CREATE PUBLICATION p FOR TABLES IN SCHEMA pgguard",
    "ALTER PUBLICATION p ADD TABLES IN SCHEMA pgguard",
    "REINDEX SCHEMA pgguard",
    "REINDEX SCHEMA CONCURRENTLY PGGUARD",
    "ALTER EXTENSION hstore ADD SCHEMA pgguard",
    "VACUUM pgguard.ledger",
    "ANALYZE pgguard.ledger",
    "CLUSTER pgguard.ledger USING ledger_pkey",
    "REINDEX TABLE pgguard.ledger",
    "ALTER TABLE pgguard.approval_requests SET SCHEMA public",
    "CREATE FOREIGN TABLE ft (id text) SERVER loopback "
    "OPTIONS (schema_name 'pgguard', table_name 'approval_requests')",
]


@pytest.mark.parametrize("sql", SCHEMA_ITSELF)
def test_statements_about_the_schema_itself(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


SEARCH_PATH = [
    "SET search_path = pgguard, public",
    "SET search_path TO public, pgguard",
    "SET LOCAL search_path = pgguard",
    "SET SESSION search_path = 'pgguard'",
    "SET search_path = PGGUARD",
    'SET search_path = "pgguard"',
    "SET SEARCH_PATH = pgguard",
    "SET SCHEMA 'pgguard'",
    "SET search_path = 'public, pgguard'",
    "SET search_path = '\"$user\",pgguard'",
    "SELECT set_config('search_path', 'pgguard', false)",
    "SELECT set_config('search_path', 'public, PGGUARD', true)",
    "SELECT pg_catalog.set_config('search_path', $1, false)",
    "SELECT set_config('search_path', 'pg' || 'guard', false)",
    "SELECT set_config(name, setting, false) FROM (VALUES ('search_path', 'x')) v(name, setting)",
    "UPDATE pg_settings SET setting = 'pgguard' WHERE name = 'search_path'",
    "UPDATE pg_settings SET setting = current_user WHERE name = 'search_path'",
    "ALTER ROLE agent SET search_path = pgguard",
    "ALTER ROLE agent IN DATABASE postgres SET search_path TO public, pgguard",
    "ALTER DATABASE postgres SET search_path = pgguard",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pgguard AS 'select 1'",
    "ALTER FUNCTION f() SET search_path = pgguard",
    # A start-up option `-c search_path=...` is judged as this SET (policy_gate._set_statement).
    "SET \"search_path\" TO 'public,pgguard'",
    # A role named like the schema would make search_path's "$user" resolve to it.
    "SET ROLE pgguard",
    "SET SESSION AUTHORIZATION pgguard",
]


@pytest.mark.parametrize("sql", SEARCH_PATH)
def test_search_path_changes_that_may_include_it(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


CHANNELS = [
    "LISTEN pgguard_approvals",
    'LISTEN "pgguard_approvals"',
    "LISTEN PGGUARD_APPROVALS",
    "UNLISTEN pgguard_approvals",
    "NOTIFY pgguard_approvals",
    "NOTIFY pgguard_approvals, 'r1'",
    "SELECT pg_notify('pgguard_approvals', 'r1')",
    "SELECT pg_notify(' pgguard_approvals ', 'r1')",
    "SELECT 1; LISTEN pgguard_approvals",
]


@pytest.mark.parametrize("sql", CHANNELS)
def test_notification_channels(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


STRING_NAMES = [
    "SELECT 'pgguard.approval_requests'::regclass",
    "SELECT regclass 'pgguard.approval_requests'",
    "SELECT CAST('pgguard.approval_requests' AS regclass)",
    "SELECT '\"pgguard\".approval_requests'::regclass::oid",
    "SELECT 'PGGUARD.approval_requests'::regclass",
    "SELECT ' pgguard . approval_requests '::regclass",
    "SELECT 'pg'\n'guard.approval_requests'::regclass",
    "SELECT E'\\x70gguard.approval_requests'::regclass",
    "SELECT U&'\\0070gguard.approval_requests'::regclass",
    "SELECT $$pgguard.approval_requests$$::regclass",
    "SELECT 'pgguard'::regnamespace",
    "SELECT to_regclass('pgguard.approval_requests')",
    "SELECT to_regnamespace('pgguard')",
    "SELECT has_table_privilege('pgguard.approval_requests', 'UPDATE')",
    "SELECT has_schema_privilege('pgguard', 'USAGE')",
    "SELECT pg_relation_size('pgguard.ledger')",
    "SELECT nextval('pgguard.ledger_id_seq')",
    "SELECT setval('\"pgguard\".ledger_id_seq', 1)",
    "SELECT * FROM pg_class WHERE relnamespace = 'pgguard'::regnamespace",
    "SELECT * FROM information_schema.tables WHERE table_schema = 'pgguard'",
    "SELECT 'pgguard.f'::regproc",
    "SELECT query_to_xml('select * from pgguard.approval_requests', true, false, '')",
    "SELECT query_to_xml('select * from pgguard/**/.approval_requests', true, false, '')",
    "SELECT f(g('pgguard.approval_requests'))",
    "WITH c AS (SELECT 'pgguard.approval_requests'::regclass AS r) SELECT r FROM c",
    "SELECT x::regclass FROM (SELECT 'pgguard.approval_requests' AS x) s",
]


@pytest.mark.parametrize("sql", STRING_NAMES)
def test_string_constants_naming_the_schema(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


EMBEDDED = [
    "DO $$ BEGIN UPDATE pgguard.approval_requests SET state = 'approved'; END $$",
    "DO $$ BEGIN PERFORM pg_notify('pgguard_approvals', 'x'); END $$",
    "DO $$ BEGIN EXECUTE 'UPDATE pgguard.approval_requests SET state = ''approved'''; END $$",
    "DO $$ BEGIN SET search_path = pgguard; END $$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO pgguard.approval_decisions VALUES ('x'); END $$",
    "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS "
    "'SELECT count(*) FROM pgguard.approval_requests'",
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpython3u AS "
    "'plpy.execute(\"update pgguard.approval_requests set state = 1\")'",
]


@pytest.mark.parametrize("sql", EMBEDDED)
def test_code_inside_statements(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded), sql


CLEAN = [
    "SELECT * FROM pgguard_notes",
    "SELECT * FROM public.pgguard_notes WHERE note = 'x'",
    "SELECT pgguard FROM notes",
    "SELECT n.pgguard FROM notes n",
    "SELECT pgguard.* FROM notes AS pgguard",
    "SELECT pgguard.note FROM notes AS pgguard",
    "INSERT INTO notes (pgguard) VALUES (1)",
    "UPDATE notes SET pgguard = 2",
    "CREATE TABLE notes2 (pgguard int, pgguard_approvals text)",
    "COPY notes (id, pgguard) FROM STDIN",
    "SELECT * FROM notes AS t(pgguard, b)",
    "SELECT * FROM pgguard",
    "SELECT * FROM public.pgguard",
    "SELECT 'public.pgguard'::regclass",
    "SELECT 'pgguard_notes'::regclass",
    "SELECT 'pgguard denied my statement'",
    "INSERT INTO log (msg) VALUES ('pgguard policy denies this statement (rule x)')",
    "SELECT 'mypgguard.x', 'pgguard2.x', 'pgguard-x.t'",
    "SELECT pgguard()",
    "SET search_path = public, pgguard_notes",
    'SET search_path = "$user", public',
    "SELECT set_config('search_path', 'public', false)",
    "SELECT set_config('work_mem', $1, false)",
    "UPDATE pg_settings SET setting = '64MB' WHERE name = 'work_mem'",
    "LISTEN pgguard_approvals_copy",
    "LISTEN my_channel",
    "NOTIFY my_channel, 'pgguard'",
    "SELECT pg_notify('my_channel', 'x')",
    "SELECT 1 -- a comment\n",
    "REINDEX SCHEMA public",
    "REINDEX TABLE pgguard",
    "DROP TABLE pgguard",
    "GRANT SELECT ON pgguard TO agent",
]


@pytest.mark.parametrize("sql", CLEAN)
def test_look_alikes_name_nothing(sql: str, guarded: Catalog) -> None:
    assert refs(sql, guarded) == (), sql


def test_reasons_never_quote_the_statement(guarded: Catalog) -> None:
    found = refs("SELECT 'pgguard.secret_value_42'::regclass", guarded)
    assert found
    assert not any("secret_value_42" in r for r in found)
    (reason,) = refs("UPDATE pgguard.approval_requests SET state = 'approved'", guarded)
    assert "pgguard" in reason
    assert "approved" not in reason


def test_other_protected_names_are_what_counts(catalog: Catalog) -> None:
    custom = replace(catalog, protected=ProtectedNames(schema="guard_state", channels=("gs_x",)))
    assert refs("UPDATE guard_state.approval_requests SET state = 'x'", custom)
    assert refs("LISTEN gs_x", custom)
    assert refs("SET search_path = guard_state", custom)
    assert refs("UPDATE pgguard.approval_requests SET state = 'x'", custom) == ()
    assert refs("LISTEN pgguard_approvals", custom) == ()


def test_no_protected_names_checks_nothing(catalog: Catalog) -> None:
    bare = replace(catalog, protected=NO_PROTECTED_NAMES)
    assert refs("UPDATE pgguard.approval_requests SET state = 'approved'", bare) == ()


def test_long_identifiers_are_truncated_as_postgresql_does(catalog: Catalog) -> None:
    schema = "s" * 63
    custom = replace(catalog, protected=ProtectedNames(schema=schema, channels=()))
    assert fold(schema + "tail") == schema
    assert refs(f"SELECT * FROM {schema}tail.t", custom)
    assert refs(f"SELECT '{schema}tail.t'::regclass", custom)


SCREENED = [
    "SELECT 1",
    "SELECT * FROM notes WHERE id = 42",
    "INSERT INTO notes VALUES ('hello', 'world')",
]


@pytest.mark.parametrize("sql", SCREENED)
def test_the_screen_passes_ordinary_text(sql: str) -> None:
    assert not ProtectedNames().may_name(sql)
    assert not ProtectedNames().may_name(sql.encode())


@pytest.mark.parametrize("sql", QUALIFIED + SCHEMA_ITSELF + SEARCH_PATH + CHANNELS + STRING_NAMES)
def test_the_screen_never_misses_a_naming_text(sql: str) -> None:
    assert ProtectedNames().may_name(sql), sql
    assert ProtectedNames().may_name(sql.encode()), sql


IDENTIFIERS = [
    "pgguard",
    "PGGUARD",
    "pgGuard",
    '"pgguard"',
    'U&"\\0070gguard"',
    "U&\"!0070gguard\" UESCAPE '!'",
]
DOTS = [".", " .", ". ", " /* c */ .", " --c\n."]
TEMPLATES_IDENT = [
    "SELECT * FROM {n}{d}approval_requests",
    "UPDATE {n}{d}approval_requests SET state = 'approved'",
    "SELECT {n}{d}f(1)",
    "SET search_path = public, {n}",
    "DROP SCHEMA {n}",
]
CHANNEL_SPELLINGS = [
    "pgguard_approvals",
    "PGGUARD_APPROVALS",
    '"pgguard_approvals"',
    'U&"\\0070gguard_approvals"',
]
TEMPLATES_CHANNEL = ["LISTEN {c}", "UNLISTEN {c}", "NOTIFY {c}", "NOTIFY {c}, 'x'"]
TEMPLATES_STRING = [
    "SELECT {s}::regclass",
    "SELECT to_regclass({s})",
    "SELECT set_config('search_path', {s}, false)",
    "SELECT pg_notify({s}, 'x')",
]


@st.composite
def string_spelling(draw: st.DrawFn) -> str:
    """'pgguard.approval_requests' (or the channel) as a constant: split across continuations,
    escaped, dollar-quoted."""
    value = draw(
        st.sampled_from(["pgguard.approval_requests", "public, pgguard", "pgguard_approvals"])
    )
    style = draw(st.sampled_from(["plain", "continued", "escaped", "unicode", "dollar"]))
    if style == "dollar":
        return f"$${value}$$"
    if style == "escaped":
        return "E'" + "".join(f"\\x{ord(c):02x}" if c in "pg" else c for c in value) + "'"
    if style == "unicode":
        return "U&'" + "".join(f"\\{ord(c):04x}" if c in "gu" else c for c in value) + "'"
    if style == "continued":
        cut = draw(st.integers(min_value=1, max_value=len(value) - 1))
        gap = draw(st.sampled_from(["\n", " \n ", "\n--c\n", "\r\n\t"]))
        return f"'{value[:cut]}'{gap}'{value[cut:]}'"
    return f"'{value}'"


naming_texts = st.one_of(
    st.builds(
        lambda t, n, d: t.format(n=n, d=d),
        st.sampled_from(TEMPLATES_IDENT),
        st.sampled_from(IDENTIFIERS),
        st.sampled_from(DOTS),
    ),
    st.builds(lambda t, s: t.format(s=s), st.sampled_from(TEMPLATES_STRING), string_spelling()),
    st.builds(
        lambda t, c: t.format(c=c),
        st.sampled_from(TEMPLATES_CHANNEL),
        st.sampled_from(CHANNEL_SPELLINGS),
    ),
)


@given(naming_texts)
def test_the_screen_is_sound(sql: str) -> None:
    """Every spelling the walk finds, the screen that gates the walk lets through."""
    try:
        statements = parse_statements(sql)
    except ParseFailure:
        return
    names = ProtectedNames()
    found = [r for s in statements for r in state_references(s.kind, s.node, names)]
    assert found, sql  # every generated text names something
    assert names.may_name(sql), (sql, found)
    assert names.may_name(sql.encode()), (sql, found)
