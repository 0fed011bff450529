"""Rule files are validated when loaded, and every error names file and line."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pgguard.policy import PolicyEngine, RulesError
from pgguard.policy.loader import load_directory

WriteRules = Callable[..., Path]

GOOD = """\
version: 1
rules:
  - id: allow-all-reads
    description: reads
    match:
      privileged: false
    action: allow
"""


def error_of(directory: Path) -> RulesError:
    with pytest.raises(RulesError) as info:
        load_directory(directory)
    return info.value


def assert_names_line(err: RulesError, name: str, line: int, text: str) -> None:
    assert any(
        re.search(rf"{re.escape(name)}:{line}: .*{re.escape(text)}", p) for p in err.problems
    ), err.problems


def test_good_file_loads(write_rules: WriteRules) -> None:
    policy = load_directory(write_rules(**{"a.yaml": GOOD}))
    assert [r.id for r in policy.rules] == ["allow-all-reads"]


def test_unknown_key_names_file_and_line(write_rules: WriteRules) -> None:
    text = GOOD.replace("    action: allow\n", "    action: allow\n    approvres: [dba]\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 8, "approvres")


def test_unknown_match_key_names_its_line(write_rules: WriteRules) -> None:
    text = GOOD.replace("      privileged: false\n", "      privileged: false\n      tabels: [x]\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 7, "tabels")


def test_bad_regex_names_file_and_line(write_rules: WriteRules) -> None:
    text = GOOD.replace("      privileged: false\n", "      agents: ['~etl-(']\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 6, "bad regular expression")


def test_unknown_category_names_file_and_line(write_rules: WriteRules) -> None:
    text = GOOD.replace("      privileged: false\n", "      categories: [ddl, exfiltrate]\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 6, "categories.1")


def test_unknown_statement_kind_is_an_error(write_rules: WriteRules) -> None:
    text = GOOD.replace("      privileged: false\n", "      kinds: [DropTableStmt]\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 6, "unknown statement kind")


def test_unknown_action_is_an_error(write_rules: WriteRules) -> None:
    err = error_of(write_rules(**{"a.yaml": GOOD.replace("action: allow", "action: approve")}))
    assert_names_line(err, "a.yaml", 7, "action")


def test_bad_duration_is_an_error(write_rules: WriteRules) -> None:
    text = GOOD.replace("action: allow", "action: hold\n    hold_timeout: soon")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 8, "hold_timeout")


def test_duplicate_yaml_key_is_an_error(write_rules: WriteRules) -> None:
    text = GOOD.replace("    action: allow\n", "    action: allow\n    action: deny\n")
    err = error_of(write_rules(**{"a.yaml": text}))
    assert_names_line(err, "a.yaml", 8, "duplicate key")


def test_duplicate_rule_id_across_files_is_an_error(write_rules: WriteRules) -> None:
    err = error_of(write_rules(**{"a.yaml": GOOD, "b.yaml": GOOD}))
    assert_names_line(err, "b.yaml", 3, "duplicate rule id")


def test_invalid_yaml_names_its_line(write_rules: WriteRules) -> None:
    err = error_of(write_rules(**{"a.yaml": GOOD + "  - id: [unclosed\n"}))
    assert any("a.yaml:" in p for p in err.problems)


def test_problems_in_several_files_are_all_reported(write_rules: WriteRules) -> None:
    bad1 = GOOD.replace("privileged: false", "privileged: maybe")
    bad2 = GOOD.replace("id: allow-all-reads", "id: other\n    extra: 1")
    err = error_of(write_rules(**{"a.yaml": bad1, "b.yaml": bad2}))
    assert any("a.yaml:6" in p for p in err.problems)
    assert any("b.yaml:4" in p for p in err.problems)


def test_directory_without_rules_is_an_error(write_rules: WriteRules, tmp_path: Path) -> None:
    err = error_of(write_rules(**{"a.yaml": "functions:\n  admin:\n    f: does things\n"}))
    assert "no rules" in str(err)
    with pytest.raises(RulesError):
        load_directory(tmp_path / "missing")


def test_rules_error_is_a_value_error() -> None:
    assert issubclass(RulesError, ValueError)


def test_engine_load_reports_file_and_line(write_rules: WriteRules) -> None:
    text = GOOD.replace("    action: allow\n", "    action: allow\n    bogus: 1\n")
    with pytest.raises(RulesError, match=r"a\.yaml:8"):
        PolicyEngine.load(write_rules(**{"a.yaml": text}))


def test_custom_directory_keeps_the_shipped_catalog(write_rules: WriteRules) -> None:
    engine = PolicyEngine.load(write_rules(**{"a.yaml": GOOD}))
    assert engine.policy.catalog.function("pg_read_file") is not None


def test_custom_catalog_entries_add_categories(write_rules: WriteRules) -> None:
    extra = "functions:\n  execute:\n    run_anything: runs shell commands (in-house)\n"
    engine = PolicyEngine.load(write_rules(**{"a.yaml": GOOD, "b.yaml": extra}))
    from pgguard.policy import Context

    decision = engine.classify("SELECT run_anything('ls')", Context("a", "d"))
    assert decision.categories == ("execute",)
    assert decision.action == "hold"


def test_shipped_catalog_names_the_critical_entries(engine: PolicyEngine) -> None:
    catalog = engine.policy.catalog
    for name in ("pg_read_file", "lo_export", "dblink", "pg_terminate_backend", "lo_import"):
        assert catalog.function(name) is not None, name
    for setting in ("role", "session_authorization"):
        entry = catalog.setting(setting)
        assert entry is not None
        assert "privilege" in entry[0]
