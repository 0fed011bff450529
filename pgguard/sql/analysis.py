"""Analysis for reviewers and masking: tables, columns, literals, rendering (sqlglot + pglast).

Owns: `analyze` / `analyze_statement` → `Analysis`, `literal_spans` and `render`.

Invariants:
- This module never decides whether a statement is privileged; policy uses `classify.py` only.
- PostgreSQL's reading wins: each statement is split and kinded by pglast first. When sqlglot
  cannot parse it, or reads it as a different kind of statement, the analysis is marked
  incomplete and falls back to what pglast knows (relations from the parse tree).
- `literal_spans` comes from PostgreSQL's own scanner, so masking can always find every literal
  even where sqlglot fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlglot
from pglast import parser as pg
from sqlglot import exp

from pgguard.sql.catalog import EMPTY_CATALOG
from pgguard.sql.classify import classify_statement
from pgguard.sql.parse import ParseFailure, parse_statements

log = logging.getLogger(__name__)

MAX_SQLGLOT_CHARS = 64 * 1024
_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
# pglast statement kind → sqlglot expression types that mean the same kind of statement.
_SAME_KIND: dict[str, tuple[type[exp.Expression], ...]] = {
    "SelectStmt": (exp.Select, exp.SetOperation, exp.Values),
    "InsertStmt": (exp.Insert,),
    "UpdateStmt": (exp.Update,),
    "DeleteStmt": (exp.Delete,),
    "MergeStmt": (exp.Merge,),
    "CopyStmt": (exp.Copy,),
    "CreateStmt": (exp.Create,),
    "CreateTableAsStmt": (exp.Create,),
    "ViewStmt": (exp.Create,),
    "IndexStmt": (exp.Create,),
    "DropStmt": (exp.Drop,),
    "AlterTableStmt": (exp.Alter,),
    "TruncateStmt": (exp.TruncateTable,),
}
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.Is)


@dataclass(frozen=True, slots=True)
class LiteralRef:
    """A constant and the column it is compared with or assigned to, when known."""

    value: str
    is_string: bool
    column: str | None


@dataclass(frozen=True, slots=True)
class LiteralSpan:
    """Where a literal token sits in the text (character offsets, end exclusive)."""

    start: int
    end: int
    token: str


@dataclass(frozen=True, slots=True)
class Analysis:
    """What one statement touches, as far as can be told."""

    kind: str
    tables: tuple[str, ...]
    columns: tuple[str, ...]
    literals: tuple[LiteralRef, ...]
    complete: bool
    note: str = ""


def analyze(sql: str) -> tuple[Analysis, ...]:
    """Analyse every statement of `sql`; empty if PostgreSQL's grammar rejects the text."""
    try:
        statements = parse_statements(sql)
    except ParseFailure:
        return ()
    out = []
    for stmt in statements:
        relations = classify_statement(stmt, EMPTY_CATALOG).relations
        out.append(analyze_statement(stmt.text, stmt.kind, relations))
    return tuple(out)


def analyze_statement(text: str, kind: str, relations: tuple[str, ...] = ()) -> Analysis:
    """sqlglot's analysis of one statement, checked against PostgreSQL's `kind`."""
    fallback = Analysis(kind, relations, (), (), complete=False)
    if len(text) > MAX_SQLGLOT_CHARS:
        return _with_note(fallback, "statement too large for detailed analysis")
    try:
        trees = [t for t in sqlglot.parse(text, read="postgres") if t is not None]
    except Exception:  # sqlglot raises many error types; analysis is best effort
        return _with_note(fallback, "sqlglot could not parse the statement")
    if len(trees) != 1:
        return _with_note(fallback, "sqlglot split the statement differently")
    tree = trees[0]
    expected = _SAME_KIND.get(kind)
    if expected is None or not isinstance(tree, expected):
        return _with_note(fallback, "sqlglot reads it as a different kind of statement")
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    tables = tuple(
        dict.fromkeys(
            _table_name(table)
            for table in tree.find_all(exp.Table)
            if table.name and table.name not in cte_names
        )
    )
    columns = tuple(dict.fromkeys(col.name for col in tree.find_all(exp.Column) if col.name))
    if isinstance(tree, exp.Insert) and isinstance(tree.this, exp.Schema):
        columns = tuple(dict.fromkeys((*columns, *(c.name for c in tree.this.expressions))))
    literals = tuple(_literal_ref(lit) for lit in tree.find_all(exp.Literal))
    return Analysis(kind, tables or relations, columns, literals, complete=True)


def _with_note(analysis: Analysis, note: str) -> Analysis:
    return Analysis(
        analysis.kind, analysis.tables, analysis.columns, analysis.literals, False, note
    )


def _table_name(table: exp.Table) -> str:
    return f"{table.db}.{table.name}" if table.db else table.name


def _literal_ref(literal: exp.Literal) -> LiteralRef:
    return LiteralRef(str(literal.this), bool(literal.is_string), _column_for(literal))


def _column_for(literal: exp.Literal) -> str | None:
    node: exp.Expression = literal
    parent = node.parent
    while isinstance(parent, exp.Paren | exp.Cast | exp.Neg):
        node, parent = parent, parent.parent
    if isinstance(parent, exp.In):
        target = parent.this
        return target.name if isinstance(target, exp.Column) else None
    if isinstance(parent, _COMPARISONS):
        other = parent.expression if parent.this is node else parent.this
        return other.name if isinstance(other, exp.Column) else None
    if isinstance(parent, exp.Tuple):
        return _insert_column(node, parent)
    return None


def _insert_column(node: exp.Expression, row: exp.Tuple) -> str | None:
    insert = row.find_ancestor(exp.Insert)
    schema = insert.this if insert is not None else None
    if not isinstance(schema, exp.Schema):
        return None
    names = [col.name for col in schema.expressions]
    index = next((i for i, item in enumerate(row.expressions) if item is node), None)
    return names[index] if index is not None and index < len(names) else None


def literal_spans(text: str) -> tuple[LiteralSpan, ...]:
    """Every literal token PostgreSQL's scanner finds (empty if the scanner rejects the text)."""
    try:
        tokens = pg.scan(text)
    except (pg.ParseError, UnicodeError, ValueError):
        return ()
    spans = []
    for token in tokens:
        if token.name in _LITERAL_TOKENS:
            # Token offsets are character offsets; `end` is inclusive.
            spans.append(LiteralSpan(token.start, token.end + 1, token.name))
    return tuple(spans)


def render(sql: str, *, pretty: bool = True) -> str | None:
    """sqlglot's rendering of `sql` for display, or None when it cannot be rendered faithfully."""
    if len(sql) > MAX_SQLGLOT_CHARS:
        return None
    try:
        statements = parse_statements(sql)
        rendered = []
        for stmt in statements:
            trees = sqlglot.parse(stmt.text, read="postgres")
            expected = _SAME_KIND.get(stmt.kind)
            if len(trees) != 1 or expected is None or not isinstance(trees[0], expected):
                rendered.append(stmt.text)
                continue
            rendered.append(trees[0].sql(dialect="postgres", pretty=pretty))
        return ";\n".join(rendered)
    except Exception:  # rendering is cosmetic; never let it break a caller
        log.debug("could not render statement", exc_info=True)
        return None
