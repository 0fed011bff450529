"""Every example of every shipped rule holds (the same check `pgguard rules check` runs)."""

from __future__ import annotations

import pytest

from pgguard.policy import PolicyEngine
from pgguard.policy.examples import ExampleResult, run_examples

_RESULTS = run_examples(PolicyEngine.load())


def test_shipped_rules_have_examples() -> None:
    assert len(_RESULTS) >= 50
    for compiled in PolicyEngine.load().policy.rules:
        assert compiled.rule.examples.match, f"{compiled.id} has no match examples"


@pytest.mark.parametrize(
    "result", _RESULTS, ids=[f"{r.rule_id}:{r.expected}:{r.sql[:40]}" for r in _RESULTS]
)
def test_shipped_rule_example(result: ExampleResult) -> None:
    assert result.passed, f"{result.where}: {result.rule_id} {result.expected}: {result.detail}"
