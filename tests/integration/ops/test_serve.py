"""`pgguard serve` as an operator runs it: a TOML file, JSON logs, signals, a late upstream.

One process, start to stop: it waits for an upstream that is not up yet (/readyz says
"waiting"), logs a start-up summary, reloads on SIGHUP (a rule's action changes for the next
statement while a held statement keeps its request), and on SIGTERM logs the signal and records
the statement still held as "pgguard shut down".
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.statedb import setup
from tests.integration.holds.helpers import TOKENS, auth, sha
from tests.integration.ops.conftest import OPS_RULES, STATE_PLAN
from tests.integration.ops.forwarder import Forwarder
from tests.support import AGENT, AGENT_PASSWORD, OWNER, TEST_DATA_DIR, shipped_rules_with

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def late_upstream(need_embedded: EmbeddedPostgres) -> Iterator[Forwarder]:
    relay = Forwarder("127.0.0.1", need_embedded.port).start()
    relay.off()  # not up yet when pgguard starts
    try:
        yield relay
    finally:
        relay.close()


def write_config(
    directory: Path, upstream: str, state: str, rules: Path, schema: str
) -> tuple[Path, int, int]:
    port, http_port = free_port(), free_port()
    config = directory / "pgguard.toml"
    config.write_text(
        f"""
data_dir = "{TEST_DATA_DIR}"

[listen]
host = "127.0.0.1"
port = {port}

[upstream]
dsn = "{upstream}"

[state]
dsn = "{state}"
schema = "{schema}"

[policy]
rules_dir = "{rules}"

[limits]
startup_wait = 60
shutdown_grace = 1

[http]
host = "127.0.0.1"
port = {http_port}

[ledger]
spool_dir = "{directory / "spool"}"

[log]
format = "json"
level = "INFO"

[[agents]]
name = "{AGENT}"
password = "{AGENT_PASSWORD}"
owner = "{OWNER}"

[[approvers]]
id = "dba1"
name = "Dana DBA"
groups = ["dba"]
token_sha256 = "{sha(TOKENS["dba1"])}"
"""
    )
    return config, port, http_port


async def get_json(api: httpx.AsyncClient, path: str) -> tuple[int, dict[str, object]] | None:
    try:
        response = await api.get(path)
    except httpx.TransportError:
        return None  # between the start-up listener and the real one
    return response.status_code, response.json()


async def until(api: httpx.AsyncClient, path: str, code: int) -> dict[str, object]:
    async with asyncio.timeout(60):
        while True:
            answer = await get_json(api, path)
            if answer is not None and answer[0] == code:
                return answer[1]
            await asyncio.sleep(0.2)


async def pending_id(api: httpx.AsyncClient, needle: str) -> str:
    async with asyncio.timeout(15):
        while True:
            response = await api.get("/api/requests?state=pending", headers=auth("dba1"))
            for item in response.json():
                if needle in item["statement"]:
                    return str(item["id"])
            await asyncio.sleep(0.1)


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON


async def until_logged(path: Path, event: str, count: int = 1) -> None:
    async with asyncio.timeout(20):
        # Polling a file another process writes: no event to wait on.
        while sum(1 for e in log_lines(path) if e.get("event") == event) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_serve_waits_reloads_on_sighup_and_logs_sigterm(
    tmp_path: Path,
    late_upstream: Forwarder,
    need_embedded: EmbeddedPostgres,
    state_dsn: str,
    direct_dsn: str,
) -> None:
    admin = await asyncpg.connect(direct_dsn)
    try:
        for name in ("hold_t", "reload_t", "last_t"):
            await admin.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int)")
    finally:
        await admin.close()
    (tmp_path / "rules").mkdir()
    rules = shipped_rules_with(tmp_path / "rules", "zz-ops.yaml", OPS_RULES)
    upstream = need_embedded.tcp_dsn().replace(f":{need_embedded.port}/", f":{late_upstream.port}/")
    state = setup.state_dsn(STATE_PLAN, parse_dsn(state_dsn))
    schema = f"pgguard_serve_{secrets.token_hex(4)}"
    config, port, http_port = write_config(tmp_path, upstream, state, rules, schema)
    stderr = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    with stderr.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "pgguard.cli", "serve", "-c", str(config)),
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    dsn = f"postgresql://{AGENT}:{AGENT_PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as api:
            waiting = await until(api, "/readyz", 503)
            assert waiting["status"] == "waiting"
            assert "upstream" in str(waiting["checks"])
            assert (await api.get("/healthz")).status_code == 200
            late_upstream.on()
            await until(api, "/readyz", 200)

            reader = await asyncpg.connect(dsn)
            holder = await asyncpg.connect(dsn)
            assert await reader.fetchval("SELECT count(*) FROM reload_t") == 0
            held = asyncio.create_task(holder.execute("DROP TABLE hold_t"))
            request_id = await pending_id(api, "hold_t")

            (rules / "zz-ops.yaml").write_text(OPS_RULES.replace("action: allow", "action: deny"))
            proc.send_signal(signal.SIGHUP)
            await until_logged(stderr, "reload")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetchval("SELECT count(*) FROM reload_t")
            assert not held.done()
            answer = await api.post(
                f"/api/requests/{request_id}/approve", json={}, headers=auth("dba1")
            )
            assert answer.status_code == 200
            assert await asyncio.wait_for(held, 10) == "DROP TABLE"

            last = asyncio.create_task(holder.execute("DROP TABLE last_t"))
            last_id = await pending_id(api, "last_t")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                await asyncio.wait_for(last, 10)
            reader.terminate()
            holder.terminate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = log_lines(stderr)
    summary = next(e for e in lines if e.get("event") == "summary")
    assert summary["version"]
    assert summary["mode"] == "enforce"
    assert str(rules / "zz-ops.yaml") in summary["rules_files"]  # type: ignore[operator]
    assert summary["agents"] == [AGENT]
    assert summary["approvers"] == ["dba1"]
    assert summary["listen"] == f"127.0.0.1:{port}"
    signals = [e["message"] for e in lines if e.get("event") == "signal"]
    assert any("SIGHUP" in str(m) for m in signals)
    assert any("SIGTERM" in str(m) for m in signals)
    assert any(e.get("decision") == "shutdown" and e.get("request_id") == last_id for e in lines)
    assert lines[-1]["message"] == "pgguard shut down"
    conn = await asyncpg.connect(state_dsn)
    try:
        row = await conn.fetchrow(
            f"SELECT state, state_reason FROM {schema}.approval_requests WHERE id = $1", last_id
        )
    finally:
        await conn.close()
    assert row is not None
    assert (row["state"], row["state_reason"]) == ("cancelled", "pgguard shut down")
