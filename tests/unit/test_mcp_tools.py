"""An agent's MCP credentials (issue 21): its own pgguard password, checked against its
configured SCRAM verifier; nothing else opens the door."""

from __future__ import annotations

import base64

from pgguard.mcp_tools import agent_password_ok
from pgguard.settings import AgentSettings
from pgguard.wire.scram import Verifier


def test_plain_password_agent() -> None:
    agent = AgentSettings(name="bot", password="s3cret", owner="alice@example.com")
    assert agent_password_ok(agent, "s3cret")
    assert not agent_password_ok(agent, "s3cret ")
    assert not agent_password_ok(agent, "")


def test_scram_verifier_agent() -> None:
    verifier = Verifier.from_password("from-a-verifier", iterations=4096)
    text = (
        "SCRAM-SHA-256$4096:"
        + base64.b64encode(verifier.salt).decode()
        + "$"
        + base64.b64encode(verifier.stored_key).decode()
        + ":"
        + base64.b64encode(verifier.server_key).decode()
    )
    agent = AgentSettings(name="bot", scram_verifier=text, owner="alice@example.com")
    assert agent_password_ok(agent, "from-a-verifier")
    assert not agent_password_ok(agent, "from-a-verifie")


def test_unknown_agent_never_passes() -> None:
    assert not agent_password_ok(None, "pgguard: no such agent")  # the dummy's own password
