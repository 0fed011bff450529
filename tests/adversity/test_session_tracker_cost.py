"""The gate's memory of prepared names (`pgguard.policy.session.SessionTracker`) costs the same
per PREPARE however many came before (invariant 5).

``remember`` rebuilds the union of everything ever prepared under a name from tuples, so each
``PREPARE s AS ... ; DEALLOCATE s`` (or protocol Parse of s) naming a new relation costs time
in proportion to all the earlier ones: 16,000 under one name took 7.7 s of CPU in this process
(480 us each at the end, 33 us at the start), on the proxy's shared loop. Found by the attack
pass on the session model (bench/session_attacks.py, sql-prepare-one-name); the fix belongs to
pgguard/policy/session.py: the union is kept in dicts and capped (EXECUTE of a name past the cap
is judged as text pgguard cannot read, and denied by the shipped rules).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from pgguard.policy import Context, PolicyEngine
from pgguard.policy.session import (
    MAX_NAMES,
    MAX_SESSION_ENTRIES,
    MAX_UNION_ENTRIES,
    SessionTracker,
)
from pgguard.sql.classify import StatementFacts
from pgguard.sql.kinds import UNPARSEABLE


def _facts(i: int) -> StatementFacts:
    return StatementFacts("PrepareStmt", "", (), (), ("SelectStmt",), (), (f"r{i}",), prepares="s")


def _cpu_to_remember(tracker: SessionTracker, first: int, count: int) -> float:
    facts = [_facts(i) for i in range(first, first + count)]
    started = time.process_time()
    for item in facts:
        tracker.remember("s", item)
    return time.process_time() - started


def test_remembering_one_more_body_does_not_cost_more_with_history() -> None:
    tracker = SessionTracker()
    early = _cpu_to_remember(tracker, 0, 2000)
    _cpu_to_remember(tracker, 2000, 10000)
    late = _cpu_to_remember(tracker, 12000, 2000)
    # Linear: about the same CPU for the same 2,000 (x1); the union's growth makes it x7 or so.
    assert late < 3 * early, (early, late)


def test_a_name_past_the_cap_is_judged_as_unreadable_and_keeps_its_categories() -> None:
    tracker = SessionTracker()
    dropper = StatementFacts(
        "PrepareStmt", "", ("ddl",), ("DROP TABLE drops a table",), ("DropStmt",), (), ("users",)
    )
    tracker.remember("s", dropper)
    for i in range(MAX_UNION_ENTRIES + 1):
        tracker.remember("s", _facts(i))
    summary = tracker.summary("s")
    assert summary is not None
    assert set(summary.categories) == {"ddl", UNPARSEABLE}
    assert summary.relations == ()  # bounded memory: the parts are forgotten, the verdict is not
    assert "can no longer tell what it runs" in summary.reasons[0]
    assert summary.state_refs == ()
    executed = tracker.resolve(
        StatementFacts("ExecuteStmt", "", (), (), ("ExecuteStmt",), (), (), executes=("s",))
    )
    assert {"ddl", UNPARSEABLE} <= set(executed.categories)


@pytest.mark.parametrize("before_the_cap", [True, False])
def test_a_body_naming_the_state_is_never_forgotten(before_the_cap: bool) -> None:
    tracker = SessionTracker()
    state_body = StatementFacts(
        "PrepareStmt",
        "",
        (),
        (),
        ("SelectStmt",),
        (),
        ("pgguard.requests",),
        state_refs=("names pgguard's state schema pgguard (a relation)",),
    )
    if before_the_cap:
        tracker.remember("s", state_body)
    for i in range(MAX_UNION_ENTRIES + 1):
        tracker.remember("s", _facts(i))
    if not before_the_cap:
        tracker.remember("s", state_body)
    summary = tracker.summary("s")
    assert summary is not None
    assert summary.state_refs  # builtin.state-schema still denies


def test_the_engine_denies_execute_of_a_name_past_the_cap() -> None:
    engine = PolicyEngine.load()
    ctx = Context("a", "d", session=engine.new_session())
    assert engine.classify("PREPARE s AS SELECT * FROM t0", ctx).action == "allow"
    assert engine.classify("EXECUTE s", ctx).action == "allow"
    assert ctx.session is not None
    for i in range(MAX_UNION_ENTRIES + 1):
        ctx.session.remember("s", _facts(i))
    decision = engine.classify("EXECUTE s", ctx)
    assert decision.action == "deny"
    assert "default.deny-unparseable" in decision.rule_ids
    assert any("can no longer tell what it runs" in r for r in decision.reasons)


def test_below_the_cap_the_union_is_exact_and_ordered() -> None:
    tracker = SessionTracker()
    for i in (3, 1, 3, 2):
        tracker.remember("s", _facts(i))
    summary = tracker.summary("s")
    assert summary is not None
    assert summary.relations == ("r3", "r1", "r2")
    assert summary.kinds == ("SelectStmt",)
    assert tracker.summary("other") is None


def _wide_prepare(name: str, width: int = 4000) -> str:
    """A PREPARE naming ``width`` relations that do not exist: the server rejects it (nothing
    is held there), but pgguard learns of it before the server answers, and keeps it."""
    return f"PREPARE {name} AS SELECT 1 FROM " + ", ".join(f"{name}_t{i}" for i in range(width))


def test_many_names_keep_the_trackers_memory_bounded() -> None:
    """Each name's union is capped, but the names were not: 300 PREPAREs of 35 KB under new
    names kept 100 MB (334 KB each, ten times the text), for the session's life, though the
    server held nothing (found by the third attack pass). The tracker now keeps a bounded
    number of names and parts per session; what it can no longer keep fails closed."""
    engine = PolicyEngine.load()
    ctx = Context("a", "d", session=engine.new_session())
    tracemalloc.start()
    try:
        for k in range(300):
            engine.classify(_wide_prepare(f"w{k}"), ctx)
            engine.classify(f"DEALLOCATE w{k}", ctx)
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 30_000_000, kept
    assert ctx.session is not None
    assert ctx.session.entries <= MAX_SESSION_ENTRIES + MAX_NAMES * 16
    # The first are kept exactly (a plain SELECT: allowed); past the budget, a name is judged
    # as text pgguard cannot read (denied), never by a part of what it ran.
    assert engine.classify("EXECUTE w0", ctx).action == "allow"
    late = engine.classify("EXECUTE w299", ctx)
    assert late.action == "deny"
    assert any("can no longer tell what it runs" in r for r in late.reasons)


def test_protocol_names_make_room_and_sql_names_past_the_limit_are_refused() -> None:
    """A driver's protocol-level names (asyncpg's __asyncpg_stmt_N__, psycopg's _pg3_N) come
    and go: the oldest are forgotten (a SQL EXECUTE of one is then judged as a name pgguard has
    not seen: held). A SQL-prepared name is never forgotten (a protocol Bind of it is judged by
    it), so a SQL PREPARE of one more name than `MAX_NAMES` is refused instead."""
    engine = PolicyEngine.load()
    tracker = engine.new_session()
    ctx = Context("a", "d", session=tracker)
    assert engine.classify("PREPARE imp AS SELECT lo_import('/etc/hostname')", ctx).action == "hold"
    harmless = StatementFacts("SelectStmt", "", (), (), ("SelectStmt",), (), ("t",))
    for i in range(MAX_NAMES * 3):
        tracker.remember_all(f"__asyncpg_stmt_{i}__", (harmless,))
    assert len(tracker.names()) <= MAX_NAMES
    assert tracker.summary("__asyncpg_stmt_0__") is None  # the oldest, forgotten
    forgotten = engine.classify('EXECUTE "__asyncpg_stmt_0__"', ctx)
    assert forgotten.action == "hold"
    assert "execute" in forgotten.categories
    kept = engine.classify("EXECUTE imp", ctx)
    assert kept.action == "hold"
    assert any("lo_import" in r for r in kept.reasons)
    assert tracker.sql_prepared("imp")
    for i in range(MAX_NAMES):
        engine.classify(f"PREPARE many{i} AS SELECT 1", ctx)
    refused = engine.classify("PREPARE one_more AS SELECT 1", ctx)
    assert refused.action == "deny"
    assert any("prepared statement names" in r for r in refused.reasons)
    assert engine.classify("PREPARE many0 AS SELECT 2", ctx).action == "allow"  # a known name
    assert len(tracker.names()) <= MAX_NAMES
    assert engine.classify("EXECUTE imp", ctx).action == "hold"
