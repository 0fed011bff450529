"""Fixtures for the Teams notifier tests: a scripted local webhook and a notifier aimed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pgguard.approvals.teams import TeamsWebhookNotifier
from tests.integration.teams.fakes import PUBLIC_URL
from tests.teams_stub import TeamsStub


@pytest.fixture
async def teams_stub() -> AsyncIterator[TeamsStub]:
    async with TeamsStub() as stub:
        yield stub


@pytest.fixture
async def notifier(teams_stub: TeamsStub) -> AsyncIterator[TeamsWebhookNotifier]:
    subject = TeamsWebhookNotifier(teams_stub.url, PUBLIC_URL, timeout=2.0)
    try:
        yield subject
    finally:
        await subject.aclose()
