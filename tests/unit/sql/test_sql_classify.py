"""The adversarial suite: categories found wherever PostgreSQL would act, and no false alarms."""

from __future__ import annotations

import pytest
from pglast import parser as pg
from sql_corpus import ADMIN, DDL, EVASIONS, EXECUTE, EXPORT, HARMLESS, PRIVILEGE

from pgguard.sql.catalog import Catalog
from pgguard.sql.classify import StatementFacts, classify_text
from pgguard.sql.kinds import STATEMENT_KINDS


def categories(sql: str, catalog: Catalog) -> set[str]:
    return {c for facts in classify_text(sql, catalog) for c in facts.categories}


def assert_valid_postgres(sql: str) -> None:
    """Every privileged case must be real PostgreSQL, so it cannot pass by failing to parse."""
    pg.parse_sql_json(sql)


@pytest.mark.parametrize(
    ("sql", "category"),
    [(s, "export") for s in EXPORT]
    + [(s, "ddl") for s in DDL]
    + [(s, "privilege") for s in PRIVILEGE]
    + [(s, "execute") for s in EXECUTE]
    + [(s, "admin") for s in ADMIN]
    + EVASIONS,
)
def test_privileged_statement_is_categorised(sql: str, category: str, catalog: Catalog) -> None:
    assert_valid_postgres(sql)
    assert category in categories(sql, catalog)


@pytest.mark.parametrize("sql", HARMLESS)
def test_harmless_look_alike_is_not_privileged(sql: str, catalog: Catalog) -> None:
    assert_valid_postgres(sql)
    assert categories(sql, catalog) == set()


_CALL = "pg_read_file('/etc/passwd')"
# Every syntactic position where PostgreSQL evaluates an expression.
POSITIONS = [
    "SELECT {f}",
    "SELECT * FROM t WHERE a = ({f})",
    "SELECT (SELECT {f})",
    "VALUES ({f})",
    "SELECT xmlelement(name x, {f})",
    "SELECT json_object('a': {f})",
    "SELECT json_array({f})",
    "SELECT JSON_VALUE(jsonb '{{}}', '$.a' PASSING {f} AS x)",
    "SELECT * FROM JSON_TABLE(jsonb '[]', '$[*]' PASSING {f} AS x COLUMNS (a int PATH '$.a'))",
    "SELECT CASE WHEN true THEN {f} END",
    "SELECT coalesce({f}, 'x')",
    "SELECT greatest({f}, 'x')",
    "SELECT ARRAY[{f}]",
    "SELECT {f} IS NULL",
    "SELECT a FROM t ORDER BY {f}",
    "SELECT a FROM t GROUP BY {f}",
    "SELECT a FROM t GROUP BY ROLLUP ({f})",
    "SELECT count(*) FILTER (WHERE {f} IS NULL) FROM t",
    "SELECT sum(a) OVER (PARTITION BY {f}) FROM t",
    "SELECT a FROM t LIMIT length({f})",
    "SELECT a FROM t OFFSET length({f})",
    "INSERT INTO t VALUES ({f})",
    "INSERT INTO t SELECT {f}",
    "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = {f}",
    "INSERT INTO t VALUES (1) RETURNING {f}",
    "UPDATE t SET a = {f}",
    "UPDATE t SET (a, b) = (SELECT {f}, 1)",
    "UPDATE t SET a = 1 FROM (SELECT {f}) s",
    "DELETE FROM t WHERE a = {f}",
    "DELETE FROM t USING u WHERE u.a = {f}",
    "MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN UPDATE SET b = {f}",
    "MERGE INTO t USING (SELECT {f} AS a) u ON t.a = u.a WHEN NOT MATCHED THEN INSERT VALUES (u.a)",
    "WITH x AS (SELECT {f}) SELECT * FROM x",
    "WITH RECURSIVE x(a) AS (SELECT 1 UNION ALL SELECT length({f}) FROM x) SELECT * FROM x",
    "WITH x AS MATERIALIZED (INSERT INTO t VALUES ({f}) RETURNING *) SELECT 1",
    "SELECT 1 UNION SELECT length({f})",
    "(SELECT 1) INTERSECT (SELECT length({f}))",
    "SELECT {f} UNION SELECT 'x' EXCEPT SELECT 'y'",
    "EXPLAIN ANALYZE SELECT {f}",
    "EXPLAIN (ANALYZE true, FORMAT json) UPDATE t SET a = {f}",
    "EXPLAIN SELECT {f}",
    "PREPARE p AS SELECT {f}",
    "DECLARE c CURSOR FOR SELECT {f}",
    "CREATE TABLE x AS SELECT {f}",
    "CREATE MATERIALIZED VIEW mv AS SELECT {f}",
    "CREATE VIEW v AS SELECT {f}",
    "CALL p({f})",
    "SELECT * FROM t TABLESAMPLE bernoulli(length({f}))",
    "SELECT * FROM t, LATERAL (SELECT {f}) s",
    "SELECT * FROM t JOIN u ON t.a = {f}",
    "SELECT {f} AT TIME ZONE 'UTC'",
    "SELECT a FROM t WHERE a IN (SELECT {f})",
    "SELECT EXISTS (SELECT {f})",
    "SELECT a FROM t WHERE a = ANY (ARRAY[{f}])",
    "SELECT a FROM t WHERE a = SOME (SELECT {f})",
    "SELECT ROW({f})",
    "SELECT ({f})::int",
    "SELECT CAST({f} AS int)",
    "SELECT substring({f} from 1 for 2)",
    "SELECT trim({f})",
    "SELECT overlay({f} placing 'x' from 1)",
    "SELECT position('x' in {f})",
    "SELECT {f} ~ 'x'",
    "SELECT xmlforest({f} AS a)",
    "SELECT xmlagg(xmlelement(name a, {f}))",
    "SELECT * FROM xmltable('/a' PASSING xml '<a/>' COLUMNS b text PATH {f})",
    "SELECT xmlpi(name x, {f})",
    "SELECT xmlroot(xml '<a/>', version {f})",
    "SELECT xmlserialize(content {f}::xml as text)",
    "SELECT string_agg(a, ',' ORDER BY {f}) FROM t",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY length({f}))",
    "SELECT JSON_OBJECTAGG(a : {f}) FROM t",
    "SELECT JSON_ARRAYAGG({f})",
    "SELECT {f} IS JSON",
    "SELECT JSON({f})",
    "SELECT JSON_SCALAR({f})",
    "SELECT JSON_SERIALIZE({f})",
    "SELECT JSON_QUERY(jsonb '{{}}', '$' RETURNING text DEFAULT {f} ON ERROR)",
    "SELECT JSON_EXISTS(jsonb '{{}}', '$' PASSING {f} AS x)",
    "SELECT a FROM t WHERE a BETWEEN {f} AND 'z'",
    "SELECT NULLIF({f}, 'x')",
    "SELECT a FROM t WHERE a IS DISTINCT FROM {f}",
    "SELECT a FROM t WHERE {f} LIKE 'x' ESCAPE '!'",
    "SELECT GROUPING(a) FROM t GROUP BY CUBE (a, {f})",
    "SELECT a FROM t WHERE (a, b) = ({f}, 'x')",
    "SELECT a FROM t WINDOW w AS (ORDER BY {f})",
    "SELECT DISTINCT ON ({f}) a FROM t",
    "SELECT a FROM t HAVING {f} IS NULL",
    "SELECT a[length({f})] FROM t",
    "SELECT a[1:length({f})] FROM t",
    "UPDATE t SET a[length({f})] = 1",
    "INSERT INTO t (a[1]) VALUES ({f})",
    "SELECT ({f}).x",
    "SELECT {f} -> 'a'",
    'SELECT lower({f}) COLLATE "C"',
    "SELECT a FROM t WHERE a = {f} FOR SHARE OF t",
    "SELECT * FROM t WHERE a = $1 AND b = {f}",
    "DO $$ BEGIN PERFORM {f}; END $$",
    "DO $$ DECLARE v text := {f}; BEGIN NULL; END $$",
    "DO $$ DECLARE c CURSOR FOR SELECT {f}; BEGIN NULL; END $$",
    "DO $$ BEGIN FOR i IN 1..length({f}) LOOP NULL; END LOOP; END $$",
    "DO $$ BEGIN RAISE NOTICE '%', {f}; END $$",
    "DO $$ BEGIN CASE WHEN {f} IS NULL THEN NULL; END CASE; END $$",
    "DO $$ BEGIN WHILE {f} IS NULL LOOP EXIT; END LOOP; END $$",
    "DO $$ DECLARE r record; BEGIN FOR r IN SELECT {f} LOOP NULL; END LOOP; END $$",
    "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT {f} $$",
    "CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT {f}; END",
    "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN {f}; END $$",
    "CREATE FUNCTION f() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY SELECT {f}; "
    "END $$",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW WHEN ({f} IS NULL) EXECUTE FUNCTION g()",
    "CREATE RULE r AS ON INSERT TO t DO ALSO SELECT {f}",
    "CREATE TABLE x (a text DEFAULT {f})",
    "CREATE TABLE x (a text GENERATED ALWAYS AS ({f}) STORED)",
    "ALTER TABLE t ALTER COLUMN a SET DEFAULT {f}",
    "ALTER TABLE t ADD CONSTRAINT c CHECK ({f} IS NOT NULL)",
    "CREATE INDEX i ON t ((a || {f}))",
    "CREATE POLICY p ON t USING ({f} IS NOT NULL)",
    "COPY (SELECT {f}) TO STDOUT",
    "COPY t FROM STDIN WHERE a = {f}",
    "SELECT x.y FROM (SELECT {f} AS y) x",
    "SELECT * FROM (SELECT {f}) s",
    "NOTIFY ch, 'x'; SELECT {f}",
]


@pytest.mark.parametrize("template", POSITIONS)
def test_privileged_call_is_found_in_every_position(template: str, catalog: Catalog) -> None:
    sql = template.format(f=_CALL)
    assert_valid_postgres(sql)
    assert "execute" in categories(sql, catalog)


def test_every_pglast_statement_kind_is_mapped() -> None:
    import inspect

    import pglast.ast as ast

    kinds = {
        name
        for name, cls in vars(ast).items()
        if inspect.isclass(cls) and issubclass(cls, ast.Node) and name.endswith("Stmt")
    }
    assert kinds - set(STATEMENT_KINDS) == set()


def test_quoted_upper_case_name_is_a_different_function(catalog: Catalog) -> None:
    assert categories("SELECT \"PG_READ_FILE\"('x')", catalog) == set()
    assert categories("SELECT PG_READ_FILE('x')", catalog) == {"execute"}


def test_set_config_reads_the_setting_name_case_insensitively(catalog: Catalog) -> None:
    for name in ("role", "ROLE", "Role", "session_authorization", "SESSION_AUTHORIZATION"):
        assert "privilege" in categories(f"SELECT set_config('{name}', 'x', false)", catalog)
    assert categories("SELECT set_config('work_mem', 'x', false)", catalog) == set()


def test_literal_sensitive_statements_are_flagged(catalog: Catalog) -> None:
    def facts(sql: str) -> StatementFacts:
        (only,) = classify_text(sql, catalog)
        return only

    assert facts("SELECT set_config('work_mem', '1MB', false)").literal_sensitive
    assert facts("SELECT 'lower'::regproc").literal_sensitive
    assert facts("SET client_encoding = 'UTF8'").literal_sensitive
    assert not facts("SELECT abalance FROM pgbench_accounts WHERE aid = 42").literal_sensitive
    assert facts("SELECT abalance FROM pgbench_accounts WHERE aid = 42").cacheable
    assert not facts("SELECT set_config('work_mem', '1MB', false)").cacheable
    assert not facts("EXECUTE p").cacheable
    assert not facts("PREPARE p AS SELECT 1").cacheable


def test_session_effects_are_reported(catalog: Catalog) -> None:
    prepare, execute, dealloc, dealloc_all = classify_text(
        "PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p; DEALLOCATE ALL", catalog
    )
    assert prepare.prepares == "p"
    assert execute.executes == ("p",)
    assert dealloc.deallocates == ("p",)
    assert dealloc_all.deallocates == ("*",)


def test_reasons_never_quote_literals(catalog: Catalog) -> None:
    secret = "s3cr3t-value"
    sqls = [
        f"SELECT set_config('role', '{secret}', false)",
        f"COPY t TO PROGRAM '{secret}'",
        f"SELECT pg_read_file('{secret}')",
        f"SET ROLE '{secret}'",
        f"DO $$ BEGIN PERFORM pg_read_file('{secret}'); END $$",
        f"LOAD '{secret}'",
    ]
    for sql in sqls:
        for facts in classify_text(sql, catalog):
            assert all(secret not in reason for reason in facts.reasons), sql


def test_relations_and_functions_are_collected(catalog: Catalog) -> None:
    (facts,) = classify_text(
        "SELECT lower(a) FROM s.orders o JOIN customers c ON c.id = o.cid", catalog
    )
    assert facts.relations == ("customers", "s.orders")
    assert facts.functions == ("lower",)
    assert facts.flagged_functions == ()
