"""Writes to system views and catalogs, read as the privileged actions they amount to.

Owns `SystemWrite` and `system_write` (what an INSERT/UPDATE/DELETE/MERGE target means).

Found from PostgreSQL 16's own catalog (``pg_rewrite`` rules other than ``_RETURN``; system views
whose definitions call volatile functions; ``information_schema.views`` updatability): the only
system view with rewrite rules is ``pg_catalog.pg_settings`` (``pg_settings_u``: ``ON UPDATE ...
WHERE new.name = old.name DO SELECT set_config(old.name, new.setting, false)``, and
``pg_settings_n``: ``DO INSTEAD NOTHING``), so an UPDATE of it is a ``set_config`` of the setting
its WHERE clause names, to the value its SET clause gives. ``pg_group`` and
``pg_stat_database_conflicts`` are auto-updatable views over ``pg_authid`` and ``pg_database``:
a write to any system relation (``pg_catalog``, ``information_schema``, or an unqualified
``pg_*`` name, which resolves to ``pg_catalog`` first) changes the catalog itself. No system view
calls a function with side effects; volatile ones there only read server state.

Invariant: when the setting an UPDATE of pg_settings changes cannot be read from constants
(``name = 'x'`` in its WHERE clause), the write counts as changing a setting chosen at run time,
which includes the settings that change lexing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgguard.sql.nodes import literal_text, names_of
from pgguard.sql.tree import Fields, JsonValue, unwrap

_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_WRITES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


@dataclass(frozen=True, slots=True)
class SystemWrite:
    """A write to a system relation: `settings` says it is pg_settings (then `setting` and
    `value` are the set_config arguments it amounts to, None when not constants)."""

    relation: str
    settings: bool
    setting: str | None = None
    value: JsonValue | None = None


def is_write(kind: str) -> bool:
    return kind in _WRITES


def system_write(fields: Fields) -> SystemWrite | None:
    """What a write statement's target means, or None for an ordinary relation."""
    relation = fields.get("relation")  # an unwrapped RangeVar
    if not isinstance(relation, dict):
        return None
    schema = relation.get("schemaname")
    name = relation.get("relname")
    if not isinstance(name, str):
        return None
    if isinstance(schema, str) and schema not in _SYSTEM_SCHEMAS:
        return None
    if schema is None and not name.startswith("pg_"):
        return None
    shown = f"{schema}.{name}" if isinstance(schema, str) else name
    if name != "pg_settings" or schema == "information_schema":
        return SystemWrite(shown, settings=False)
    return SystemWrite(
        shown,
        settings=True,
        setting=_named_setting(fields.get("whereClause")),
        value=_new_setting(fields.get("targetList")),
    )


def _named_setting(where: JsonValue | None) -> str | None:
    """The constant in ``name = '...'`` at the top of the WHERE clause (or one AND arm)."""
    wrapped = unwrap(where)
    if wrapped is None:
        return None
    kind, fields = wrapped
    if kind == "BoolExpr" and fields.get("boolop") == "AND_EXPR":
        args = fields.get("args")
        found = {_named_setting(arg) for arg in args} if isinstance(args, list) else set()
        found.discard(None)
        return found.pop() if len(found) == 1 else None
    if (
        kind != "A_Expr"
        or fields.get("kind") != "AEXPR_OP"
        or names_of(fields.get("name")) != ["="]
    ):
        return None
    for column, constant in (("lexpr", "rexpr"), ("rexpr", "lexpr")):
        if _is_name_column(fields.get(column)):
            return literal_text(fields.get(constant))
    return None


def _is_name_column(node: JsonValue | None) -> bool:
    wrapped = unwrap(node)
    if wrapped is None or wrapped[0] != "ColumnRef":
        return False
    fields = names_of(wrapped[1].get("fields"))
    return bool(fields) and fields[-1] == "name"


def _new_setting(targets: JsonValue | None) -> JsonValue | None:
    for target in targets if isinstance(targets, list) else []:
        wrapped = unwrap(target)
        fields = wrapped[1] if wrapped is not None and wrapped[0] == "ResTarget" else {}
        if fields.get("name") == "setting":
            value: JsonValue | None = fields.get("val")
            return value
    return None
