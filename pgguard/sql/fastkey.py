"""A cheap literal-blind cache key for statement text, for the classifier's hot path.

``literal_blind_key`` replaces the *contents* of plain string literals and bare digit runs with
fixed tokens, so ``... WHERE aid = 42`` and ``... WHERE aid = 7`` share a key, without calling
PostgreSQL's parser. It is only a cache key: the engine stores under it only decisions it has
proven literal-independent (the same ones its normalized-text cache holds), so two texts sharing a
key are two texts whose decisions are equal.

Soundness rests on tokenizing literals exactly as PostgreSQL does. That is only easy for a subset
of the lexical grammar, so the key is refused (``None``) whenever the text contains anything that
makes literal boundaries subtle: backslashes, ``$`` (dollar quotes and parameters), comments,
prefixed strings (``E''``, ``B''``, ``X''``, ``N''``, ``U&''``), non-ASCII bytes or NUL. What is
left has only ``'...'`` strings (with ``''`` escapes, standard_conforming_strings on - the caller
checks the session's lexing state) and ``"..."`` identifiers (with ``""`` escapes), which a single
left-to-right regex tokenizes the way the server does. Quoted identifiers are kept verbatim:
``"2023_payroll"`` and ``"2024_payroll"`` never share a key.
"""

from __future__ import annotations

import re

_REFUSE = re.compile(rb"[\\$\x00\x80-\xff]|/\*|--")
# Bytes that can start anything _REFUSE matches, or a quoted token. Deleting every other byte
# (one C call) tells whether the regular expressions are needed at all: ordinary statements
# without comments or quotes need neither _REFUSE nor the token scan.
_SPECIAL = b"\\$\x00/-'\"" + bytes(range(0x80, 0x100))
_ORDINARY = bytes(b for b in range(256) if b not in _SPECIAL)
_TOKENS = re.compile(rb"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\b[0-9]+\b")
_DIGITS = re.compile(rb"\b[0-9]+\b")
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
    out: list[bytes] = []
    pos = 0
    for match in _TOKENS.finditer(sql):
        start = match.start()
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
        pos = match.end()
    out.append(sql[pos:])
    return b"".join(out)
