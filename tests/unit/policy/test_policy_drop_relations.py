"""DROP exposes the relations it removes, so table-scoped rules judge it like other DDL."""

from __future__ import annotations

import pytest

from pgguard.policy import Context, PolicyEngine
from tests.support import shipped_rules_with

SCRATCH_RULE = """
version: 1
rules:
  - id: scratch.allow-ddl
    description: DDL on scratch tables needs no approval.
    match:
      categories: [ddl]
      tables: ["~scratch_.*"]
    action: allow
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    directory = tmp_path_factory.mktemp("rules")
    return PolicyEngine.load(shipped_rules_with(directory, "zz-scratch.yaml", SCRATCH_RULE))


@pytest.mark.parametrize(
    ("sql", "action", "relations"),
    [
        ("DROP TABLE scratch_1", "allow", ["scratch_1"]),
        ("DROP VIEW scratch_v", "allow", ["scratch_v"]),
        ("DROP TABLE payroll", "hold", ["payroll"]),
        ("DROP TABLE scratch_1, payroll", "hold", ["payroll", "scratch_1"]),  # not fully covered
        ("DROP TABLE hr.payroll", "hold", ["hr.payroll"]),
        ("DROP INDEX IF EXISTS payroll_idx", "hold", ["payroll_idx"]),
    ],
)
def test_drop_targets_are_relations(
    engine: PolicyEngine, sql: str, action: str, relations: list[str]
) -> None:
    decision = engine.classify(sql, Context(agent="a", database="d"))
    assert decision.action == action
    assert list(decision.statements[0].relations) == relations
