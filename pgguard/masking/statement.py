"""Masked statement text, built from PostgreSQL's own scanner and parse tree.

Owns: `mask_sql` → `MaskedStatement`, and `mask_parameters` for Bind parameter values.

Invariants:
- The output is the input's token stream with every literal and every comment replaced; the
  tokens come from PostgreSQL's scanner (pglast), never from regexes over the text, so keywords,
  identifiers, operators, `$n` parameters and whitespace stay exactly as written.
- Placeholders keep the SQL parseable: strings become `'<label>'` (a plain string literal),
  numbers `0 /*<int>*/` or `0.0 /*<numeric>*/`, bit strings `B'' /*<bits>*/`, comments
  `/*<comment>*/`. Labels never contain a quote or `*/` (validated in the rules).
- Anything that cannot be scanned or parsed is redacted whole (`<unparseable statement: N
  bytes>`); `mask_sql` never raises and never returns a value from the input.
- SQL and PL/pgSQL bodies in dollar quotes (DO, CREATE FUNCTION) are masked token by token
  inside; bodies in other languages are replaced whole.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from pglast import parser as pg

from pgguard.masking.rules import MaskingRules, describe_value
from pgguard.masking.tree import Touches, TreeFacts, read_tree

log = logging.getLogger(__name__)

MAX_MASK_CHARS = 1024 * 1024
_STRING_TOKENS = frozenset({"SCONST", "USCONST"})
_NUMBER_TOKENS = frozenset({"ICONST", "FCONST"})
_BIT_TOKENS = {"BCONST": "B'' /*<bits>*/", "XCONST": "X'' /*<bytes>*/"}
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_CODE_LANGUAGES = frozenset({"sql", "plpgsql"})
_DOLLAR = re.compile(r"^(\$[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*\$|\$\$)")
_DIGITS = re.compile(r"^[0-9_]+$")


@dataclass(frozen=True, slots=True)
class MaskedStatement:
    """A statement as a reviewer may see it."""

    text: str
    touches: Touches
    masked_values: int
    complete: bool


def unparseable_placeholder(sql: str) -> str:
    return f"<unparseable statement: {len(sql.encode('utf-8', 'replace'))} bytes>"


def mask_sql(sql: str, rules: MaskingRules, *, lex_hazard: bool = False) -> MaskedStatement:
    """Mask every value in `sql`; never raises, never returns raw text it could not read.

    `lex_hazard`: the session lexes this text differently from PostgreSQL's defaults (e.g.
    `standard_conforming_strings = off` and a backslash in the text), so what the scanner here
    calls an identifier might be part of a string there: the whole text is redacted.
    """
    if lex_hazard:
        size = len(sql.encode("utf-8", "replace"))
        return MaskedStatement(
            f"<statement hidden: this session lexes it differently: {size} bytes>",
            Touches(),
            0,
            complete=False,
        )
    try:
        return _mask_statement(sql, rules)
    except Exception:  # masking must never fail open nor break the caller
        log.warning("could not mask statement (%d bytes); redacted whole", len(sql))
        return MaskedStatement(unparseable_placeholder(sql), Touches(), 0, complete=False)


def _mask_statement(sql: str, rules: MaskingRules) -> MaskedStatement:
    if len(sql) > MAX_MASK_CHARS or "\x00" in sql:
        return MaskedStatement(unparseable_placeholder(sql), Touches(), 0, complete=False)
    try:
        facts = read_tree(sql)
    except (pg.ParseError, ValueError, UnicodeError):
        return MaskedStatement(unparseable_placeholder(sql), Touches(), 0, complete=False)
    masker = _Masker(rules, facts)
    text = masker.mask(sql, with_tree=True)
    if text is None:
        return MaskedStatement(unparseable_placeholder(sql), Touches(), 0, complete=False)
    return MaskedStatement(text, facts.touches(), masker.count, masker.complete)


class _Masker:
    """Rewrites one text token by token; `count` and `complete` accumulate over bodies."""

    def __init__(self, rules: MaskingRules, facts: TreeFacts) -> None:
        self.rules = rules
        self.facts = facts
        self.count = 0
        self.complete = True

    def mask(self, text: str, *, with_tree: bool) -> str | None:
        try:
            tokens = pg.scan(text)
        except (pg.ParseError, ValueError, UnicodeError):
            return None
        offsets = _byte_offsets(text) if with_tree else None
        out: list[str] = []
        pos = 0
        previous: list[str] = []
        option_depth = 0
        skip_until = -1
        for index, token in enumerate(tokens):
            start, end = token.start, token.end + 1
            gap, pos = text[pos:start], end
            if index <= skip_until:
                continue
            out.append(_gap(gap))
            raw = text[start:end]
            name = token.name
            if name in _COMMENT_TOKENS:
                out.append("/*<comment>*/")
                continue
            # Every string inside OPTIONS (...) is a server, mapping or table option: hidden
            # as a connection detail whatever it looks like.
            if name == "ASCII_40" and (option_depth or _context_is(previous, "OPTIONS")):
                option_depth += 1
            elif name == "ASCII_41" and option_depth:
                option_depth -= 1
            context = previous[-1] if previous else ""
            if option_depth:
                context = "OPTIONS"
            location = offsets[start] if offsets is not None else None
            if name in _STRING_TOKENS:
                out.append(self._string(raw, context, location))
                if name == "USCONST":
                    skip_until = _uescape_end(tokens, index)
            elif name in _NUMBER_TOKENS:
                out.append(self._number(raw, name, location))
            elif name in _BIT_TOKENS:
                self.count += 1
                out.append(_BIT_TOKENS[name])
            else:
                out.append(raw)
            previous.append(name)
        out.append(_gap(text[pos:]))
        return "".join(out)

    def _string(self, raw: str, context: str, location: int | None) -> str:
        self.count += 1
        dollar = _DOLLAR.match(raw)
        value = raw[len(dollar.group()) : -len(dollar.group())] if dollar else _unquote(raw)
        if dollar and value in self.facts.bodies:
            return self._body(value, self.facts.bodies[value], dollar.group())
        if value in self.facts.bodies:
            self.complete = False
            return f"'<body:{len(value.encode())} bytes>'"
        if context == "PASSWORD":
            return "'<password>'"
        if context == "PROGRAM":
            return f"'<program:{len(value)} chars>'"
        if context in ("CONNECTION", "OPTIONS") or location in self.facts.connection_consts:
            return "'<connection string>'"
        column = self.facts.const_columns.get(location) if location is not None else None
        return f"'<{describe_value(value, self.rules, column)}>'"

    def _number(self, raw: str, name: str, location: int | None) -> str:
        self.count += 1
        column = self.facts.const_columns.get(location) if location is not None else None
        label = describe_value(raw, self.rules, column)
        if label.startswith("text:"):
            label = "int" if _DIGITS.match(raw) else "numeric"
        return f"{'0' if name == 'ICONST' else '0.0'} /*<{label}>*/"

    def _body(self, body: str, language: str, tag: str) -> str:
        size = len(body.encode())
        if language not in _CODE_LANGUAGES:
            self.complete = False
            return f"$$<{language or 'opaque'} body: {size} bytes>$$"
        inner = _Masker(self.rules, TreeFacts())
        masked = inner.mask(body, with_tree=False)
        self.count += inner.count - 1
        if masked is None:
            self.complete = False
            return f"$$<body: {size} bytes>$$"
        self.complete = self.complete and inner.complete
        serial = 0
        while tag in masked:
            serial += 1
            tag = f"$masked{serial}$"
        return f"{tag}{masked}{tag}"


def _context_is(previous: list[str], name: str) -> bool:
    return bool(previous) and previous[-1] == name


def _gap(text: str) -> str:
    """Text between tokens is whitespace; anything else is hidden (fail closed)."""
    return text if not text or text.isspace() else " /*<hidden>*/ "


def _uescape_end(tokens: list[pg.Token], index: int) -> int:
    """After a masked U&'' string, its `UESCAPE 'c'` clause must go too."""
    following = [i for i in range(index + 1, len(tokens)) if tokens[i].name not in _COMMENT_TOKENS]
    if len(following) >= 2 and tokens[following[0]].name == "UESCAPE":
        return following[1]
    return -1


def _unquote(raw: str) -> str:
    """An approximation of a string token's value, used only to choose a placeholder label."""
    body = raw
    if body[:1] in "EeNnBbXx" and body[1:2] == "'":
        body = body[1:]
    elif body[:3].upper() == "U&'":
        body = body[2:]
    if len(body) >= 2 and body[0] == "'" and body[-1] == "'":
        body = body[1:-1]
    return re.sub(r"'\s*\n\s*'", "", body).replace("''", "'")


def _byte_offsets(text: str) -> list[int]:
    """Character index → UTF-8 byte offset (the tree's locations are byte offsets)."""
    offsets = []
    total = 0
    for char in text:
        offsets.append(total)
        total += len(char.encode("utf-8", "surrogatepass"))
    offsets.append(total)
    return offsets


def mask_parameters(
    values: list[bytes | None], rules: MaskingRules, columns: list[str | None] | None = None
) -> list[str]:
    """Placeholders for Bind parameter values, e.g. `<email>`, `<text:5 chars>`, `NULL`.

    `columns[i]` is the column parameter i is compared with or assigned to, when known.
    """
    out = []
    for index, value in enumerate(values):
        column = columns[index] if columns is not None and index < len(columns) else None
        if value is None:
            out.append("NULL")
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            out.append(f"<binary:{len(value)} bytes>")
            continue
        label = describe_value(text, rules, column)
        if label.startswith("text:") and _DIGITS.match(text):
            label = "int"
        out.append(f"<{label}>")
    return out
