"""The CLI contract, exercised as a subprocess exactly as automated checks run it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

WriteRules = Callable[..., Path]


CLI = [sys.executable, "-m", "pgguard.cli_policy"]


def run(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, timeout=60, check=False)


def classify_json(sql: bytes, *extra: str) -> dict[str, object]:
    proc = run(["classify", *extra, "--json"], sql)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


def test_classify_json_privileged() -> None:
    out = classify_json(b"SELECT 1; COPY orders TO STDOUT")
    assert out["privileged"] is True
    assert out["categories"] == ["export"]
    assert out["action"] == "hold"
    statements = out["statements"]
    assert isinstance(statements, list)
    assert [(s["kind"], s["categories"], s["rules"]) for s in statements] == [
        ("SelectStmt", [], ["default.allow-unprivileged"]),
        ("CopyStmt", ["export"], ["default.hold-export"]),
    ]


def test_classify_json_harmless() -> None:
    out = classify_json(b"SELECT abalance FROM pgbench_accounts WHERE aid = 42")
    assert out["privileged"] is False
    assert out["action"] == "allow"
    assert out["categories"] == []


def test_classify_json_hostile_bytes_are_privileged() -> None:
    for data in (b"SELECT 1\x00; DROP TABLE t", b"SELECT '\xff\xfe'", b"SELEC 1", b"\xc3"):
        out = classify_json(data)
        assert out["privileged"] is True
        assert out["action"] == "deny"


def test_classify_json_with_custom_rules(write_rules: WriteRules) -> None:
    rules = write_rules(
        **{
            "a.yaml": """
rules:
  - id: everything-held
    description: hold all
    match: {}
    action: hold
"""
        }
    )
    out = classify_json(b"SELECT 1", "--rules", str(rules))
    assert out["action"] == "hold"
    assert out["statements"][0]["rules"] == ["everything-held"]  # type: ignore[index]


def test_classify_jsonl_answers_line_by_line() -> None:
    lines = [
        json.dumps({"sql": "SELECT 1"}),
        json.dumps({"sql": "DROP TABLE t"}),
        "not json",
        json.dumps({"sql": "SELECT 1\u0000"}),
        json.dumps({"nosql": 1}),
        json.dumps({"sql": "SELECT pg_read_file('x')", "agent": "a", "database": "b"}),
    ]
    proc = run(["classify", "--jsonl"], ("\n".join(lines) + "\n").encode())
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(out) == len(lines)
    assert [o["action"] for o in out] == ["allow", "hold", "deny", "deny", "deny", "hold"]
    assert "error" in out[2]
    assert all(o["privileged"] is (o["action"] != "allow") for o in out)


def test_classify_jsonl_flushes_each_line() -> None:
    with subprocess.Popen(
        [*CLI, "classify", "--jsonl"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        for sql, action in (("SELECT 1", "allow"), ("TRUNCATE t", "hold")):
            proc.stdin.write((json.dumps({"sql": sql}) + "\n").encode())
            proc.stdin.flush()
            line = proc.stdout.readline()  # would block forever without a flush
            assert json.loads(line)["action"] == action
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_rules_check_passes_on_shipped_rules() -> None:
    proc = run(["rules", "check"], b"")
    assert proc.returncode == 0, proc.stderr
    assert b"examples pass" in proc.stdout


def test_rules_check_reports_failing_examples(write_rules: WriteRules) -> None:
    rules = write_rules(
        **{
            "a.yaml": """
rules:
  - id: hold-ddl
    description: ddl
    match: {categories: [ddl]}
    action: hold
    examples:
      match: [SELECT 1]
      no_match: [DROP TABLE t]
"""
        }
    )
    proc = run(["rules", "check", str(rules)], b"")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "a.yaml:3" in err
    assert "should match" in err
    assert "should not match" in err


def test_rules_check_reports_invalid_files(write_rules: WriteRules) -> None:
    rules = write_rules(**{"a.yaml": "rules:\n  - id: x\n    description: y\n    action: maybe\n"})
    proc = run(["rules", "check", str(rules)], b"")
    assert proc.returncode not in (0, 1)
    assert f"{Path(rules) / 'a.yaml'}:4" in proc.stderr.decode()


def test_register_adds_commands_to_an_app() -> None:
    import typer
    from typer.testing import CliRunner

    from pgguard.cli_policy import register

    app = typer.Typer()

    @app.command()
    def serve() -> None:
        """Placeholder for the proxy's own command."""

    register(app)
    result = CliRunner().invoke(app, ["classify", "--json"], input="DROP TABLE t")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["action"] == "hold"


def test_main_cli_module_exposes_the_same_contract() -> None:
    """Through pgguard.cli (the `pgguard` console script), once the main app registers us."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("pgguard.cli") is None:
        pytest.skip("pgguard.cli not present yet")
    proc = subprocess.run(
        [sys.executable, "-m", "pgguard.cli", "classify", "--json"],
        input=b"GRANT ALL ON t TO PUBLIC",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["privileged"], out["categories"], out["action"]) == (True, ["privilege"], "hold")
