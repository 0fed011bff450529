"""Which portals a SQL statement runs by name: ``FETCH`` and ``MOVE`` (pure).

Owns: `fetched_portals`. Protocol-level portals (Bind) and SQL cursors (DECLARE) share one
namespace in PostgreSQL, so ``FETCH ALL FROM p1`` runs whatever portal ``p1`` holds - a
protocol portal bound to any statement included (issue 15). The gate judges those statements
as well as the FETCH.

Invariant: the names are the server's (identifiers folded by PostgreSQL's own grammar, pglast).
Text that does not parse yields no names; it is unparseable, and refused, anyway.
"""

from __future__ import annotations

from typing import Any

from pglast import parse_sql


def fetched_portals(sql: str) -> tuple[str, ...]:
    """The portal names FETCH and MOVE statements in ``sql`` run, in order, without repeats."""
    try:
        statements = parse_sql(sql)
    except Exception:  # pglast's ParseError, or anything else: no names (refused elsewhere)
        return ()
    names: dict[str, None] = {}
    for raw in statements:
        node: Any = raw.stmt  # pglast's generated node classes
        if type(node).__name__ == "FetchStmt" and node.portalname:
            names[str(node.portalname)] = None
    return tuple(names)
