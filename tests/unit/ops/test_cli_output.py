"""What operators read: `pending` with whole ids, `ledger show` at 80 columns, `--version`."""

from __future__ import annotations

import subprocess
import sys

from pgguard import __version__
from pgguard.cli_approver import pending_text
from pgguard.cli_ledger import show_text
from pgguard.ledger.reader import LedgerRow
from tests.integration.ledger.conftest import entry

LONG = "COPY (SELECT " + ", ".join(f"column_{i}" for i in range(40)) + " FROM orders) TO STDOUT"


def test_pending_shows_whole_ids_and_fits_80_columns() -> None:
    requests: list[dict[str, object]] = [
        {
            "id": "nk7p7mdq2wfxa3be",
            "agent": "reporting-agent",
            "owner": "alice@example.com",
            "database": "warehouse",
            "categories": ["export"],
            "expires_at": "2026-12-04T19:00:00+00:00",
            "statement": LONG,
        }
    ]
    text = pending_text(requests)
    lines = text.splitlines()
    assert lines[0].split()[0] == "nk7p7mdq2wfxa3be"  # first on its line: copy and paste
    assert all(len(line) <= 80 for line in lines)
    assert "column_39" in text  # wrapped, not cut
    assert pending_text([]) == "no pending requests\n"


def test_ledger_show_fits_80_columns_and_wraps_the_statement_not_the_id() -> None:
    rows = [
        LedgerRow(
            entry(
                agent="bot",
                action="hold",
                categories=("export",),
                request_id="req-0123456789abcdef",
                approvers=({"id": "bob", "name": "Bob", "channel": "api"},),
                statement=LONG,
            ),
            "chain",
            1,
            "hash",
        )
    ]
    text = show_text(rows)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert any(line.strip().startswith("request req-0123456789abcdef") for line in lines)
    assert "column_39" in text
    assert "Bob (api)" in text


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pgguard.cli", "--version"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.decode().strip() == f"pgguard {__version__}"
