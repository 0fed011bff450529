"""sqlglot analysis: tables, columns, literals — with PostgreSQL's reading winning."""

from __future__ import annotations

from pgguard.sql.analysis import LiteralRef, analyze, literal_spans, render


def test_select_tables_columns_and_literal_columns() -> None:
    (a,) = analyze("SELECT a FROM s.t WHERE b = 5 AND c IN ('x', 'y')")
    assert a.complete
    assert a.kind == "SelectStmt"
    assert a.tables == ("s.t",)
    assert set(a.columns) == {"a", "b", "c"}
    assert LiteralRef("5", False, "b") in a.literals
    assert LiteralRef("x", True, "c") in a.literals


def test_insert_literals_map_to_their_columns() -> None:
    (a,) = analyze("INSERT INTO t (card, cvv) VALUES ('4111', '123')")
    assert a.literals == (LiteralRef("4111", True, "card"), LiteralRef("123", True, "cvv"))


def test_update_assignment_literal_maps_to_column() -> None:
    (a,) = analyze("UPDATE users SET password = 'hunter2' WHERE id = 3")
    assert LiteralRef("hunter2", True, "password") in a.literals


def test_cte_names_are_not_tables() -> None:
    (a,) = analyze("WITH x AS (SELECT * FROM real_table) SELECT * FROM x")
    assert a.tables == ("real_table",)


def test_statement_sqlglot_reads_differently_falls_back_to_postgres() -> None:
    (a,) = analyze("GRANT SELECT ON orders TO bob")
    assert not a.complete
    assert a.kind == "GrantStmt"
    assert a.tables == ("orders",)
    assert a.note


def test_unparseable_text_has_no_analysis() -> None:
    assert analyze("SELEC 1") == ()


def test_literal_spans_come_from_postgres_scanner() -> None:
    sql = "SELECT 'é''s', $$dollar$$, 42, E'a\\'b' FROM t -- 'not a literal'"
    spans = [sql[s.start : s.end] for s in literal_spans(sql)]
    assert spans == ["'é''s'", "$$dollar$$", "42", "E'a\\'b'"]


def test_render_keeps_statements_sqlglot_cannot_read() -> None:
    out = render("select a from t where b=1; grant all on t to x")
    assert out is not None
    assert "SELECT" in out
    assert "grant all on t to x" in out
