"""Helpers for the Teams bot tests: settings with Entra subjects, clicks, request reads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from pgguard.settings import Settings
from tests.bot_connector_stub import BotConnectorStub
from tests.integration.holds.helpers import TOKENS, auth, eventually, sha, wait_for_request
from tests.support import AGENT, AGENT_PASSWORD, OWNER, PgguardThread, agent_settings

PUBLIC_URL = "https://pgguard.example.test"

# Entra object ids of the configured approvers (``[[approvers]] subject``), and of a stranger.
SUBJECTS = {
    "dba1": "11111111-1111-4111-8111-111111111111",
    "dba2": "22222222-2222-4222-8222-222222222222",
    "owner": "33333333-3333-4333-8333-333333333333",
    "aud": "44444444-4444-4444-8444-444444444444",
    "stranger": "55555555-5555-4555-8555-555555555555",
}


def bot_settings(
    upstream_dsn: str,
    state_dsn: str,
    rules_dir: Path,
    schema: str,
    spool: Path,
    bot: dict[str, object],
) -> Settings:
    """pgguard with the test rules, token+subject approvers, and ``[teams.bot]`` = ``bot``."""
    approvers = [
        ("dba1", "Dana DBA", ["dba"]),
        ("dba2", "Drew DBA", ["dba"]),
        (OWNER, "Alice Owner", ["dba"]),
        ("aud", "Audrey", ["audit"]),
    ]
    return agent_settings(
        upstream_dsn,
        state_dsn,
        agents=[{"name": AGENT, "password": AGENT_PASSWORD, "owner": OWNER}],
        policy={"rules_dir": str(rules_dir)},
        state={"schema": schema, "timeout": 5.0},
        http={"host": "127.0.0.1", "port": 0, "public_url": PUBLIC_URL},
        ledger={"spool_dir": str(spool)},
        teams={"bot": bot},
        approvers=[
            {
                "id": approver_id,
                "name": name,
                "groups": groups,
                "token_sha256": sha(TOKENS["owner" if approver_id == OWNER else approver_id]),
                "subject": SUBJECTS["owner" if approver_id == OWNER else approver_id],
            }
            for approver_id, name, groups in approvers
        ],
    )


async def click(
    api: httpx.AsyncClient,
    stub: BotConnectorStub,
    request_id: str,
    verb: str,
    who: str,
    *,
    token: str | None = None,
    **invoke: Any,
) -> httpx.Response:
    """``who`` (a key of SUBJECTS) clicks ``verb`` on the card of ``request_id``."""
    activity = stub.invoke(request_id, verb, clicker=SUBJECTS[who], name=f"Teams {who}", **invoke)
    return await send(api, activity, token or stub.mint())


async def send(
    api: httpx.AsyncClient, activity: dict[str, object], token: str | None
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await api.post("/api/messages", json=activity, headers=headers)


async def get_request(api: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/requests/{request_id}", headers=auth("dba1"))
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, dict)
    return body


async def wait_for_card(stub: BotConnectorStub, request_id: str) -> dict[str, Any]:
    """The card the bot posted for ``request_id`` (waits up to 10 s)."""
    await eventually(lambda: bool(stub.cards_for(request_id)))
    return stub.cards_for(request_id)[0].card


def refusal_text(response: httpx.Response) -> str:
    """The message of a Universal Actions refusal (asserting that it is one)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["statusCode"] == 200
    assert body["type"] == "application/vnd.microsoft.activity.message"
    assert isinstance(body["value"], str)
    return body["value"]


def answered_card(response: httpx.Response) -> dict[str, Any]:
    """The card of a Universal Actions card response (asserting that it is one)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["statusCode"] == 200
    assert body["type"] == "application/vnd.microsoft.card.adaptive"
    card = body["value"]
    assert isinstance(card, dict)
    return card


def execute_verbs(card: dict[str, Any]) -> list[str]:
    return [a["verb"] for a in card.get("actions", []) if a.get("type") == "Action.Execute"]


@dataclass
class Held:
    """An agent's statement, held: the agent's connection, its pending call, the request."""

    conn: asyncpg.Connection
    running: asyncio.Task[Any]
    request: dict[str, Any]


@contextlib.asynccontextmanager
async def held(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    stub: BotConnectorStub,
    statement: str,
    table: str,
) -> AsyncIterator[Held]:
    """An agent session whose ``statement`` (about ``table``) is held and has its card posted;
    the connection is closed on the way out. COPY statements are fetched, others executed."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        call = conn.fetch if statement.startswith("COPY") else conn.execute
        running = asyncio.create_task(call(statement))
        request = await wait_for_request(api, table)
        await wait_for_card(stub, request["id"])
        yield Held(conn, running, request)
    finally:
        await conn.close()
