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

import pytest

from pgguard.policy import Context, PolicyEngine
from pgguard.policy.session import MAX_UNION_ENTRIES, SessionTracker
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
