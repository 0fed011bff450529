"""`pgguard ledger show|export|verify` with a TOML config, through Typer's test runner."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

from pgguard.cli_ledger import register
from pgguard.ledger import LedgerWriter
from tests.integration.ledger.conftest import entry

APPROVER = {"id": "bob", "name": "Bob", "channel": "teams", "comment": "ok"}


@pytest.fixture(scope="module")
async def config(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    data = directory / "data"  # the configured data_dir: signing key and anchor file
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=directory / "spool",
        instance_id="cli",
        signing_key_file=data / "ledger-signing.pem",
        anchor_file=data / "ledger-anchors.jsonl",
    )
    writer.record(entry(agent="etl", statement="SELECT 1"))
    await writer.record_durable(
        entry(
            agent="bot",
            action="hold",
            categories=("export",),
            request_id="req-9",
            approvers=(APPROVER,),
            statement="COPY t TO STDOUT",
        )
    )
    writer.record(entry(agent="bot", action="deny", categories=("ddl",), statement="DROP TABLE t"))
    await writer.close()
    path = directory / "pgguard.toml"
    path.write_text(
        f'data_dir = "{data}"\n\n[upstream]\ndsn = "{ledger_dsn}"\n\n'
        f'[state]\ndsn = "{ledger_dsn}"\nschema = "{state_schema}"\n'
    )
    return path


def run(*args: str) -> tuple[int, str, str]:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None: ...

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.stdout, result.stderr


def test_show(config: Path) -> None:
    code, out, _ = run("ledger", "show", "-c", str(config), "--agent", "bot")
    assert code == 0, out
    assert "req-9" in out
    assert "Bob" in out
    assert "DROP TABLE t" in out
    assert "SELECT 1" not in out


def test_export_jsonl_and_csv_with_filters(config: Path, tmp_path: Path) -> None:
    code, out, _ = run("ledger", "export", "-c", str(config), "--format", "jsonl")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["agent"] for r in records] == ["etl", "bot", "bot"]  # oldest first
    code, out, _ = run("ledger", "export", "-c", str(config), "--approver", "bob")
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["req-9"]
    target = tmp_path / "out.csv"
    code, _, _ = run(
        "ledger",
        "export",
        "-c",
        str(config),
        "--format",
        "csv",
        "-o",
        str(target),
        "--category",
        "ddl",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [r["statement"] for r in rows] == ["DROP TABLE t"]
    assert rows[0]["action"] == "deny"
    assert rows[0]["categories"] == '["ddl"]'
    code, out, _ = run("ledger", "export", "-c", str(config), "--since", "2999-01-01")
    assert code == 0
    assert out == ""


async def test_verify_exit_codes(
    config: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    # asyncio.run inside the CLI needs a thread without a running loop
    code, out, _ = await asyncio.to_thread(run, "ledger", "verify", "-c", str(config))
    assert code == 0
    assert "ledger verified: 3 entries in 1 chains, 1 signed checkpoints" in out
    await admin.execute(
        f"UPDATE \"{state_schema}\".ledger_entries SET statement = 'SELECT 2' "
        "WHERE statement = 'SELECT 1'"
    )
    code, _, err = await asyncio.to_thread(run, "ledger", "verify", "-c", str(config))
    assert code == 1
    assert "modified" in err


def test_unreachable_database_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\ndsn = "postgresql://x:y@127.0.0.1:1/db"\n[state]\ntimeout = 1\n')
    code, _, err = run("ledger", "verify", "-c", str(path), "--hash-only")
    assert code == 2
    assert "cannot reach the state database" in err
