"""The planner's row estimate for a held statement, for the review payload.

For an export (COPY ... TO), an UPDATE or DELETE, or a CREATE TABLE AS, pgguard runs a plain
``EXPLAIN`` - never ``ANALYZE`` - on its own upstream connection, in a READ ONLY transaction with
short statement and lock timeouts, and reports the top node's estimated rows. It is best effort:
any problem means "no estimate" (with the reason the card shows), never a failure.

Planning runs code: constant folding evaluates IMMUTABLE functions, selectivity estimation calls
operators' functions on histogram values, and the planner folds index expressions, CHECK
constraints, defaults and row-security policies of the tables it plans for. So the EXPLAIN runs
only when the statement provably reaches no user-defined code (object id 16384 and above):

- the statement calls no function at all, names no type, operator or cast that is not built in
  (any operator named like one it writes, or like the comparison operators it may use
  implicitly; any user-defined cast in the database);
- every relation it names resolves, is a table, partitioned table or materialized view without
  rules, triggers or row-level security, and neither it, its partitions/children, nor their
  indexes, constraints, defaults, policies or extended statistics depend on a user-defined
  function, operator or type.

The text is lexed by the server exactly as pglast read it: ``standard_conforming_strings`` is
pinned on for the transaction, and the EXPLAIN goes through the extended protocol, whose Parse
refuses a second command smuggled into the text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pglast import parse_sql
from pglast import parser as pg
from pglast.stream import RawStream

from pgguard.proxy.catalog import own_connection
from pgguard.settings import UpstreamSettings

log = logging.getLogger(__name__)

_DIRECT = ("UpdateStmt", "DeleteStmt")
# Operators a statement may use without writing them (IN, BETWEEN, IS DISTINCT FROM, USING,
# CASE x WHEN, NULLIF, DISTINCT, ORDER BY...): checked as if written.
_IMPLICIT_OPERATORS = ("=", "<>", "<", ">", "<=", ">=")
FIRST_USER_OID = 16384


@dataclass(frozen=True, slots=True)
class Estimate:
    """The planner's estimate, or why there is none."""

    rows: int | None = None
    skipped: str | None = None

    def touches(self) -> dict[str, object]:
        """The fields it adds to a request's `touches`."""
        if self.rows is not None:
            return {"estimated_rows": self.rows}
        return {"estimate_skipped": self.skipped} if self.skipped else {}


@dataclass(slots=True)
class _Names:
    """What a statement names that could lead to code: from its parse tree."""

    functions: bool = False
    operators: set[str] = field(default_factory=lambda: set(_IMPLICIT_OPERATORS))
    types: set[str] = field(default_factory=set)
    relations: dict[str, None] = field(default_factory=dict)
    ctes: set[str] = field(default_factory=set)


def explainable_query(sql: str) -> str | None:
    """The query whose plan estimates what ``sql`` touches, or None when there is none."""
    try:
        statements = parse_sql(sql)
    except Exception:  # pglast raises its own ParseError; anything else also means "no estimate"
        return None
    if len(statements) != 1:
        return None
    node: Any = statements[0].stmt  # pglast's node classes are generated; attributes vary
    kind = type(node).__name__
    if kind in _DIRECT:
        return sql
    if kind == "CopyStmt" and not node.is_from:
        if node.query is not None:
            return str(RawStream()(node.query))
        if node.relation is not None:
            return f"SELECT * FROM {RawStream()(node.relation)}"
    if kind == "CreateTableAsStmt" and node.query is not None:
        return str(RawStream()(node.query))
    return None  # SELECT ... INTO would need a rewrite; everything else has nothing to count


def names_in(query: str) -> _Names:
    """The functions, operators, types and relations ``query`` names (raises if unparseable)."""
    names = _Names()
    _collect(json.loads(pg.parse_sql_json(query)), names)
    return names


def _collect(value: object, names: _Names) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, names)
        return
    if not isinstance(value, dict):
        return
    if isinstance(value.get("relname"), str):  # a RangeVar, written bare where one is required
        _note("RangeVar", value, names)
    type_name = value.get("typeName")
    if isinstance(type_name, dict):  # a TypeName, likewise bare
        _note("TypeName", type_name, names)
    for kind, inner in value.items():
        if isinstance(inner, dict):
            _note(kind, inner, names)
        _collect(inner, names)


def _note(kind: str, node: dict[str, Any], names: _Names) -> None:
    if kind in ("FuncCall", "RangeFunction", "RangeTableFunc", "RangeTableSample"):
        names.functions = True
    elif kind == "A_Expr":
        names.operators.update(_svals(node.get("name")))
    elif kind == "TypeName":
        found = _svals(node.get("names"))
        if found:
            names.types.add(found[-1])
    elif kind == "CommonTableExpr" and isinstance(node.get("ctename"), str):
        names.ctes.add(node["ctename"])
    elif kind == "RangeVar" and isinstance(node.get("relname"), str):
        schema = node.get("schemaname")
        parts = (
            [schema, node["relname"]] if isinstance(schema, str) and schema else [node["relname"]]
        )
        names.relations[".".join('"' + part.replace('"', '""') + '"' for part in parts)] = None


def _svals(value: object) -> list[str]:
    out: list[str] = []
    for item in value if isinstance(value, list) else []:
        inner = item.get("String") if isinstance(item, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("sval"), str):
            out.append(inner["sval"])
    return out


_CHECK = f"""
WITH RECURSIVE named AS (
    SELECT n, pg_catalog.to_regclass(n) AS oid FROM pg_catalog.unnest($1::text[]) AS n
), rels AS (
    SELECT oid FROM named WHERE oid IS NOT NULL
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN rels r ON i.inhparent = r.oid
), objs AS (
    SELECT 'pg_class'::regclass AS classid, oid AS objid FROM rels
    UNION ALL SELECT 'pg_class'::regclass, indexrelid FROM pg_catalog.pg_index
        WHERE indrelid IN (SELECT oid FROM rels)
    UNION ALL SELECT 'pg_constraint'::regclass, oid FROM pg_catalog.pg_constraint
        WHERE conrelid IN (SELECT oid FROM rels)
    UNION ALL SELECT 'pg_attrdef'::regclass, oid FROM pg_catalog.pg_attrdef
        WHERE adrelid IN (SELECT oid FROM rels)
    UNION ALL SELECT 'pg_policy'::regclass, oid FROM pg_catalog.pg_policy
        WHERE polrelid IN (SELECT oid FROM rels)
    UNION ALL SELECT 'pg_statistic_ext'::regclass, oid FROM pg_catalog.pg_statistic_ext
        WHERE stxrelid IN (SELECT oid FROM rels)
    UNION ALL SELECT 'pg_rewrite'::regclass, oid FROM pg_catalog.pg_rewrite
        WHERE ev_class IN (SELECT oid FROM rels)
)
SELECT
    (SELECT pg_catalog.string_agg(n, ', ') FROM named WHERE oid IS NULL) AS unknown,
    (SELECT pg_catalog.string_agg(c.oid::regclass::text, ', ')
        FROM pg_catalog.pg_class c JOIN rels r ON c.oid = r.oid
        WHERE c.relkind NOT IN ('r', 'p', 'm') OR c.relhasrules OR c.relhastriggers
            OR c.relrowsecurity) AS unusual,
    EXISTS (SELECT FROM pg_catalog.pg_depend d JOIN objs o
            ON d.classid = o.classid AND d.objid = o.objid
        WHERE d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_type'::regclass)
            AND d.refobjid >= {FIRST_USER_OID}) AS dependent_code,
    EXISTS (SELECT FROM pg_catalog.pg_operator
        WHERE oprname = ANY($2::text[]) AND oid >= {FIRST_USER_OID}) AS user_operator,
    EXISTS (SELECT FROM pg_catalog.pg_type
        WHERE typname = ANY($3::text[]) AND oid >= {FIRST_USER_OID}) AS user_type,
    EXISTS (SELECT FROM pg_catalog.pg_cast WHERE oid >= {FIRST_USER_OID}) AS user_cast
"""


def _why_not(row: Any) -> str | None:
    """Why the catalog says planning could run user code; None when it cannot."""
    if row["unknown"]:
        return f"relation not found: {row['unknown']}"
    if row["unusual"]:
        return f"not a plain table, or has rules, triggers or row security: {row['unusual']}"
    if row["dependent_code"]:
        return "a table it reads has user-defined code (index, constraint, default, column type)"
    if row["user_operator"]:
        return "it may use a user-defined operator"
    if row["user_type"]:
        return "it names a user-defined type"
    if row["user_cast"]:
        return "the database has user-defined casts"
    return None


async def estimate_rows(
    settings: UpstreamSettings, database: str, sql: str, functions: tuple[str, ...]
) -> Estimate:
    """The estimate for ``sql`` (already classified), or why it was skipped."""
    if functions:
        return Estimate(skipped="it calls functions")
    query = explainable_query(sql)
    if query is None:
        return Estimate()
    try:
        names = names_in(query)
    except Exception:  # unparseable: nothing is explained
        return Estimate(skipped="could not be analysed")
    if names.functions:
        return Estimate(skipped="it calls functions")
    relations = [r for r in names.relations if r.strip('"') not in names.ctes]
    try:
        async with own_connection(settings, database, "pgguard-estimate") as conn:
            await conn.execute("SET LOCAL standard_conforming_strings = on")
            row = await conn.fetchrow(
                _CHECK, relations, sorted(names.operators), sorted(names.types)
            )
            why = _why_not(row)
            if why is not None:
                return Estimate(skipped=why)
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}")
    except Exception as exc:  # best effort by design: no estimate rather than no review
        log.info("no row estimate: %s", type(exc).__name__)
        return Estimate(skipped="the planner could not be asked")
    try:
        document = json.loads(plan) if isinstance(plan, str) else plan
        top = document[0]["Plan"]
        if top.get("Node Type") == "ModifyTable" and top.get("Plans"):
            top = top["Plans"][0]  # an UPDATE/DELETE returns no rows: count those it changes
        return Estimate(rows=int(top["Plan Rows"]))
    except (KeyError, IndexError, TypeError, ValueError):
        return Estimate(skipped="the planner gave no estimate")
