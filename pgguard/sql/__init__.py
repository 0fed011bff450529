"""SQL understanding: splitting and parsing with PostgreSQL's own grammar (pglast), statement
facts and categories, fingerprints, lexing-state safety, and sqlglot-based analysis (tables,
columns, literals) for masking and rendering.

Public API: `LexState`, `decode_sql`, `lexing_hazard`, `parse_statements`, `classify_text`,
`StatementFacts`, `Catalog`, `fingerprint`, `normalized_key`, and `analysis.analyze`.
"""

from __future__ import annotations

from pgguard.sql.catalog import Catalog
from pgguard.sql.classify import StatementFacts, classify_statement, classify_text
from pgguard.sql.kinds import ALL_CATEGORIES, PRIVILEGED_CATEGORIES, UNPARSEABLE
from pgguard.sql.lexstate import LexState, UnreadableSQL, decode_sql, lexing_hazard
from pgguard.sql.parse import (
    ParsedStatement,
    ParseFailure,
    fingerprint,
    normalized_key,
    parse_statements,
)

__all__ = [
    "ALL_CATEGORIES",
    "PRIVILEGED_CATEGORIES",
    "UNPARSEABLE",
    "Catalog",
    "LexState",
    "ParseFailure",
    "ParsedStatement",
    "StatementFacts",
    "UnreadableSQL",
    "classify_statement",
    "classify_text",
    "decode_sql",
    "fingerprint",
    "lexing_hazard",
    "normalized_key",
    "parse_statements",
]
