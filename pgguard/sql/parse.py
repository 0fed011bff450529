"""Splitting and parsing with PostgreSQL's own grammar (pglast / libpg_query).

Owns: `parse_statements` (text → the statements PostgreSQL would execute, each with its kind,
its parse tree and its own text), `fingerprint` and `normalized_key`.

Invariants:
- pglast is the only authority on what a statement is. Anything it rejects raises `ParseFailure`,
  which callers turn into an `unparseable` verdict; nothing here ever falls back to guessing.
- Callers pass text that went through `lexstate.decode_sql` (no NUL bytes, encodable as UTF-8).
- Messages in `ParseFailure` never quote the statement: they go to logs and to the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pglast import parser as pg

from pgguard.sql.tree import Fields, JsonValue, TreeError, load_json, unwrap

_QUOTED = re.compile(r'"[^"]*"')
_NEAR = re.compile(r"\s+at or near\b.*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedStatement:
    """One top-level statement: its node type (`SelectStmt`, `CopyStmt`, ...), tree and text."""

    kind: str
    node: Fields
    text: str


class ParseFailure(ValueError):
    """PostgreSQL's grammar rejects the text (or the tree could not be read)."""


def safe_parse_message(message: str) -> str:
    """libpg_query's message with every quoted fragment of the statement removed."""
    return _QUOTED.sub('"…"', _NEAR.sub("", message)).strip() or "syntax error"


def parse_statements(text: str) -> tuple[ParsedStatement, ...]:
    """Parse `text` into its statements in execution order, or raise ParseFailure."""
    try:
        raw = pg.parse_sql_json(text)
    except pg.ParseError as exc:
        raise ParseFailure(safe_parse_message(str(exc.args[0]) if exc.args else "")) from None
    except (UnicodeError, ValueError, MemoryError) as exc:
        raise ParseFailure(f"parser could not read the text ({type(exc).__name__})") from None
    try:
        tree = load_json(raw)
    except TreeError as exc:
        raise ParseFailure(str(exc)) from None
    raw_stmts = tree.get("stmts", []) if isinstance(tree, dict) else None
    if not isinstance(raw_stmts, list):
        raise ParseFailure("parse tree has no statement list")
    utf8 = text.encode("utf-8")
    return tuple(_statement(entry, utf8) for entry in raw_stmts)


def _statement(entry: JsonValue, utf8: bytes) -> ParsedStatement:
    if not isinstance(entry, dict):
        raise ParseFailure("parse tree entry is not an object")
    wrapped = unwrap(entry.get("stmt"))
    if wrapped is None:
        raise ParseFailure("parse tree entry has no statement")
    kind, node = wrapped
    start = _int(entry.get("stmt_location"))
    length = _int(entry.get("stmt_len"))
    chunk = utf8[start : start + length] if length else utf8[start:]
    return ParsedStatement(kind=kind, node=node, text=chunk.decode("utf-8", "replace").strip())


def _int(value: JsonValue) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def fingerprint(text: str) -> str:
    """libpg_query's literal-independent fingerprint of the whole text ("" if it will not parse)."""
    try:
        return str(pg.fingerprint(text))
    except (pg.ParseError, UnicodeError, ValueError, MemoryError):
        return ""


def normalized_key(text: str) -> str | None:
    """The text with every constant replaced by `$n` (None if it will not parse).

    Unlike the fingerprint, this keeps every identifier, alias and statement name, so two texts
    with the same key differ only in the values of their constants.
    """
    try:
        return str(pg.normalize(text))
    except (pg.ParseError, UnicodeError, ValueError, MemoryError):
        return None
