"""Code inside statements: DO blocks and function bodies (SQL and PL/pgSQL).

Owns: `Collector`, the fact accumulator shared with `classify.py`, and its analysis of embedded
code: SQL-language bodies are classified like top-level text; PL/pgSQL is parsed with libpg_query's
PL/pgSQL parser and every embedded expression and statement is classified; bodies in any other
language are opaque.

Invariants:
- Whatever cannot be read inside a body makes the enclosing statement `execute` (opaque code),
  never harmless. Dynamic SQL (`EXECUTE`, `OPEN ... FOR EXECUTE`) is always opaque.
- Nesting of code inside code is bounded by MAX_EMBEDDING_DEPTH; deeper is opaque.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pglast import parser as pg

from pgguard.sql.catalog import Catalog
from pgguard.sql.kinds import EXECUTE, PRIVILEGE, UNPARSEABLE
from pgguard.sql.nodes import bool_value, def_elems, string_value
from pgguard.sql.parse import ParseFailure
from pgguard.sql.tree import Fields, JsonValue, TreeError, load_json

if TYPE_CHECKING:
    from pgguard.sql.classify import StatementFacts

    ClassifyText = Callable[[str, Catalog, int], tuple[StatementFacts, ...]]

MAX_EMBEDDING_DEPTH = 4
_READABLE_LANGUAGES = frozenset({"sql", "plpgsql"})
_DYNAMIC_PLPGSQL = frozenset({"PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors", "dynquery"})
# PL/pgSQL expression parse modes (RawParseMode): 0 statement, 2 expression, 3-5 assignment.
_MODE_STATEMENT = 0
_ASSIGN_MODES = frozenset({3, 4, 5})


class Collector:
    """Facts gathered while walking one statement (categories keep first-seen order)."""

    def __init__(
        self, catalog: Catalog, depth: int, text: str, classify_text: ClassifyText
    ) -> None:
        self.catalog = catalog
        self.depth = depth
        self.text = text
        self.categories: dict[str, None] = {}
        self.reasons: dict[str, None] = {}
        self.kinds: dict[str, None] = {}
        self.functions: set[str] = set()
        self.flagged_functions: set[str] = set()
        self.relations: set[str] = set()
        self.executes: list[str] = []
        self.literal_sensitive = False
        self.embedded_code = False
        self.changes_lexing = False
        self.state_refs: dict[str, None] = {}
        self._classify_text = classify_text

    def add(self, categories: tuple[str, ...], reason: str) -> None:
        if not categories:
            return
        for category in categories:
            self.categories[category] = None
        if reason:
            self.reasons[reason] = None

    def analyse_do(self, fields: Fields) -> None:
        self.embedded_code = True
        options = def_elems(fields.get("args"))
        language = (string_value(options.get("language")) or "plpgsql").lower()
        if language == "plpgsql":
            self._analyse_plpgsql("DO block")
        else:
            self.add((EXECUTE,), f"DO block in language {language} is opaque to pgguard")

    def analyse_function(self, fields: Fields) -> None:
        self.embedded_code = True
        options = def_elems(fields.get("options"))
        if bool_value(options.get("security")):
            self.add((PRIVILEGE,), "SECURITY DEFINER code runs with its owner's privileges")
        has_sql_body = fields.get("sql_body") is not None
        language = string_value(options.get("language"))
        language = language.lower() if language else ("sql" if has_sql_body else "")
        if language not in _READABLE_LANGUAGES:
            shown = language or "unspecified"
            self.add((EXECUTE,), f"function body in language {shown} is opaque to pgguard")
            return
        if has_sql_body:
            return  # BEGIN ATOMIC bodies are part of the tree and were walked already
        if language == "plpgsql":
            self._analyse_plpgsql("function body")
            return
        body = string_value(options.get("as"))
        if body is not None:
            self._absorb_sql(body, "function body")

    def absorb_sql(self, sql: str, where: str) -> None:
        """Take in the facts of SQL text that runs as part of this statement."""
        self._absorb_sql(sql, where)

    def analyse_plpgsql(self, where: str) -> None:
        """Take in the facts of the PL/pgSQL body of `self.text` (a CREATE FUNCTION or DO)."""
        self._analyse_plpgsql(where)

    def _absorb_sql(self, sql: str, where: str) -> None:
        if self.depth + 1 > MAX_EMBEDDING_DEPTH:
            self.add((EXECUTE,), f"{where} nests code too deeply to analyse")
            return
        try:
            facts = self._classify_text(sql, self.catalog, self.depth + 1)
        except ParseFailure:
            self.add((EXECUTE,), f"part of the {where} could not be parsed")
            return
        for item in facts:
            self._absorb(item, where)

    def _absorb(self, facts: StatementFacts, where: str) -> None:
        for category in facts.categories:
            if category == UNPARSEABLE:
                self.add((EXECUTE,), f"part of the {where} could not be parsed")
            else:
                self.categories[category] = None
        for reason in facts.reasons:
            self.reasons[f"{where}: {reason}"] = None
        for reason in facts.state_refs:
            self.state_refs[f"{where}: {reason}"] = None
        if facts.kind not in {"SelectStmt", "PLAssignStmt"}:
            self.kinds[facts.kind] = None
        self.functions.update(facts.functions)
        self.flagged_functions.update(facts.flagged_functions)
        self.relations.update(facts.relations)
        self.changes_lexing = self.changes_lexing or facts.changes_lexing
        if facts.executes or facts.prepares is not None:
            self.add((EXECUTE,), f"{where} runs prepared statements pgguard cannot track")
        self.literal_sensitive = True

    def _analyse_plpgsql(self, where: str) -> None:
        try:
            tree = load_json(pg.parse_plpgsql_json(self.text))
        except (pg.ParseError, TreeError, UnicodeError, ValueError, MemoryError):
            self.add((EXECUTE,), f"{where} could not be parsed as PL/pgSQL")
            return
        for key, value in _iter_plpgsql(tree):
            if key in _DYNAMIC_PLPGSQL:
                self.add((EXECUTE,), f"{where} runs SQL built at run time")
            elif key == "PLpgSQL_expr" and isinstance(value, dict):
                sql = _expression_as_sql(value)
                if sql is None:
                    self.add((EXECUTE,), f"part of the {where} could not be parsed")
                else:
                    self._absorb_sql(sql, where)


def _iter_plpgsql(tree: JsonValue) -> list[tuple[str, JsonValue]]:
    """Every (key, value) pair of every object in the PL/pgSQL tree, iteratively."""
    out: list[tuple[str, JsonValue]] = []
    stack: list[JsonValue] = [tree]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                out.append((key, item))
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    return out


def _expression_as_sql(expr: Fields) -> str | None:
    """SQL text PostgreSQL's raw parser would accept for one PL/pgSQL expression."""
    query = expr.get("query")
    mode = expr.get("parseMode", _MODE_STATEMENT)
    if not isinstance(query, str):
        return None
    if mode == _MODE_STATEMENT:
        return query
    if mode in _ASSIGN_MODES:
        return _assignment_as_select(query)
    return f"SELECT {query}"


def _assignment_as_select(query: str) -> str | None:
    """'target[sub] := expr' read as 'SELECT target[sub], expr' so both sides are walked."""
    try:
        tokens = pg.scan(query)
    except (pg.ParseError, UnicodeError, ValueError):
        return None
    depth = 0
    for token in tokens:
        if token.name in {"ASCII_40", "ASCII_91"}:
            depth += 1
        elif token.name in {"ASCII_41", "ASCII_93"}:
            depth -= 1
        elif depth == 0 and token.name in {"COLON_EQUALS", "ASCII_61"}:
            # Token offsets are character offsets; `end` is inclusive.
            target = query[: token.start]
            value = query[token.end + 1 :]
            return f"SELECT {target}, {value}"
    return None
