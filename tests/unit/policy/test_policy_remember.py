"""The remember key: equal only for statements that do the same thing (issue 16)."""

from __future__ import annotations

import pytest

from pgguard.policy import Context, PolicyEngine
from pgguard.policy.remember import remember_key

ENGINE = PolicyEngine.load()
CTX = Context(agent="a", database="d")
UTF8 = ("on", "UTF8")


def key(sql: str, lexing: tuple[str, str] = UTF8, params: list[bytes | None] | None = None) -> str:
    decision = ENGINE.classify(sql, CTX)
    return remember_key(
        sql.encode(), decision.facts, decision.categories, decision.rule_ids, lexing, params
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("DO $$ BEGIN PERFORM 0; END $$", "DO $$ BEGIN EXECUTE 'DROP TABLE users'; END $$"),
        ("GRANT SELECT ON notes TO analyst", "GRANT SELECT ON notes TO intruder"),
        ("ALTER ROLE analyst SUPERUSER", "ALTER ROLE intruder SUPERUSER"),
        ("SELECT set_config('work_mem', '1MB', false)", "SELECT set_config('role', 'x', false)"),
        ("SET work_mem = '1MB'", "SET role = 'x'"),
        ("COPY notes TO '/tmp/a'", "COPY notes TO '/tmp/b'"),
        (
            "CREATE FUNCTION f() RETURNS int AS 'SELECT 1' LANGUAGE sql",
            "CREATE FUNCTION f() RETURNS int AS 'SELECT pg_read_file(''x'')::int' LANGUAGE sql",
        ),
        ("SELECT lo_export(1, '/tmp/x')", "SELECT lo_export(1, '/tmp/x') FROM pg_stat_activity"),
    ],
)
def test_near_misses_have_different_keys(a: str, b: str) -> None:
    assert key(a) != key(b)


def test_literal_values_alone_share_a_key() -> None:
    assert key("COPY (SELECT * FROM t WHERE id = 1) TO STDOUT") == key(
        "COPY (SELECT * FROM t WHERE id = 22) TO STDOUT"
    )


def test_parameters_count_when_the_decision_read_constants() -> None:
    sql = "SELECT set_config($1, $2, false)"
    assert key(sql, params=[b"work_mem", b"1MB"]) != key(sql, params=[b"role", b"x"])
    assert key(sql, params=[b"role", b"x"]) == key(sql, params=[b"role", b"x"])


def test_the_lexing_state_counts() -> None:
    sql = "COPY notes TO STDOUT"
    assert key(sql) != key(sql, ("off", "UTF8"))
