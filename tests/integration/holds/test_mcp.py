"""The agents' MCP door (issue 21), driven by the ``mcp`` SDK's own client: streamable HTTP at
``{public_url}/mcp`` with HTTP Basic (the agent's own pgguard credentials) and stdio
(``pgguard mcp --agent NAME`` with PGGUARD_AGENT_PASSWORD). An agent sees only its own
requests; a request asked ahead of time, once approved, lets exactly that text run once."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.integration.holds.helpers import TOKENS, auth, sha
from tests.support import AGENT, AGENT_PASSWORD, OWNER, PgguardThread

TOOLS = {"check_statement", "request_approval", "request_status", "my_requests"}


@asynccontextmanager
async def http_client(pgguard: PgguardThread, user: str, password: str) -> AsyncIterator[Client]:
    url = f"{pgguard.http_url}/mcp"
    async with (
        create_mcp_http_client(auth=httpx2.BasicAuth(user, password)) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_http_tools_answer_for_the_authenticated_agent(pgguard: PgguardThread) -> None:
    async with http_client(pgguard, AGENT, AGENT_PASSWORD) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        held = await call(client, "check_statement", sql="DROP TABLE hold_t")
        assert held["action"] == "hold"
        assert held["categories"] == ["ddl"]
        assert held["hold_mode"] == "wait"
        allowed = await call(client, "check_statement", sql="SELECT 1")
        assert allowed["action"] == "allow"
        masked = await call(
            client, "check_statement", sql="SELECT * FROM t WHERE email = 'ada@example.com'"
        )
        assert "ada@example.com" not in masked["masked_statement"]
        returned = await call(client, "check_statement", sql="DROP TABLE return_t")
        assert returned["hold_mode"] == "return"


async def test_http_refuses_missing_wrong_and_approver_credentials(
    pgguard: PgguardThread,
) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as raw:
        for extra in (
            {},
            auth("dba1"),  # an approver's bearer token is no agent
            {"Authorization": "Basic " + _b64(f"{AGENT}:wrong")},
            {"Authorization": "Basic " + _b64(f"dba1:{TOKENS['dba1']}")},
            {"Authorization": "Basic " + _b64(f"nobody:{AGENT_PASSWORD}")},
        ):
            response = await raw.post("/mcp", json=body, headers={**headers, **extra})
            assert response.status_code == 401, (extra, response.text)
            assert "Basic" in response.headers["www-authenticate"]


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def test_an_agent_sees_only_its_own_requests(pgguard: PgguardThread) -> None:
    async with http_client(pgguard, AGENT, AGENT_PASSWORD) as client:
        opened = await call(client, "request_approval", sql="DROP TABLE quorum_t", reason="tidy up")
        request = opened["request"]
        assert request["state"] == "pending"
        assert request["reason"] == "tidy up"
        again = await call(client, "request_approval", sql="DROP TABLE quorum_t", reason="x")
        assert again["request"]["id"] == request["id"]  # pending: the same request
        status = await call(client, "request_status", id=request["id"])
        assert status["state"] == "pending"
        mine = await call(client, "my_requests", state="pending")
        assert request["id"] in {r["id"] for r in mine["requests"]}
    async with http_client(pgguard, "leaky", "leaky-password") as other:
        text = await refused(other, "request_status", id=request["id"])
        assert f"no request {request['id']}" in text
        assert "DROP" not in text
        theirs = await call(other, "my_requests")
        assert request["id"] not in {r["id"] for r in theirs["requests"]}


async def test_http_request_ahead_runs_the_exact_statement_once(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    async with http_client(pgguard, AGENT, AGENT_PASSWORD) as client:
        opened = await call(
            client, "request_approval", sql="DELETE FROM dba_only_t", reason="reset"
        )
    request_id = opened["request"]["id"]
    response = await api.post(
        f"/api/requests/{request_id}/approve", json={"reason": "ok"}, headers=auth("dba1")
    )
    assert response.status_code == 200, response.text
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        other = asyncio.create_task(conn.execute("DELETE FROM dba_only_t WHERE id = 1"))
        await asyncio.sleep(1)
        assert not other.done()  # another text is held as usual
        other.cancel()
    finally:
        conn.terminate()
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        assert await asyncio.wait_for(conn.execute("DELETE FROM dba_only_t"), 10) == "DELETE 1"
        again = asyncio.create_task(conn.execute("DELETE FROM dba_only_t"))
        await asyncio.sleep(1)
        assert not again.done()  # once: the second send waits for a new approval
        again.cancel()
    finally:
        conn.terminate()


def _config(pgguard: PgguardThread, state_dsn: str, path: Path) -> Path:
    settings = pgguard.settings
    config = path / "pgguard.toml"
    config.write_text(
        f'data_dir = "{settings.data_dir.resolve()}"\n'
        f'[upstream]\ndsn = "{settings.upstream.dsn.get_secret_value()}"\n'
        f'[state]\ndsn = "{state_dsn}"\nschema = "{settings.state.schema_name}"\n'
        f'[policy]\nrules_dir = "{settings.policy.rules_dir}"\n'
        f'[http]\npublic_url = "{settings.http.public_url}"\n'
        f'[[agents]]\nname = "{AGENT}"\npassword = "{AGENT_PASSWORD}"\nowner = "{OWNER}"\n'
        f'[[approvers]]\nid = "dba1"\nname = "Dana DBA"\ngroups = ["dba"]\n'
        f'token_sha256 = "{sha(TOKENS["dba1"])}"\n'
    )
    return config


def _stdio(config: Path, password: str) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "pgguard.cli", "mcp", "--agent", AGENT, "-c", str(config)],
        env={**env, "PGGUARD_AGENT_PASSWORD": password},
    )


async def test_stdio_request_ahead_then_approved_runs_once(
    pgguard: PgguardThread, api: httpx.AsyncClient, state_dsn: str, tmp_path: Path
) -> None:
    config = _config(pgguard, state_dsn, tmp_path)
    async with Client(_stdio(config, AGENT_PASSWORD)) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        opened = await call(client, "request_approval", sql="DROP TABLE hold_t", reason="gone")
        request_id = opened["request"]["id"]
        assert opened["request"]["page"].endswith(f"/requests/{request_id}")
    response = await api.post(
        f"/api/requests/{request_id}/approve", json={"reason": "ok"}, headers=auth("dba1")
    )
    assert response.status_code == 200, response.text
    conn = await asyncpg.connect(pgguard.dsn())
    try:  # the proxy (another process's key file, the same key) runs it without a new hold
        assert await asyncio.wait_for(conn.execute("DROP TABLE hold_t"), 10) == "DROP TABLE"
    finally:
        await conn.close()


async def test_stdio_refuses_a_wrong_password(
    pgguard: PgguardThread, state_dsn: str, tmp_path: Path
) -> None:
    config = _config(pgguard, state_dsn, tmp_path)
    with pytest.raises(Exception):  # noqa: B017,PT011 - the server exits before the handshake
        async with Client(_stdio(config, "wrong")) as client:
            await client.list_tools()
