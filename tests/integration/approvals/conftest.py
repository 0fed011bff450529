"""Fixtures for the approval tests: a private state schema in the session's state database.

Each test module gets its own schema (``pgguard_test_<random>``), dropped at the end, so these
tests share the embedded server with the rest of the suite without seeing each other's rows.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from pgguard.approvals import ApprovalRequest, ApprovalService, ApprovalStore, NewRequest
from tests.keys import STATE_KEY


class RecordingNotifier:
    """A Notifier that remembers what it was told."""

    def __init__(self) -> None:
        self.created: list[ApprovalRequest] = []
        self.updated: list[ApprovalRequest] = []

    async def request_created(self, request: ApprovalRequest) -> None:
        self.created.append(request)

    async def request_updated(self, request: ApprovalRequest) -> None:
        self.updated.append(request)


BASE_REQUEST = NewRequest(
    agent="agent",
    owner="alice@example.com",
    database="postgres",
    client_address="127.0.0.1:5555",
    application_name="etl",
    statement="COPY finance.invoices TO STDOUT WHERE amount > ?",
    parameters=("?",),
    fingerprint="fp-copy-invoices",
    categories=("export",),
    rule_ids=("export.copy",),
    reason="nightly export for finance",
    approver_groups=(),
    touches={"tables": ["finance.invoices"]},
)


def request(**changes: object) -> NewRequest:
    """A NewRequest with a fresh fingerprint unless one is given, so tests never remember."""
    changes.setdefault("fingerprint", f"fp-{secrets.token_hex(6)}")
    return replace(BASE_REQUEST, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def state_schema() -> str:
    return f"pgguard_test_{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
async def store(state_dsn: str, state_schema: str) -> AsyncIterator[ApprovalStore]:
    opened = await ApprovalStore.open(state_dsn, key=STATE_KEY, schema=state_schema, timeout=5.0)
    try:
        yield opened
    finally:
        await opened.close()
        conn = await asyncpg.connect(state_dsn, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{state_schema}" CASCADE', timeout=10)
        finally:
            await conn.close(timeout=10)


@pytest.fixture(scope="module")
async def store_b(
    state_dsn: str, state_schema: str, store: ApprovalStore
) -> AsyncIterator[ApprovalStore]:
    """A second pool on the same schema: another pgguard instance's view."""
    opened = await ApprovalStore.open(state_dsn, key=STATE_KEY, schema=state_schema, timeout=5.0)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def notifier() -> RecordingNotifier:
    return RecordingNotifier()


@pytest.fixture
async def service(
    store: ApprovalStore, state_dsn: str, notifier: RecordingNotifier
) -> AsyncIterator[ApprovalService]:
    started = ApprovalService(
        store, state_dsn, key=STATE_KEY, notifier=notifier, poll_interval=1.0, instance_id="a"
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def service_b(store_b: ApprovalStore, state_dsn: str) -> AsyncIterator[ApprovalService]:
    started = ApprovalService(store_b, state_dsn, key=STATE_KEY, poll_interval=1.0, instance_id="b")
    await started.start()
    try:
        yield started
    finally:
        await started.stop()
