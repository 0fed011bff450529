"""Approval requests in the Postgres state database (asyncpg), every transition a compare-and-swap.

Owns: `ApprovalStore` — create, read, decide, cancel, expire, and find remembered approvals;
and the Teams bot's bookkeeping (posted card per request, invoke ids already acted on).

Invariants: a request leaves `pending` only through ``UPDATE ... WHERE id = $1 AND state =
'pending'``, and the same transaction sends ``NOTIFY pgguard_approvals, '<id>'``, so two approvers
or two instances can never both decide and every instance learns of each transition. Every row
this module writes carries a MAC made with the state key (`pgguard.approvals.signing`): the
request binds its statement, context and terms; each decision its verdict and approver; each final
state the request. Quorum counts only decisions whose MACs verify; a request whose own MAC fails
cannot be decided. The store never trusts what it reads back: holders re-verify
(`pgguard.approvals.verify`). Expiry is
judged by the database clock (``now()``). Every call has a timeout; asyncpg and OS errors leave
this module as `ApprovalStoreUnavailable`, so a caller holding a statement fails closed.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

import asyncpg

from pgguard.approvals.model import (
    AlreadyDecided,
    ApprovalRequest,
    ApprovalStoreUnavailable,
    Approver,
    DecisionRecord,
    DuplicateApproval,
    IntegrityFailure,
    NewRequest,
    NotAllowedToApprove,
    RequestNotFound,
    RequestState,
    SelfApproval,
    new_request_id,
)
from pgguard.approvals.schema import (
    MIGRATIONS,
    NOTIFY_CHANNEL,
    checked_schema,
    migration_statements,
)
from pgguard.approvals.signing import RequestBinding, StateKey
from pgguard.approvals.verify import verified_approvers
from pgguard.errors import PgGuardError

log = logging.getLogger(__name__)

_REQUEST_COLUMNS = (
    "id, state, agent, owner, database, client_address, application_name, statement, parameters, "
    "fingerprint, categories, rule_ids, reason, approver_groups, min_approvals, remember_s, "
    "expires_in_s, session_id, instance_id, touches, created_at, expires_at, decided_at, "
    "remembered_from, state_reason, statement_digest, request_mac, state_mac"
)
_DECISION_COLUMNS = (
    "request_id, approver_id, approver_name, verdict, channel, comment, decided_at, mac"
)
REMEMBERED_CANDIDATES = 5  # newest approvals tried; a forged one costs a look, never a release


class ApprovalStore:
    """Approval requests and decisions in ``<schema>.approval_requests``/``approval_decisions``."""

    def __init__(
        self, pool: asyncpg.Pool, quoted_schema: str, timeout: float, key: StateKey
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._key = key
        self._requests = f"{quoted_schema}.approval_requests"
        self._decisions = f"{quoted_schema}.approval_decisions"
        self._bot_messages = f"{quoted_schema}.bot_messages"
        self._bot_seen = f"{quoted_schema}.bot_seen_activities"

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        key: StateKey,
        schema: str = "pgguard",
        timeout: float = 5.0,  # noqa: ASYNC109 - the per-statement timeout, not one deadline
        server_settings: Mapping[str, str] | None = None,
    ) -> ApprovalStore:
        """Connect a small pool and bring the schema up to date.

        ``server_settings`` are the state sessions' GUCs (``lock_timeout``, ``statement_timeout``
        from `StateSettings.server_settings`): a lock someone else holds fails a call, never
        hangs it.
        """
        quoted = checked_schema(schema)
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    dsn,
                    min_size=1,
                    max_size=5,
                    timeout=timeout,
                    command_timeout=timeout,
                    server_settings={
                        **(server_settings or {}),
                        "application_name": "pgguard-approvals",
                    },
                ),
                timeout * 2,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ApprovalStoreUnavailable(
                f"could not connect to the approval state database: {type(exc).__name__}"
            ) from exc
        store = cls(pool, quoted, timeout, key)
        try:
            await store._migrate(quoted)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except (OSError, TimeoutError, asyncpg.InterfaceError):
            self._pool.terminate()

    # --- reads ----------------------------------------------------------------------------------

    async def get(self, request_id: str) -> ApprovalRequest | None:
        found = await self.get_many([request_id])
        return found[0] if found else None

    async def get_many(self, request_ids: Sequence[str]) -> builtins.list[ApprovalRequest]:
        """The requests with these ids that exist (in no particular order)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} WHERE id = ANY($1::text[])",
                list(request_ids),
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    async def list(
        self, state: RequestState | None = None, limit: int = 100
    ) -> builtins.list[ApprovalRequest]:
        """The newest requests first, optionally only those in one state."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} "
                "WHERE $1::text IS NULL OR state = $1 ORDER BY created_at DESC, id LIMIT $2",
                None if state is None else state.value,
                limit,
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    async def list_for_agent(
        self, agent: str, state: RequestState | None = None, limit: int = 50
    ) -> builtins.list[ApprovalRequest]:
        """One agent's requests, newest first, optionally only those in one state."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} WHERE agent = $1 "
                "AND ($2::text IS NULL OR state = $2) ORDER BY created_at DESC, id LIMIT $3",
                agent,
                None if state is None else state.value,
                limit,
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    async def remembered_candidates(
        self, agent: str, fingerprint: str, *, database: str | None = None
    ) -> builtins.list[ApprovalRequest]:
        """Approved, rememberable requests whose window still covers now (newest first).

        Candidates only: the caller keeps one whose MACs verify
        (`pgguard.approvals.verify.remembered_approval_problem`). Auto-approvals are never
        themselves remembered, so a window cannot extend itself.
        """
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} "
                "WHERE agent = $1 AND fingerprint = $2 AND ($3::text IS NULL OR database = $3) "
                "AND state = 'approved' AND remember_s IS NOT NULL AND remembered_from IS NULL "
                "AND decided_at + remember_s * interval '1 second' > now() "
                "ORDER BY decided_at DESC LIMIT $4",
                agent,
                fingerprint,
                database,
                REMEMBERED_CANDIDATES,
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    async def returned_candidates(
        self, agent: str, database: str, fingerprint: str
    ) -> builtins.list[ApprovalRequest]:
        """Return-mode requests for this statement that may still run: pending, or approved
        and not yet run, before their expiry (newest first). Candidates only: the caller keeps
        one whose MACs verify against its own digest of the statement."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} "
                "WHERE agent = $1 AND database = $2 AND fingerprint = $3 AND run_at IS NULL "
                "AND state IN ('pending', 'approved') AND expires_at > now() "
                "ORDER BY created_at DESC LIMIT $4",
                agent,
                database,
                fingerprint,
                REMEMBERED_CANDIDATES,
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    async def mark_run(self, request_id: str) -> bool:
        """Claim an approved return-mode request's one run (compare-and-swap: exactly one
        caller, on any instance, gets True - and only before the request's expiry)."""
        async with self._connection() as conn:
            claimed = await conn.fetchval(
                f"UPDATE {self._requests} SET run_at = now() WHERE id = $1 "
                "AND state = 'approved' AND run_at IS NULL AND expires_at > now() RETURNING id",
                request_id,
                timeout=self._timeout,
            )
            return claimed is not None

    # --- transitions ----------------------------------------------------------------------------

    async def create(
        self, new: NewRequest, statement_digest: str, *, remembered_from: str | None = None
    ) -> ApprovalRequest:
        """Store a pending request; with ``remembered_from``, an already-approved one citing it.

        ``statement_digest`` is the holder's keyed digest of the exact statement
        (`StateKey.statement_digest`); the row's MAC binds it, the context and the rule's terms.
        """
        request_id = new_request_id()
        state = RequestState.PENDING if remembered_from is None else RequestState.APPROVED
        state_reason = None if remembered_from is None else f"remembered approval {remembered_from}"
        binding = RequestBinding(
            request_id=request_id,
            statement_digest=statement_digest,
            agent=new.agent,
            owner=new.owner,
            database=new.database,
            session_id=new.session_id,
            fingerprint=new.fingerprint,
            approver_groups=tuple(new.approver_groups),
            min_approvals=new.min_approvals,
            remember_s=new.remember_s,
        )
        state_mac = (
            None
            if remembered_from is None
            else self._key.state_mac(request_id, state.value, statement_digest)
        )
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"INSERT INTO {self._requests} ({_REQUEST_COLUMNS}) VALUES ($1, $2, $3, $4, $5, "
                "$6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20::jsonb, "
                "now(), now() + $17 * interval '1 second', "
                "CASE WHEN $2 = 'pending' THEN NULL ELSE now() END, $21, $22, $23, $24, $25) "
                f"RETURNING {_REQUEST_COLUMNS}",
                request_id,
                state.value,
                new.agent,
                new.owner,
                new.database,
                new.client_address,
                new.application_name,
                new.statement,
                list(new.parameters),
                new.fingerprint,
                list(new.categories),
                list(new.rule_ids),
                new.reason,
                list(new.approver_groups),
                new.min_approvals,
                new.remember_s,
                float(new.expires_in_s),
                new.session_id,
                new.instance_id,
                json.dumps(dict(new.touches), default=str),
                remembered_from,
                state_reason,
                statement_digest,
                self._key.request_mac(binding),
                state_mac,
                timeout=self._timeout,
            )
            assert row is not None
            await self._notify(conn, row["id"])
            return _request(row, ())

    async def record_decision(
        self,
        request_id: str,
        approver: Approver,
        verdict: Literal["approve", "deny"],
        comment: str,
        channel: str,
    ) -> ApprovalRequest:
        """Record one approver's verdict under a row lock; decide when quorum or any deny.

        Refusals, in order: unknown id, a row that fails its MAC, self-approval (whatever the
        groups, under any spelling), wrong group, no longer pending (a pending request past its
        expiry is expired here and then refused), same approver twice. The request is approved
        once ``min_approvals`` distinct approvers approved with decisions whose MACs verify.
        """
        async with self._transaction() as conn:
            decided = await self._decide(conn, request_id, approver, verdict, comment, channel)
        if decided is None:  # raised only now, so the expiry above is committed
            raise AlreadyDecided(f"approval request {request_id} has expired")
        return decided

    async def _decide(
        self,
        conn: asyncpg.Connection,
        request_id: str,
        approver: Approver,
        verdict: Literal["approve", "deny"],
        comment: str,
        channel: str,
    ) -> ApprovalRequest | None:
        """record_decision's body, in its transaction; None when it found the request due."""
        row = await conn.fetchrow(
            f"SELECT {_REQUEST_COLUMNS}, expires_at <= now() AS due FROM {self._requests} "
            "WHERE id = $1 FOR UPDATE",
            request_id,
            timeout=self._timeout,
        )
        if row is None:
            raise RequestNotFound(f"approval request {request_id} does not exist")
        stored = _request(row, ())
        binding = stored.binding()
        if not self._key.request_verifies(binding, stored.request_mac):
            log.error(
                "INTEGRITY: approval request %s fails its MAC; refusing a decision on it "
                "(the state database was written by someone other than pgguard)",
                request_id,
            )
            raise IntegrityFailure(
                f"approval request {request_id} fails its integrity check and cannot be decided"
            )
        if verdict == "approve" and approver.is_owner(stored.owner):
            raise SelfApproval(
                f"{approver.id} owns agent {stored.agent} and cannot approve its request "
                f"{request_id}"
            )
        groups = stored.approver_groups
        if groups and not set(groups) & set(approver.groups):
            raise NotAllowedToApprove(
                f"request {request_id} needs an approver in one of: {', '.join(groups)}"
            )
        digest = binding.statement_digest
        if stored.state == RequestState.PENDING and row["due"]:
            await self._transition(conn, request_id, RequestState.EXPIRED, "expired", digest)
            return None
        if stored.state != RequestState.PENDING:
            raise AlreadyDecided(f"approval request {request_id} is already {stored.state}")
        try:
            await conn.execute(
                f"INSERT INTO {self._decisions} (request_id, approver_id, approver_name, "
                "verdict, channel, comment, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                request_id,
                approver.id,
                approver.name,
                verdict,
                channel,
                comment,
                self._key.decision_mac(binding, verdict, approver.id, channel),
                timeout=self._timeout,
            )
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateApproval(
                f"{approver.id} has already decided on request {request_id}"
            ) from exc
        current = await self._reload(conn, request_id)
        if verdict == "deny":
            await self._transition(
                conn, request_id, RequestState.DENIED, f"denied by {approver.id}", digest
            )
            return await self._reload(conn, request_id)
        approvals = len(verified_approvers(current, self._key, binding))
        if approvals >= stored.min_approvals:
            await self._transition(
                conn,
                request_id,
                RequestState.APPROVED,
                f"approved by {approvals} approver(s)",
                digest,
            )
            return await self._reload(conn, request_id)
        await self._notify(conn, request_id)  # a partial approval is news too
        return current

    async def cancel(self, request_id: str, reason: str) -> ApprovalRequest | None:
        """Pending → cancelled; None when the request is unknown or no longer pending."""
        async with self._transaction() as conn:
            digest = await conn.fetchval(
                f"SELECT statement_digest FROM {self._requests} WHERE id = $1 FOR UPDATE",
                request_id,
                timeout=self._timeout,
            )
            if not await self._transition(
                conn, request_id, RequestState.CANCELLED, reason, digest or ""
            ):
                return None
            return await self._reload(conn, request_id)

    async def expire_due(self) -> builtins.list[ApprovalRequest]:
        """Pending → expired for every request whose expiry has passed (database clock)."""
        async with self._transaction() as conn:
            due = await conn.fetch(
                f"SELECT id, statement_digest FROM {self._requests} "
                "WHERE state = 'pending' AND expires_at <= now() FOR UPDATE SKIP LOCKED",
                timeout=self._timeout,
            )
            expired = []
            for row in due:
                digest = row["statement_digest"] or ""
                if await self._transition(conn, row["id"], RequestState.EXPIRED, "expired", digest):
                    expired.append(row["id"])
            if not expired:
                return []
            rows = await conn.fetch(
                f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} WHERE id = ANY($1::text[])",
                expired,
                timeout=self._timeout,
            )
            return await self._with_decisions(conn, rows)

    # --- the Teams bot's bookkeeping ------------------------------------------------------------

    async def save_bot_message(
        self, request_id: str, conversation_id: str, activity_id: str
    ) -> None:
        """Remember which posted activity shows this request (the newest post wins)."""
        async with self._connection() as conn:
            await conn.execute(
                f"INSERT INTO {self._bot_messages} (request_id, conversation_id, activity_id) "
                "VALUES ($1, $2, $3) ON CONFLICT (request_id) DO UPDATE SET "
                "conversation_id = EXCLUDED.conversation_id, activity_id = EXCLUDED.activity_id, "
                "posted_at = now()",
                request_id,
                conversation_id,
                activity_id,
                timeout=self._timeout,
            )

    async def bot_message(self, request_id: str) -> tuple[str, str] | None:
        """(conversation id, activity id) of the card posted for this request, if any."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT conversation_id, activity_id FROM {self._bot_messages} "
                "WHERE request_id = $1",
                request_id,
                timeout=self._timeout,
            )
        return None if row is None else (row["conversation_id"], row["activity_id"])

    async def first_sighting(self, activity_id: str, keep_until: datetime) -> bool:
        """Record an incoming activity id; False when it was seen before (a replay).

        Rows past their ``keep_until`` are dropped first: by then the token that carried the
        activity has expired, so a replay of it is refused by its signature checks instead.
        """
        async with self._transaction() as conn:
            await conn.execute(
                f"DELETE FROM {self._bot_seen} WHERE keep_until < now()", timeout=self._timeout
            )
            inserted = await conn.fetchval(
                f"INSERT INTO {self._bot_seen} (activity_id, keep_until) VALUES ($1, $2) "
                "ON CONFLICT (activity_id) DO NOTHING RETURNING true",
                activity_id,
                keep_until,
                timeout=self._timeout,
            )
        return bool(inserted)

    # --- helpers --------------------------------------------------------------------------------

    async def _transition(
        self,
        conn: asyncpg.Connection,
        request_id: str,
        to: RequestState,
        reason: str,
        statement_digest: str,
    ) -> bool:
        """The compare-and-swap: pending → ``to``; notifies and returns True when it won.

        The new state carries pgguard's state MAC, so a final state written by anyone else is
        recognised as forged by every instance.
        """
        won = await conn.fetchval(
            f"UPDATE {self._requests} SET state = $2, decided_at = now(), state_reason = $3, "
            "state_mac = $4 WHERE id = $1 AND state = 'pending' RETURNING true",
            request_id,
            to.value,
            reason,
            self._key.state_mac(request_id, to.value, statement_digest),
            timeout=self._timeout,
        )
        if won:
            await self._notify(conn, request_id)
        return bool(won)

    async def _notify(self, conn: asyncpg.Connection, request_id: str) -> None:
        await conn.execute(
            "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, request_id, timeout=self._timeout
        )

    async def _reload(self, conn: asyncpg.Connection, request_id: str) -> ApprovalRequest:
        rows = await conn.fetch(
            f"SELECT {_REQUEST_COLUMNS} FROM {self._requests} WHERE id = $1",
            request_id,
            timeout=self._timeout,
        )
        return (await self._with_decisions(conn, rows))[0]

    async def _with_decisions(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
    ) -> builtins.list[ApprovalRequest]:
        if not rows:
            return []
        decision_rows = await conn.fetch(
            f"SELECT {_DECISION_COLUMNS} FROM {self._decisions} "
            "WHERE request_id = ANY($1::text[]) ORDER BY decided_at, approver_id",
            [row["id"] for row in rows],
            timeout=self._timeout,
        )
        by_request: dict[str, list[DecisionRecord]] = {}
        for d in decision_rows:
            by_request.setdefault(d["request_id"], []).append(
                DecisionRecord(
                    approver_id=d["approver_id"],
                    approver_name=d["approver_name"],
                    verdict=d["verdict"],
                    channel=d["channel"],
                    comment=d["comment"],
                    decided_at=d["decided_at"],
                    mac=d["mac"],
                )
            )
        return [_request(row, tuple(by_request.get(row["id"], ()))) for row in rows]

    async def _migrate(self, quoted_schema: str) -> None:
        lock, bootstrap, read_version, record_version = migration_statements(quoted_schema)
        async with self._transaction() as conn:
            await conn.execute(lock, timeout=self._timeout)
            await conn.execute(bootstrap, timeout=self._timeout)
            version = await conn.fetchval(read_version, timeout=self._timeout)
            for number, ddl in enumerate(MIGRATIONS, start=1):
                if number > version:
                    log.info("applying approval schema migration %d", number)
                    await conn.execute(ddl.format(s=quoted_schema), timeout=self._timeout)
                    await conn.execute(record_version, number, timeout=self._timeout)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except PgGuardError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ApprovalStoreUnavailable(
                f"the approval state database failed: {type(exc).__name__}: {exc}"
            ) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn


def _request(row: asyncpg.Record, decisions: tuple[DecisionRecord, ...]) -> ApprovalRequest:
    touches: Any = json.loads(row["touches"])
    return ApprovalRequest(
        id=row["id"],
        state=RequestState(row["state"]),
        agent=row["agent"],
        owner=row["owner"],
        database=row["database"],
        client_address=row["client_address"],
        application_name=row["application_name"],
        statement=row["statement"],
        parameters=tuple(row["parameters"]),
        fingerprint=row["fingerprint"],
        categories=tuple(row["categories"]),
        rule_ids=tuple(row["rule_ids"]),
        reason=row["reason"],
        approver_groups=tuple(row["approver_groups"]),
        min_approvals=row["min_approvals"],
        remember_s=row["remember_s"],
        expires_in_s=row["expires_in_s"],
        session_id=row["session_id"],
        instance_id=row["instance_id"],
        touches=touches if isinstance(touches, dict) else {},
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        decided_at=row["decided_at"],
        decisions=decisions,
        remembered_from=row["remembered_from"],
        state_reason=row["state_reason"],
        statement_digest=row["statement_digest"],
        request_mac=row["request_mac"],
        state_mac=row["state_mac"],
    )
