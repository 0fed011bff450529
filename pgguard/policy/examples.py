"""Running the `examples:` of every rule, for `pgguard rules check` and the test suite.

Owns: `run_examples` → one `ExampleResult` per example. An example under `match` passes when the
rule matches at least one statement of it; one under `no_match` when it matches none.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgguard.policy.decision import Context
from pgguard.policy.engine import PolicyEngine
from pgguard.policy.models import ExampleCase


@dataclass(frozen=True, slots=True)
class ExampleResult:
    rule_id: str
    where: str
    expected: str  # "match" | "no_match"
    sql: str
    passed: bool
    detail: str


def run_examples(engine: PolicyEngine) -> list[ExampleResult]:
    """Classify every example of every rule in `engine` (a fresh session each) and check it."""
    results: list[ExampleResult] = []
    for compiled in engine.policy.rules:
        rule = compiled.rule
        for expected, cases in (
            ("match", rule.examples.match),
            ("no_match", rule.examples.no_match),
        ):
            for case in cases:
                example = case if isinstance(case, ExampleCase) else ExampleCase(sql=case)
                ctx = Context(
                    agent=example.agent, database=example.database, session=engine.new_session()
                )
                decision = engine.classify(example.sql, ctx)
                hit = any(rule.id in verdict.rules for verdict in decision.statements)
                passed = hit == (expected == "match")
                detail = (
                    f"action={decision.action} categories={list(decision.categories)} "
                    f"rules={[list(v.rules) for v in decision.statements]}"
                )
                results.append(
                    ExampleResult(rule.id, compiled.where, expected, example.sql, passed, detail)
                )
    return results
