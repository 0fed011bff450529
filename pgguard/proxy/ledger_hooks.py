"""What the proxy writes to the ledger, and when (``pgguard.ledger`` stores it).

* Session start and end, and failed authentications.
* A refused statement (denied by policy, by an approver, expired or cancelled): one entry when the
  refusal is decided.
* An approved privileged statement: a *durable* entry with the decision and the approvers is
  written before the statement is forwarded - if that cannot be done, the statement is refused
  (``LedgerUnavailable``); its outcome is appended as a separate entry when the server answers.
* An ordinary statement: one entry with its outcome once the server has answered, written in
  batches off the hot path (``LedgerWriter.record`` only seals and queues).

Statement text is always masked. Masking parses the statement, so its result is cached by the
exact text: drivers that use parameters repeat the same text, and the cache makes those free.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pgguard.ledger import LedgerEntry, LedgerWriter, new_entry_id
from pgguard.masking import MaskingRules, mask_sql
from pgguard.wire.outcomes import Outcome

if TYPE_CHECKING:
    from pgguard.approvals.model import ApprovalRequest
    from pgguard.policy import Decision
    from pgguard.proxy.gate import SessionView

_MASK_CACHE = 4096


class StatementRecord:
    """A statement on its way through the proxy, until its outcome is known."""

    __slots__ = ("decision", "durable_entry_id", "kind", "received", "request", "sql")

    def __init__(self, kind: str, sql: bytes, decision: Decision | None) -> None:
        self.kind = kind
        self.sql = sql
        self.decision = decision
        self.received = time.time()
        self.request: ApprovalRequest | None = None
        self.durable_entry_id: str | None = None


class LedgerHooks:
    def __init__(
        self, writer: LedgerWriter, masking: MaskingRules, instance_id: str, upstream_role: str
    ) -> None:
        self.writer = writer
        self.masking = masking
        self.instance_id = instance_id
        self.upstream_role = upstream_role
        self._masked: OrderedDict[bytes, str] = OrderedDict()

    # --- sessions -----------------------------------------------------------------------------

    def session_started(self, session: SessionView) -> None:
        self.writer.record(self._base(session, "session_start", time.time()))

    def session_ended(self, session: SessionView) -> None:
        self.writer.record(self._base(session, "session_end", time.time()))

    def auth_failed(self, agent: str, database: str, client_address: str, reason: str) -> None:
        now = _when(time.time())
        self.writer.record(
            LedgerEntry(
                kind="auth_failure",
                instance_id=self.instance_id,
                session_id="",
                received_at=now,
                agent=agent,
                database=database,
                client_address=client_address,
                detail={"reason": reason},
            )
        )

    # --- statements ---------------------------------------------------------------------------

    def refused(
        self, session: SessionView, record: StatementRecord, sqlstate: str, message: str
    ) -> None:
        """A statement that will never run; recorded at once."""
        now = time.time()
        entry = self._statement(session, record, "statement")
        self.writer.record(
            _replace(
                entry,
                completed_at=_when(now),
                sqlstate=sqlstate,
                error_message=message,
                duration_ms=(now - record.received) * 1e3,
            )
        )

    async def approved(self, session: SessionView, record: StatementRecord) -> None:
        """Make the approved statement's entry durable before it is forwarded (or raise)."""
        entry = self._statement(session, record, "statement")
        await self.writer.record_durable(entry)
        record.durable_entry_id = entry.entry_id

    def finished(self, session: SessionView, record: StatementRecord, outcome: Outcome) -> None:
        now = time.time()
        fields = {
            "completed_at": _when(now),
            "command_tag": outcome.tags[-1]
            if outcome.tags
            else ("PORTAL SUSPENDED" if outcome.suspended else None),
            "rows": outcome.rows,
            "sqlstate": outcome.sqlstate,
            "error_message": outcome.message
            or (
                "skipped: an earlier statement of its pipeline failed" if outcome.skipped else None
            ),
            "duration_ms": (now - record.received) * 1e3,
        }
        if record.durable_entry_id is not None:
            entry = self._base(session, "outcome", now)
            entry = _replace(
                entry,
                statement_entry_id=record.durable_entry_id,
                request_id=record.request.id if record.request else None,
                **fields,
            )
        else:
            entry = _replace(self._statement(session, record, "statement"), **fields)
        self.writer.record(entry)

    # --- building entries ----------------------------------------------------------------------

    def _base(self, session: SessionView, kind: str, at: float) -> LedgerEntry:
        return LedgerEntry(
            kind=kind,  # type: ignore[arg-type]
            instance_id=self.instance_id,
            session_id=session.session_id,
            received_at=_when(at),
            agent=session.agent,
            owner=session.owner,
            client_address=session.client_address,
            application_name=session.application_name,
            database=session.database,
            upstream_role=self.upstream_role,
        )

    def _statement(self, session: SessionView, record: StatementRecord, kind: str) -> LedgerEntry:
        entry = self._base(session, kind, record.received)
        decision = record.decision
        request = record.request
        approvers: tuple[dict[str, str], ...] = ()
        if request is not None:
            approvers = tuple(
                {
                    "id": d.approver_id,
                    "name": d.approver_name,
                    "channel": d.channel,
                    "comment": d.comment or "",
                    "verdict": d.verdict,
                }
                for d in request.decisions
            )
        return _replace(
            entry,
            entry_id=new_entry_id(),
            statement=self.masked(record.sql),
            fingerprint=decision.fingerprint if decision else "",
            categories=decision.categories if decision else (),
            rule_ids=decision.rule_ids if decision else (),
            action=decision.action if decision else "allow",
            decided_at=_when(time.time()) if request is not None else entry.received_at,
            request_id=request.id if request is not None else None,
            approvers=approvers,
            reason=request.reason if request is not None else None,
        )

    def masked(self, sql: bytes) -> str:
        cached = self._masked.get(sql)
        if cached is not None:
            return cached
        text = mask_sql(sql.decode("utf-8", "replace"), self.masking).text
        self._masked[sql] = text
        if len(self._masked) > _MASK_CACHE:
            self._masked.popitem(last=False)
        return text


def _when(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _replace(entry: LedgerEntry, **changes: object) -> LedgerEntry:
    import dataclasses

    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
