"""The planner's row estimate for a held statement, for the review payload.

For an export (COPY ... TO), an UPDATE or DELETE, or a CREATE TABLE AS / SELECT INTO, pgguard
runs a plain ``EXPLAIN`` - never ``ANALYZE``, so nothing executes - on its own upstream
connection, in a READ ONLY transaction with short statement and lock timeouts, and reports the
top node's estimated rows. It is best effort: any problem means "no estimate", never a failure.

Planning can evaluate functions (constant folding, selectivity estimates), and a user function
may do anything; so a statement that calls any function at all is not explained. (Operators and
type input functions already defined in the database are opaque to pgguard; the READ ONLY
transaction keeps them from writing.) The text is lexed by the server exactly as pglast read it:
``standard_conforming_strings`` is pinned on for the transaction, and the EXPLAIN goes through
the extended protocol, whose Parse refuses a second command smuggled into the text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pglast import parse_sql
from pglast.stream import RawStream

from pgguard.proxy.catalog import own_connection
from pgguard.settings import UpstreamSettings

log = logging.getLogger(__name__)

_DIRECT = ("UpdateStmt", "DeleteStmt")


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
    if kind == "SelectStmt" and node.intoClause is not None:
        return None  # SELECT ... INTO: plan the same query without INTO would need a rewrite
    return None


async def estimate_rows(
    settings: UpstreamSettings, database: str, sql: str, functions: tuple[str, ...]
) -> int | None:
    """Estimated rows for ``sql`` (already classified), or None when it cannot be had safely."""
    if functions:
        return None
    query = explainable_query(sql)
    if query is None:
        return None
    try:
        async with own_connection(settings, database, "pgguard-estimate") as conn:
            await conn.execute("SET LOCAL standard_conforming_strings = on")
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}")
    except Exception as exc:  # best effort by design: no estimate rather than no review
        log.info("no row estimate: %s", type(exc).__name__)
        return None
    try:
        document = json.loads(plan) if isinstance(plan, str) else plan
        return int(document[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
