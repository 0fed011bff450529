"""The remember key: what a remembered approval (a rule's ``remember:``) is keyed on.

Owns `remember_key`. A remembered approval covers a later statement only when both have the same
key (and agent and database, which the approvals store compares separately).

Invariant: the key changes with everything that changes what a statement does. It covers the
categories and deciding rules, the session's lexing state, and the token stream with only literal
values removed (`pgguard.sql.parse.normalized_key`: identifiers, grantees, role names, setting
names given as identifiers, COPY file names are all kept) - never libpg_query's fingerprint,
which ignores a DO block's body and a GRANT's grantee. When a statement's decision read a
constant (`StatementFacts.literal_sensitive`: ``set_config('role', ...)``, ``'f'::regproc``,
a write to pg_settings) or it carries code (`embedded_code`: DO and routine bodies), or the
text does not parse (or is not UTF-8), the key covers the text's bytes verbatim and its Bind
parameters. The routines a statement calls (read by `pgguard.proxy.routines`) count by their
version (oid and xmin), so a routine replaced since the approval needs a new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pgguard.sql.classify import ROUTINE_BODY, StatementFacts
from pgguard.sql.parse import normalized_key

_VERSION = b"pgguard remember key v1"


def remember_key(
    sql: bytes,
    facts: Sequence[StatementFacts],
    categories: Sequence[str],
    rule_ids: Sequence[str],
    lexing: tuple[str, str],
    parameters: Sequence[bytes | None] | bytes | None = None,
) -> str:
    """The key of one held statement: ``rk1:`` and a SHA-256 over the parts above.

    `lexing`: (standard_conforming_strings, client_encoding) as the server reported them.
    `parameters`: the Bind parameters (or the raw message when they cannot be decoded)."""
    verbatim = not facts or any(f.literal_sensitive or f.embedded_code for f in facts)
    text = None if verbatim or lexing[1].upper() != "UTF8" else _utf8(sql)
    shape = None if text is None else normalized_key(text)
    digest = hashlib.sha256(_VERSION)
    for part in (
        "\x1f".join(sorted(categories)),
        "\x1f".join(sorted(rule_ids)),
        "\x1f".join(lexing),
        "shape" if shape is not None else "text",
    ):
        _feed(digest, part.encode())
    _feed(digest, shape.encode() if shape is not None else sql)  # the bytes the server reads
    if shape is None:
        for value in _parameters(parameters):
            _feed(digest, value)
    for item in facts:  # the routines the statement calls, each as the version judged
        if item.kind == ROUTINE_BODY:
            _feed(digest, item.text.encode())
    return f"rk1:{digest.hexdigest()}"


def _utf8(sql: bytes) -> str | None:
    try:
        return sql.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parameters(parameters: Sequence[bytes | None] | bytes | None) -> list[bytes]:
    if parameters is None:
        return [b"no parameters"]
    if isinstance(parameters, bytes):
        return [b"raw", parameters]
    return [b"\xff" if value is None else b"\x00" + value for value in parameters]


def _feed(digest: hashlib._Hash, data: bytes) -> None:
    """Length-prefixed, so no two different part lists hash alike."""
    digest.update(len(data).to_bytes(8, "big"))
    digest.update(data)
