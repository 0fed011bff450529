"""What a statement touches, read from PostgreSQL's parse tree."""

from __future__ import annotations

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
    assert mask_sql(sql, RULES).touches == touches


def test_tables_lists_reads_then_writes() -> None:
    touches = mask_sql("INSERT INTO a SELECT * FROM b", RULES).touches
    assert touches.tables == ("b", "a")
