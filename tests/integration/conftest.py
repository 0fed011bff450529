"""Fixtures shared by the integration tests of the policy gate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from tests.support import ProxyThread, agent_settings


@pytest.fixture(scope="module")
def guarded(upstream_dsn: str) -> Iterator[ProxyThread]:
    """A proxy with the shipped policy and no approvers (held statements are refused); the
    gate may look things up upstream (FunctionCall OIDs, routine bodies). One per module."""
    settings = agent_settings(upstream_dsn)
    gate = PolicyGate(load_engine(settings), upstream=settings.upstream)
    thread = ProxyThread(settings, gate).start()
    try:
        yield thread
    finally:
        thread.stop()
