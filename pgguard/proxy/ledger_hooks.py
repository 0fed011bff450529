"""What the proxy writes to the ledger, and when (``pgguard.ledger`` stores it).

* Session start and end, and failed authentications.
* A refused statement (denied by policy, by an approver, expired or cancelled): one entry when the
  refusal is decided.
* An approved privileged statement: a *durable* entry with the decision and the approvers is
  written before the statement is forwarded - if that cannot be done, the statement is refused
  (``LedgerUnavailable``); its outcome is appended as a separate entry when the server answers.
* An ordinary statement (allowed, no approval): one entry with its outcome once the server has
  answered, in the packed form (``LedgerWriter.record_packed`` seals a short array and queues it;
  the session's fields and the masked text are records cached here and stored once per pack).
  The relay's callback only notes it (one append); the hooks are the writer's *feeder*, so the
  masking, the records and the sealing run in batches - before anything else is written (which
  keeps the chain in recording order) and before each shipping round.

Statement text is always masked. Masking parses the statement, so its result is cached by the
exact text: drivers that use parameters repeat the same text, and the cache makes those free.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pgguard.ledger import LedgerEntry, LedgerWriter
from pgguard.ledger.model import jsonb_text
from pgguard.ledger.packed import PackedOutcome, Ref, epoch_us, session_record, text_record
from pgguard.masking import MaskingRules, mask_server_message, mask_sql, mask_text
from pgguard.sql.fastkey import literal_blind_key
from pgguard.wire.outcomes import Outcome, tag_rows

if TYPE_CHECKING:
    from pgguard.approvals.model import ApprovalRequest
    from pgguard.policy import Decision
    from pgguard.proxy.gate import SessionView

log = logging.getLogger(__name__)

_MASK_CACHE = 4096
_MASK_CACHE_TEXT = 16 * 1024  # bytes; bounds the cache at about 64 MiB of keys
_PENDING_BATCH = 256  # noted statements that make the shipper run now (else: flush_interval)
_PENDING_MAX = 4096  # ... and that are sealed at once, when the shipper does not come


class StatementRecord:
    """A statement on its way through the proxy, until its outcome is known."""

    __slots__ = ("blind", "decision", "durable_entry_id", "kind", "received", "request", "sql")

    def __init__(
        self, kind: str, sql: bytes, decision: Decision | None, blind: bytes | None = None
    ) -> None:
        self.kind = kind
        self.sql = sql
        self.decision = decision
        self.blind = blind  # sql's literal-blind key, when the classifier computed it
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
        self._texts: OrderedDict[tuple[bytes | str, int], tuple[Decision | None, Ref]] = (
            OrderedDict()
        )
        self._sessions: dict[str, tuple[str, Ref]] = {}
        # Ordinary statements not yet handed to the writer: (session record, statement, when
        # it completed, outcome); see `drain`.
        self._pending: list[tuple[Ref, StatementRecord, float, Outcome]] = []
        writer.add_feeder(self.drain)

    # --- sessions -----------------------------------------------------------------------------

    def session_started(self, session: SessionView) -> None:
        self.writer.record(self._entry(session, "session_start", time.time()))

    def session_ended(self, session: SessionView) -> None:
        self._sessions.pop(session.session_id, None)
        self.writer.record(self._entry(session, "session_end", time.time()))

    def auth_failed(self, agent: str, database: str, client_address: str, reason: str) -> None:
        self.writer.record(
            LedgerEntry(
                kind="auth_failure",
                instance_id=self.instance_id,
                session_id="",
                received_at=_when(time.time()),
                agent=agent,
                database=database,
                client_address=client_address,
                detail={"reason": reason},
            )
        )

    def integrity_alert(self, request: ApprovalRequest, problem: str) -> None:
        """A state row pgguard did not write (a forged or altered approval): on the record."""
        self.writer.record(
            LedgerEntry(
                kind="integrity_alert",
                instance_id=self.instance_id,
                session_id=request.session_id,
                received_at=_when(time.time()),
                agent=request.agent,
                owner=request.owner,
                database=request.database,
                fingerprint=request.fingerprint,
                request_id=request.id,
                detail={"stored_state": request.state.value, "problem": problem},
            )
        )

    # --- statements ---------------------------------------------------------------------------

    def refused(
        self, session: SessionView, record: StatementRecord, sqlstate: str, message: str
    ) -> None:
        """A statement that will never run; recorded at once."""
        now = time.time()
        self.writer.record(
            self._statement(
                session,
                record,
                completed_at=_when(now),
                sqlstate=sqlstate,
                error_message=mask_text(message, self.masking),
                duration_ms=(now - record.received) * 1e3,
            )
        )

    async def approved(self, session: SessionView, record: StatementRecord) -> None:
        """Make the approved statement's entry durable before it is forwarded (or raise)."""
        entry = self._statement(session, record)
        await self.writer.record_durable(entry)
        record.durable_entry_id = entry.entry_id

    def finished_many(self, session: SessionView, outcomes: list[Outcome]) -> None:
        """Statements the server answered, one ReadyForQuery's worth, in order; each outcome's
        token is the `StatementRecord` the gate handed out. Ordinary statements are only noted
        here (one append each; `drain` records them), the others are recorded at once. Never
        raises: it runs on the relay's path, and recording must not break the session."""
        now = time.time()
        session_ref: Ref | None = None
        pending = self._pending
        for outcome in outcomes:
            record = outcome.token
            if not isinstance(record, StatementRecord):
                continue
            try:
                decision = record.decision
                if (
                    record.request is None
                    and record.durable_entry_id is None
                    and (decision is None or decision.action == "allow")
                ):
                    if session_ref is None:
                        # The session record now: its application_name is the one the
                        # statements ran under.
                        session_ref = self._session_ref(session)
                    pending.append((session_ref, record, now, outcome))
                else:
                    self._record_outcome(session, record, outcome, now)
            except Exception:  # one statement that cannot be recorded must not cost the others
                log.exception("session %s: could not record an outcome", session.session_id)
        if len(pending) >= _PENDING_BATCH:
            self.writer.wake()
            if len(pending) >= _PENDING_MAX:
                # The shipper is stuck (a slow state database): seal here, so the writer's
                # bounded queue and its spool take over - memory stays bounded.
                try:
                    self.drain()
                except Exception:
                    log.exception("ledger: could not seal the noted statements")

    def _record_outcome(
        self, session: SessionView, record: StatementRecord, outcome: Outcome, now: float
    ) -> None:
        """The outcome of a statement that is not ordinary (approved, or allowed only by
        observe mode): a full entry, written now."""
        fields: dict[str, object] = {
            "completed_at": _when(now),
            "command_tag": _command_tag(outcome),
            "rows": outcome.rows,
            "sqlstate": outcome.sqlstate,
            "error_message": _error_message(outcome, self.masking),
            "duration_ms": (now - record.received) * 1e3,
        }
        if record.durable_entry_id is not None:
            request_id = record.request.id if record.request else None
            entry = self._entry(
                session,
                "outcome",
                now,
                statement_entry_id=record.durable_entry_id,
                request_id=request_id,
                **fields,
            )
        else:
            entry = self._statement(session, record, **fields)
        self.writer.record(entry)

    def drain(self) -> None:
        """Hand the noted ordinary statements to the writer, in order (the writer's feeder)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        items: list[tuple[Ref, Ref, PackedOutcome]] = []
        for session_ref, record, completed, outcome in pending:
            try:
                items.append(
                    (
                        session_ref,
                        self._text_ref(record),
                        _outcome_of(record, completed, outcome, self.masking),
                    )
                )
            except Exception:  # one statement that cannot be rendered must not cost the others
                log.exception("ledger: could not record a statement")
        self.writer.record_packed_many(items)

    def _session_ref(self, session: SessionView) -> Ref:
        cached = self._sessions.get(session.session_id)
        if cached is not None and cached[0] == session.application_name:
            return cached[1]
        fields = {
            "instance_id": self.instance_id,
            "session_id": session.session_id,
            "agent": session.agent,
            "owner": session.owner,
            "client_address": session.client_address,
            "application_name": mask_text(session.application_name, self.masking),
            "database": session.database,
            "upstream_role": self.upstream_role,
        }
        ref = session_record({k: jsonb_text(v) for k, v in fields.items()})
        self._sessions[session.session_id] = (session.application_name, ref)
        return ref

    def _text_ref(self, record: StatementRecord) -> Ref:
        # Keyed by the literal-blind key when the classifier computed one (bytes), else by the
        # masked text (str): either way texts differing only in literal values (simple-protocol
        # drivers) share one record. The decision is the engine's cached object, the same for
        # the same literal-independent classification; its identity completes the key (hashing
        # the object itself would walk all its fields on every statement).
        decision = record.decision
        blind = record.blind if record.blind is not None and b'"' not in record.blind else None
        key = (blind if blind is not None else self.masked(record.sql), id(decision))
        cached = self._texts.get(key)
        if cached is not None and cached[0] is decision:
            return cached[1]
        text = blind.decode("ascii") if blind is not None else key[0]
        assert isinstance(text, str)
        ref = text_record(
            jsonb_text(text),  # the view reads packs as jsonb: no NUL may reach a body
            jsonb_text(decision.fingerprint) if decision else "",
            [jsonb_text(c) for c in decision.categories] if decision else [],
            [jsonb_text(r) for r in decision.rule_ids] if decision else [],
            "allow",
        )
        if len(text) <= _MASK_CACHE_TEXT:
            self._texts[key] = (decision, ref)
            if len(self._texts) > _MASK_CACHE:
                self._texts.popitem(last=False)
        return ref

    def _masked_text(self, record: StatementRecord) -> str:
        if record.blind is not None and b'"' not in record.blind:
            return record.blind.decode("ascii")  # the literal-blind rendering, as in `masked`
        return self.masked(record.sql)

    def _entry(self, session: SessionView, kind: str, at: float, **fields: object) -> LedgerEntry:
        return LedgerEntry(
            kind=kind,  # type: ignore[arg-type]
            instance_id=self.instance_id,
            session_id=session.session_id,
            received_at=_when(at),
            agent=session.agent,
            owner=session.owner,
            client_address=session.client_address,
            application_name=mask_text(session.application_name, self.masking),
            database=session.database,
            upstream_role=self.upstream_role,
            **fields,  # type: ignore[arg-type]
        )

    def _statement(
        self, session: SessionView, record: StatementRecord, **fields: object
    ) -> LedgerEntry:
        decision = record.decision
        request = record.request
        if request is not None:
            fields["approvers"] = tuple(
                {
                    "id": d.approver_id,
                    "name": d.approver_name,
                    "channel": d.channel,
                    "comment": d.comment or "",
                    "verdict": d.verdict,
                }
                for d in request.decisions
            )
            fields["request_id"] = request.id
            fields["reason"] = request.reason
            fields["decided_at"] = _when(time.time())
        if decision is not None:
            fields["fingerprint"] = decision.fingerprint
            fields["categories"] = decision.categories
            fields["rule_ids"] = decision.rule_ids
            fields["action"] = decision.action
        else:
            fields["action"] = "allow"
        return self._entry(
            session, "statement", record.received, statement=self._masked_text(record), **fields
        )

    def masked(self, sql: bytes) -> str:
        """Masked text, cached by the exact text.

        Texts in the literal-blind subset (``pgguard.sql.fastkey``: plain ASCII, no comments,
        no special literals) and without quoted identifiers are rendered with every literal
        replaced by ``'?'`` or ``0`` - a faithful, value-free reading that costs a regular
        expression, not a parse. Everything else goes through the full masker.
        """
        if len(sql) > _MASK_CACHE_TEXT:
            # Large texts are neither cached (memory) nor scanned twice; the masker redacts
            # what it will not read.
            return mask_sql(sql.decode("utf-8", "replace"), self.masking).text
        cached = self._masked.get(sql)
        if cached is not None:
            return cached
        blind = literal_blind_key(sql)
        # A quoted identifier may be a value in disguise (an e-mail as an alias): the full
        # masker judges it; the literal-blind rendering keeps identifiers as written.
        if blind is not None and b'"' not in blind:
            text = blind.decode("ascii")
        else:
            text = mask_sql(sql.decode("utf-8", "replace"), self.masking).text
        self._remember(sql, text)
        return text

    def _remember(self, key: bytes, text: str) -> None:
        self._masked[key] = text
        if len(self._masked) > _MASK_CACHE:
            self._masked.popitem(last=False)


def _when(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _outcome_of(
    record: StatementRecord, completed: float, outcome: Outcome, masking: MaskingRules
) -> PackedOutcome:
    tags = outcome.tags
    if len(tags) == 1 and outcome.sqlstate is None and outcome.message is None:
        # The common case, one statement that completed: its tag's fields come from a cache
        # (tags repeat: "SELECT 1", "UPDATE 1", ...). A skipped statement has no tag.
        fields = _TAG_FIELDS.get(tags[0])
        if fields is None:
            fields = _tag_fields(tags[0])
        # epoch_us, inlined: this runs for every statement
        received_us, completed_us = round(record.received * 1e6), round(completed * 1e6)
        return received_us, completed_us, fields[0], fields[1], None, None
    return _packed_outcome(
        epoch_us(record.received),
        epoch_us(completed),
        _command_tag(outcome),
        outcome.rows,
        outcome.sqlstate,
        _error_message(outcome, masking),
    )


_TAG_FIELDS: dict[str, tuple[str, int | None]] = {}  # command tag -> (jsonb-safe tag, rows)
_TAG_FIELDS_MAX = 4096


def _tag_fields(tag: str) -> tuple[str, int | None]:
    fields = (tag if _plain(tag) else jsonb_text(tag), tag_rows(tag))
    if len(_TAG_FIELDS) >= _TAG_FIELDS_MAX:
        _TAG_FIELDS.clear()  # row counts make tags varied; a fresh start beats an LRU here
    _TAG_FIELDS[tag] = fields
    return fields


def _command_tag(outcome: Outcome) -> str | None:
    tag = outcome.tags[-1] if outcome.tags else None
    if tag is None and outcome.suspended:
        return "PORTAL SUSPENDED"
    return tag


def _error_message(outcome: Outcome, masking: MaskingRules) -> str | None:
    """The server's message as the ledger stores it: the values it quotes masked."""
    if outcome.message is None and outcome.skipped:
        return "skipped: an earlier statement of its pipeline failed"
    return None if outcome.message is None else mask_server_message(outcome.message, masking)


def _packed_outcome(
    received: int,
    completed: int,
    tag: str | None,
    rows: int | None,
    sqlstate: str | None,
    error: str | None,
) -> PackedOutcome:
    """The outcome array's fields, made jsonb-safe (the view reads packs as jsonb)."""
    if _plain(tag) and _plain(error) and _plain(sqlstate):
        return received, completed, tag, rows, sqlstate, error
    return (
        received,
        completed,
        None if tag is None else jsonb_text(tag),
        rows,
        None if sqlstate is None else jsonb_text(sqlstate),
        None if error is None else jsonb_text(error),
    )


def _plain(text: str | None) -> bool:
    return text is None or (text.isascii() and "\x00" not in text)
