"""ApprovalStore: the state machine's rules, enforced by the database transaction."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pgguard.approvals import (
    AlreadyDecided,
    ApprovalStore,
    Approver,
    DuplicateApproval,
    NotAllowedToApprove,
    RequestNotFound,
    RequestState,
    SelfApproval,
)
from pgguard.approvals.model import ApprovalStoreUnavailable
from pgguard.errors import ConfigError
from tests.integration.approvals.conftest import request
from tests.keys import DIGEST, STATE_KEY

BOB = Approver("bob@example.com", "Bob", ("dba",))
CAROL = Approver("carol@example.com", "Carol", ("security",))
ALICE_OWNER = Approver("alice@example.com", "Alice", ("dba", "security"))


async def test_create_stores_every_field(store: ApprovalStore) -> None:
    created = await store.create(request(), DIGEST)
    assert created.state is RequestState.PENDING
    assert len(created.id) == 16
    assert created.id.isalnum()
    assert created.id.islower()
    assert created.decided_at is None
    assert created.decisions == ()
    assert 299 < (created.expires_at - created.created_at).total_seconds() < 301
    fetched = await store.get(created.id)
    assert fetched == created
    payload = created.to_json()
    assert payload["statement"] == "COPY finance.invoices TO STDOUT WHERE amount > ?"
    assert payload["touches"] == {"tables": ["finance.invoices"]}
    assert payload["reason"] == "nightly export for finance"


async def test_ids_are_unique(store: ApprovalStore) -> None:
    ids = {(await store.create(request(), DIGEST)).id for _ in range(20)}
    assert len(ids) == 20


async def test_approve_and_deny(store: ApprovalStore) -> None:
    approved = await store.record_decision(
        (await store.create(request(), DIGEST)).id, BOB, "approve", "ok", "api"
    )
    assert approved.state is RequestState.APPROVED
    assert approved.decided_at is not None
    (decision,) = approved.decisions
    assert (decision.approver_id, decision.verdict, decision.channel, decision.comment) == (
        "bob@example.com",
        "approve",
        "api",
        "ok",
    )
    denied = await store.record_decision(
        (await store.create(request(), DIGEST)).id, BOB, "deny", "no", "teams"
    )
    assert denied.state is RequestState.DENIED
    with pytest.raises(AlreadyDecided):
        await store.record_decision(denied.id, CAROL, "approve", "", "api")


async def test_quorum_needs_distinct_approvers(store: ApprovalStore) -> None:
    created = await store.create(request(min_approvals=2), DIGEST)
    first = await store.record_decision(created.id, BOB, "approve", "", "api")
    assert first.state is RequestState.PENDING
    assert len(first.approvals) == 1
    with pytest.raises(DuplicateApproval):
        await store.record_decision(created.id, BOB, "approve", "again", "api")
    second = await store.record_decision(created.id, CAROL, "approve", "", "teams")
    assert second.state is RequestState.APPROVED
    assert {d.approver_id for d in second.decisions} == {BOB.id, CAROL.id}


async def test_one_deny_decides_a_quorum_request(store: ApprovalStore) -> None:
    created = await store.create(request(min_approvals=3), DIGEST)
    await store.record_decision(created.id, BOB, "approve", "", "api")
    denied = await store.record_decision(created.id, CAROL, "deny", "no", "api")
    assert denied.state is RequestState.DENIED


async def test_self_approval_is_refused_whatever_the_groups(store: ApprovalStore) -> None:
    created = await store.create(request(approver_groups=("dba",)), DIGEST)
    with pytest.raises(SelfApproval):
        await store.record_decision(created.id, ALICE_OWNER, "approve", "", "api")
    assert (await store.get(created.id)).state is RequestState.PENDING  # type: ignore[union-attr]


async def test_wrong_group_is_refused(store: ApprovalStore) -> None:
    created = await store.create(request(approver_groups=("dba",)), DIGEST)
    with pytest.raises(NotAllowedToApprove):
        await store.record_decision(created.id, CAROL, "approve", "", "api")
    with pytest.raises(NotAllowedToApprove):
        await store.record_decision(created.id, CAROL, "deny", "", "api")
    approved = await store.record_decision(created.id, BOB, "approve", "", "api")
    assert approved.state is RequestState.APPROVED


async def test_unknown_request(store: ApprovalStore) -> None:
    with pytest.raises(RequestNotFound):
        await store.record_decision("nosuchrequest123", BOB, "approve", "", "api")
    assert await store.get("nosuchrequest123") is None


async def test_cancel_is_a_compare_and_swap(store: ApprovalStore) -> None:
    created = await store.create(request(), DIGEST)
    cancelled = await store.cancel(created.id, "client disconnected")
    assert cancelled is not None
    assert cancelled.state is RequestState.CANCELLED
    assert cancelled.state_reason == "client disconnected"
    assert await store.cancel(created.id, "again") is None
    with pytest.raises(AlreadyDecided):
        await store.record_decision(created.id, BOB, "approve", "", "api")


async def test_decision_after_expiry_expires_instead(store: ApprovalStore) -> None:
    created = await store.create(request(expires_in_s=0.05), DIGEST)
    await asyncio.sleep(0.1)
    with pytest.raises(AlreadyDecided):
        await store.record_decision(created.id, BOB, "approve", "", "api")
    assert (await store.get(created.id)).state is RequestState.EXPIRED  # type: ignore[union-attr]


async def test_concurrent_decisions_on_two_pools_have_one_winner(
    store: ApprovalStore, store_b: ApprovalStore
) -> None:
    for _ in range(5):
        created = await store.create(request(), DIGEST)
        results = await asyncio.gather(
            store.record_decision(created.id, BOB, "approve", "", "api"),
            store_b.record_decision(created.id, CAROL, "deny", "", "teams"),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1
        assert len(losers) == 1
        assert isinstance(losers[0], AlreadyDecided)
        final = await store.get(created.id)
        assert final is not None
        assert len(final.decisions) == 1
        assert final.state == winners[0].state


async def test_list_filters_by_state(store: ApprovalStore) -> None:
    created = await store.create(request(), DIGEST)
    pending = await store.list(RequestState.PENDING, limit=1000)
    assert created.id in {r.id for r in pending}
    assert all(r.state is RequestState.PENDING for r in pending)
    assert len(await store.list(limit=2)) == 2


async def test_migrations_are_idempotent_and_schema_names_checked(
    state_dsn: str, state_schema: str
) -> None:
    again = await ApprovalStore.open(state_dsn, key=STATE_KEY, schema=state_schema)
    await again.close()
    with pytest.raises(ConfigError):
        await ApprovalStore.open(state_dsn, key=STATE_KEY, schema='x"; DROP')


async def test_unreachable_state_database_fails_closed() -> None:
    with pytest.raises(ApprovalStoreUnavailable):
        await ApprovalStore.open(
            "postgresql://nobody:x@127.0.0.1:1/postgres?sslmode=disable",
            key=STATE_KEY,
            timeout=1.0,
        )


async def test_schema_is_readable_by_an_auditor(
    state_dsn: str, state_schema: str, store: ApprovalStore
) -> None:
    created = await store.create(request(rule_ids=("r1", "r2")), DIGEST)
    await store.record_decision(created.id, BOB, "approve", "fine", "api")
    conn = await asyncpg.connect(state_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            f"SELECT r.state, r.rule_ids, r.touches->'tables' AS tables, d.approver_id "
            f'FROM "{state_schema}".approval_requests r '
            f'JOIN "{state_schema}".approval_decisions d ON d.request_id = r.id WHERE r.id = $1',
            created.id,
            timeout=10,
        )
    finally:
        await conn.close(timeout=10)
    assert row is not None
    assert (row["state"], row["rule_ids"], row["approver_id"]) == (
        "approved",
        ["r1", "r2"],
        BOB.id,
    )
