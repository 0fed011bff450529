"""ApprovalService: holds released by approval, denial, expiry, cancel and other instances."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from pgguard.approvals import (
    AlreadyDecided,
    ApprovalRequest,
    ApprovalService,
    ApprovalStore,
    Approver,
    DuplicateApproval,
    NotAllowedToApprove,
    RequestState,
    SelfApproval,
)
from pgguard.errors import AdminShutdown
from tests.integration.approvals.conftest import RecordingNotifier, request
from tests.keys import STATE_KEY, STATEMENT

BOB = Approver("bob@example.com", "Bob", ("dba",))
CAROL = Approver("carol@example.com", "Carol", ("dba",))
OWNER = Approver("alice@example.com", "Alice", ("dba",))
WAIT = 5.0  # generous: a failure should fail, not hang


async def resolved(
    future: asyncio.Future[ApprovalRequest], within: float = WAIT
) -> ApprovalRequest:
    return await asyncio.wait_for(asyncio.shield(future), within)


async def eventually(predicate: object, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_approve_releases_the_hold(
    service: ApprovalService, notifier: RecordingNotifier
) -> None:
    held, future = await service.hold(request(), STATEMENT)
    assert held.state is RequestState.PENDING
    assert held.instance_id == "a"
    assert not future.done()
    await eventually(lambda: [r.id for r in notifier.created] == [held.id])
    approved = await service.approve(held.id, BOB, "looks fine", "api")
    final = await resolved(future)
    assert final.state is RequestState.APPROVED == approved.state
    assert final.decisions[0].approver_id == BOB.id
    await eventually(lambda: [r.state for r in notifier.updated] == [RequestState.APPROVED])
    assert service.waiting == 0


async def test_deny_releases_the_hold(service: ApprovalService) -> None:
    held, future = await service.hold(request(), STATEMENT)
    await service.deny(held.id, BOB, "not tonight", "teams")
    final = await resolved(future)
    assert final.state is RequestState.DENIED
    assert final.decisions[0].comment == "not tonight"


async def test_quorum_of_two(service: ApprovalService) -> None:
    held, future = await service.hold(request(min_approvals=2), STATEMENT)
    partial = await service.approve(held.id, BOB, "", "api")
    assert partial.state is RequestState.PENDING
    with pytest.raises(DuplicateApproval):
        await service.approve(held.id, BOB, "", "api")
    await asyncio.sleep(0.1)
    assert not future.done()
    await service.approve(held.id, CAROL, "", "api")
    assert (await resolved(future)).state is RequestState.APPROVED


async def test_self_approval_and_wrong_group_keep_it_pending(service: ApprovalService) -> None:
    held, future = await service.hold(request(approver_groups=("dba",)), STATEMENT)
    with pytest.raises(SelfApproval):
        await service.approve(held.id, OWNER, "", "api")
    with pytest.raises(NotAllowedToApprove):
        await service.approve(held.id, Approver("eve@example.com", "Eve", ("sales",)), "", "api")
    assert not future.done()
    await service.cancel(held.id, "test over")
    assert (await resolved(future)).state is RequestState.CANCELLED


async def test_double_decision_race_across_two_instances(
    service: ApprovalService, service_b: ApprovalService
) -> None:
    held, future = await service.hold(request(), STATEMENT)
    results = await asyncio.gather(
        service.approve(held.id, BOB, "", "api"),
        service_b.deny(held.id, CAROL, "", "teams"),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, ApprovalRequest)]
    assert len(winners) == 1
    assert sum(isinstance(r, AlreadyDecided) for r in results) == 1
    assert (await resolved(future)).state is winners[0].state


async def test_expiry_releases_with_no_client_action(
    service: ApprovalService, notifier: RecordingNotifier
) -> None:
    started = time.monotonic()
    held, future = await service.hold(request(expires_in_s=0.5), STATEMENT)
    final = await resolved(future, within=WAIT)
    assert final.state is RequestState.EXPIRED
    assert time.monotonic() - started < 2.5
    await eventually(lambda: any(r.id == held.id for r in notifier.updated))


async def test_cancel_releases_and_is_quiet_when_final(service: ApprovalService) -> None:
    held, future = await service.hold(request(), STATEMENT)
    await service.cancel(held.id, "client disconnected")
    final = await resolved(future)
    assert final.state is RequestState.CANCELLED
    assert final.state_reason == "client disconnected"
    await service.cancel(held.id, "again")  # no longer pending: nothing happens


async def test_a_cancelled_wait_does_not_leak(service: ApprovalService) -> None:
    held, future = await service.hold(request(), STATEMENT)
    future.cancel()
    await asyncio.sleep(0)
    assert service.waiting == 0
    await service.approve(held.id, BOB, "", "api")  # resolving nobody is fine


async def test_remembered_approval(service: ApprovalService, notifier: RecordingNotifier) -> None:
    original, future = await service.hold(
        request(fingerprint="fp-remember", remember_s=60), STATEMENT
    )
    await service.approve(original.id, BOB, "", "api")
    await resolved(future)
    again, again_future = await service.hold(
        request(fingerprint="fp-remember", remember_s=60), STATEMENT
    )
    assert again.state is RequestState.APPROVED
    assert again.remembered_from == original.id
    assert again_future.done()
    assert again_future.result() == again
    assert again.id != original.id
    other, other_future = await service.hold(
        request(fingerprint="fp-other", remember_s=60), STATEMENT
    )
    assert other.state is RequestState.PENDING
    assert not other_future.done()
    other_agent, _ = await service.hold(
        request(fingerprint="fp-remember", remember_s=60, agent="other"), STATEMENT
    )
    assert other_agent.state is RequestState.PENDING
    no_remember_rule, _ = await service.hold(request(fingerprint="fp-remember"), STATEMENT)
    assert no_remember_rule.state is RequestState.PENDING
    assert again.id not in {r.id for r in notifier.created}


async def test_approval_on_another_instance_releases_within_a_second(
    store: ApprovalStore, store_b: ApprovalStore, state_dsn: str
) -> None:
    # Polling is slowed right down so only LISTEN/NOTIFY can be this fast.
    a = ApprovalService(store, state_dsn, key=STATE_KEY, poll_interval=30, instance_id="a")
    b = ApprovalService(store_b, state_dsn, key=STATE_KEY, poll_interval=30, instance_id="b")
    await a.start()
    await b.start()
    try:
        assert a.listening
        held, future = await a.hold(request(), STATEMENT)
        await b.approve(held.id, BOB, "", "api")
        started = time.monotonic()
        assert (await resolved(future, within=1.0)).state is RequestState.APPROVED
        assert time.monotonic() - started < 1.0
    finally:
        await b.stop()
        await a.stop()


async def test_polling_releases_when_the_listen_connection_drops(
    service: ApprovalService, service_b: ApprovalService, state_dsn: str
) -> None:
    pid = service.listen_backend_pid
    assert pid is not None
    held, future = await service.hold(request(), STATEMENT)
    conn = await asyncpg.connect(state_dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid, timeout=10)
    finally:
        await conn.close(timeout=10)
    await service_b.approve(held.id, BOB, "", "api")
    assert (await resolved(future, within=2.5)).state is RequestState.APPROVED
    await eventually(lambda: service.listening and service.listen_backend_pid not in (None, pid))


async def test_stop_fails_held_statements_closed(store: ApprovalStore, state_dsn: str) -> None:
    svc = ApprovalService(store, state_dsn, key=STATE_KEY, instance_id="c")
    await svc.start()
    held, future = await svc.hold(request(), STATEMENT)
    await svc.stop()
    with pytest.raises(AdminShutdown):
        await resolved(future)
    final = await store.get(held.id)
    assert final is not None
    assert final.state is RequestState.CANCELLED


async def test_a_failing_notifier_never_delays_or_breaks_the_hold(
    store: ApprovalStore, state_dsn: str
) -> None:
    class Broken:
        async def request_created(self, request: ApprovalRequest) -> None:
            await asyncio.sleep(30)

        async def request_updated(self, request: ApprovalRequest) -> None:
            raise RuntimeError("teams is down")

    svc = ApprovalService(store, state_dsn, key=STATE_KEY, notifier=Broken(), instance_id="d")
    await svc.start()
    try:
        started = time.monotonic()
        held, future = await svc.hold(request(), STATEMENT)
        assert time.monotonic() - started < 1.0
        await svc.approve(held.id, BOB, "", "api")
        assert (await resolved(future)).state is RequestState.APPROVED
    finally:
        await svc.stop()


async def test_polling_alone_releases_when_listen_cannot_connect(
    store: ApprovalStore, service_b: ApprovalService
) -> None:
    unreachable = "postgresql://nobody:x@127.0.0.1:1/postgres?sslmode=disable"
    svc = ApprovalService(
        store, unreachable, key=STATE_KEY, poll_interval=0.5, instance_id="e", timeout=1.0
    )
    await svc.start()
    try:
        assert not svc.listening
        held, future = await svc.hold(request(), STATEMENT)
        await service_b.approve(held.id, BOB, "", "api")
        assert (await resolved(future, within=2.0)).state is RequestState.APPROVED
    finally:
        await svc.stop()
