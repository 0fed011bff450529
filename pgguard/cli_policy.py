"""The `pgguard classify` and `pgguard rules check` commands (registered onto the main Typer app).

Owns the CLI contract automated checks depend on:
- `classify --json` reads one SQL string as raw bytes from stdin and prints one JSON object
  `{"privileged", "categories", "action", "statements": [{"kind", "categories", "rules"}, ...]}`
  (plus extra keys). Unreadable input is `"privileged": true` with kind `unparseable`.
- `classify --jsonl` reads `{"sql": "..."}` per line (optional "agent", "database") and writes
  exactly one result object per input line, flushing after each, until end of input. One session
  spans the stream, like one connection. A line that is not such an object yields
  `{"error": ..., "privileged": true, "action": "deny"}` so the output stays line-aligned.
- `rules check [DIR]` validates rule files and runs their examples; exit 1 on any problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, BinaryIO, TextIO

import typer

from pgguard.policy import Context, PolicyEngine, RulesError, SessionTracker
from pgguard.policy.examples import run_examples
from pgguard.policy.shadows import shadowed_rules
from pgguard.sql.statenames import ProtectedNames

_DEFAULT_AGENT = "cli"
_DEFAULT_DATABASE = "cli"


def register(app: typer.Typer) -> None:
    """Add `classify` and the `rules` sub-app (with `check`) to `app`."""
    app.command("classify")(classify_command)
    rules_app = typer.Typer(
        help="Validate and test policy rule files.\n\n"
        "Example: pgguard rules check /etc/pgguard/rules",
        no_args_is_help=True,
    )
    rules_app.command("check")(rules_check_command)
    app.add_typer(rules_app, name="rules")


def classify_command(
    rules: Annotated[
        Path | None, typer.Option("--rules", help="Rules directory (default: shipped rules).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Read one SQL string from stdin; print one JSON object.")
    ] = False,
    as_jsonl: Annotated[
        bool, typer.Option("--jsonl", help='Read {"sql": ...} per line; print one result per line.')
    ] = False,
    agent: Annotated[str, typer.Option(help="Agent name the rules see.")] = _DEFAULT_AGENT,
    database: Annotated[str, typer.Option(help="Database name the rules see.")] = _DEFAULT_DATABASE,
) -> None:
    """Classify SQL read from standard input and print the policy decision.

    Example: echo "COPY customers TO STDOUT" | pgguard classify --json
    """
    if as_json and as_jsonl:
        raise typer.BadParameter("--json and --jsonl are exclusive")
    engine = _load_engine(rules)
    if as_jsonl:
        classify_stream(engine, sys.stdin.buffer, sys.stdout, agent, database)
        return
    data = sys.stdin.buffer.read()
    ctx = Context(agent=agent, database=database, session=engine.new_session())
    decision = engine.classify(data, ctx)
    if as_json:
        sys.stdout.write(json.dumps(decision.to_json()) + "\n")
        return
    sys.stdout.write(f"action: {decision.action}  privileged: {decision.privileged}\n")
    for verdict in decision.statements:
        cats = ", ".join(verdict.categories) or "-"
        rules_text = ", ".join(verdict.rules) or "-"
        sys.stdout.write(f"  {verdict.kind}: categories [{cats}] rules [{rules_text}]\n")
    for reason in decision.reasons:
        sys.stdout.write(f"  why: {reason}\n")


def classify_stream(
    engine: PolicyEngine, source: BinaryIO, sink: TextIO, agent: str, database: str
) -> None:
    """The --jsonl loop: one result line per input line, flushed as soon as it is known."""
    session = engine.new_session()
    for raw in source:
        line = raw.rstrip(b"\r\n")
        result = _classify_line(engine, line, agent, database, session)
        sink.write(json.dumps(result) + "\n")
        sink.flush()


def _classify_line(
    engine: PolicyEngine,
    line: bytes,
    agent: str,
    database: str,
    session: SessionTracker,
) -> dict[str, object]:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return _error("input line is not valid JSON")
    if not isinstance(request, dict) or not isinstance(request.get("sql"), str):
        return _error('input line must be an object with a string "sql"')
    line_agent = request.get("agent", agent)
    line_database = request.get("database", database)
    if not isinstance(line_agent, str) or not isinstance(line_database, str):
        return _error('"agent" and "database" must be strings')
    ctx = Context(agent=line_agent, database=line_database, session=session)
    return engine.classify(request["sql"], ctx).to_json()


def _error(message: str) -> dict[str, object]:
    return {
        "error": message,
        "privileged": True,
        "categories": ["unparseable"],
        "action": "deny",
        "statements": [],
    }


def rules_check_command(
    directory: Annotated[
        Path | None, typer.Argument(help="Rules directory (default: shipped rules).")
    ] = None,
) -> None:
    """Validate rule files, run every rule's examples, and warn about rules that can never
    decide (a later rule matches every statement they match). Exit 1 when an example fails.

    Example: pgguard rules check /etc/pgguard/rules
    """
    engine = _load_engine(directory)
    for shadow in shadowed_rules(engine.policy.rules):
        sys.stderr.write(f"warning: {shadow.message()}\n")
    results = run_examples(engine)
    failures = [r for r in results if not r.passed]
    for failure in failures:
        verb = "should match" if failure.expected == "match" else "should not match"
        sys.stderr.write(
            f"{failure.where}: rule {failure.rule_id} {verb}: {failure.sql!r} ({failure.detail})\n"
        )
    files = len(engine.policy.files)
    summary = (
        f"{len(engine.policy.rules)} rules in {files} files; "
        f"{len(results) - len(failures)}/{len(results)} examples pass"
    )
    sys.stdout.write(summary + "\n")
    if failures:
        raise typer.Exit(code=1)


def _load_engine(rules: Path | None) -> PolicyEngine:
    try:
        # The default state schema and channels, as a pgguard with default settings protects.
        return PolicyEngine.load(rules, protected=ProtectedNames())
    except RulesError as exc:
        for problem in exc.problems:
            sys.stderr.write(problem + "\n")
        raise typer.Exit(code=2) from None


def main() -> None:
    """Entry point for `python -m pgguard.cli_policy` (the real CLI is pgguard.cli)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
