"""The built-in deny of statements naming pgguard's own state (builtin.state-schema).

It is not a rule: no rule file can allow what it denies, reuse its id, or switch it off, and
observe mode enforces it too. Caching never hands a naming text another text's answer.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pgguard.approvals.schema import NOTIFY_CHANNEL
from pgguard.cli_policy import _load_engine, classify_stream
from pgguard.policy import Context, PolicyEngine, RulesError
from pgguard.policy.rules import STATE_SCHEMA_RULE
from pgguard.proxy.assembly import load_engine
from pgguard.settings import Settings
from pgguard.sql.classify import StatementFacts
from pgguard.sql.statenames import DEFAULT_CHANNELS, DEFAULT_STATE_SCHEMA, ProtectedNames

WriteRules = Callable[..., Path]

ATTACKS = [
    "UPDATE pgguard.approval_requests SET state = 'approved', decided_at = now() WHERE id = 'r1'",
    "INSERT INTO pgguard.approval_decisions (request_id, approver) VALUES ('r1', 'x')",
    "LOCK TABLE pgguard.approval_requests",
    "SET search_path = pgguard, public",
    "LISTEN pgguard_approvals",
    "SELECT pg_notify('pgguard_approvals', 'x')",
    "SELECT 'pgguard.approval_requests'::regclass",
]

ALLOW_EVERYTHING = """
rules:
  - id: open.everything
    description: allow everything, even unreadable text
    match: {}
    action: allow
  - id: open.unparseable
    description: allow unreadable text
    match: {categories: [unparseable]}
    action: allow
"""


def ctx(engine: PolicyEngine) -> Context:
    return Context(agent="a", database="d", session=engine.new_session())


@pytest.mark.parametrize("sql", ATTACKS)
@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_attacks_are_denied_in_every_mode(sql: str, mode: str) -> None:
    engine = PolicyEngine.load(mode=mode)  # type: ignore[arg-type]
    decision = engine.classify(sql, ctx(engine))
    assert decision.action == "deny"
    assert decision.rule_ids[0] == STATE_SCHEMA_RULE
    assert decision.observe is False  # acted on even in observe mode
    assert decision.privileged is True
    assert any("pgguard" in r for r in decision.reasons)


def test_observe_mode_still_only_observes_everything_else() -> None:
    engine = PolicyEngine.load(mode="observe")
    decision = engine.classify("DROP TABLE t", ctx(engine))
    assert decision.action == "hold"
    assert decision.observe is True
    assert engine.classify("SELECT 1", ctx(engine)).observe is True


@pytest.mark.parametrize("sql", ATTACKS)
def test_rule_files_cannot_allow_it(sql: str, write_rules: WriteRules) -> None:
    engine = PolicyEngine.load(write_rules(**{"10-open.yaml": ALLOW_EVERYTHING}))
    assert engine.classify("DROP TABLE t", ctx(engine)).action == "allow"  # the rules do apply
    decision = engine.classify(sql, ctx(engine))
    assert decision.action == "deny"
    assert decision.rule_ids == (STATE_SCHEMA_RULE,)
    (verdict,) = decision.statements
    assert verdict.rule == STATE_SCHEMA_RULE
    assert "open.everything" in verdict.rules  # what matched is still reported


def test_rule_files_cannot_take_the_builtin_id(write_rules: WriteRules) -> None:
    text = """
rules:
  - id: builtin.state-schema
    description: pretend to be pgguard
    action: allow
"""
    with pytest.raises(RulesError) as info:
        PolicyEngine.load(write_rules(**{"10-x.yaml": text}))
    assert "reserved" in str(info.value)


def test_unreadable_text_that_spells_a_name_is_denied_even_when_rules_allow_unreadable(
    write_rules: WriteRules,
) -> None:
    engine = PolicyEngine.load(write_rules(**{"10-open.yaml": ALLOW_EVERYTHING}))
    unparseable = engine.classify("UPDATE pgguard.approval_requests SET;;(", ctx(engine))
    assert (unparseable.action, unparseable.rule_ids) == ("deny", (STATE_SCHEMA_RULE,))
    undecodable = engine.classify(b"UPDATE pgguard.approval_requests SET x = '\xff'", ctx(engine))
    assert (undecodable.action, undecodable.rule_ids) == ("deny", (STATE_SCHEMA_RULE,))
    # Unreadable text that names nothing of pgguard's is still up to the rules.
    assert engine.classify("SELEC 1 +", ctx(engine)).action == "allow"


def test_a_classifier_failure_on_a_naming_text_is_still_the_builtin_deny(
    monkeypatch: pytest.MonkeyPatch, write_rules: WriteRules
) -> None:
    import pgguard.policy.engine as engine_module

    def broken(*args: object, **kwargs: object) -> tuple[StatementFacts, ...]:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine_module, "classify_text", broken)
    engine = PolicyEngine.load(write_rules(**{"10-open.yaml": ALLOW_EVERYTHING}), cache_size=0)
    decision = engine.classify("UPDATE pgguard.approval_requests SET state = 'x'", ctx(engine))
    assert (decision.action, decision.rule_ids) == ("deny", (STATE_SCHEMA_RULE,))


def test_a_multi_statement_string_is_denied_for_its_naming_statement() -> None:
    engine = PolicyEngine.load()
    decision = engine.classify(
        "SELECT 1; UPDATE pgguard.approval_requests SET state = 'denied'", ctx(engine)
    )
    assert decision.action == "deny"
    assert [v.action for v in decision.statements] == ["allow", "deny"]


def test_execute_of_a_prepared_naming_statement_is_denied() -> None:
    engine = PolicyEngine.load()
    context = ctx(engine)
    prepared = engine.classify("PREPARE p AS DELETE FROM pgguard.approval_decisions", context)
    assert prepared.action == "deny"
    executed = engine.classify("EXECUTE p", context)
    assert (executed.action, executed.rule_ids[0]) == ("deny", STATE_SCHEMA_RULE)


@pytest.mark.parametrize(
    ("clean", "naming"),
    [
        ("SELECT 'public.t'::regclass", "SELECT 'pgguard.approval_requests'::regclass"),
        ("SELECT 'public.t'::regclass", "SELECT 'pg'\n'guard.approval_requests'::regclass"),
        ("SELECT pg_notify('mine', 'x')", "SELECT pg_notify('pgguard_approvals', 'x')"),
        ("SELECT * FROM t WHERE s = 'a'", "SELECT * FROM t WHERE s = 'pgguard'"),
        (
            "SELECT set_config('search_path', 'public', false)",
            "SELECT set_config('search_path', 'public,pgguard', false)",
        ),
    ],
)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_caches_never_lend_an_answer_to_a_naming_text(
    clean: str, naming: str, as_bytes: bool
) -> None:
    engine = PolicyEngine.load()
    context = ctx(engine)
    for _ in range(2):  # the second round answers the clean text from a cache
        first = engine.classify(clean.encode() if as_bytes else clean, context)
        assert first.action != "deny"
    decision = engine.classify(naming.encode() if as_bytes else naming, context)
    assert (decision.action, decision.rule_ids[0]) == ("deny", STATE_SCHEMA_RULE)


def test_the_defaults_are_pgguards_defaults() -> None:
    settings = Settings.load(upstream={"dsn": "postgresql://u@localhost/db"})
    assert settings.state.schema_name == DEFAULT_STATE_SCHEMA
    assert DEFAULT_CHANNELS == (NOTIFY_CHANNEL,)
    assert PolicyEngine.load().protected == ProtectedNames()


def test_the_configured_schema_is_protected() -> None:
    settings = Settings.load(
        upstream={"dsn": "postgresql://u@localhost/db"}, state={"schema": "guard_state"}
    )
    engine = load_engine(settings)
    assert engine.protected == ProtectedNames(schema="guard_state", channels=(NOTIFY_CHANNEL,))
    assert engine.classify("DELETE FROM guard_state.ledger", ctx(engine)).action == "deny"
    assert engine.classify("LISTEN pgguard_approvals", ctx(engine)).action == "deny"


def test_cli_classify_protects_the_default_names() -> None:
    engine = _load_engine(None)
    out = io.StringIO()
    lines = b"".join(json.dumps({"sql": sql}).encode() + b"\n" for sql in ATTACKS)
    classify_stream(engine, io.BytesIO(lines), out, "cli", "cli")
    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["action"] for r in results] == ["deny"] * len(ATTACKS)
    assert all(r["rule_ids"][0] == STATE_SCHEMA_RULE for r in results)
