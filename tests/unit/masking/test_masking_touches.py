"""What a statement touches, read from PostgreSQL's parse tree."""

from __future__ import annotations

import dataclasses

import pytest

from pgguard.masking import MaskingRules, Touches, mask_sql

RULES = MaskingRules.load()


@pytest.mark.parametrize(
    ("sql", "touches"),
    [
        (
            "SELECT name, email FROM public.users u JOIN orders o ON o.uid = u.id",
            Touches(("public.users", "orders"), (), ("name", "email", "uid", "id")),
        ),
        (
            "INSERT INTO audit (who, what) SELECT user_name, action FROM events",
            Touches(("events",), ("audit",), ("user_name", "action"), ("who", "what")),
        ),
        (
            "UPDATE users SET email = 'x' WHERE id = 1",
            Touches((), ("users",), ("id",), ("email",)),
        ),
        ("DELETE FROM s.t WHERE a IN (SELECT a FROM u)", Touches(("u",), ("s.t",), ("a",))),
        (
            "COPY users (email, ssn) TO STDOUT",
            Touches(("users",), (), ("email", "ssn"), (), "client"),
        ),
        ("COPY users TO '/tmp/u.csv'", Touches(("users",), (), (), (), "server_file")),
        ("COPY (SELECT * FROM users) TO PROGRAM 'gzip'", Touches(("users",), export="program")),
        ("COPY users (email) FROM STDIN", Touches((), ("users",), (), ("email",))),
        ("WITH c AS (SELECT 1 AS x) SELECT x FROM c", Touches((), (), ("x",))),
        ("DROP TABLE a, s.b", Touches((), ("a", "s.b"))),
        ("TRUNCATE payroll.salaries", Touches((), ("payroll.salaries",))),
        ("CREATE TABLE t2 AS SELECT * FROM t1", Touches(("t1",), ("t2",))),
        ("SELECT lo_export(1, '/tmp/x')", Touches(export="server_file")),
    ],
)
def test_touches(sql: str, touches: Touches) -> None:
    # The lock is tested below.
    assert dataclasses.replace(mask_sql(sql, RULES).touches, lock=None) == touches


@pytest.mark.parametrize(
    ("sql", "lock"),
    [
        ("ALTER TABLE t ADD COLUMN c int", "ACCESS EXCLUSIVE"),
        ("DROP TABLE t", "ACCESS EXCLUSIVE"),
        ("TRUNCATE t", "ACCESS EXCLUSIVE"),
        ("VACUUM FULL t", "ACCESS EXCLUSIVE"),
        ("VACUUM t", "SHARE UPDATE EXCLUSIVE"),
        ("CREATE INDEX ON t (a)", "SHARE"),
        ("CREATE INDEX CONCURRENTLY ON t (a)", "SHARE UPDATE EXCLUSIVE"),
        ("UPDATE t SET a = 1", "ROW EXCLUSIVE"),
        ("COPY t TO STDOUT", "ACCESS SHARE"),
        ("SELECT * FROM t FOR UPDATE", "ROW SHARE"),
        ("LOCK TABLE t IN SHARE MODE", "SHARE"),
        ("ALTER ROLE a RENAME TO b", None),
        ("GRANT SELECT ON t TO bob", None),
    ],
)
def test_lock_from_statement_kind(sql: str, lock: str | None) -> None:
    assert mask_sql(sql, RULES).touches.lock == lock


@pytest.mark.parametrize(
    ("sql", "roles"),
    [
        ("ALTER ROLE pgguard_up PASSWORD 'x'", ("pgguard_up",)),
        ("ALTER ROLE CURRENT_USER SET search_path = x", ("CURRENT_USER",)),
        ("ALTER USER SESSION_USER PASSWORD 'x'", ("SESSION_USER",)),
        ("GRANT admin TO bob", ("admin", "bob")),
        ("GRANT SELECT ON t TO alice, PUBLIC", ("alice",)),
        ("CREATE ROLE r2", ("r2",)),
        ("ALTER ROLE a RENAME TO b", ("a", "b")),
        ("DROP ROLE x, y", ("x", "y")),
    ],
)
def test_roles_named(sql: str, roles: tuple[str, ...]) -> None:
    assert mask_sql(sql, RULES).touches.roles == roles


def test_tables_lists_reads_then_writes() -> None:
    touches = mask_sql("INSERT INTO a SELECT * FROM b", RULES).touches
    assert touches.tables == ("b", "a")
