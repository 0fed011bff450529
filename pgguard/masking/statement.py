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
- Code is shown, data is masked (rules/masking/README.md): SQL and PL/pgSQL bodies (DO, CREATE
  FUNCTION/PROCEDURE) are shown with their own literals masked, recursively; an `EXECUTE` string
  in PL/pgSQL is parsed as SQL and masked the same way, or shown whole and flagged
  `/*not parsed*/` when it does not parse; a `COPY ... PROGRAM` command, a COPY or LOAD file
  name and the path arguments of server-file and large-object functions are shown whole (words
  a value detector recognises and URL/conninfo passwords still masked); a connection string is
  shown with its password masked. Bodies in other languages are replaced whole. A quoted
  identifier in which a value detector finds something (an e-mail as an alias) is masked too.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from pglast import parser as pg

from pgguard.masking.rules import MaskingRules, describe_value, finds_connection_strings
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
# Server-file, large-object and adminpack functions -> the argument positions that name a file.
_PATH_ARGUMENTS: dict[str, frozenset[int]] = {
    "lo_import": frozenset({0}),
    "lo_export": frozenset({1}),
    "pg_read_file": frozenset({0}),
    "pg_read_binary_file": frozenset({0}),
    "pg_stat_file": frozenset({0}),
    "pg_ls_dir": frozenset({0}),
    "pg_file_write": frozenset({0}),
    "pg_file_rename": frozenset({0, 1, 2}),
    "pg_file_unlink": frozenset({0}),
    "pg_file_sync": frozenset({0}),
}
_CONNECTION_ARGUMENTS = frozenset(
    {"dblink", "dblink_connect", "dblink_connect_u", "dblink_exec", "dblink_send_query"}
)
_NAMED_CONNECTS = frozenset({"dblink_connect", "dblink_connect_u"})
_CONNINFO = re.compile(r"\s*([A-Za-z_]+\s*=|[A-Za-z][A-Za-z0-9+.-]*://)")
_CONNECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@\s/]*@")
_CONNINFO_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
# dblink-style functions whose second argument is SQL run on the remote server.
_REMOTE_SQL_ARGUMENTS = frozenset({"dblink", "dblink_exec", "dblink_send_query"})
_EXECUTE_ENDS = frozenset({"USING", "INTO", "ASCII_59"})
# Tokens after which a new statement starts (SQL, and PL/pgSQL blocks and branches).
_STATEMENT_STARTS = frozenset({"ASCII_59", "BEGIN_P", "THEN", "ELSE", "LOOP"})


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

    def __init__(self, rules: MaskingRules, facts: TreeFacts, depth: int = 0) -> None:
        self.rules = rules
        self.facts = facts
        self.depth = depth
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
        calls: list[_Call] = []
        execute_at: int | None = None
        head = ""
        last_word = ""
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
            if name == "ASCII_40":
                calls.append(_Call(_function_name(previous, tokens, index, text)))
            elif name == "ASCII_41" and calls:
                calls.pop()
            elif name == "ASCII_44" and calls:
                calls[-1].argument += 1
            if not previous or previous[-1] in _STATEMENT_STARTS or last_word == "loop":
                head = name  # the first token of a (PL/pgSQL or SQL) statement
            if name == "EXECUTE" and head == "EXECUTE":
                execute_at = len(calls)
            elif name in _EXECUTE_ENDS:
                execute_at = None
            context = "OPTIONS" if option_depth else _context(previous, calls, execute_at)
            if context == "PROGRAM" and head != "COPY":
                context = ""  # `SELECT program '...'` is a typed literal: data
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
            elif name == "IDENT" and raw.startswith('"'):
                out.append(self._quoted_identifier(raw))
            else:
                out.append(raw)
            previous.append(name)
            last_word = raw.lower() if name == "IDENT" else ""
        out.append(_gap(text[pos:]))
        return "".join(out)

    def _string(self, raw: str, context: str, location: int | None) -> str:
        dollar = _DOLLAR.match(raw)
        value = raw[len(dollar.group()) : -len(dollar.group())] if dollar else _unquote(raw)
        if value in self.facts.bodies:
            exact = value if dollar else _exact_value(raw)
            if exact is not None:
                return self._body(exact, self.facts.bodies[value], dollar.group() if dollar else "")
            self.count += 1
            self.complete = False
            return f"'<body:{len(value.encode())} bytes>'"
        if context == "PASSWORD":
            self.count += 1
            return "'<password>'"
        if context in ("PROGRAM", "PATH", "DYNAMIC_SQL", "CONNECTION") or (
            context in ("TO", "FROM", "LOAD") and value in self.facts.code_values
        ):
            shown = self._code(raw, dollar.group() if dollar else "", context)
            if shown is not None:
                return shown
        self.count += 1
        if context in ("CONNECTION", "OPTIONS") or location in self.facts.connection_consts:
            return "'<connection string>'"
        column = self.facts.const_columns.get(location) if location is not None else None
        return f"'<{describe_value(value, self.rules, column)}>'"

    def _code(self, raw: str, tag: str, context: str) -> str | None:
        """A literal that is code or names a target, as the reviewer sees it; None: mask it."""
        value = raw[len(tag) : -len(tag)] if tag else _exact_value(raw)
        if value is None:
            return None
        if context == "DYNAMIC_SQL":
            parsed = self._dynamic_sql(value, tag)
            if parsed is not None:
                return parsed
            shown = _mask_words(value, self.rules)
            self.count += shown != value
            return f"{_quote(shown, tag)} /*not parsed*/"
        if context == "CONNECTION":
            if not _CONNINFO.match(value):
                # dblink('SELECT ...') (the unnamed connection) or a connection's name
                if _CONNECTION_NAME.fullmatch(value):
                    return _quote(value, tag)
                return self._dynamic_sql(value, tag)
            value = _CONNINFO_PASSWORD.sub(r"\1<password>", value)
        shown = _mask_words(value, self.rules)
        if shown != value:
            self.count += 1
        return _quote(shown, tag)

    def _dynamic_sql(self, value: str, tag: str) -> str | None:
        """An EXECUTE string that parses as SQL, masked like a statement; None when it won't."""
        if self.depth >= _MAX_DEPTH:
            return None
        try:
            facts = read_tree(value)
        except (pg.ParseError, ValueError, UnicodeError):
            return None
        inner = _Masker(self.rules, facts, self.depth + 1)
        masked = inner.mask(value, with_tree=True)
        if masked is None:
            return None
        self.count += inner.count
        self.complete = self.complete and inner.complete
        return _quote(masked, tag)

    def _quoted_identifier(self, raw: str) -> str:
        """A quoted identifier that a value detector recognises (an e-mail used as an alias)
        is a value in disguise: it becomes `"<label>"`."""
        masked = _mask_words(raw[1:-1].replace('""', '"'), self.rules)
        if masked == raw[1:-1].replace('""', '"'):
            return raw
        self.count += 1
        return '"' + masked.replace('"', '""') + '"'

    def _number(self, raw: str, name: str, location: int | None) -> str:
        self.count += 1
        column = self.facts.const_columns.get(location) if location is not None else None
        label = describe_value(raw, self.rules, column)
        if label.startswith("text:"):
            label = "int" if _DIGITS.match(raw) else "numeric"
        return f"{'0' if name == 'ICONST' else '0.0'} /*<{label}>*/"

    def _body(self, body: str, language: str, tag: str) -> str:
        size = len(body.encode())
        if language not in _CODE_LANGUAGES or self.depth >= _MAX_DEPTH:
            self.count += 1
            self.complete = False
            return f"$$<{language or 'opaque'} body: {size} bytes>$$"
        facts = TreeFacts()
        try:
            facts = read_tree(body) if language == "sql" else _plpgsql_facts(body)
        except (pg.ParseError, ValueError, UnicodeError, RecursionError):
            facts = TreeFacts()
        inner = _Masker(self.rules, facts, self.depth + 1)
        masked = inner.mask(body, with_tree=language == "sql")
        if masked is None:
            self.count += 1
            self.complete = False
            return f"$$<body: {size} bytes>$$"
        self.count += inner.count
        self.complete = self.complete and inner.complete
        return _quote(masked, tag)


_MAX_DEPTH = 8


def _plpgsql_facts(body: str) -> TreeFacts:
    """What the SQL statements embedded in a PL/pgSQL body name as targets (COPY and LOAD
    files): PL/pgSQL's own parser finds them; locations are not mapped back (values stay data).
    """
    tag = "$pgguard_body$"
    if tag in body:
        return TreeFacts()
    tree = json.loads(
        pg.parse_plpgsql_json(
            f"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
        )
    )
    facts = TreeFacts()
    for query in _queries(tree):
        try:
            facts.code_values |= read_tree(query).code_values
        except (pg.ParseError, ValueError, UnicodeError):
            continue
    return facts


def _queries(value: object) -> list[str]:
    if isinstance(value, list):
        return [q for item in value for q in _queries(item)]
    if not isinstance(value, dict):
        return []
    found = [value["query"]] if isinstance(value.get("query"), str) else []
    return found + [q for child in value.values() for q in _queries(child)]


@dataclass(slots=True)
class _Call:
    """An open parenthesis: the function it calls (lower-case, "" if none) and the argument."""

    name: str
    argument: int = 0


def _context(previous: list[str], calls: list[_Call], execute_at: int | None) -> str:
    """What the next literal is: PATH, CONNECTION, DYNAMIC_SQL (code), else the previous token
    (a literal after a bare EXECUTE token that starts no PL/pgSQL statement is data)."""
    call = calls[-1] if calls else None
    if call is not None and call.argument in _PATH_ARGUMENTS.get(call.name, ()):
        return "PATH"
    if call is not None and call.name in _CONNECTION_ARGUMENTS and call.argument == 0:
        return "CONNECTION"
    if call is not None and call.name in _NAMED_CONNECTS and call.argument == 1:
        return "CONNECTION"  # dblink_connect('name', 'conninfo')
    if call is not None and call.name in _REMOTE_SQL_ARGUMENTS and call.argument == 1:
        return "DYNAMIC_SQL"
    if execute_at is not None and execute_at == len(calls):
        return "DYNAMIC_SQL"
    return previous[-1] if previous else ""


def _function_name(previous: list[str], tokens: list[pg.Token], index: int, text: str) -> str:
    if not previous or index == 0:
        return ""
    token = tokens[index - 1]
    if token.name in _COMMENT_TOKENS or token.name.startswith("ASCII_"):
        return ""
    return text[token.start : token.end + 1].strip('"').lower()


def _quote(text: str, tag: str) -> str:
    """`text` as a string literal: dollar-quoted with a tag it does not contain, or '...'."""
    if not tag:
        return "'" + text.replace("'", "''") + "'"
    serial = 0
    while tag in text:
        serial += 1
        tag = f"$masked{serial}$"
    return f"{tag}{text}{tag}"


def _mask_words(text: str, rules: MaskingRules) -> str:
    """Code shown whole (a shell command, a path): words a value detector recognises, and
    passwords in URLs, are still masked."""
    text = _URL_PASSWORD.sub(r"\1<password>@", text)
    text = _CONNINFO_PASSWORD.sub(r"\1<password>", text)
    return re.sub(r"[^\s'\"]+", lambda m: _word(m.group(), rules), text)


def _word(word: str, rules: MaskingRules) -> str:
    for rule in rules.value_rules:
        if finds_connection_strings(rule):
            continue  # its passwords are masked above; the rest of it is a target
        try:
            found = rule.find(word)
        except (ValueError, RecursionError):
            return "<hidden>"
        if found is not None:
            return f"<{rule.label}>"
    return word


def _exact_value(raw: str) -> str | None:
    """The exact value of one string token, read by PostgreSQL's parser; None if unreadable."""
    if raw[:2].upper() == "U&":
        return None  # its UESCAPE clause is a separate token
    try:
        tree = json.loads(pg.parse_sql_json(f"SELECT {raw}"))
        target = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"][0]["ResTarget"]
        value = target["val"]["A_Const"]["sval"]["sval"]
    except (pg.ParseError, ValueError, KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, str) else None


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
