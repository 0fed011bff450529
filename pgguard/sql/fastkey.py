"""A cheap literal-blind cache key for statement text, for the classifier's hot path.

``literal_blind_key`` replaces the *contents* of plain string literals and bare digit runs with
fixed tokens, so ``... WHERE aid = 42`` and ``... WHERE aid = 7`` share a key, without calling
PostgreSQL's parser.

The property (tested with generated texts in tests/unit/sql/test_sql_cache_soundness.py):
two texts share a key only if PostgreSQL's lexer reads them, in the default lexing state
(standard_conforming_strings on, an ASCII-safe client encoding; the caller checks), as the same
token stream in which only the *values* of string and numeric constants differ. Everything that
changes how a token decodes is part of the token stream, not a value: a ``UESCAPE 'c'`` clause
is the escape character of the ``U&`` token before it, so it is never blinded.

The key is proven for a subset of the lexical grammar only; any text outside it gets ``None``
(the caller takes the full path). The subset: ASCII text without NUL, backslashes, ``$``
(dollar quotes and parameters), comments, prefixed strings (``E''``, ``B''``, ``X''``, ``N''``,
``U&''``) and ``U&""`` identifiers (so no ``UESCAPE`` can apply to anything), in which every
quote character belongs to a complete ``'...'`` string (``''`` escapes) or ``"..."``
identifier (``""`` escapes). There a single left-to-right scan tokenizes literals exactly as the
server does. Quoted identifiers are kept verbatim: ``"2023_payroll"`` and ``"2024_payroll"``
never share a key.

It is only a cache key: the engine stores under it only decisions it has proven
literal-independent (`StatementFacts.cacheable`), so two texts sharing a key have equal
decisions.
"""

from __future__ import annotations

import re

# `&"` is a U&"..." identifier (the prefix is never separated from its quote): UESCAPE may follow.
_REFUSE = re.compile(rb"[\\$\x00\x80-\xff]|/\*|--|&\"")
# Bytes that can start anything _REFUSE matches, or a quoted token. Deleting every other byte
# (one C call) tells whether the regular expressions are needed at all: ordinary statements
# without comments or quotes need neither _REFUSE nor the token scan.
_SPECIAL = b"\\$\x00/-'\"" + bytes(range(0x80, 0x100))
_ORDINARY = bytes(b for b in range(256) if b not in _SPECIAL)
# The last alternative is a quote that starts no complete token (unterminated): refused.
_TOKENS = re.compile(rb"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\b[0-9]+\b|['\"]")
_DIGITS = re.compile(rb"\b[0-9]+\b")
_QUOTE_BYTES = frozenset(b"'\"")
_PREFIX_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_&")


def literal_blind_key(sql: bytes) -> bytes | None:
    """The text with literal values blinded, or None when the text is outside the safe subset."""
    special = sql.translate(None, _ORDINARY)
    if not special:
        return _DIGITS.sub(b"0", sql)  # no quotes, nothing refused: every digit run is a number
    if special.strip(b"'\"") and _REFUSE.search(sql) is not None:
        return None
    if b"'" not in special and b'"' not in special:
        return _DIGITS.sub(b"0", sql)
    if b'&"' in sql:  # only quotes left among the specials, so _REFUSE did not look
        return None
    out: list[bytes] = []
    pos = 0
    for match in _TOKENS.finditer(sql):
        start, end = match.span()
        if end - start == 1 and sql[start] in _QUOTE_BYTES:
            return None  # a quote outside every complete token: unterminated, read otherwise
        first = sql[start]
        if first == 0x22:  # '"': identifiers stay as written
            continue
        if first == 0x27:  # "'": a string, unless prefixed (E'', B'', X'', N'', U&'')
            if start and sql[start - 1] in _PREFIX_CHARS:
                return None
            replacement = b"'?'"
        else:
            replacement = b"0"
        out.append(sql[pos:start])
        out.append(replacement)
        pos = end
    out.append(sql[pos:])
    return b"".join(out)
