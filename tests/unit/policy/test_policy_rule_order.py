"""Rule files load in the documented order, and `rules check` names rules that never decide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pgguard.policy import Context, PolicyEngine
from pgguard.policy.loader import rule_files
from pgguard.policy.shadows import shadowed_rules
from tests.support import shipped_rules_with

PROTECT = """
version: 1
rules:
  - id: site.protect-payroll
    description: Nobody drops payroll.
    match: {tables: [payroll]}
    action: deny
"""


def test_default_yaml_comes_first_then_the_rest_by_name(tmp_path: Path) -> None:
    for name in ("zz.yaml", "50-etl.yaml", "default.yaml", "00-early.yml", "functions.yaml"):
        (tmp_path / name).write_text("version: 1\n")
    names = [p.name for p in rule_files(tmp_path)]
    assert names == ["default.yaml", "00-early.yml", "50-etl.yaml", "functions.yaml", "zz.yaml"]


def test_a_site_deny_in_50_protect_beats_the_default_hold(tmp_path: Path) -> None:
    engine = PolicyEngine.load(shipped_rules_with(tmp_path, "50-protect.yaml", PROTECT))
    decision = engine.classify("DROP TABLE payroll", Context(agent="a", database="d"))
    assert (decision.action, decision.rule_ids) == ("deny", ("site.protect-payroll",))


SHADOWED = """
version: 1
rules:
  - id: site.allow-etl-copies
    description: The ETL agent may export.
    match: {agents: [etl], categories: [export]}
    action: allow
  - id: site.hold-everything-of-etl
    description: Everything the ETL agent does is reviewed.
    match: {agents: [etl, "~etl-.*"]}
    action: hold
  - id: site.deny-other-drops
    description: Not overridden - a narrower rule comes later.
    match: {kinds: [DropStmt]}
    action: deny
  - id: site.hold-drops-of-prod
    description: Narrower than the one before.
    match: {kinds: [DropStmt], databases: [prod]}
    action: hold
"""


def test_a_rule_a_later_rule_always_overrides_is_reported(tmp_path: Path) -> None:
    directory = shipped_rules_with(tmp_path, "50-site.yaml", SHADOWED)
    shadows = shadowed_rules(PolicyEngine.load(directory).policy.rules)
    assert [(s.rule_id, s.by_id) for s in shadows] == [
        ("site.allow-etl-copies", "site.hold-everything-of-etl")
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pgguard.cli_policy", "rules", "check", str(directory)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"rule site.allow-etl-copies can never decide" in proc.stderr
    assert b"site.deny-other-drops can never" not in proc.stderr


def test_the_shipped_rules_have_no_dead_rule() -> None:
    assert shadowed_rules(PolicyEngine.load().policy.rules) == []
