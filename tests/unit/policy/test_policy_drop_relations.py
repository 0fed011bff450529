"""DROP exposes the relations it removes, so table-scoped rules judge it like other DDL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pgguard.policy import SHIPPED_RULES_DIR, Context, PolicyEngine

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
    directory: Path = tmp_path_factory.mktemp("rules")
    for path in SHIPPED_RULES_DIR.glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    (directory / "zz-scratch.yaml").write_text(SCRATCH_RULE)
    return PolicyEngine.load(directory)


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
