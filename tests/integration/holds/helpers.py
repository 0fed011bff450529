"""Helpers for the approval tests: settings, approver tokens, rules, API polling."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support import AGENT, AGENT_PASSWORD, OWNER, agent_settings

PUBLIC_URL = "https://pgguard.example.test"

TOKENS = {"dba1": "dba1-token", "dba2": "dba2-token", "owner": "owner-token", "aud": "aud-token"}

TEST_RULES = """
version: 1
rules:
  - id: test.quorum
    description: Two approvers for exports of quorum_t.
    match: {tables: [quorum_t]}
    action: hold
    min_approvals: 2
  - id: test.dba-only
    description: Only DBAs approve exports of dba_only_t.
    match: {tables: [dba_only_t]}
    action: hold
    approvers: [dba]
  - id: test.short
    description: Exports of short_t expire fast.
    match: {tables: [short_t]}
    action: hold
    hold_timeout: 1
  - id: test.hold-everything-of-leaky
    description: Every statement of the agent "leaky" goes to review (the masking leak test).
    match: {agents: [leaky]}
    action: hold
  - id: test.remember
    description: An approval of remember_t exports is remembered.
    match: {tables: [remember_t]}
    action: hold
    remember: 60
  - id: test.return
    description: DDL on return_t is refused at once and runs once when re-sent, approved.
    match: {tables: [return_t]}
    action: hold
    hold_mode: return
    hold_timeout: 60
  - id: test.return-short
    description: Return mode with a short expiry.
    match: {tables: [return_short_t]}
    action: hold
    hold_mode: return
    hold_timeout: 2
"""


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hold_settings(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, schema: str, **extra: Any
) -> Any:
    extra.setdefault("ledger", {"spool_dir": str(Path(tempfile.mkdtemp(prefix="pgguard-spool-")))})
    return agent_settings(
        upstream_dsn,
        state_dsn,
        agents=[
            {"name": AGENT, "password": AGENT_PASSWORD, "owner": OWNER},
            {"name": "leaky", "password": "leaky-password", "owner": "carol@example.com"},
        ],
        policy={"rules_dir": str(rules_dir)},
        state={
            "schema": schema,
            "timeout": extra.pop("state_timeout", 5.0),
            **extra.pop("state", {}),
        },
        http={"host": "127.0.0.1", "port": 0, "public_url": PUBLIC_URL},
        approvers=[
            {
                "id": "dba1",
                "name": "Dana DBA",
                "groups": ["dba"],
                "token_sha256": sha(TOKENS["dba1"]),
            },
            {
                "id": "dba2",
                "name": "Drew DBA",
                "groups": ["dba"],
                "token_sha256": sha(TOKENS["dba2"]),
            },
            {
                "id": OWNER,
                "name": "Alice Owner",
                "groups": ["dba"],
                "token_sha256": sha(TOKENS["owner"]),
            },
            {
                "id": "aud",
                "name": "Audrey",
                "groups": ["audit"],
                "token_sha256": sha(TOKENS["aud"]),
            },
        ],
        **extra,
    )


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (up to 10 s) until ``condition()`` holds."""
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


async def wait_for_request(api: httpx.AsyncClient, needle: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            response = await api.get(
                "/api/requests", params={"state": "pending"}, headers=auth("dba1")
            )
            assert response.status_code == 200
            for item in response.json():
                if needle in item["statement"]:
                    return item
            await asyncio.sleep(0.05)
