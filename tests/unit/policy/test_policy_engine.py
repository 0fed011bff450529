"""Engine semantics: rule order, allow-covers / hold-touches matching, fail-closed paths, modes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pgguard.policy import SHIPPED_RULES_DIR, Context, LexState, PolicyEngine
from pgguard.policy.rules import CompiledRule
from pgguard.sql.classify import StatementFacts

WriteRules = Callable[..., Path]

CTX = Context(agent="agent", database="app")
DEFAULT = (SHIPPED_RULES_DIR / "default.yaml").read_text(encoding="utf-8")


def custom(write_rules: WriteRules, extra: str, **kwargs: object) -> PolicyEngine:
    directory = write_rules(**{"00-default.yaml": DEFAULT, "50-custom.yaml": extra})
    return PolicyEngine.load(directory, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sql", "action"),
    [
        ("SELECT 1", "allow"),
        ("DROP TABLE t", "hold"),
        ("SELEC 1", "deny"),
        ("SELECT 1; DROP TABLE t; SELEC", "deny"),
        ("SELECT 1; DROP TABLE t", "hold"),
        (b"SELECT 1\x00", "deny"),
        ("", "allow"),
    ],
)
def test_default_policy_actions(engine: PolicyEngine, sql: str | bytes, action: str) -> None:
    assert engine.classify(sql, CTX).action == action


def test_decision_json_has_the_contract_shape(engine: PolicyEngine) -> None:
    out = engine.classify("SELECT 1; COPY t TO STDOUT", CTX).to_json()
    assert out["privileged"] is True
    assert out["categories"] == ["export"]
    assert out["action"] == "hold"
    statements = out["statements"]
    assert isinstance(statements, list)
    assert [s["kind"] for s in statements] == ["SelectStmt", "CopyStmt"]
    assert statements[1]["categories"] == ["export"]
    assert statements[1]["rules"] == ["default.hold-export"]


def test_unparseable_decision_is_privileged_with_empty_fingerprint(engine: PolicyEngine) -> None:
    decision = engine.classify("SELEC 1", CTX)
    assert decision.privileged
    assert decision.fingerprint == ""
    assert decision.statements[0].kind == "unparseable"
    assert decision.rule_ids == ("default.deny-unparseable",)


def test_later_rule_widens_for_one_agent_and_database(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: migrator.ddl
    description: the migration bot may change the schema of staging
    match: {categories: [ddl], agents: [migrator], databases: ['~staging(-.*)?']}
    action: allow
""",
    )
    assert engine.classify("DROP TABLE t", Context("migrator", "staging-eu")).action == "allow"
    assert engine.classify("DROP TABLE t", Context("migrator", "prod")).action == "hold"
    assert engine.classify("DROP TABLE t", Context("other", "staging")).action == "hold"
    # allow covers only ddl: a statement that is also privilege stays held.
    mixed = "ALTER TABLE t OWNER TO bob"
    assert engine.classify(mixed, Context("migrator", "staging")).action == "hold"


def test_later_rule_narrows(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: no-export-from-prod
    description: exports from prod are refused outright
    match: {categories: [export], databases: [prod]}
    action: deny
  - id: hold-payroll
    description: anything touching payroll salaries needs approval
    match: {tables: [payroll.salaries]}
    action: hold
    approvers: [hr]
    hold_timeout: 10m
""",
    )
    assert engine.classify("COPY t TO STDOUT", Context("a", "prod")).action == "deny"
    assert engine.classify("COPY t TO STDOUT", Context("a", "dev")).action == "hold"
    for sql in ("SELECT * FROM salaries", "SELECT * FROM payroll.salaries"):
        decision = engine.classify(sql, CTX)
        assert decision.action == "hold"
        assert decision.rule_ids == ("hold-payroll",)
        assert decision.approver_groups == ("hr",)
        assert decision.hold_timeout_s == 600
        assert not decision.privileged
    assert engine.classify("SELECT * FROM other.salaries", CTX).action == "allow"


def test_allow_rules_must_cover_every_privileged_function(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: ops.cancel
    description: the ops agent may cancel queries
    match: {categories: [admin], functions: [pg_cancel_backend], agents: [ops]}
    action: allow
""",
    )
    ops = Context("ops", "app")
    assert engine.classify("SELECT pg_cancel_backend(1)", ops).action == "allow"
    both = "SELECT pg_cancel_backend(1), pg_terminate_backend(2)"
    assert engine.classify(both, ops).action == "hold"
    assert engine.classify("CHECKPOINT", ops).action == "hold"
    assert engine.classify("COPY (SELECT pg_cancel_backend(1)) TO STDOUT", ops).action == "hold"


def test_allow_by_schema_needs_qualified_names(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: sandbox.ddl
    description: the sandbox bot may change its own schema
    match: {categories: [ddl], schemas: [sandbox], agents: [sandbox-bot]}
    action: allow
""",
    )
    bot = Context("sandbox-bot", "app")
    assert engine.classify("CREATE TABLE sandbox.t (a int)", bot).action == "allow"
    assert engine.classify("CREATE TABLE t (a int)", bot).action == "hold"
    assert engine.classify("DROP TABLE sandbox.a, public.b", bot).action == "hold"


def test_unparseable_needs_an_explicit_rule(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: etl.everything
    description: the etl agent is trusted with everything it can say
    match: {agents: [etl]}
    action: allow
""",
    )
    etl = Context("etl", "app")
    assert engine.classify("DROP TABLE t", etl).action == "allow"
    assert engine.classify("SELEC 1", etl).action == "deny"
    assert engine.classify(b"SELECT \xff", etl).action == "deny"


def test_no_matching_rule_falls_back_closed(write_rules: WriteRules) -> None:
    directory = write_rules(
        **{
            "a.yaml": """
rules:
  - id: only-reads
    description: reads
    match: {kinds: [SelectStmt]}
    action: allow
"""
        }
    )
    engine = PolicyEngine.load(directory)
    assert engine.classify("DROP TABLE t", CTX).action == "hold"
    assert engine.classify("SELEC", CTX).action == "deny"
    assert engine.classify("INSERT INTO t VALUES (1)", CTX).action == "allow"
    assert engine.classify("SELECT pg_read_file('x')", CTX).action == "allow"  # explicit rule


def test_a_rule_that_raises_holds(write_rules: WriteRules, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = PolicyEngine.load(write_rules(**{"a.yaml": DEFAULT}), cache_size=0)
    original = CompiledRule.matches

    def flaky(self: CompiledRule, facts: StatementFacts, agent: str, database: str) -> bool:
        if self.id == "default.hold-admin":
            raise RuntimeError("boom")
        return original(self, facts, agent, database)

    monkeypatch.setattr(CompiledRule, "matches", flaky)
    decision = engine.classify("SELECT 1", CTX)
    assert decision.action == "hold"
    assert "builtin.rule-error" in decision.rule_ids


def test_internal_error_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgguard.policy.engine as engine_module

    def broken(*args: object, **kwargs: object) -> tuple[StatementFacts, ...]:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine_module, "classify_text", broken)
    engine = PolicyEngine.load(cache_size=0)
    decision = engine.classify("SELECT 1", CTX)
    assert decision.action == "deny"
    assert decision.privileged


def test_observe_mode_computes_but_flags(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        engine = PolicyEngine.load(mode="observe")
    assert any("OBSERVE" in r.getMessage() for r in caplog.records)
    decision = engine.classify("DROP TABLE t", CTX)
    assert decision.observe
    assert decision.action == "hold"
    assert decision.to_json()["observe"] is True
    assert not PolicyEngine.load().classify("DROP TABLE t", CTX).observe
    with pytest.raises(ValueError, match="mode"):
        PolicyEngine.load(mode="relaxed")  # type: ignore[arg-type]


def test_approver_groups_intersect_and_conflicts_deny(write_rules: WriteRules) -> None:
    engine = custom(
        write_rules,
        """
rules:
  - id: ddl-by-dba
    description: schema changes go to DBAs
    match: {categories: [ddl]}
    action: hold
    approvers: [dba, platform]
    hold_timeout: 120
  - id: privilege-by-security
    description: privilege changes go to security
    match: {categories: [privilege]}
    action: hold
    approvers: [security, platform]
  - id: export-by-security-only
    description: exports go to security only
    match: {categories: [export]}
    action: hold
    approvers: [security]
""",
    )
    one = engine.classify("DROP TABLE t", CTX)
    assert one.approver_groups == ("dba", "platform")
    assert one.hold_timeout_s == 120
    two = engine.classify("DROP TABLE t; GRANT ALL ON t TO x", CTX)
    assert two.approver_groups == ("platform",)
    assert two.hold_timeout_s == 120
    clash = engine.classify("DROP TABLE t; COPY t TO STDOUT", CTX)
    assert clash.action == "deny"
    assert clash.rule_ids == ("builtin.no-common-approver",)


def test_lexing_hazard_holds_even_harmless_text(engine: PolicyEngine) -> None:
    off = Context("a", "d", lex=LexState(standard_conforming_strings=False))
    tricky = "SELECT 'a\\'; DROP TABLE t; --'"
    decision = engine.classify(tricky, off)
    assert decision.action == "hold"
    assert "builtin.lex-hazard" in decision.rule_ids
    assert decision.privileged
    assert engine.classify("SELECT 'plain'", off).action == "allow"
    sjis = Context("a", "d", lex=LexState(client_encoding="SJIS"))
    assert engine.classify(b"SELECT '\x95\\'; --'", sjis).action == "hold"
    assert engine.classify(b"SELECT 1", sjis).action == "allow"


@pytest.mark.parametrize(
    ("sql", "changes"),
    [
        ("SET client_encoding = 'UTF8'", True),
        ("SET standard_conforming_strings = on", True),
        ("RESET ALL", True),
        ("DISCARD ALL", True),
        ("SELECT set_config('client_encoding', 'LATIN1', false)", True),
        ("SET work_mem = '1MB'", False),
        ("SELECT 1", False),
    ],
)
def test_statements_that_change_lexing_are_flagged(
    engine: PolicyEngine, sql: str, changes: bool
) -> None:
    assert engine.classify(sql, CTX).changes_lexing is changes


def test_pending_lex_state_holds_risky_text(engine: PolicyEngine) -> None:
    from pgguard.policy import PENDING_LEX_STATE

    pending = Context("a", "d", lex=PENDING_LEX_STATE)
    assert engine.classify(b"SELECT 1", pending).action == "allow"
    assert engine.classify(b"SELECT 'a\\'", pending).action == "hold"
    assert engine.classify("SELECT 'é'".encode(), pending).action == "hold"
