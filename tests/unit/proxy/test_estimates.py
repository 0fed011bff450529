"""Which query pgguard explains to estimate what a held statement touches."""

from __future__ import annotations

import pytest

from pgguard.proxy.estimates import explainable_query, names_in


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("COPY (SELECT a FROM t WHERE b > 1) TO STDOUT", "SELECT a FROM t WHERE b > 1"),
        ("COPY public.customers TO STDOUT", "SELECT * FROM public.customers"),
        ("UPDATE t SET a = 1 WHERE b = 2", "UPDATE t SET a = 1 WHERE b = 2"),
        ("DELETE FROM t", "DELETE FROM t"),
        ("CREATE TABLE x AS SELECT * FROM y", "SELECT * FROM y"),
    ],
)
def test_explainable(sql: str, expected: str) -> None:
    assert explainable_query(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "COPY t FROM STDIN",
        "DROP TABLE t",
        "SELECT 1; DELETE FROM t",
        "GRANT ALL ON t TO x",
        "SELEC",
    ],
)
def test_not_explainable(sql: str) -> None:
    assert explainable_query(sql) is None


def test_names_in_finds_relations_operators_types_and_functions() -> None:
    names = names_in(
        "DELETE FROM s.t USING u WHERE t.a === u.b AND t.c = '1'::dom AND t.d IN (SELECT x FROM v)"
    )
    assert set(names.relations) == {'"s"."t"', '"u"', '"v"'}
    assert {"===", "="} <= names.operators
    assert "dom" in names.types
    assert not names.functions
    assert names_in("DELETE FROM t WHERE a = lower('x')").functions
    assert "<" in names_in("DELETE FROM t WHERE a IN (1, 2)").operators  # implicit ones too
