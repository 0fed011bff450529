"""pgguard's own names inside statements: the state schema and the notification channels.

Owns: `ProtectedNames` (the names, from settings), its text screens `may_name` and `mentions`,
and `state_references`, which finds every position of one parsed statement where PostgreSQL
would resolve one of the names. The policy engine denies such statements with a built-in rule
(`builtin.state-schema`) that no rule file can override. This is defence in depth: the real
guard is that the upstream role agents act as cannot reach the state database at all.

What names the state schema (compared case-insensitively, quoted or not, after PostgreSQL's
63-byte identifier truncation; a quoted "PGGUARD" is another schema to PostgreSQL, and refusing
it too costs nothing):
- an identifier used as a qualifier: any qualified name with the schema before its last part
  (tables, views, sequences, functions, procedures, types, operators, collations, ...:
  `pgguard.x`, `db.pgguard.x`), and a column reference `pgguard.t.c`;
- a field that names a schema (`schemaname`, `ALTER ... SET SCHEMA`, `IMPORT FOREIGN SCHEMA`
  remote or local, `CREATE EXTENSION ... SCHEMA`, `ALTER DEFAULT PRIVILEGES IN SCHEMA`,
  `FOR TABLES IN SCHEMA`), the object of a statement about a schema (CREATE/ALTER/DROP/COMMENT/
  SECURITY LABEL ON/GRANT ON SCHEMA, `... ON ALL TABLES IN SCHEMA`, `REINDEX SCHEMA`), and
  `CREATE SCHEMA AUTHORIZATION` a role of that name (the schema takes the role's name);
- any string constant, wherever it is (reg* casts, catalog functions such as `to_regclass`,
  `has_table_privilege`, `nextval`, `set_config`, search_path values, SQL passed as a string,
  foreign-table options) that is the schema name, uses it as a qualifier (`'pgguard.x'`,
  `'"pgguard" . x'`, also when a comment follows it) or lists it (`'public, pgguard'`);
  ordinary text that merely contains the word (`'pgguard denied it'`) does not count, but a
  host name such as `'pgguard.example.com'` does (it reads as a qualified name);
- `set_config('search_path', <anything but a constant>)` and an UPDATE of `pg_settings` with a
  value that is not a constant: the value cannot be read, and a search_path that includes the
  schema would let unqualified names reach it.

What names a channel: `LISTEN`/`UNLISTEN`/`NOTIFY` of it, and a string constant that contains it
as a word (`pg_notify('pgguard_approvals', ...)`).

Invariants:
- `may_name(text)` is False only if no statement in `text` can name a protected name in any of
  the positions above: names are ASCII and cannot be spelled in SQL without their letters in a
  row, except through escapes (`U&`, backslashes), string continuation across a newline (which
  the screen sees through by ignoring quotes and blanks) or comments inside a continuation; the
  screen says "maybe" whenever any of those appear, and whenever `set_config` or `pg_settings`
  does (search_path values that cannot be read).
- Bind parameters are not text: `SELECT nextval($1)` is judged without its value (a known
  limit of judging text; the README says so).
- Reasons name the protected name and the kind of position, never a literal value.
- Pure and iterative: no I/O, no recursion on the shape of the tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pgguard.sql.nodes import literal_text
from pgguard.sql.tree import UNWRAPPED_FIELD_TYPES, Fields, JsonValue, unwrap

DEFAULT_STATE_SCHEMA = "pgguard"
DEFAULT_CHANNELS = ("pgguard_approvals",)
_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer identifiers
_BLANKS = " \t\n\r\f\v"
_SQUEEZE = str.maketrans("", "", "'\"" + _BLANKS)
_SQUEEZE_BYTES = b"'\"" + _BLANKS.encode()
# Text through which a name can hide from a plain substring search (see the module docstring),
# and the two ways to set search_path to a value that is not a constant.
_HIDING = ("\\", "u&", "--", "/*", "set_config", "pg_settings")
# An enum value saying the node is about a schema: OBJECT_SCHEMA (DROP, COMMENT, GRANT, ALTER
# ... OWNER/RENAME, SECURITY LABEL, ALTER EXTENSION ADD), ACL_TARGET_ALL_IN_SCHEMA,
# REINDEX_OBJECT_SCHEMA, PUBLICATIONOBJ_TABLES_IN_SCHEMA; then these fields name schemas.
_SCHEMA_KIND = re.compile(r"[A-Z_]*SCHEMA[A-Z_]*")
_SCHEMA_OBJECT_FIELDS = ("object", "objects", "subname", "newname", "name")
_SCHEMA_OPTIONS = frozenset({"schema", "schemas"})
# Lists of plain names (columns, labels) rather than one qualified name.
_NAME_SET_FIELDS = frozenset(
    {
        "colnames",
        "colNames",
        "attlist",
        "keys",
        "including",
        "fk_attrs",
        "pk_attrs",
        "fk_del_set_cols",
        "aliascolnames",
        "aliases",
        "columns",
        "cols",
        "vals",
        "tokentype",
    }
)
_CHANNEL_STATEMENTS = frozenset({"ListenStmt", "UnlistenStmt", "NotifyStmt"})
_STRING_TOKENS = re.compile(
    r'(?P<quoted>"(?:[^"]|"")*"?)|(?P<word>[\w$]+)|(?P<blank>\s+)|(?P<comment>--|/\*)|(?P<other>.)',
    re.DOTALL,
)
_UNQUOTED_TOKENS = re.compile(
    r"(?P<word>[\w$]+)|(?P<blank>\s+)|(?P<comment>--|/\*)|(?P<other>.)", re.DOTALL
)

STATE_SCHEMA_REASON = "names pgguard's state schema {name} ({where})"
CHANNEL_REASON = "names pgguard's notification channel {name} ({where})"
SEARCH_PATH_REASON = "sets search_path to a value pgguard cannot read ({where})"


def fold(name: str) -> str:
    """A name as compared here: lower case, truncated as PostgreSQL truncates identifiers."""
    raw = name.lower().encode("utf-8")
    if len(raw) <= _MAX_IDENTIFIER_BYTES:
        return name.lower()
    return raw[:_MAX_IDENTIFIER_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class ProtectedNames:
    """The names pgguard keeps agents away from: its state schema and notification channels."""

    schema: str | None = DEFAULT_STATE_SCHEMA
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _screen: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _screen_bytes: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        schema = fold(self.schema) if self.schema is not None else None
        channels = tuple(fold(c) for c in self.channels)
        names = (*((schema,) if schema else ()), *channels)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "_names", names)
        # One C-level search per text: the hiding places and the names themselves.
        pattern = "|".join(re.escape(n) for n in (*_HIDING, *names))
        object.__setattr__(self, "_screen", re.compile(pattern))
        object.__setattr__(self, "_screen_bytes", re.compile(pattern.encode()))

    def __bool__(self) -> bool:
        return bool(self._names)

    @property
    def all_names(self) -> tuple[str, ...]:
        return self._names

    def may_name(self, text: str | bytes) -> bool:
        """False only when `text` certainly names none of the protected names (sound screen).

        On the classifier's hot path: one regular-expression search, a second one only when
        the text has quotes (a name split by string continuation: `'pg'<newline>'guard'`)."""
        if not self._names:
            return False
        if isinstance(text, bytes):
            lowered_bytes = text.lower()
            if self._screen_bytes.search(lowered_bytes) is not None:
                return True
            if b"'" not in lowered_bytes:
                return False
            squeezed_bytes = lowered_bytes.translate(None, _SQUEEZE_BYTES)
            return self._screen_bytes.search(squeezed_bytes) is not None
        lowered = text.lower()
        if self._screen.search(lowered) is not None:
            return True
        if "'" not in lowered:
            return False
        return self._screen.search(lowered.translate(_SQUEEZE)) is not None

    def mentions(self, text: str | bytes) -> bool:
        """Whether text that could not be parsed spells a protected name (best effort)."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")  # names are ASCII; any byte maps to one character
        squeezed = text.lower().translate(_SQUEEZE)
        return any(n in squeezed for n in self._names)

    def is_schema(self, name: str) -> bool:
        return self.schema is not None and fold(name) == self.schema

    def is_channel(self, name: str) -> bool:
        return fold(name) in self.channels


NO_PROTECTED_NAMES = ProtectedNames(schema=None, channels=())


def state_references(kind: str, node: Fields, names: ProtectedNames) -> tuple[str, ...]:
    """Why the statement (`kind`, `node`) names a protected name; empty when it does not."""
    found: dict[str, None] = {}
    stack: list[tuple[str, Fields]] = [(kind, node)]
    while stack:
        node_type, fields = stack.pop()
        _check_node(node_type, fields, names, found)
        for key, value in fields.items():
            if type(value) is dict:
                stack.append(_child(key, value))
            elif type(value) is list:
                svals = _string_list(value)
                if svals is not None:
                    _check_name_list(node_type, key, svals, names, found)
                    continue
                for item in value:
                    if type(item) is dict:
                        stack.append(_child(key, item))
                    elif type(item) is list:
                        stack.append(("List", {"items": item}))
    return tuple(found)


def _child(key: str, value: Fields) -> tuple[str, Fields]:
    wrapped = unwrap(value)
    if wrapped is not None:
        return wrapped
    node_type = UNWRAPPED_FIELD_TYPES.get(key) or ("RangeVar" if "relname" in value else "")
    return node_type, value


def _string_list(items: list[JsonValue]) -> list[str] | None:
    """The svals of a non-empty list made only of String nodes (a name), else None."""
    out: list[str] = []
    for item in items:
        wrapped = unwrap(item)
        if wrapped is None or wrapped[0] != "String":
            return None
        sval = wrapped[1].get("sval")
        if not isinstance(sval, str):
            return None
        out.append(sval)
    return out or None


def _check_name_list(
    node_type: str, key: str, svals: list[str], names: ProtectedNames, found: dict[str, None]
) -> None:
    if key in _NAME_SET_FIELDS or node_type == "ColumnRef":
        return  # column lists name no schema; column references are read by _on_column_ref
    if any(names.is_schema(q) for q in svals[:-1]):
        _schema(found, names, "qualified name")


def _check_node(
    node_type: str, fields: Fields, names: ProtectedNames, found: dict[str, None]
) -> None:
    for key, value in fields.items():
        if type(value) is not str:
            continue
        if "schema" in key.lower() and names.is_schema(value):
            _schema(found, names, "qualified name" if key == "schemaname" else key)
        elif (
            key == "conditionname" and node_type in _CHANNEL_STATEMENTS and names.is_channel(value)
        ):
            _channel(found, names, value, node_type.removesuffix("Stmt").upper())
    checker = _NODE_CHECKS.get(node_type)
    if checker is not None:
        checker(fields, names, found)
    if any(type(v) is str and _SCHEMA_KIND.fullmatch(v) for v in fields.values()):
        for field in _SCHEMA_OBJECT_FIELDS:
            if any(names.is_schema(s) for s in _strings(fields.get(field))):
                _schema(found, names, "statement about the schema")


def _strings(value: JsonValue | None) -> list[str]:
    """Every String sval (or plain string) in a value, through List nodes and lists."""
    out: list[str] = []
    stack: list[JsonValue | None] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            stack.extend(item)
        else:
            wrapped = unwrap(item)
            if wrapped is None:
                continue
            node_type, fields = wrapped
            if node_type == "String":
                stack.append(fields.get("sval"))
            elif node_type == "List":
                stack.append(fields.get("items"))
    return out


def _on_const(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    inner = fields.get("sval")
    if isinstance(inner, dict):
        value = inner.get("sval")
        if isinstance(value, str):
            _check_string(value, names, found, "string constant")


def _on_column_ref(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    parts = fields.get("fields")
    parts = parts if isinstance(parts, list) else []
    # `a.b` is table.column or column.field, `a.*` a table's columns: only `s.t.c` and
    # `s.t.*` (or `db.s.t.c`) have a schema, before the last two parts.
    for part in parts[:-2]:
        if any(names.is_schema(s) for s in _strings(part)):
            _schema(found, names, "column reference")


def _on_def_elem(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    values = _strings(fields.get("arg"))
    if fields.get("defname") in _SCHEMA_OPTIONS and any(names.is_schema(v) for v in values):
        _schema(found, names, "schema option")
    for value in values:  # option values, function bodies, foreign-table options
        _check_string(value, names, found, "option value")


def _on_create_schema(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    role = fields.get("authrole")
    rolename = role.get("rolename") if isinstance(role, dict) else None
    named_after_role = fields.get("schemaname") is None and isinstance(rolename, str)
    if named_after_role and names.is_schema(str(rolename)):
        _schema(found, names, "CREATE SCHEMA AUTHORIZATION takes the role's name")


def _on_func_call(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    raw_name = fields.get("funcname")
    funcname = _string_list(raw_name) if isinstance(raw_name, list) else None
    if not funcname or funcname[-1].lower() != "set_config" or not names.schema:
        return
    args = fields.get("args")
    args = args if isinstance(args, list) else []
    setting = literal_text(args[0]) if args else None
    value = args[1] if len(args) > 1 else None
    if setting is not None and setting.strip().lower() != "search_path":
        return
    if value is None or literal_text(value) is None:
        found[SEARCH_PATH_REASON.format(where="set_config")] = None


def _on_update(fields: Fields, names: ProtectedNames, found: dict[str, None]) -> None:
    relation = fields.get("relation")
    relname = relation.get("relname") if isinstance(relation, dict) else None
    if not names.schema or not isinstance(relname, str) or relname.lower() != "pg_settings":
        return
    targets = fields.get("targetList")
    for target in targets if isinstance(targets, list) else []:
        wrapped = unwrap(target)
        val = wrapped[1].get("val") if wrapped is not None else None
        if literal_text(val) is None:
            found[SEARCH_PATH_REASON.format(where="UPDATE pg_settings")] = None


_NODE_CHECKS = {
    "A_Const": _on_const,
    "ColumnRef": _on_column_ref,
    "DefElem": _on_def_elem,
    "CreateSchemaStmt": _on_create_schema,
    "FuncCall": _on_func_call,
    "UpdateStmt": _on_update,
}


def _check_string(value: str, names: ProtectedNames, found: dict[str, None], where: str) -> None:
    """A string constant PostgreSQL may read as a name (reg* input, search_path, SQL text)."""
    lowered = value.lower()
    if not any(n in lowered for n in names.all_names):
        return  # also the fast exit for every ordinary string
    # Read once with "..." as quoted identifiers (SQL, reg* input, search_path) and once with
    # double quotes as plain characters (code in other languages: plpy.execute("... pgguard.x")).
    for tokens in (_significant_tokens(value, True), _significant_tokens(value, False)):
        _check_tokens(tokens, names, found, where)


def _check_tokens(
    tokens: list[tuple[str, str]], names: ProtectedNames, found: dict[str, None], where: str
) -> None:
    for index, (kind, text) in enumerate(tokens):
        if kind not in {"quoted", "word"}:
            continue
        if names.is_channel(text):
            _channel(found, names, text, where)
        if not names.is_schema(text):
            continue
        before = tokens[index - 1][1] if index else None
        after = tokens[index + 1] if index + 1 < len(tokens) else None
        qualifies = after is not None and (after[1] == "." or after[0] == "comment")
        listed = before in {None, ","} and (after is None or after[1] == ",")
        if qualifies or listed:
            _schema(found, names, where)


def _significant_tokens(value: str, quotes: bool) -> list[tuple[str, str]]:
    """Identifier-like tokens and punctuation of a string, blanks dropped, quotes undone."""
    out: list[tuple[str, str]] = []
    for match in (_STRING_TOKENS if quotes else _UNQUOTED_TOKENS).finditer(value):
        kind = match.lastgroup or "other"
        if kind == "blank":
            continue
        text = match.group()
        if kind == "quoted":
            text = text[1:-1].replace('""', '"') if text.endswith('"') else text[1:]
        out.append((kind, text))
    return out


def _schema(found: dict[str, None], names: ProtectedNames, where: str) -> None:
    found[STATE_SCHEMA_REASON.format(name=names.schema, where=where)] = None


def _channel(found: dict[str, None], names: ProtectedNames, name: str, where: str) -> None:
    found[CHANNEL_REASON.format(name=fold(name), where=where)] = None
