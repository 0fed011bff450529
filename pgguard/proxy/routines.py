"""Routines judged by their bodies: what a call of an existing user-defined routine does.

Owns `RoutineJudge`. A statement that calls functions (``SELECT f()``, ``CALL p()``, a
FunctionCall message) is judged by the bodies of every user-defined routine (oid >= 16384) of
those names, in any schema (a superset of what name resolution can pick), read by a read-only
query on pgguard's own connection (`pgguard.proxy.catalog.user_routines`), classified with the
same classifier (`pgguard.sql.classify.classify_routine_body`) and judged by the same rules. The
routines those bodies call are read too, down to `MAX_DEPTH`; deeper calls count as `execute`.

Invariants:
- Built-in routines (oid below 16384) keep the catalogue's judgement (rules/functions.yaml).
- Bodies in languages other than SQL and PL/pgSQL, SQL-standard (BEGIN ATOMIC) bodies, dynamic
  SQL, aggregates and unreadable definitions are `execute`; a catalog that cannot be read refuses
  the statement (the caller's fail-closed path).
- The catalog is read on one connection per database, opened on first need and closed when the
  database's last session ends; every transaction on it is READ ONLY with short timeouts.
- Analyses are cached by (database, oid, xmin): a replaced routine has a new xmin and is read
  again. The catalog itself is read for every statement that calls a function, so a routine
  created or replaced a moment ago is judged by its current body.
- A routine a rule allows by name (an ``allow`` rule listing it under ``functions``, for this
  agent and database) is not read: the rule's author vouches for its body.
- Out of scope (documented): routines run by DEFAULT expressions, triggers fired by DML, casts,
  operators and event triggers are not followed from the statement.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import asyncpg

from pgguard.policy import Context, Decision, PolicyEngine
from pgguard.proxy.catalog import Routine, catalog_connection, user_routines
from pgguard.settings import UpstreamSettings
from pgguard.sql.classify import StatementFacts, classify_routine_body
from pgguard.sql.kinds import EXECUTE

MAX_DEPTH = 3
_CACHE_LIMIT = 4096


class RoutineJudge:
    """Reads and classifies routine bodies; one per gate, shared by its sessions."""

    def __init__(self, engine: PolicyEngine, upstream: UpstreamSettings) -> None:
        self.engine = engine
        self.upstream = upstream
        self._bodies: dict[tuple[str, int, int], StatementFacts] = {}
        # One catalog connection per database while sessions of it exist (a connection per
        # look-up cost ~4 ms a statement); look-ups on one connection take turns.
        self._links: dict[str, asyncpg.Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    def session_started(self, database: str) -> None:
        self._users[database] += 1

    def session_ended(self, database: str) -> None:
        """Close the database's catalog connection when its last session ends."""
        self._users[database] -= 1
        if self._users[database] > 0:
            return
        del self._users[database]
        self._locks.pop(database, None)
        conn = self._links.pop(database, None)
        if conn is not None:
            # Dropped at once, not closed politely: a close still pending when the event loop
            # stops (shutdown) would leak the socket. It only ever ran read-only look-ups.
            conn.terminate()

    async def _routines(self, database: str, names: list[str]) -> list[Routine]:
        lock = self._locks.setdefault(database, asyncio.Lock())
        async with lock:
            conn = self._links.get(database)
            if conn is None or conn.is_closed():
                conn = await catalog_connection(self.upstream, database)
                self._links[database] = conn
            try:
                return await user_routines(conn, names)
            except BaseException:
                self._links.pop(database, None)  # a connection in an unknown state goes
                conn.terminate()
                raise

    def called_names(self, decision: Decision, agent: str, database: str) -> list[str]:
        """Function names the statement calls whose bodies must be read (sorted)."""
        called = decision.called_functions
        if not called:
            return []
        return [n for n in called if not self._allowed_by_name(n, agent, database)]

    async def judge(self, decision: Decision, ctx: Context, names: list[str]) -> Decision:
        """`decision`, made at least as strict as the bodies of the routines it calls."""
        bodies = await self._bodies_of(ctx.database, names)
        if not bodies:
            return decision
        judged = self.engine.decide_facts(tuple(bodies), ctx)
        # Facts that name each routine version (oid, xmin): a remembered approval
        # (`pgguard.policy.remember`) never covers a routine replaced since.
        return _merge(decision, dataclasses.replace(judged, facts=tuple(bodies)))

    async def _bodies_of(self, database: str, names: list[str]) -> list[StatementFacts]:
        out: list[StatementFacts] = []
        seen: set[int] = set()
        frontier = names
        for depth in range(MAX_DEPTH + 1):
            if not frontier:
                break
            routines = await self._routines(database, frontier)
            fresh = [r for r in routines if r.oid not in seen]
            if fresh and depth == MAX_DEPTH:
                out.append(_too_deep(fresh[0].name))
                break
            called: set[str] = set()
            for routine in fresh:
                seen.add(routine.oid)
                facts = self._analysis(database, routine)
                out.append(facts)
                called.update(facts.functions)
            frontier = sorted(called)
        return out

    def _analysis(self, database: str, routine: Routine) -> StatementFacts:
        key = (database, routine.oid, routine.xmin)
        facts = self._bodies.get(key)
        if facts is None:
            facts = classify_routine_body(
                routine.language if routine.kind in ("f", "p") else "aggregate",
                routine.definition,
                routine.source,
                list(routine.config),
                self.engine.policy.catalog,
            )
            facts = dataclasses.replace(
                facts,
                text=f"routine {routine.oid} version {routine.xmin}",
                reasons=tuple(f"{routine.name}: {r}" for r in facts.reasons),
            )
            if len(self._bodies) >= _CACHE_LIMIT:
                self._bodies.clear()
            self._bodies[key] = facts
        return facts

    def _allowed_by_name(self, name: str, agent: str, database: str) -> bool:
        """An ``allow`` rule lists the routine under ``functions`` for this agent and database."""
        for compiled in self.engine.policy.rules:
            if compiled.rule.action != "allow" or compiled.functions is None:
                continue
            if compiled.agents is not None and not compiled.agents.matches(agent):
                continue
            if compiled.databases is not None and not compiled.databases.matches(database):
                continue
            if compiled.functions.matches(name):
                return True
        return False


def _too_deep(name: str) -> StatementFacts:
    return StatementFacts(
        kind="RoutineBody",
        text="",
        categories=(EXECUTE,),
        reasons=(f"{name}: routines nest more than {MAX_DEPTH} calls deep",),
        kinds=(),
        functions=(),
        relations=(),
        literal_sensitive=True,
        embedded_code=True,
    )


def _merge(decision: Decision, bodies: Decision) -> Decision:
    """The statement's decision and its routines' bodies' decision, as one."""
    order = {"allow": 0, "hold": 1, "deny": 2}
    base = bodies if order[bodies.action] > order[decision.action] else decision
    return dataclasses.replace(
        base,
        privileged=decision.privileged or bodies.privileged,
        categories=tuple(dict.fromkeys((*decision.categories, *bodies.categories))),
        reasons=tuple(dict.fromkeys((*decision.reasons, *bodies.reasons))),
        statements=(*decision.statements, *bodies.statements),
        fingerprint=decision.fingerprint,
        changes_lexing=decision.changes_lexing or bodies.changes_lexing,
        facts=(*decision.facts, *bodies.facts),
    )
