"""Stand-ins for the approval model's values, shaped like `pgguard.approvals.model`'s.

The notifier reads requests through a structural protocol, so its tests do not depend on the
model's module; these frozen dataclasses carry exactly the attributes the cards read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PUBLIC_URL = "https://pgguard.example.com/"


@dataclass(frozen=True, slots=True)
class FakeDecision:
    approver_id: str
    approver_name: str
    verdict: str
    channel: str
    comment: str | None
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class FakeRequest:
    id: str = "req7abc"
    state: str = "pending"
    agent: str = "report-bot"
    owner: str = "alice@example.com"
    database: str = "sales"
    client_address: str = "10.0.0.7:51234"
    application_name: str = "psql"
    statement: str = "COPY customers (email) TO STDOUT WHERE id = '<email ****@example.com>'"
    parameters: tuple[str, ...] = ("<int>",)
    fingerprint: str = "fp-1234"
    categories: tuple[str, ...] = ("export", "pii")
    rule_ids: tuple[str, ...] = ("export.copy-to", "pii.customers")
    reason: str | None = "monthly churn report for finance"
    approver_groups: tuple[str, ...] = ("dba",)
    min_approvals: int = 1
    created_at: datetime = NOW
    expires_at: datetime = NOW + timedelta(minutes=15)
    decided_at: datetime | None = None
    decisions: tuple[FakeDecision, ...] = ()
    remembered_from: str | None = None
    state_reason: str | None = None
    touches: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: {"reads": ["customers"], "export": "client", "estimated_rows": 1200}
    )


def fake_request(**changes: object) -> FakeRequest:
    return dataclasses.replace(FakeRequest(), **changes)


def live_request(expires_in: float = 900.0, **changes: object) -> FakeRequest:
    """A request created now that expires `expires_in` seconds from now."""
    now = datetime.now(UTC)
    return fake_request(created_at=now, expires_at=now + timedelta(seconds=expires_in), **changes)


def decision(name: str, verdict: str, comment: str | None = None) -> FakeDecision:
    return FakeDecision(f"id-{name}", name, verdict, "web", comment, NOW + timedelta(minutes=2))
