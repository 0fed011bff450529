"""`pgguard ledger export|show|verify` on a ledger of some size, run as the real command (a
subprocess): the formats, ``--json``, the progress bar only on a terminal, and a closed pipe
(``| head``) that ends quietly."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from pgguard.ledger import LedgerWriter
from tests.integration.ledger.conftest import entry, record_packed

ENTRIES = 20_000  # well above a pipe's buffer once written out
ROOT = Path(__file__).resolve().parents[3]
APPROVER = {"id": "bob", "name": "Bob", "channel": "teams", "comment": "ok"}


@pytest.fixture(scope="module")
async def config(
    ledger_dsn: str,
    state_schema: str,
    admin: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    directory = tmp_path_factory.mktemp("export")
    data = directory / "data"
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=directory / "spool",
        instance_id="export",
        signing_key_file=data / "ledger-signing.pem",
        anchor_file=data / "ledger-anchors.jsonl",
    )
    for i in range(ENTRIES - 2):
        record_packed(writer, statement=f"SELECT {i % 50}")
        if i % 5000 == 4999:
            await writer.flush()  # a pack each time at least
    await writer.record_durable(
        entry(
            agent="bot",
            action="hold",
            categories=("export",),
            request_id="req-1",
            approvers=(APPROVER,),
            statement="COPY t TO STDOUT",
        )
    )
    writer.record(entry(agent="bot", action="deny", categories=("ddl",), statement="DROP TABLE t"))
    await writer.close()
    # some packs expanded, some not: exports and verify read both
    assert await admin.fetchval(f'SELECT "{state_schema}".ledger_expand(1)') > 0
    assert await admin.fetchval(f'SELECT count(*) FROM "{state_schema}".ledger_packs') > 0
    path = directory / "pgguard.toml"
    path.write_text(
        f'data_dir = "{data}"\n\n[upstream]\ndsn = "{ledger_dsn}"\n\n'
        f'[state]\ndsn = "{ledger_dsn}"\nschema = "{state_schema}"\n'
    )
    return path


def pgguard(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pgguard.cli", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_export_formats_stream_every_entry(config: Path, tmp_path: Path) -> None:
    done = pgguard("ledger", "export", "-c", str(config), "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""  # not a terminal: no progress bar
    lines = done.stdout.splitlines()
    assert len(lines) == ENTRIES
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["seq"] == 1
    assert last["statement"] == "DROP TABLE t"
    assert json.loads(lines[-2])["approvers"] == [APPROVER]
    target = tmp_path / "out.csv"
    done = pgguard("ledger", "export", "-c", str(config), "--format", "csv", "-o", str(target))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == ENTRIES
    assert rows[-1]["categories"] == '["ddl"]'


def test_export_ocsf_is_datastore_activity(config: Path) -> None:
    done = pgguard("ledger", "export", "-c", str(config), "--format", "ocsf", "--agent", "bot")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(events) == 2
    for event in events:
        assert event["class_uid"] == 6005
        assert event["category_uid"] == 6
        assert event["type_uid"] == 6005 * 100 + event["activity_id"]
        assert isinstance(event["time"], int)
        assert event["metadata"]["product"]["name"] == "pgguard"
        assert event["metadata"]["version"]
    held, denied = events
    assert held["activity_id"] == 1  # Read: an export
    assert held["action"] == "Allowed"
    assert held["query_info"]["query_string"] == "COPY t TO STDOUT"
    assert held["unmapped"]["request_id"] == "req-1"
    assert held["unmapped"]["approvers"] == [APPROVER]
    assert denied["activity_id"] == 6  # Create: DDL
    assert (denied["action_id"], denied["status_id"]) == (2, 2)


def test_export_json_summary(config: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    done = pgguard("ledger", "export", "-c", str(config), "-o", str(target), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr)
    assert summary["entries"] == ENTRIES
    assert summary["format"] == "jsonl"


def test_closed_pipe_ends_quietly(config: Path) -> None:
    """``pgguard ledger export | head -1``: the reader goes away after one line."""
    command = f"{sys.executable} -m pgguard.cli ledger export -c {config} | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert len(done.stdout.splitlines()) == 1
    assert done.stderr == b"", done.stderr
    assert done.returncode == 0


def test_progress_bar_only_on_a_terminal(config: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    primary, secondary = pty.openpty()
    try:
        command = ["ledger", "export", "-c", str(config), "-o", str(target)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard.cli", *command],
            stdout=subprocess.DEVNULL,
            stderr=secondary,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        )
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(primary)
    assert b"export" in seen
    assert f"{ENTRIES}".encode() in seen or b"exported" in seen
    assert len(target.read_text().splitlines()) == ENTRIES


def test_show_and_verify_json(config: Path) -> None:
    done = pgguard("ledger", "show", "-c", str(config), "--limit", "5", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert [e["statement"] for e in shown["entries"][:2]] == ["DROP TABLE t", "COPY t TO STDOUT"]
    assert len(shown["entries"]) == 5
    assert shown["lag"]["packs"] >= 1  # the fixture left packs unexpanded
    done = pgguard("ledger", "verify", "-c", str(config), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["entries"] == ENTRIES
    assert report["signed"] is True
    assert report["problems"] == []
