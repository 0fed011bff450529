"""The approval service: holds requests, releases waiters when any instance decides, expires.

Owns: `ApprovalService` (hold, approve, deny, cancel; start/stop of its background tasks) and the
`Notifier` protocol it calls (Teams, elsewhere).

Invariants: each held request has at most one waiting future, resolved exactly once with the
request in a final state — or, fail closed, with an error when the service stops. Waiters learn
of decisions from ``LISTEN pgguard_approvals`` (any instance), from a poll of the ids they wait
for every ``poll_interval`` (the fallback when notifications are lost), and from the expiry loop.
A waiter is released only by a final state whose MACs verify against its own digest of the held
statement (`pgguard.approvals.verify`); anything else is reported as a forgery and ignored. A
waiter whose request is past its expiry while the state database is unreachable, or whose row
was changed by someone else, is released as expired, locally. Notifier calls run in background
tasks with a timeout and never raise here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import asyncpg

from pgguard.approvals.model import (
    ApprovalRequest,
    ApprovalStoreUnavailable,
    Approver,
    NewRequest,
    RequestState,
)
from pgguard.approvals.schema import NOTIFY_CHANNEL
from pgguard.approvals.signing import StateKey
from pgguard.approvals.store import ApprovalStore
from pgguard.approvals.verify import final_state_problem, remembered_approval_problem
from pgguard.errors import AdminShutdown, PgGuardError
from pgguard.metrics import COUNTS

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_S = 0.5
# The notifier retries a new request's card until the request expires, and a follow-up card for
# up to two minutes; these bounds only stop a notifier that ignores its own deadlines.
NOTIFIER_SLACK_S = 15.0
FOLLOW_UP_LIMIT_S = 150.0
LOCAL_EXPIRY_GRACE_S = 3.0  # past expiry and the database still silent: release locally
LISTEN_HEALTH_INTERVAL_S = 5.0
STOP_GRACE_S = 2.0


class Notifier(Protocol):
    """Told about new and finished requests (Teams cards). Should never raise; guarded anyway."""

    async def request_created(self, request: ApprovalRequest) -> None: ...

    async def request_updated(self, request: ApprovalRequest) -> None: ...


@dataclasses.dataclass(slots=True)
class _Waiter:
    request: ApprovalRequest
    future: asyncio.Future[ApprovalRequest]
    local_deadline: (
        float  # loop.time() past which the request is expired, whatever the database says
    )
    statement_digest: str  # the holder's own digest of the held statement; never read back
    forgeries_seen: set[str] = dataclasses.field(default_factory=set)


ForgeryHandler = Callable[[ApprovalRequest, str], None]


class ApprovalService:
    """One instance's view of the shared approval state; see the module docstring."""

    def __init__(
        self,
        store: ApprovalStore,
        dsn: str,
        *,
        key: StateKey,
        notifier: Notifier | None = None,
        poll_interval: float = 1.0,
        instance_id: str = "",
        timeout: float = 5.0,
        server_settings: Mapping[str, str] | None = None,
        on_forgery: ForgeryHandler | None = None,
    ) -> None:
        self._store = store
        self._dsn = dsn
        self._key = key
        self._server_settings = dict(server_settings or {})
        self.on_forgery = on_forgery  # told of every forged final state a waiter saw (ledger)
        self._notifier = notifier
        self._poll_interval = poll_interval
        self._instance_id = instance_id
        self._timeout = timeout
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._listen_conn: asyncpg.Connection | None = None
        self._listening = asyncio.Event()
        self._first_attempt = asyncio.Event()  # the first LISTEN connect ended, either way

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the LISTEN, expiry and poll loops; waits (bounded) for LISTEN's first try.

        An unreachable LISTEN connection is not fatal: polling releases waiters meanwhile.
        """
        self._tasks = [
            asyncio.create_task(self._listen_loop(), name="approvals-listen"),
            asyncio.create_task(self._expiry_loop(), name="approvals-expiry"),
            asyncio.create_task(self._poll_loop(), name="approvals-poll"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self._timeout * 2)

    async def stop(self) -> None:
        """Stop the loops; waiters still holding get AdminShutdown and their requests cancelled."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._close_listen_connection()
        waiting, self._waiters = self._waiters, {}
        for request_id, waiter in waiting.items():
            if not waiter.future.done():
                waiter.future.set_exception(
                    AdminShutdown("pgguard is shutting down; the held statement was not executed")
                )
            with contextlib.suppress(PgGuardError):
                await self._store.cancel(request_id, "pgguard instance shut down")
        if self._background:  # let notifications finish briefly, then drop them
            _, late = await asyncio.wait(self._background, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    @property
    def store(self) -> ApprovalStore:
        """The store, for reads (HTTP API listing) and closing at shutdown."""
        return self._store

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._listening.is_set()

    @property
    def listen_backend_pid(self) -> int | None:
        """The server pid of the LISTEN connection (for operators and tests)."""
        conn = self._listen_conn
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- the proxy's side -----------------------------------------------------------------------

    async def hold(
        self, new: NewRequest, statement: bytes, parameters: bytes | None = None
    ) -> tuple[ApprovalRequest, asyncio.Future[ApprovalRequest]]:
        """Create the request (or auto-approve it from a remembered approval) and a future.

        ``statement`` and ``parameters`` are the exact bytes the policy judged (the SQL text and
        the raw Bind message): the request's MAC binds their keyed digest, and only decisions
        whose MACs verify against it release the future. The future resolves with the request
        once it is final. Cancelling the future only stops waiting; call `cancel` to end the
        request. Raises ApprovalStoreUnavailable (fail closed).
        """
        if not new.instance_id and self._instance_id:
            new = dataclasses.replace(new, instance_id=self._instance_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ApprovalRequest] = loop.create_future()
        digest = self._key.statement_digest(statement, parameters)
        if new.remember_s is not None:
            remembered = await self._remembered(new)
            if remembered is not None:
                request = await self._store.create(new, digest, remembered_from=remembered.id)
                future.set_result(request)
                return request, future
        request = await self._store.create(new, digest)
        self._waiters[request.id] = _Waiter(
            request, future, loop.time() + new.expires_in_s + LOCAL_EXPIRY_GRACE_S, digest
        )
        future.add_done_callback(lambda _: self._forget(request.id, future))
        until_expiry = (request.expires_at - datetime.now(UTC)).total_seconds()
        limit = max(until_expiry, 0.0) + NOTIFIER_SLACK_S
        self._in_background(self._notify_created(request), limit)
        return request, future

    async def _remembered(self, new: NewRequest) -> ApprovalRequest | None:
        """The newest remembered approval covering ``new`` whose MACs verify; forged ones logged."""
        candidates = await self._store.remembered_candidates(
            new.agent, new.fingerprint, database=new.database
        )
        for candidate in candidates:
            problem = remembered_approval_problem(
                candidate,
                self._key,
                agent=new.agent,
                database=new.database,
                fingerprint=new.fingerprint,
            )
            if problem is None:
                return candidate
            self._report_forgery(candidate, f"not used as a remembered approval: {problem}")
        return None

    # --- return mode: requests nobody waits on -------------------------------------------------

    async def open_request(
        self, new: NewRequest, statement: bytes, parameters: bytes | None = None
    ) -> ApprovalRequest:
        """Create a pending request that no session waits on (return mode, or asked ahead of
        time over MCP) and notify approvers. Raises ApprovalStoreUnavailable (fail closed)."""
        if not new.instance_id and self._instance_id:
            new = dataclasses.replace(new, instance_id=self._instance_id)
        request = await self._store.create(new, self._key.statement_digest(statement, parameters))
        until_expiry = (request.expires_at - datetime.now(UTC)).total_seconds()
        self._in_background(
            self._notify_created(request), max(until_expiry, 0.0) + NOTIFIER_SLACK_S
        )
        return request

    async def open_for(
        self, new: NewRequest, statement: bytes, parameters: bytes | None = None
    ) -> ApprovalRequest | None:
        """The newest authentic request for exactly this statement (``new``'s agent, database
        and fingerprint, and the keyed digest of ``statement`` and ``parameters``) that is
        pending, or approved and not yet run; None if there is none. Rows that fail their MACs
        are reported as forgeries and skipped."""
        digest = self._key.statement_digest(statement, parameters)
        candidates = await self._store.returned_candidates(new.agent, new.database, new.fingerprint)
        for candidate in candidates:
            if candidate.agent != new.agent or candidate.database != new.database:
                continue
            if candidate.state == RequestState.PENDING:
                if self._key.request_verifies(candidate.binding(digest), candidate.request_mac):
                    return candidate
                continue  # another statement's request (a digest mismatch), or a forged row
            problem = final_state_problem(candidate, self._key, digest)
            if problem is None:
                return candidate
            self._report_forgery(candidate, f"not run in return mode: {problem}")
        return None

    async def mark_run(self, request_id: str) -> bool:
        """Claim the one run of an approved return-mode request (True for exactly one caller)."""
        return await self._store.mark_run(request_id)

    async def cancel(self, request_id: str, reason: str) -> None:
        """End a pending request (client disconnect, CancelRequest); quiet if already final."""
        try:
            cancelled = await self._store.cancel(request_id, reason)
        except PgGuardError as exc:
            # Fail closed regardless: the statement is not forwarded, and the request expires.
            log.warning("could not cancel approval request %s: %s", request_id, exc)
            waiter = self._waiters.pop(request_id, None)
            if waiter is not None:
                waiter.future.cancel()
            return
        if cancelled is not None:
            self._settle(cancelled)

    # --- the approver's side --------------------------------------------------------------------

    async def approve(
        self, request_id: str, approver: Approver, comment: str, channel: str
    ) -> ApprovalRequest:
        return await self._decide(request_id, approver, "approve", comment, channel)

    async def deny(
        self, request_id: str, approver: Approver, comment: str, channel: str
    ) -> ApprovalRequest:
        return await self._decide(request_id, approver, "deny", comment, channel)

    async def _decide(
        self,
        request_id: str,
        approver: Approver,
        verdict: Literal["approve", "deny"],
        comment: str,
        channel: str,
    ) -> ApprovalRequest:
        request = await self._store.record_decision(request_id, approver, verdict, comment, channel)
        COUNTS.decision(verdict, channel)
        self._settle(request)
        return request

    # --- settling waiters -----------------------------------------------------------------------

    def _settle(self, request: ApprovalRequest, *, announce: bool = True) -> None:
        """Resolve the request's waiter if it is final and authentic; announce what this side did.

        A final state whose MACs do not verify against the waiter's own statement digest is no
        decision: it is logged and reported (`on_forgery`), and the waiter goes on waiting until
        a genuine decision or its local expiry.
        """
        if not request.state.final:
            return
        waiter = self._waiters.get(request.id)
        if waiter is not None:
            problem = final_state_problem(request, self._key, waiter.statement_digest)
            if problem is not None:
                if problem not in waiter.forgeries_seen:
                    waiter.forgeries_seen.add(problem)
                    self._report_forgery(request, problem)
                return
            del self._waiters[request.id]
            if not waiter.future.done():
                waiter.future.set_result(request)
        if announce:
            self._in_background(self._notify_updated(request), FOLLOW_UP_LIMIT_S)

    def _report_forgery(self, request: ApprovalRequest, problem: str) -> None:
        log.error(
            "INTEGRITY: approval request %s (agent %s) is %s in the state database, but %s; "
            "treated as no decision",
            request.id,
            request.agent,
            request.state.value,
            problem,
        )
        if self.on_forgery is not None:
            try:
                self.on_forgery(request, problem)
            except Exception:  # reporting must never release or break a hold
                log.exception("could not report the forged approval row")

    def _forget(self, request_id: str, future: asyncio.Future[ApprovalRequest]) -> None:
        waiter = self._waiters.get(request_id)
        if waiter is not None and waiter.future is future:
            del self._waiters[request_id]

    async def _refresh(self, request_ids: list[str]) -> None:
        """Reload requests some waiter holds; settle the final ones (announced by their decider)."""
        ids = [i for i in request_ids if i in self._waiters]
        if not ids:
            return
        try:
            requests = await self._store.get_many(ids)
        except ApprovalStoreUnavailable as exc:
            log.warning("approval state database unreachable while polling: %s", exc)
            self._release_overdue()
            return
        for request in requests:
            self._settle(request, announce=False)

    def _release_overdue(self, why: str = "the approval state database was unreachable") -> None:
        """Fail closed: a waiter past its local deadline is released as expired.

        Its request expired by the database clock a moment before (``LOCAL_EXPIRY_GRACE_S``),
        so this only acts when the database is unreachable or its row no longer says pending
        because someone other than pgguard changed it.
        """
        now = asyncio.get_running_loop().time()
        for request_id, waiter in list(self._waiters.items()):
            if now >= waiter.local_deadline:
                expired = dataclasses.replace(
                    waiter.request,
                    state=RequestState.EXPIRED,
                    state_reason=f"expired while {why}",
                )
                self._waiters.pop(request_id, None)
                if not waiter.future.done():
                    waiter.future.set_result(expired)

    # --- background loops -----------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        backoff = 0.2
        while True:
            closed = asyncio.Event()
            on_close = _setter(closed)
            try:
                conn = await asyncio.wait_for(
                    asyncpg.connect(
                        self._dsn,
                        timeout=self._timeout,
                        command_timeout=self._timeout,
                        server_settings={
                            **self._server_settings,
                            "application_name": f"pgguard-approvals-listen {self._instance_id}"[
                                :63
                            ],
                        },
                    ),
                    self._timeout * 2,
                )
                self._listen_conn = conn
                conn.add_termination_listener(on_close)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notification)
                self._listening.set()
                self._first_attempt.set()
                backoff = 0.2
                # Catch up on what was missed while not listening.
                await self._refresh(list(self._waiters))
                while not closed.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), LISTEN_HEALTH_INTERVAL_S)
                    if not closed.is_set():
                        await conn.fetchval("SELECT 1", timeout=self._timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: drop the connection, poll, and reconnect
                log.warning("approval LISTEN connection failed: %s", type(exc).__name__)
            self._listening.clear()
            self._first_attempt.set()
            await self._close_listen_connection()
            log.info("approval LISTEN connection lost; polling until it is back")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        request_id = str(payload)
        if request_id in self._waiters:
            self._in_background(self._refresh([request_id]), NOTIFIER_SLACK_S)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            try:
                expired = await self._store.expire_due()
            except PgGuardError as exc:
                log.warning("could not expire approval requests: %s", exc)
                self._release_overdue()
                continue
            for request in expired:
                self._settle(request)
            self._release_overdue("its stored state was not pgguard's (see INTEGRITY errors)")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self._refresh(list(self._waiters))
            except Exception:  # the loop must survive anything; a raise here means a bug
                log.exception("approval poll failed")

    async def _close_listen_connection(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), self._timeout)
        except Exception:
            conn.terminate()

    # --- notifier -------------------------------------------------------------------------------

    async def _notify_created(self, request: ApprovalRequest) -> None:
        if self._notifier is not None:
            await self._notifier.request_created(request)

    async def _notify_updated(self, request: ApprovalRequest) -> None:
        if self._notifier is not None:
            await self._notifier.request_updated(request)

    def _in_background(self, coro: Coroutine[Any, Any, None], limit: float) -> None:
        task = asyncio.create_task(self._guarded(coro, limit))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _guarded(self, coro: Coroutine[Any, Any, None], limit: float) -> None:
        try:
            await asyncio.wait_for(coro, limit)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("approval background task failed")


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()
