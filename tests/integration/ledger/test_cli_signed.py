"""`pgguard ledger verify` with keys and anchor files: what it uses by default, and its exit codes
(0 intact, 1 problems, 2 nothing to check with)."""

from __future__ import annotations

import asyncio
import secrets
import stat
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pgguard.ledger import LedgerWriter
from tests.integration.ledger.attacker import Item, rewrite_chain
from tests.integration.ledger.conftest import entry, record_packed
from tests.integration.ledger.test_cli import run
from tests.support import PgguardThread, agent_settings


@pytest.fixture
async def config(
    ledger_dsn: str, state_schema: str, admin: asyncpg.Connection, tmp_path: Path
) -> Path:
    """A closed, signed chain of 3 entries (the tables emptied first) and its config file."""
    data = tmp_path / "data"
    writer = await LedgerWriter.open(
        ledger_dsn,
        schema=state_schema,
        spool_dir=tmp_path / "spool",
        instance_id="cli",
        signing_key_file=data / "ledger-signing.pem",
        anchor_file=data / "ledger-anchors.jsonl",
    )
    for table in ("ledger_entries", "ledger_packs", "ledger_checkpoints"):
        await admin.execute(f'TRUNCATE "{state_schema}".{table}')
    writer.record(entry(statement="SELECT 1"))
    record_packed(writer)
    record_packed(writer)
    await writer.close()
    path = tmp_path / "pgguard.toml"
    path.write_text(
        f'data_dir = "{data}"\n\n[state]\ndsn = "{ledger_dsn}"\nschema = "{state_schema}"\n'
    )
    return path


async def verify_cli(*args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run, "ledger", "verify", *args)  # asyncio.run needs a thread


async def test_plain_verify_uses_the_configured_key_and_anchor_file(config: Path) -> None:
    code, out, err = await verify_cli("-c", str(config))
    assert code == 0, err
    assert "ledger verified: 3 entries in 1 chains, 1 signed checkpoints" in out
    assert "warning" not in err


async def test_deleted_chain_exits_1(
    config: Path, admin: asyncpg.Connection, state_schema: str
) -> None:
    for table in ("ledger_entries", "ledger_packs", "ledger_checkpoints"):
        await admin.execute(f'DELETE FROM "{state_schema}".{table}')
    code, _, err = await verify_cli("-c", str(config))
    assert code == 1
    assert "chain_missing" in err
    code, _, err = await verify_cli("-c", str(config), "--hash-only")
    assert code == 0  # what the bare hash chain cannot see
    assert "warning: --hash-only" in err


async def test_a_key_that_did_not_sign_exits_1(config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    code, _, err = await verify_cli("-c", str(config), "--public-key", str(other))
    assert code == 1
    assert "bad_signature" in err
    assert "unanchored" in err
    # both keys: the right one covers the chain again
    right = config.parent / "data" / "ledger-signing.pub.pem"
    code, _, err = await verify_cli(
        "-c", str(config), "--public-key", str(other), "--public-key", str(right)
    )
    assert code == 0, err


async def test_no_key_and_unreadable_files_exit_2(config: Path, tmp_path: Path) -> None:
    for name in ("ledger-signing.pem", "ledger-signing.pub.pem"):
        (config.parent / "data" / name).unlink()
    code, _, err = await verify_cli("-c", str(config))
    assert code == 2
    assert "no public key" in err
    code, _, err = await verify_cli("-c", str(config), "--public-key", str(tmp_path / "nope.pem"))
    assert code == 2
    code, _, err = await verify_cli("-c", str(config), "--anchors", str(tmp_path / "nope.jsonl"))
    assert code == 2


async def test_without_the_anchor_file_verify_warns(config: Path) -> None:
    (config.parent / "data" / "ledger-anchors.jsonl").unlink()
    code, _, err = await verify_cli("-c", str(config))
    assert code == 0
    assert "warning: no anchor file" in err


async def test_through_the_proxy_then_rewritten(
    upstream_dsn: str, ledger_dsn: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """The real path: statements through pgguard (started as `serve` starts it, the key made
    at first start), a clean stop, `verify -c` passes; the rewrite with recomputed hashes that
    the bare hash chain misses makes it fail."""
    schema = f"pgguard_ledger_proxy_{secrets.token_hex(4)}"
    data = tmp_path / "data"
    settings = agent_settings(
        upstream_dsn,
        state={"dsn": ledger_dsn, "schema": schema},
        http={"enabled": False},
        data_dir=str(data),
        ledger={"spool_dir": str(tmp_path / "spool"), "checkpoint_entries": 5},
    )
    thread = PgguardThread(settings).start()
    try:
        conn = await asyncpg.connect(thread.dsn())
        try:
            for i in range(12):
                await conn.fetchval(f"SELECT {i}")
        finally:
            await conn.close()
    finally:
        thread.stop()
    assert stat.S_IMODE((data / "ledger-signing.pem").stat().st_mode) == 0o600
    path = tmp_path / "pgguard.toml"
    path.write_text(f'data_dir = "{data}"\n\n[state]\ndsn = "{ledger_dsn}"\nschema = "{schema}"\n')
    try:
        code, out, err = await verify_cli("-c", str(path))
        assert code == 0, err
        assert "signed checkpoints" in out
        (chain_id,) = [
            r["chain_id"]
            for r in await admin.fetch(f"SELECT DISTINCT chain_id FROM {schema}.ledger")
        ]

        def edit(items: list[Item]) -> list[Item]:
            items[1].set_statement("SELECT 'nothing to see'")
            return items

        await rewrite_chain(admin, schema, chain_id, edit)
        code, _, err = await verify_cli("-c", str(path), "--hash-only")
        assert code == 0
        code, _, err = await verify_cli("-c", str(path))
        assert code == 1
        assert "modified: entries " in err  # a run: from the last checkpoint that held
        assert " .. " in err
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
