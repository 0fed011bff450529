"""What a statement touches, and where its constants sit, read from PostgreSQL's parse tree.

Owns: `Touches`, `ExportKind` and `read_tree` → `TreeFacts` (tables and columns read and
written, export kind, the column each constant is compared with or assigned to, constants that
are connection strings, function/DO bodies with their language, and the COPY and LOAD file
names, which are targets and code rather than data).

Invariants: pglast (libpg_query) is the only source; a tree it cannot produce yields no facts and
the caller treats the statement as unanalysed. Locations are UTF-8 byte offsets, as in the tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from pglast import parser as pg

ExportKind = Literal["client", "server_file", "program"]
Json = object

# Statement kind → the fields holding the relation(s) it writes to.
_WRITE_TARGETS: dict[str, tuple[str, ...]] = {
    "InsertStmt": ("relation",),
    "UpdateStmt": ("relation",),
    "DeleteStmt": ("relation",),
    "MergeStmt": ("relation",),
    "TruncateStmt": ("relations",),
    "CreateStmt": ("relation",),
    "AlterTableStmt": ("relation",),
    "IndexStmt": ("relation",),
    "ViewStmt": ("view",),
    "RenameStmt": ("relation",),
    "CreateTrigStmt": ("relation",),
    "RuleStmt": ("relation",),
    "CreatePolicyStmt": ("table",),
    "AlterPolicyStmt": ("table",),
    "VacuumStmt": (),
    "ClusterStmt": ("relation",),
    "RefreshMatViewStmt": ("relation",),
    "CreateForeignTableStmt": (),
}
_CONNECTION_FUNCTIONS = frozenset(
    {"dblink", "dblink_connect", "dblink_connect_u", "dblink_exec", "dblink_send_query"}
)
_SERVER_FILE_FUNCTIONS = frozenset({"lo_export", "lo_import", "pg_file_write"})


@dataclass(frozen=True, slots=True)
class Touches:
    """Tables and columns a statement reads and writes, and where data goes if it is exported.

    `export`: "client" for COPY ... TO STDOUT, "server_file" for COPY ... TO 'file' (and
    lo_export), "program" for COPY ... TO PROGRAM; None otherwise. `roles`: the roles it names
    (CURRENT_USER, SESSION_USER and CURRENT_ROLE as written). `lock`: the strongest table lock
    its statement kinds take (e.g. "ACCESS EXCLUSIVE" for most ALTER TABLE), None if none.
    """

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    columns_read: tuple[str, ...] = ()
    columns_written: tuple[str, ...] = ()
    export: ExportKind | None = None
    roles: tuple[str, ...] = ()
    lock: str | None = None

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.reads, *self.writes)))


@dataclass(slots=True)
class TreeFacts:
    """Everything masking learns from the tree of one text (all its statements)."""

    const_columns: dict[int, str] = field(default_factory=dict)
    connection_consts: set[int] = field(default_factory=set)
    bodies: dict[str, str] = field(default_factory=dict)
    code_values: set[str] = field(default_factory=set)
    reads: dict[str, None] = field(default_factory=dict)
    writes: dict[str, None] = field(default_factory=dict)
    columns_read: dict[str, None] = field(default_factory=dict)
    columns_written: dict[str, None] = field(default_factory=dict)
    export: ExportKind | None = None
    ctes: set[str] = field(default_factory=set)
    targets: set[int] = field(default_factory=set)
    roles: dict[str, None] = field(default_factory=dict)
    lock: int = 0

    def touches(self) -> Touches:
        return Touches(
            tuple(name for name in self.reads if name not in self.ctes),
            tuple(self.writes),
            tuple(self.columns_read),
            tuple(self.columns_written),
            self.export,
            tuple(self.roles),
            _LOCK_NAMES[self.lock] if self.lock else None,
        )


def read_tree(text: str) -> TreeFacts:
    """The facts of `text`; raises pglast's ParseError (or ValueError) when it will not parse."""
    tree = json.loads(pg.parse_sql_json(text))
    facts = TreeFacts()
    for entry in tree.get("stmts", []) if isinstance(tree, dict) else []:
        _walk(entry, facts)
    return facts


def _walk(value: Json, facts: TreeFacts) -> None:
    if isinstance(value, list):
        for item in value:
            _walk(item, facts)
        return
    if not isinstance(value, dict):
        return
    if len(value) == 1:
        ((kind, inner),) = value.items()
        if kind[:1].isupper() and isinstance(inner, dict):
            _visit(kind, inner, facts)
            _walk(inner, facts)
            return
    if "relname" in value:
        _relation(value, facts)
    if "roletype" in value:
        _role_spec(value, facts)
    for child in value.values():
        _walk(child, facts)


def _visit(kind: str, node: dict[str, Json], facts: TreeFacts) -> None:
    facts.lock = max(facts.lock, _lock(kind, node))
    if kind == "RoleSpec":
        _role_spec(node, facts)
    for key in _WRITE_TARGETS.get(kind, ()):
        _mark_targets(node.get(key), facts)
    if kind in ("SelectStmt", "CreateTableAsStmt"):
        into = node.get("intoClause") or node.get("into")
        if isinstance(into, dict):
            _mark_targets(into.get("rel"), facts)
    visitor = _VISITORS.get(kind)
    if visitor is not None:
        visitor(node, facts)


def _mark_targets(value: Json, facts: TreeFacts) -> None:
    if isinstance(value, list):
        for item in value:
            _mark_targets(item, facts)
    elif isinstance(value, dict):
        inner = value.get("RangeVar", value)
        if isinstance(inner, dict):
            facts.targets.add(id(inner))


def _relation(node: dict[str, Json], facts: TreeFacts) -> None:
    parts = [node.get(key) for key in ("catalogname", "schemaname", "relname")]
    name = ".".join(part for part in parts if isinstance(part, str) and part)
    if not name:
        return
    (facts.writes if id(node) in facts.targets else facts.reads)[name] = None


def _list(value: Json) -> list[Json]:
    return value if isinstance(value, list) else []


def _strings(value: Json) -> list[str]:
    """The `sval`s of a list of String nodes."""
    out: list[str] = []
    for item in value if isinstance(value, list) else []:
        inner = item.get("String") if isinstance(item, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("sval"), str):
            out.append(str(inner["sval"]))
    return out


def _column_of(value: Json) -> str | None:
    inner = value.get("ColumnRef") if isinstance(value, dict) else None
    if not isinstance(inner, dict):
        return None
    names = _strings(inner.get("fields"))
    return names[-1] if names else None


def _const_locations(value: Json) -> list[int]:
    """Locations of constants in a plain constant expression (casts, lists, arrays)."""
    if isinstance(value, list):
        return [loc for item in value for loc in _const_locations(item)]
    if not isinstance(value, dict) or len(value) != 1:
        return []
    ((kind, inner),) = value.items()
    if not isinstance(inner, dict):
        return []
    if kind == "A_Const":
        location = inner.get("location")
        return [location] if isinstance(location, int) else []
    child = {"TypeCast": "arg", "List": "items", "A_ArrayExpr": "elements"}.get(kind)
    return _const_locations(inner.get(child)) if child else []


def _assign(column: str | None, value: Json, facts: TreeFacts) -> None:
    if column:
        for location in _const_locations(value):
            facts.const_columns.setdefault(location, column)


def _a_expr(node: dict[str, Json], facts: TreeFacts) -> None:
    left, right = node.get("lexpr"), node.get("rexpr")
    _assign(_column_of(left), right, facts)
    _assign(_column_of(right), left, facts)


def _column_ref(node: dict[str, Json], facts: TreeFacts) -> None:
    names = _strings(node.get("fields"))
    if names:
        facts.columns_read[names[-1]] = None


def _res_target(node: dict[str, Json], facts: TreeFacts) -> None:
    name = node.get("name")
    if isinstance(name, str):
        _assign(name, node.get("val"), facts)


def _insert(node: dict[str, Json], facts: TreeFacts) -> None:
    names = []
    for item in _list(node.get("cols")):
        target = item.get("ResTarget") if isinstance(item, dict) else None
        name = target.get("name") if isinstance(target, dict) else None
        names.append(name if isinstance(name, str) else None)
        if isinstance(name, str):
            facts.columns_written[name] = None
    select = node.get("selectStmt")
    inner = select.get("SelectStmt") if isinstance(select, dict) else None
    rows = inner.get("valuesLists") if isinstance(inner, dict) else None
    for row in rows if isinstance(rows, list) else []:
        items = row.get("List", {}).get("items") if isinstance(row, dict) else None
        for name, item in zip(names, items if isinstance(items, list) else [], strict=False):
            _assign(name, item, facts)


def _update(node: dict[str, Json], facts: TreeFacts) -> None:
    for item in _list(node.get("targetList")):
        target = item.get("ResTarget") if isinstance(item, dict) else None
        name = target.get("name") if isinstance(target, dict) else None
        if isinstance(name, str):
            facts.columns_written[name] = None


def _copy(node: dict[str, Json], facts: TreeFacts) -> None:
    columns = facts.columns_written if node.get("is_from") else facts.columns_read
    for name in _strings(node.get("attlist")):
        columns[name] = None
    filename = node.get("filename")
    if isinstance(filename, str) and not node.get("is_program"):
        facts.code_values.add(filename)  # the server file it reads or writes: a target
    if node.get("is_from"):
        _mark_targets(node.get("relation"), facts)
        return
    if node.get("is_program"):
        facts.export = "program"
    elif node.get("filename") is not None:
        facts.export = facts.export or "server_file"
    else:
        facts.export = facts.export or "client"


def _func_call(node: dict[str, Json], facts: TreeFacts) -> None:
    names = _strings(node.get("funcname"))
    name = names[-1].lower() if names else ""
    args = node.get("args")
    if name in _CONNECTION_FUNCTIONS and isinstance(args, list) and args:
        facts.connection_consts.update(_const_locations(args[0]))
    if name in _SERVER_FILE_FUNCTIONS and facts.export is None:
        facts.export = "server_file"


def _load(node: dict[str, Json], facts: TreeFacts) -> None:
    filename = node.get("filename")
    if isinstance(filename, str):
        facts.code_values.add(filename)  # the library the server loads: code


def _drop(node: dict[str, Json], facts: TreeFacts) -> None:
    if node.get("removeType") not in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW"):
        return
    for item in _list(node.get("objects")):
        inner = item.get("List", {}).get("items") if isinstance(item, dict) else None
        name = ".".join(_strings(inner))
        if name:
            facts.writes[name] = None


def _set(node: dict[str, Json], facts: TreeFacts) -> None:
    name = node.get("name")
    if isinstance(name, str):
        _assign(name.rsplit(".", 1)[-1], node.get("args"), facts)


def _cte(node: dict[str, Json], facts: TreeFacts) -> None:
    name = node.get("ctename")
    if isinstance(name, str):
        facts.ctes.add(name)


def _options(items: Json) -> dict[str, Json]:
    out: dict[str, Json] = {}
    for item in items if isinstance(items, list) else []:
        inner = item.get("DefElem") if isinstance(item, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("defname"), str):
            out[str(inner["defname"])] = inner.get("arg")
    return out


def _body(options: dict[str, Json], default_language: str, facts: TreeFacts) -> None:
    language_node = options.get("language")
    language = default_language
    if isinstance(language_node, dict) and isinstance(language_node.get("String"), dict):
        language = str(language_node["String"].get("sval", default_language)).lower()
    body = options.get("as")
    if isinstance(body, dict) and "List" in body:
        body = body["List"].get("items")
    bodies = _strings(body if isinstance(body, list) else [body])
    for text in bodies[:1]:
        facts.bodies[text] = language


def _do(node: dict[str, Json], facts: TreeFacts) -> None:
    _body(_options(node.get("args")), "plpgsql", facts)


def _function(node: dict[str, Json], facts: TreeFacts) -> None:
    _body(_options(node.get("options")), "", facts)


# Table lock modes, weakest first (index = strength), and the mode each statement kind takes.
_LOCK_NAMES = (
    "",
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
)
_KIND_LOCKS = {
    "SelectStmt": 1,
    "InsertStmt": 3,
    "UpdateStmt": 3,
    "DeleteStmt": 3,
    "MergeStmt": 3,
    "VacuumStmt": 4,
    "CreateStatsStmt": 4,
    "CommentStmt": 4,
    "IndexStmt": 5,
    "CreateTrigStmt": 6,
    "AlterTableStmt": 8,
    "DropStmt": 8,
    "TruncateStmt": 8,
    "RenameStmt": 8,
    "ClusterStmt": 8,
    "RuleStmt": 8,
    "CreatePolicyStmt": 8,
    "AlterPolicyStmt": 8,
    "ReindexStmt": 8,
    "RefreshMatViewStmt": 8,
}


def _lock(kind: str, node: dict[str, Json]) -> int:
    """The table lock a statement kind takes (the common case: ALTER TABLE SET STATISTICS and a
    few other subcommands take less; shown as the worst)."""
    if kind == "CopyStmt":
        return 3 if node.get("is_from") else 1
    if kind == "RenameStmt" and node.get("relation") is None:
        return 0  # renaming a role, schema, function...: no table lock
    if kind == "SelectStmt" and node.get("lockingClause"):
        return 2
    if kind == "IndexStmt" and node.get("concurrent"):
        return 4
    if kind == "RefreshMatViewStmt" and node.get("concurrent"):
        return 7
    if kind == "VacuumStmt" and "full" in json.dumps(node.get("options")).lower():
        return 8
    if kind == "LockStmt":
        mode = node.get("mode")
        return mode if isinstance(mode, int) and 0 < mode < len(_LOCK_NAMES) else 8
    return _KIND_LOCKS.get(kind, 0)


def _role_spec(node: dict[str, Json], facts: TreeFacts) -> None:
    kind = node.get("roletype")
    name = node.get("rolename")
    if kind == "ROLESPEC_CSTRING" and isinstance(name, str):
        facts.roles[name] = None
    elif isinstance(kind, str) and kind != "ROLESPEC_PUBLIC":
        facts.roles[kind.removeprefix("ROLESPEC_")] = None


def _create_role(node: dict[str, Json], facts: TreeFacts) -> None:
    if isinstance(node.get("role"), str):
        facts.roles[str(node["role"])] = None


def _grant_role(node: dict[str, Json], facts: TreeFacts) -> None:
    for item in _list(node.get("granted_roles")):
        inner = item.get("AccessPriv") if isinstance(item, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("priv_name"), str):
            facts.roles[str(inner["priv_name"])] = None


def _rename(node: dict[str, Json], facts: TreeFacts) -> None:
    if node.get("renameType") == "OBJECT_ROLE":
        for key in ("subname", "newname"):
            if isinstance(node.get(key), str):
                facts.roles[str(node[key])] = None


_VISITORS = {
    "CreateRoleStmt": _create_role,
    "GrantRoleStmt": _grant_role,
    "RenameStmt": _rename,
    "A_Expr": _a_expr,
    "ColumnRef": _column_ref,
    "ResTarget": _res_target,
    "InsertStmt": _insert,
    "UpdateStmt": _update,
    "CopyStmt": _copy,
    "FuncCall": _func_call,
    "DropStmt": _drop,
    "LoadStmt": _load,
    "CommonTableExpr": _cte,
    "VariableSetStmt": _set,
    "DoStmt": _do,
    "CreateFunctionStmt": _function,
}
