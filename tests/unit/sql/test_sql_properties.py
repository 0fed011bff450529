"""Property tests: the classifier never raises and never calls unreadable text harmless."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from pgguard.policy import Context, LexState, PolicyEngine
from pgguard.sql.catalog import Catalog
from pgguard.sql.classify import classify_text
from pgguard.sql.lexstate import DEFAULT_LEX_STATE, UnreadableSQL, decode_sql
from pgguard.sql.parse import ParseFailure

ENGINE = PolicyEngine.load(cache_size=0)
CTX = Context(agent="prop", database="db")

FRAGMENTS = [
    "SELECT",
    "select",
    "FROM",
    "t",
    "WHERE",
    "a",
    "=",
    "1",
    "'x'",
    "'",
    '"',
    "$$",
    "$a$",
    ";",
    "--",
    "/*",
    "*/",
    "\n",
    " ",
    "(",
    ")",
    ",",
    "pg_read_file",
    "set_config",
    "'role'",
    "DROP",
    "TABLE",
    "COPY",
    "TO",
    "STDOUT",
    "DO",
    "BEGIN",
    "END",
    "E'\\''",
    "\\",
    "::regproc",
    "GRANT",
    "EXPLAIN",
    "ANALYZE",
    "WITH",
    "AS",
    "PREPARE",
    "EXECUTE",
    "p",
    "é",
    "\x00",
    "U&'\\0041'",
]
sqlish = st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(" ".join)


def _engine_is_sound(data: str | bytes, lex: LexState = DEFAULT_LEX_STATE) -> None:
    decision = ENGINE.classify(data, Context(agent="prop", database="db", lex=lex))
    assert "internal error while classifying" not in decision.reasons
    assert decision.action in {"allow", "hold", "deny"}
    if any(v.kind == "unparseable" for v in decision.statements):
        assert decision.privileged
        assert decision.action != "allow"
    if decision.action == "allow":
        assert not decision.privileged


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_never_breaks_the_engine(text: str) -> None:
    _engine_is_sound(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_break_the_engine(data: bytes) -> None:
    _engine_is_sound(data)
    _engine_is_sound(data, LexState(standard_conforming_strings=False, client_encoding="SJIS"))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(sqlish)
def test_sql_like_text_never_breaks_the_engine(text: str) -> None:
    _engine_is_sound(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_unparseable_text_is_privileged(text: str) -> None:
    try:
        pg.parse_sql_json(text)
        parses = "\x00" not in text
    except Exception:
        parses = False
    decision = ENGINE.classify(text, CTX)
    if not parses:
        assert decision.privileged
        assert decision.action == "deny"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(sqlish)
def test_lower_layers_raise_only_their_own_errors(text: str) -> None:
    try:
        decoded = decode_sql(text, LexState())
    except UnreadableSQL:
        return
    with contextlib.suppress(ParseFailure):
        classify_text(decoded, Catalog())


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(sqlish)
def test_a_privileged_statement_after_anything_parseable_is_caught(prefix: str) -> None:
    try:
        pg.parse_sql_json(prefix)
    except Exception:
        return
    if "\x00" in prefix:
        return
    decision = ENGINE.classify(prefix + ";\nDROP TABLE victims", CTX)
    assert decision.privileged
    assert decision.action != "allow"


def test_hundreds_of_kilobytes_are_classified() -> None:
    rows = ",".join(f"({i}, 'name {i}')" for i in range(20_000))
    sql = f"INSERT INTO t (a, b) VALUES {rows}; SELECT pg_reload_conf()"
    assert len(sql) > 300_000
    decision = ENGINE.classify(sql, CTX)
    assert decision.action == "hold"
    assert "admin" in decision.categories


def test_thousands_of_nesting_levels_do_not_crash() -> None:
    for sql in (
        "SELECT " + "1 + " * 8000 + "1",
        "SELECT " + "(" * 3000 + "1" + ")" * 3000,
        "SELECT " + "f(" * 3000 + "1" + ")" * 3000,
        "SELECT " + "ARRAY[" * 3000 + "1" + "]" * 3000,
        "SELECT " + "NOT " * 5000 + "true",
        "SELECT " + "(SELECT " * 300 + "pg_read_file('x')" + ")" * 300,
        "SELECT " + "(" * 100_000 + "1" + ")" * 100_000,
    ):
        decision = ENGINE.classify(sql, CTX)
        assert "internal error while classifying" not in decision.reasons
    deep = "SELECT " + "(SELECT " * 300 + "pg_read_file('x')" + ")" * 300
    assert ENGINE.classify(deep, CTX).categories == ("execute",)
