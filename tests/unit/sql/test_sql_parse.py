"""Splitting and parsing with PostgreSQL's grammar."""

from __future__ import annotations

import pytest

from pgguard.sql.catalog import Catalog
from pgguard.sql.classify import classify_text
from pgguard.sql.parse import (
    ParseFailure,
    fingerprint,
    normalized_key,
    parse_statements,
    safe_parse_message,
)


def test_statements_are_split_in_order_with_their_own_text() -> None:
    stmts = parse_statements("SELECT 'é;' ; /* x */ DROP TABLE t;\nINSERT INTO t VALUES (1)")
    assert [s.kind for s in stmts] == ["SelectStmt", "DropStmt", "InsertStmt"]
    assert stmts[0].text == "SELECT 'é;'"
    assert stmts[1].text.endswith("DROP TABLE t")
    assert stmts[2].text == "INSERT INTO t VALUES (1)"


def test_empty_text_has_no_statements() -> None:
    assert parse_statements("") == ()
    assert parse_statements(" -- nothing\n") == ()


@pytest.mark.parametrize(
    "sql",
    ["SELEC 1", "SELECT 'open", "SELECT 1 /* open", 'SELECT "', "DROP TABLE", "\\copy t to 'x'"],
)
def test_grammar_rejections_raise_parse_failure(sql: str) -> None:
    with pytest.raises(ParseFailure):
        parse_statements(sql)


def test_parse_failure_message_does_not_quote_the_statement() -> None:
    with pytest.raises(ParseFailure) as info:
        parse_statements("SELECT secretvalue AS x secondsecret thirdsecret")
    assert "secret" not in str(info.value)
    assert safe_parse_message('syntax error at or near "x"') == "syntax error"
    assert '"' not in safe_parse_message('zero-length delimited identifier "abc"').strip('"…')


def test_whole_multi_statement_string_fails_when_one_part_does_not_parse() -> None:
    with pytest.raises(ParseFailure):
        parse_statements("SELECT 1; DROP TABLE t; SELEC 2")


def test_fingerprint_ignores_literals_but_normalized_key_keeps_names() -> None:
    a = "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
    b = "SELECT abalance FROM pgbench_accounts WHERE aid = 2"
    assert fingerprint(a) == fingerprint(b) != ""
    assert normalized_key(a) == normalized_key(b)
    assert normalized_key("DEALLOCATE p1") != normalized_key("DEALLOCATE p2")
    assert normalized_key("SELECT pg_read_file(1)") != normalized_key("SELECT pg_ls_dir(1)")
    assert fingerprint("SELEC") == ""
    assert normalized_key("SELEC") is None


def test_deeply_nested_expression_is_classified_without_recursion() -> None:
    sql = "SELECT " + "1 + " * 5000 + "pg_read_file('x')"
    catalog = Catalog(functions={"pg_read_file": (("execute",), "reads a file")})
    (facts,) = classify_text(sql, catalog)
    assert facts.categories == ("execute",)


def test_nesting_beyond_the_parser_limit_is_a_parse_failure() -> None:
    with pytest.raises(ParseFailure):
        parse_statements("SELECT " + "(" * 20000 + "1" + ")" * 20000)
