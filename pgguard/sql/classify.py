"""Statement facts: what PostgreSQL would do when executing one parsed statement.

Owns: `StatementFacts` and `classify_text` / `classify_statement`, which walk every node of the
parse tree (CTEs, subqueries, function arguments at any depth, EXPLAIN targets, PREPARE bodies,
rule actions, DO and function bodies) and collect categories with reviewer-facing reasons, the
functions called, the relations touched and the session effects (PREPARE/EXECUTE/DEALLOCATE).

Invariants:
- Categories only come from PostgreSQL's reading (the pglast tree); sqlglot is never consulted.
- The walk is iterative (`tree.iter_nodes`): nesting depth cannot crash it.
- Reasons never contain literal values from the statement: only kinds, identifiers and names
  taken from the catalog.
- `literal_sensitive` is set whenever a constant's (or a parameter's) value or form was read to
  decide anything; such statements must never share a cache entry across different constants.
- `state_refs` says where a statement (or code inside it) names pgguard's own state schema or
  channels (`statenames`, with the catalog's protected names); the engine denies those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgguard.sql import embedded
from pgguard.sql.catalog import (
    FUNCTION_NAME_FUNCTIONS,
    FUNCTION_NAME_TYPES,
    LEXING_SETTINGS,
    SET_CONFIG_FUNCTIONS,
    Catalog,
)
from pgguard.sql.kinds import (
    ADMIN,
    DDL,
    EXECUTE,
    EXPORT,
    PRIVILEGE,
    UNPARSEABLE,
    categories_of_kind,
)
from pgguard.sql.lexstate import encoding_is_ascii_unsafe
from pgguard.sql.nodes import function_name_from_literal, literal_text, names_of
from pgguard.sql.parse import ParsedStatement, parse_statements
from pgguard.sql.statenames import state_references
from pgguard.sql.syswrites import system_write
from pgguard.sql.tree import Fields, JsonValue, iter_nodes

# Kinds whose verdict can be shared between texts that differ only in constants.
CACHEABLE_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_PLAIN_SETTING = re.compile(r"[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?")
_SAFE_ON = frozenset({"on", "true", "yes", "1"})
_SAFE_BACKSLASH_QUOTE = frozenset({"safe_encoding", "off", "false", "no", "0"})


@dataclass(frozen=True, slots=True)
class StatementFacts:
    """Everything the policy layer needs to know about one statement."""

    kind: str
    text: str
    categories: tuple[str, ...]
    reasons: tuple[str, ...]
    kinds: tuple[str, ...]
    functions: tuple[str, ...]
    relations: tuple[str, ...]
    flagged_functions: tuple[str, ...] = ()
    literal_sensitive: bool = False
    embedded_code: bool = False
    changes_lexing: bool = False
    prepares: str | None = None
    executes: tuple[str, ...] = ()
    deallocates: tuple[str, ...] = ()
    state_refs: tuple[str, ...] = ()  # where pgguard's state schema or channels are named
    undoes_settings: bool = False  # ends a transaction or subtransaction (reverting its SETs)

    @property
    def touches_session(self) -> bool:
        """True when the facts read or change the session's prepared statements (PREPARE,
        EXECUTE, DEALLOCATE): a decision on them holds only for the session state it saw."""
        return bool(self.executes or self.deallocates) or self.prepares is not None

    @property
    def cacheable(self) -> bool:
        """True when texts differing only in constants are guaranteed the same facts."""
        return (
            not self.literal_sensitive
            and not self.state_refs
            and not self.embedded_code
            and not self.touches_session
            and all(kind in CACHEABLE_KINDS for kind in self.kinds)
        )


def unparseable_facts(reason: str, text: str = "") -> StatementFacts:
    """The fail-closed verdict for text that could not be fully read."""
    return StatementFacts(
        kind=UNPARSEABLE,
        text=text,
        categories=(UNPARSEABLE,),
        reasons=(reason,),
        kinds=(UNPARSEABLE,),
        functions=(),
        relations=(),
        literal_sensitive=True,
    )


def classify_text(text: str, catalog: Catalog, depth: int = 0) -> tuple[StatementFacts, ...]:
    """Parse and classify every statement of `text`; raises parse.ParseFailure."""
    return tuple(classify_statement(stmt, catalog, depth) for stmt in parse_statements(text))


def classify_statement(stmt: ParsedStatement, catalog: Catalog, depth: int = 0) -> StatementFacts:
    """Walk one statement's whole tree and collect its facts."""
    walk = _Walk(catalog, depth, stmt.text)
    for node_type, fields in iter_nodes(stmt.kind, stmt.node):
        if node_type.endswith("Stmt"):
            walk.kinds[node_type] = None
            cats, why = categories_of_kind(node_type)
            walk.add(cats, why)
        handler = _HANDLERS.get(node_type)
        if handler is not None:
            handler(walk, fields)
    if stmt.kind == "PrepareStmt":
        name = stmt.node.get("name")
        walk.prepares = name if isinstance(name, str) else ""
    if DDL in walk.categories:
        walk.note_catalog_names_in_definition()
    protected = catalog.protected
    if protected and protected.may_name(stmt.text):
        for reason in state_references(stmt.kind, stmt.node, protected):
            walk.state_refs[reason] = None
    return StatementFacts(
        kind=stmt.kind,
        text=stmt.text,
        categories=tuple(walk.categories),
        reasons=tuple(walk.reasons),
        kinds=tuple(walk.kinds),
        functions=tuple(sorted(walk.functions)),
        relations=tuple(sorted(walk.relations)),
        flagged_functions=tuple(sorted(walk.flagged_functions)),
        literal_sensitive=walk.literal_sensitive,
        embedded_code=walk.embedded_code,
        changes_lexing=walk.changes_lexing,
        prepares=walk.prepares,
        executes=tuple(walk.executes),
        deallocates=tuple(walk.deallocates),
        state_refs=tuple(walk.state_refs),
        undoes_settings=walk.undoes_settings,
    )


ROUTINE_BODY = "RoutineBody"


def classify_routine_body(
    language: str, definition: str | None, body: str | None, config: list[str], catalog: Catalog
) -> StatementFacts:
    """What calling an existing routine does, from its catalog entry (``pg_proc``).

    `definition` is ``pg_get_functiondef`` (PL/pgSQL is parsed from it), `body` is ``prosrc``
    (SQL bodies), `config` is ``proconfig`` (``name=value`` settings applied during the call).
    Bodies in other languages, SQL-standard (BEGIN ATOMIC) bodies and unreadable definitions
    are `execute`; dynamic SQL is `execute` as it is in DO blocks."""
    walk = _Walk(catalog, 0, definition or "")
    where = "routine body"
    if language == "plpgsql" and definition:
        walk.analyse_plpgsql(where)
    elif language == "sql" and body and body.strip():
        walk.absorb_sql(body, where)
    else:
        walk.add((EXECUTE,), f"{where} in language {language or 'unknown'} is opaque to pgguard")
    for item in config:
        name, _, value = item.partition("=")
        walk.check_setting(name, "routine setting", {"A_Const": {"sval": {"sval": value}}}, False)
    return StatementFacts(
        kind=ROUTINE_BODY,
        text="",
        categories=tuple(walk.categories),
        reasons=tuple(walk.reasons),
        kinds=tuple(walk.kinds),
        functions=tuple(sorted(walk.functions)),
        relations=tuple(sorted(walk.relations)),
        flagged_functions=tuple(sorted(walk.flagged_functions)),
        literal_sensitive=True,
        embedded_code=True,
        changes_lexing=walk.changes_lexing,
        state_refs=tuple(walk.state_refs),
    )


class _Walk(embedded.Collector):
    """Accumulates facts while the tree is walked."""

    def __init__(self, catalog: Catalog, depth: int, text: str) -> None:
        super().__init__(catalog, depth, text, classify_text)
        self.identifiers: set[str] = set()
        self.prepares: str | None = None
        self.deallocates: list[str] = []
        self.undoes_settings = False

    def note_catalog_names_in_definition(self) -> None:
        """A definition (operator, cast, trigger, aggregate, ...) that names a catalog function
        will run it later, when the object is used: show that to the reviewer now."""
        for name in sorted(self.identifiers):
            entry = self.catalog.function(name)
            if entry is not None:
                self.add(entry[0], f"definition refers to {name}: {entry[1]}")

    def check_setting(self, name: str, how: str, value: JsonValue | None, resets: bool) -> bool:
        """Add what changing setting `name` means; True when that is privileged."""
        flagged = False
        entry = self.catalog.setting(name)
        if entry is not None and entry[0]:
            self.add(entry[0], f"{how} {name.lower()}: {entry[1]}")
            flagged = True
        if name.lower() in LEXING_SETTINGS:
            self.literal_sensitive = True
            self.changes_lexing = True
            if resets or not _lexing_value_is_safe(name.lower(), value):
                self.add((ADMIN,), f"{how} {name.lower()} changes how later statements are lexed")
                flagged = True
        return flagged


def _lexing_value_is_safe(name: str, value: JsonValue | None) -> bool:
    literal = literal_text(value)
    if literal is None:
        return False
    if name == "standard_conforming_strings":
        return literal.lower() in _SAFE_ON
    if name == "backslash_quote":  # only "on" lets \' end a string in an unsafe encoding
        return literal.lower() in _SAFE_BACKSLASH_QUOTE
    return not encoding_is_ascii_unsafe(literal)


def _on_func_call(walk: _Walk, fields: Fields) -> None:
    names = names_of(fields.get("funcname"))
    if not names:
        return
    name = names[-1]
    walk.functions.add(name)
    entry = walk.catalog.function(name)
    if entry is None and len(names) >= 2:
        # Catalog entries such as 'cron.schedule' match only the schema-qualified call.
        entry = walk.catalog.function(f"{names[-2]}.{name}")
    if entry is not None:
        walk.flagged_functions.add(name)
        walk.add(entry[0], f"calls {name}: {entry[1]}")
    args = fields.get("args")
    first = args[0] if isinstance(args, list) and args else None
    if name in SET_CONFIG_FUNCTIONS:
        _on_set_config(walk, first, args[1] if isinstance(args, list) and len(args) > 1 else None)
    elif name in FUNCTION_NAME_FUNCTIONS:
        _on_function_name(walk, first, name)


def _on_set_config(walk: _Walk, name_node: JsonValue | None, value: JsonValue | None) -> None:
    if _set_setting(walk, literal_text(name_node), value, "set_config"):
        walk.flagged_functions.add("set_config")


def _set_setting(walk: _Walk, setting: str | None, value: JsonValue | None, how: str) -> bool:
    """Judge a ``set_config`` (or what amounts to one); True when that is privileged. A name
    not read from a constant may be a lexing setting: what follows is read as pending."""
    walk.literal_sensitive = True
    if setting is None:
        walk.add((PRIVILEGE,), f"{how} with a setting name computed at run time")
        walk.changes_lexing = True
        return True
    if not _PLAIN_SETTING.fullmatch(setting.lower()):
        walk.add((PRIVILEGE,), f"{how} with an unusual setting name")
        walk.changes_lexing = True
        return True
    return walk.check_setting(setting, f"{how} of", value, resets=False)


def _on_write(walk: _Walk, fields: Fields) -> None:
    target = system_write(fields)
    if target is None:
        return
    if target.settings:  # its rewrite rule calls set_config(name, setting, false)
        _set_setting(walk, target.setting, target.value, "a write to pg_settings")
    else:
        walk.add((ADMIN,), f"writes the system relation {target.relation}")


def _on_function_name(walk: _Walk, node: JsonValue | None, via: str) -> None:
    literal = literal_text(node)
    walk.literal_sensitive = True
    if literal is None:
        return
    name = function_name_from_literal(literal)
    entry = walk.catalog.function(name)
    if entry is not None:
        walk.flagged_functions.add(name)
        walk.add(entry[0], f"{via} names {name}: {entry[1]}")


def _on_type_cast(walk: _Walk, fields: Fields) -> None:
    type_name = fields.get("typeName")
    names = names_of(type_name.get("names")) if isinstance(type_name, dict) else []
    if names and names[-1] in FUNCTION_NAME_TYPES:
        _on_function_name(walk, fields.get("arg"), f"cast to {names[-1]}")


def _on_range_var(walk: _Walk, fields: Fields) -> None:
    relname = fields.get("relname")
    schema = fields.get("schemaname")
    if isinstance(relname, str):
        walk.relations.add(f"{schema}.{relname}" if isinstance(schema, str) else relname)


def _on_copy(walk: _Walk, fields: Fields) -> None:
    program = bool(fields.get("is_program"))
    server_file = isinstance(fields.get("filename"), str) and not program
    if not fields.get("is_from"):
        walk.add((EXPORT,), "COPY ... TO sends data out of the database")
        if program:
            walk.add((EXECUTE,), "COPY ... TO PROGRAM runs a command on the database server")
        elif server_file:
            walk.add((EXPORT,), "COPY ... TO a file writes a file on the database server")
    elif program:
        walk.add((EXECUTE,), "COPY ... FROM PROGRAM runs a command on the database server")
    elif server_file:
        walk.add((EXECUTE,), "COPY ... FROM a file reads a file on the database server")


def _on_variable_set(walk: _Walk, fields: Fields) -> None:
    kind = fields.get("kind")
    name = fields.get("name")
    if kind == "VAR_RESET_ALL":
        walk.changes_lexing = True  # may reset client_encoding / standard_conforming_strings
        return
    if kind == "VAR_SET_MULTI" or not isinstance(name, str):
        return
    args = fields.get("args")
    value = args[0] if isinstance(args, list) and args else None
    resets = kind in {"VAR_RESET", "VAR_SET_DEFAULT"}
    walk.check_setting(name, "RESET" if kind == "VAR_RESET" else "SET", value, resets=resets)


def _on_alter_table_cmd(walk: _Walk, fields: Fields) -> None:
    subtype = fields.get("subtype")
    if subtype == "AT_ChangeOwner":
        walk.add((PRIVILEGE,), "ALTER ... OWNER TO changes ownership")
    elif subtype in {
        "AT_EnableRowSecurity",
        "AT_DisableRowSecurity",
        "AT_ForceRowSecurity",
        "AT_NoForceRowSecurity",
    }:
        walk.add((PRIVILEGE,), "ALTER TABLE switches row-level security")


_DROPPED_RELATIONS = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_FOREIGN_TABLE",
        "OBJECT_SEQUENCE",
        "OBJECT_INDEX",
    }
)


def _on_drop(walk: _Walk, fields: Fields) -> None:
    remove_type = fields.get("removeType")
    if remove_type == "OBJECT_POLICY":
        walk.add((PRIVILEGE,), "DROP POLICY removes a row-level security policy")
    elif remove_type in _DROPPED_RELATIONS:
        # DROP names its relations as lists of names, not RangeVars: expose them to rules that
        # match tables and schemas, as every other statement's relations are.
        objects = fields.get("objects")
        for item in objects if isinstance(objects, list) else []:
            names = _dropped_name(item)
            if names:
                walk.relations.add(".".join(names[-2:]))


def _dropped_name(item: object) -> list[str]:
    if not isinstance(item, dict):
        return []
    items = item.get("List", {}).get("items") if isinstance(item.get("List"), dict) else None
    names: list[str] = []
    for part in items if isinstance(items, list) else []:
        value = part.get("String", {}).get("sval") if isinstance(part, dict) else None
        if isinstance(value, str):
            names.append(value)
    return names


def _on_rename(walk: _Walk, fields: Fields) -> None:
    if fields.get("renameType") == "OBJECT_ROLE":
        walk.add((PRIVILEGE,), "ALTER ROLE ... RENAME changes a role")


def _on_create_schema(walk: _Walk, fields: Fields) -> None:
    if fields.get("authrole") is not None:
        walk.add((PRIVILEGE,), "CREATE SCHEMA AUTHORIZATION sets an owner")


def _on_discard(walk: _Walk, fields: Fields) -> None:
    if fields.get("target") == "DISCARD_ALL":
        walk.changes_lexing = True
        walk.add((PRIVILEGE,), "DISCARD ALL resets the session's role and authorization")


def _on_into(walk: _Walk, fields: Fields) -> None:
    walk.add((DDL,), "SELECT ... INTO / CREATE TABLE AS creates a table")


def _on_execute(walk: _Walk, fields: Fields) -> None:
    name = fields.get("name")
    walk.executes.append(name if isinstance(name, str) else "")


def _on_deallocate(walk: _Walk, fields: Fields) -> None:
    name = fields.get("name")
    walk.deallocates.append("*" if fields.get("isall") or not isinstance(name, str) else name)


def _on_string(walk: _Walk, fields: Fields) -> None:
    sval = fields.get("sval")
    if isinstance(sval, str) and len(sval) <= 64:
        walk.identifiers.add(sval)


# ROLLBACK (TO SAVEPOINT) reverts the SETs it undoes; COMMIT and PREPARE TRANSACTION end SET LOCAL.
_ENDS_SETTINGS_SCOPE = frozenset(
    {
        "TRANS_STMT_COMMIT",
        "TRANS_STMT_ROLLBACK",
        "TRANS_STMT_ROLLBACK_TO",
        "TRANS_STMT_PREPARE",
    }
)


def _on_transaction(walk: _Walk, fields: Fields) -> None:
    if fields.get("kind") in _ENDS_SETTINGS_SCOPE:
        walk.undoes_settings = True


def _on_do(walk: _Walk, fields: Fields) -> None:
    walk.analyse_do(fields)


def _on_create_function(walk: _Walk, fields: Fields) -> None:
    walk.analyse_function(fields)


_HANDLERS = {
    "FuncCall": _on_func_call,
    "TypeCast": _on_type_cast,
    "RangeVar": _on_range_var,
    "CopyStmt": _on_copy,
    "InsertStmt": _on_write,
    "UpdateStmt": _on_write,
    "DeleteStmt": _on_write,
    "MergeStmt": _on_write,
    "VariableSetStmt": _on_variable_set,
    "AlterTableCmd": _on_alter_table_cmd,
    "DropStmt": _on_drop,
    "RenameStmt": _on_rename,
    "CreateSchemaStmt": _on_create_schema,
    "DiscardStmt": _on_discard,
    "IntoClause": _on_into,
    "ExecuteStmt": _on_execute,
    "DeallocateStmt": _on_deallocate,
    "String": _on_string,
    "DoStmt": _on_do,
    "TransactionStmt": _on_transaction,
    "CreateFunctionStmt": _on_create_function,
}
