"""The policy gate: the classifier and the rules (``pgguard.policy``) behind ``Gate.check``.

What it adds to the pass-through gate:

* Query text is classified; ``deny`` refuses with 42501 naming the rule ids. ``hold`` asks for
  approval (`pgguard.approvals`, the request bound by MAC to the exact statement bytes) and the
  session waits, told so by a NOTICE at once and every ``[holds] notice_interval``
  (`pgguard.proxy.hold_notices`), until the decision, the expiry, or the session's own
  ``statement_timeout`` (`pgguard.proxy.session_timeouts`: 57014, the request cancelled).
  A rule or agent with ``hold_mode: return`` is refused at once with 55000 instead and runs once
  when re-sent after the approval (`pgguard.proxy.returned`). Without approvers configured a
  hold refuses with 42501, saying approval is required. Every refusal has a DETAIL and a HINT.
* A Parse is classified so its facts are known when it is Executed (and, because protocol-level
  and SQL-level prepared statements share one namespace, to a later SQL ``EXECUTE`` too). Only a
  ``deny`` stops a Parse; everything else is decided at Execute, where the statement runs - judged
  by the strictest of every text the statement name may hold.
* The lexing state the classifier must assume comes from the server's ParameterStatus reports.
  After a statement that may change it (SET client_encoding, standard_conforming_strings, RESET
  ALL, ...) was forwarded, later statements are classified in the "pending" state until the
  server's ReadyForQuery for it has arrived - so pipelined text is never read in a stale state.
* Start-up parameters (``options=-c role=...`` and friends) are judged as the SET statements they
  amount to; a parameter that is not plainly allowed refuses the connection.
* ``[policy] mode = "observe"`` computes and logs every would-be action but never refuses.
* Size (``pgguard.proxy.offload``): a text above ``[limits] max_statement_bytes`` is refused with
  54000 unread. With an offload, a Query or single-text Execute above its threshold is
  classified in a worker process while the session waits (a Hold resolved by a task, as for a
  FunctionCall); such a Parse is let through unjudged - its Execute is where it is judged. The
  worker masks it too (ledger, review); a long held statement gets no row estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from pgguard.approvals.model import ApprovalRequest, NewRequest
from pgguard.approvals.service import ApprovalService
from pgguard.errors import (
    AdminShutdown,
    PgGuardError,
    PolicyDenied,
    PortalDoesNotExist,
    QueryCanceled,
    StatementTooComplex,
)
from pgguard.masking import MaskedStatement, MaskingRules
from pgguard.metrics import COUNTS
from pgguard.policy import (
    OBSERVE_MODE_NOTICE,
    PENDING_LEX_STATE,
    Context,
    Decision,
    LexState,
    PolicyEngine,
    SessionTracker,
)
from pgguard.policy.session import TOO_MANY_NAMES_REASON
from pgguard.proxy import hold_notices
from pgguard.proxy.catalog import function_name
from pgguard.proxy.estimates import estimate_rows
from pgguard.proxy.gate import (
    ALLOW,
    Allow,
    Deny,
    Gate,
    Hold,
    SessionView,
    SqlEvent,
    Verdict,
    function_call_refused,
)
from pgguard.proxy.holds import new_request, request_fingerprint, settle
from pgguard.proxy.holds import outcome as outcome_of
from pgguard.proxy.ledger_hooks import LedgerHooks, StatementRecord
from pgguard.proxy.offload import ParseOffload
from pgguard.proxy.returned import approved_ahead, judge_returned, plain_event
from pgguard.proxy.routines import RoutineJudge
from pgguard.proxy.session_timeouts import StatementTimeout, server_default_ms
from pgguard.settings import UpstreamSettings
from pgguard.sql.cursors import fetched_portals
from pgguard.wire.outcomes import Outcome
from pgguard.wire.session import sql_prepared_text
from pgguard.wire.startup_options import StartupOptionError, settings_from_startup

log = logging.getLogger(__name__)

_ACTION_ORDER = {"allow": 0, "hold": 1, "deny": 2}
# pgguard_statements_total, counted inline: action -> a Decision's categories -> count
_STATEMENTS = COUNTS.statements
_ALLOWED = COUNTS.statements["allow"]
_TIME_CLASSIFY = COUNTS.classify.observe  # pgguard_classify_seconds: the engine's cache misses


@dataclass
class _SessionPolicy:
    """Per-session state the policy gate keeps (attached to the session)."""

    tracker: SessionTracker
    contexts: dict[tuple[bool, str], Context] = field(default_factory=dict)
    context: Context | None = None  # the last one, valid while parameters_version is unchanged
    context_version: int = -1
    # See _classify_remembered; the engine that decided, so a reload's new rules are not bypassed.
    last_decision: tuple[bytes, Context, Decision, PolicyEngine] | None = None
    lex_pending_until: int = 0  # ReadyForQuery count at which a lexing change is confirmed
    lex_changed: bool = False  # a lexing change was let through: a ROLLBACK/COMMIT may undo it
    last_record: StatementRecord | None = None  # the statement just allowed, for the ledger
    hold_record: StatementRecord | None = None  # the statement being held
    approved_record: StatementRecord | None = None  # the held statement just approved
    hold_task: asyncio.Task[None] | None = None
    hold_future: asyncio.Future[Allow | Deny] | None = None
    hold_request_id: str | None = None
    functions: dict[int, tuple[str, str]] = field(default_factory=dict)  # FunctionCall OIDs
    hold_outcome: str = ""  # the held request's final state, for pgguard_hold_wait_seconds
    premasked: tuple[bytes, MaskedStatement] | None = None  # a long text masked off the loop
    timeouts: StatementTimeout = field(default_factory=StatementTimeout)  # ends holds (57014)


class PolicyGate(Gate):
    def __init__(
        self,
        engine: PolicyEngine,
        *,
        approvals: ApprovalService | None = None,
        masking: MaskingRules | None = None,
        instance_id: str = "",
        upstream: UpstreamSettings | None = None,
        ledger: LedgerHooks | None = None,
        offload: ParseOffload | None = None,
        max_statement_bytes: int | None = None,
        public_url: str = "",
        notice_interval: float = 30.0,
        hold_modes: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.public_url = public_url  # request pages named in the agents' notices and errors
        self.notice_interval = notice_interval  # [holds] notice_interval
        self.hold_modes = dict(hold_modes or {})  # agent name -> default hold_mode
        self.offload = offload
        self.max_statement_bytes = max_statement_bytes
        # Texts up to this long are judged here at once: the hot path pays one comparison.
        limits = [n for n in (max_statement_bytes, offload and offload.threshold) if n]
        self._size_limit: int | None = min(limits) if limits else None
        self.engine = engine
        engine.on_read = _TIME_CLASSIFY
        self.approvals = approvals
        self.masking = masking or MaskingRules.load()
        self.instance_id = instance_id
        self.upstream = upstream  # row estimates for reviews, FunctionCall OIDs
        self.ledger = ledger
        self._judging: set[asyncio.Task[None]] = set()  # deferred judgements under way
        # Set by Running.stop: a hold ended now was ended by pgguard, not by its client.
        self.shutting_down = False
        self._cancelling: set[asyncio.Task[object]] = set()  # requests being marked cancelled
        # Routines judged by their bodies: needs pgguard's own catalog look-ups upstream.
        self.routines = RoutineJudge(engine, upstream) if upstream is not None else None

    def reload(self, engine: PolicyEngine) -> None:
        """New rules for every next judgement (a reload; the caller validated them). Held
        statements keep their requests; the per-session cache of the last decision is keyed
        on the engine, so no session reuses a decision of the old rules."""
        self.engine = engine
        engine.on_read = _TIME_CLASSIFY
        if self.routines is not None:
            self.routines.engine = engine

    @property
    def observe(self) -> bool:
        return self.engine.mode == "observe"

    # --- session lifecycle -----------------------------------------------------------------

    def session_notices(self, session: SessionView) -> list[str]:
        return [OBSERVE_MODE_NOTICE] if self.observe else []

    def check_startup(
        self, agent: str, database: str, parameters: list[tuple[str, str]]
    ) -> PgGuardError | None:
        """Judge start-up parameters as the SET statements they amount to.

        A connection cannot wait for an approval mid-handshake, so a setting that is privileged
        (a held category, or a lexing hazard) or denied refuses it. A setting that is held only
        because a broad rule holds everything of this agent (an ordinary ``client_encoding``
        or ``application_name`` every driver sends) does not: such rules are about statements.
        """
        try:
            settings = settings_from_startup(parameters)
        except StartupOptionError as exc:
            return PolicyDenied(f"pgguard refuses the startup parameter: {exc}")
        ctx = Context(agent=agent, database=database)
        for name, value in settings:
            decision = self.engine.classify(_set_statement(name, value), ctx)
            refused = decision.action == "deny" or (
                decision.action == "hold" and decision.privileged
            )
            if refused and not decision.observe:
                return PolicyDenied(
                    f'pgguard refuses the startup setting "{name}" '
                    f"(rule {', '.join(decision.rule_ids) or 'default'})",
                    hint="Connect without it; a setting that needs approval can be SET later.",
                )
        return None

    # --- statements ------------------------------------------------------------------------

    def check(self, session: SessionView, event: SqlEvent) -> Verdict:
        state: _SessionPolicy | None = session.gate_state  # type: ignore[assignment]
        if state is None:
            state = self._state(session)
        ctx = state.context  # the last context, while no ParameterStatus or lexing change
        if (
            ctx is None
            or state.lex_pending_until
            or state.context_version != session.parameters_version
        ):
            ctx = self._context(session, state)
        size_limit = self._size_limit
        if size_limit is not None and (
            len(event.sql) > size_limit
            # One candidate is the event's own text (SqlEvent); only several need a look.
            or (len(event.candidates) > 1 and max(map(len, event.candidates)) > size_limit)
        ):
            sized = self._by_size(session, state, ctx, event)
            if sized is not None:
                return sized
        if event.kind == "query":
            decision, blind = self.engine.classify_keyed(event.sql, ctx)
            if decision.fetches:
                decision = self._with_fetched_portals(session, ctx, decision, event.sql)
            return self._verdict(session, state, decision, event, blind)
        if event.kind == "parse":
            decision = self._classify_remembered(state, event.sql, ctx)
            if event.statement and decision.facts:
                state.tracker.remember_all(event.statement, decision.facts)
            if decision.action == "deny":
                return self._verdict(session, state, decision, event)
            self._note_lexing(session, state, decision)
            return ALLOW
        return self._check_execute(session, state, ctx, event)

    # --- large statements -------------------------------------------------------------------

    def _by_size(
        self, session: SessionView, state: _SessionPolicy, ctx: Context, event: SqlEvent
    ) -> Verdict | None:
        """A verdict for a text too large for the loop, or None to judge it here as usual."""
        longest = max((len(event.sql), *(len(t) for t in event.candidates)))
        limit = self.max_statement_bytes
        if limit is not None and longest > limit:
            error = StatementTooComplex(
                f"pgguard refuses statements longer than {limit} bytes "
                "([limits] max_statement_bytes)"
            )
            if self.ledger is not None:  # recorded as what it is, without reading it
                self.ledger.premask(event.sql, f"<{longest} bytes, not read>")
                record = StatementRecord(event.kind, event.sql, None)
                self.ledger.refused(session, record, error.sqlstate, error.message)
            return Deny(error)
        offload = self.offload
        if offload is None or longest <= offload.threshold:
            return None
        if event.kind == "parse":
            return ALLOW  # judged at its Execute (only a deny stops a Parse, nothing runs here)
        if event.kind == "query":
            return self._offloaded(session, state, ctx, event, event.sql)
        single = len(event.candidates) == 1 and not event.ambiguous
        if single and not self._with_sql_prepared(state, event)[1]:
            return self._offloaded(session, state, ctx, event, event.candidates[0])
        return None

    def _offloaded(
        self,
        session: SessionView,
        state: _SessionPolicy,
        ctx: Context,
        event: SqlEvent,
        text: bytes,
    ) -> Hold:
        def refused(exc: Exception) -> Deny:
            if isinstance(exc, StatementTooComplex):
                return Deny(exc)
            log.error("session %s: a long statement was not judged: %s", session.session_id, exc)
            return Deny(StatementTooComplex("pgguard could not analyse this statement"))

        return self._deferred(self._judge_offloaded(session, state, ctx, event, text), refused)

    async def _judge_offloaded(
        self,
        session: SessionView,
        state: _SessionPolicy,
        ctx: Context,
        event: SqlEvent,
        text: bytes,
    ) -> Verdict:
        assert self.offload is not None
        decision, blind, masked = await self.offload.classify(
            text, ctx, mask=self.ledger is not None or self.approvals is not None
        )
        if masked is not None:
            state.premasked = (text, masked)  # for a hold's review (see _hold)
            if self.ledger is not None:
                self.ledger.premask(text, masked.text)
        if any(f.executes for f in decision.facts):
            raise StatementTooComplex(
                "pgguard judges a statement this long only when it EXECUTEs no prepared statement",
                hint="Send the EXECUTE as a statement of its own.",
            )
        if ctx.session is not None:  # what the worker's empty tracker remembered
            for facts in decision.facts:
                if facts.prepares is not None and not ctx.session.remember(facts.prepares, facts):
                    raise StatementTooComplex(TOO_MANY_NAMES_REASON)
        if decision.fetches:
            decision = self._with_fetched_portals(session, ctx, decision, text)
        # The literal-blind key stands for the text in the ledger; an Execute's is not kept
        # (as in `check`).
        blind = blind if event.kind == "query" else None
        return self._verdict(session, state, decision, event, blind)

    # --- judgements that wait (long texts, FunctionCall OIDs, routine bodies) ----------------

    def _deferred(
        self,
        judging: Coroutine[Any, Any, Verdict],
        refused: Callable[[Exception], Allow | Deny],
    ) -> Hold:
        """A verdict that needs I/O or another process: only this session waits for it.

        A judgement that ends in a hold (an approval) is awaited too; an exception is
        ``refused(exc)`` (fail closed); cancellation refuses with 57014.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Allow | Deny] = loop.create_future()
        task = loop.create_task(self._settle_when_judged(judging, refused, future))
        self._judging.add(task)
        task.add_done_callback(self._judging.discard)
        return Hold(future)

    @staticmethod
    async def _settle_when_judged(
        judging: Coroutine[Any, Any, Verdict],
        refused: Callable[[Exception], Allow | Deny],
        future: asyncio.Future[Allow | Deny],
    ) -> None:
        try:
            verdict = await judging
            if isinstance(verdict, Hold):
                verdict = await verdict.decision
            settle(future, verdict if isinstance(verdict, Deny) else ALLOW)
        except asyncio.CancelledError:
            settle(future, Deny(hold_notices.cancelled_by_client(None)))
            raise
        except Exception as exc:
            settle(future, refused(exc))

    # --- the FunctionCall message ---------------------------------------------------------

    def check_function_call(self, session: SessionView, oid: int, body: bytes) -> Verdict:
        """Judge a FunctionCall as the ``SELECT schema.fn()`` call it is.

        The OID is resolved once per session from the catalog, by a read-only query on
        pgguard's own connection (libpq's large-object API: lo_open, loread, lowrite, ... pass;
        server-side file functions are judged as they are in SQL). An OID that cannot be
        resolved is refused. The whole message (its arguments) is what an approval binds.
        """
        state = self._state(session)
        known = state.functions.get(oid)
        if known is not None:
            return self.check(session, _function_call_event(known, body))
        if self.upstream is None:
            return super().check_function_call(session, oid, body)

        def refused(exc: Exception) -> Deny:
            log.error("function call OID %d not judged: %s", oid, exc)
            return function_call_refused("it could not be judged")

        return self._deferred(self._resolve_function_call(session, state, oid, body), refused)

    async def _resolve_function_call(
        self, session: SessionView, state: _SessionPolicy, oid: int, body: bytes
    ) -> Verdict:
        assert self.upstream is not None
        name = await function_name(self.upstream, session.database, oid)
        if name is None:
            return function_call_refused(f"no function has OID {oid}")
        if len(state.functions) < _MAX_FUNCTIONS:
            state.functions[oid] = name
        return self.check(session, _function_call_event(name, body))

    def _check_execute(
        self, session: SessionView, state: _SessionPolicy, ctx: Context, event: SqlEvent
    ) -> Verdict:
        if not event.candidates:
            if event.statement == "" and not event.portal and not event.sql:
                return self._no_unnamed_portal(session, ctx, event)
            # A named portal no Bind made: only a SQL DECLARE can have (a cursor, judged when
            # declared). Judged as the EXECUTE of an empty name, which does not parse: denied.
            decision = self.engine.classify(f'EXECUTE "{_quote_ident(event.statement)}"', ctx)
            return self._verdict(session, state, decision, event)
        if event.statement or event.statements:
            candidates, sql_prepared = self._with_sql_prepared(state, event)
        else:  # the unnamed statement, the usual case: no SQL PREPARE can name it
            candidates, sql_prepared = event.candidates, False
        if len(candidates) == 1 and not sql_prepared and not event.ambiguous:
            decision = self._classify_remembered(state, candidates[0], ctx)
            if decision.fetches:
                decision = self._with_fetched_portals(session, ctx, decision, candidates[0])
            return self._verdict(session, state, decision, event)
        decisions = [self.engine.classify(text, ctx) for text in candidates]
        strictest = max(decisions, key=lambda d: _ACTION_ORDER[d.action])
        ambiguous = event.ambiguous or len(candidates) > 1
        if ambiguous and strictest.action != "allow" and not strictest.observe:
            return self._refuse_ambiguous(session, state, strictest, event)
        return self._verdict(session, state, strictest, event)

    def _no_unnamed_portal(self, session: SessionView, ctx: Context, event: SqlEvent) -> Deny:
        """An Execute of the unnamed portal where the session model says none exists (nothing
        was bound, or a simple Query destroyed it: protocol docs, "Extended Query") is answered
        here with the server's own error and never forwarded. PostgreSQL 16.2 keeps the portal
        of a failed ``ROLLBACK TO SAVEPOINT`` Query past its memory, and an Execute of it in the
        aborted transaction can crash the backend, and with it every session of the cluster
        (tests/integration/test_upstream_crash_guard.py). The ledger records it as the server
        would have: allowed, failed with 34000."""
        error = PortalDoesNotExist('portal "" does not exist')
        if self.ledger is not None:
            decision = self.engine.classify(b"", ctx)
            record = StatementRecord(event.kind, event.sql, decision)
            self.ledger.refused(session, record, error.sqlstate, error.message)
        return Deny(error)

    @staticmethod
    def _with_sql_prepared(
        state: _SessionPolicy, event: SqlEvent
    ) -> tuple[tuple[bytes, ...], bool]:
        """The event's candidates, and ``EXECUTE "name"`` for each statement name the portal
        may be bound from that a SQL PREPARE may have taken: the two share one namespace, and
        the connection's model (`pgguard.wire.session`) knows only the texts Parses put there.

        With whether any SQL PREPARE may be involved. A text the model
        knows and a SQL-prepared body are two texts the portal may run, so a privileged
        Execute of such a name is refused as ambiguous rather than shown to a reviewer as the
        one the model knows."""
        tracker = state.tracker
        if not event.statements:  # the usual case: one binding
            name = event.statement
            if not name or not tracker.sql_prepared(name):
                return event.candidates, False
            prepared = [name]
        else:
            prepared = [name for name in event.statements if name and tracker.sql_prepared(name)]
            if not prepared:
                return event.candidates, False
        extra = [sql_prepared_text(name) for name in prepared]
        return (*event.candidates, *(t for t in extra if t not in event.candidates)), True

    def _with_fetched_portals(
        self, session: SessionView, ctx: Context, decision: Decision, sql: bytes
    ) -> Decision:
        """A FETCH or MOVE runs the portal it names: judged by what that portal runs too.

        Protocol portals and SQL cursors share one namespace, so ``FETCH ALL FROM p1`` of a
        portal bound (never Executed) to a privileged statement would run it unjudged. Such a
        FETCH cannot be held mid-portal, so it is refused when the portal's text is not plainly
        allowed: the client Executes the portal instead, where it is held. (SQL cursors were
        judged by their DECLARE.)
        """
        worst = decision
        for name in fetched_portals(sql.decode("utf-8", "replace")):
            for text in session.portal_texts(name):
                judged = self.engine.classify(text, ctx)
                if _ACTION_ORDER[judged.action] > _ACTION_ORDER[worst.action]:
                    worst = judged
        if worst is decision:
            return decision
        reason = "FETCH/MOVE of a protocol-level portal that runs a privileged statement"
        return dataclasses.replace(
            worst,
            action="deny",
            reasons=(*worst.reasons, reason),
            rule_ids=(*worst.rule_ids, "builtin.fetch-of-privileged-portal"),
        )

    def _refuse_ambiguous(
        self, session: SessionView, state: _SessionPolicy, decision: Decision, event: SqlEvent
    ) -> Verdict:
        """A privileged Execute whose portal may run more than one text: never shown as one."""
        log.warning(
            "session %s agent %s: refused an Execute of portal %r that may run %d texts",
            session.session_id,
            session.agent,
            event.portal,
            len(event.candidates),
        )
        error = PolicyDenied(
            f'pgguard: portal "{event.portal}" of statement "{event.statement}" may run '
            "more than one text, and one of them needs approval",
            detail="A Parse, Bind or Close sent before it may not have taken effect on the "
            "server (an error makes the server skip the rest of a pipeline), so pgguard cannot "
            "show a reviewer the one text that would run.",
            hint="Close the statement, Parse it again and wait for the server's answer "
            "(Sync) before executing it.",
        )
        if self.ledger is not None:
            record = StatementRecord(event.kind, event.sql, decision)
            self.ledger.refused(session, record, error.sqlstate, error.message)
        return Deny(error)

    def _classify_remembered(self, state: _SessionPolicy, sql: bytes, ctx: Context) -> Decision:
        """``classify``, remembering the last text's decision: a Parse and the Execute of its
        portal (or repeated Executes of one prepared statement) ask about the same text in the
        same context. Only decisions that do not depend on the session's prepared statements
        are remembered - exactly those the engine's own cache may keep."""
        last = state.last_decision
        if last is not None and last[1] is ctx and last[0] == sql and last[3] is self.engine:
            return last[2]
        decision = self.engine.classify(sql, ctx)
        if not any(f.touches_session for f in decision.facts):
            state.last_decision = (sql, ctx, decision, self.engine)
        return decision

    def _verdict(
        self,
        session: SessionView,
        state: _SessionPolicy,
        decision: Decision,
        event: SqlEvent,
        blind: bytes | None = None,
    ) -> Verdict:
        """The verdict on `decision`; first, when it calls functions, made at least as strict
        as the bodies of the user-defined routines it may call (`pgguard.proxy.routines`)."""
        if decision.action == "allow" and not decision.called_functions:
            # The common case, in short: what `_verdict_now` and `_judge` do for it (with
            # `_count` inlined: a function call would cost more than the count).
            categories = decision.categories
            _ALLOWED[categories] = _ALLOWED.get(categories, 0) + 1
            self._let_through(session, state, decision, event)
            if self.ledger is not None:
                state.last_record = StatementRecord(event.kind, event.sql, decision, blind)
            return ALLOW
        if self.routines is not None and decision.action != "deny":
            names = self.routines.called_names(decision, session.agent, session.database)
            if names:
                return self._hold_for_routines(session, state, decision, event, blind, names)
        return self._verdict_now(session, state, decision, event, blind)

    def _hold_for_routines(
        self,
        session: SessionView,
        state: _SessionPolicy,
        decision: Decision,
        event: SqlEvent,
        blind: bytes | None,
        names: list[str],
    ) -> Verdict:
        def refused(exc: Exception) -> Allow | Deny:
            # Fail closed: a body pgguard cannot read is not harmless.
            log.error("routine bodies not judged: %s", type(exc).__name__)
            if self.observe:  # observe mode never refuses; the log line above is the record
                return ALLOW
            return Deny(
                PolicyDenied(
                    "pgguard could not read the definitions of the functions this "
                    "statement calls, so it is refused"
                )
            )

        judging = self._judge_routines(session, state, decision, event, blind, names)
        return self._deferred(judging, refused)

    async def _judge_routines(
        self,
        session: SessionView,
        state: _SessionPolicy,
        decision: Decision,
        event: SqlEvent,
        blind: bytes | None,
        names: list[str],
    ) -> Verdict:
        assert self.routines is not None
        ctx = Context(session.agent, session.database, session=state.tracker)
        judged = await self.routines.judge(decision, ctx, names)
        return self._verdict_now(session, state, judged, event, blind)

    def _verdict_now(
        self,
        session: SessionView,
        state: _SessionPolicy,
        decision: Decision,
        event: SqlEvent,
        blind: bytes | None = None,
    ) -> Verdict:
        verdict = self._judge(session, state, decision, event)
        if self.ledger is not None:
            record = StatementRecord(event.kind, event.sql, decision, blind)
            if verdict is ALLOW:
                state.last_record = record
            elif isinstance(verdict, Deny):
                error = verdict.error
                self.ledger.refused(session, record, error.sqlstate, error.message)
        return verdict

    def _judge(
        self, session: SessionView, state: _SessionPolicy, decision: Decision, event: SqlEvent
    ) -> Verdict:
        _count(decision)
        if decision.action == "allow":
            self._let_through(session, state, decision, event)
            return ALLOW
        rules = ", ".join(decision.rule_ids) or "default"
        if decision.observe:
            log.warning(
                "observe mode: session %s agent %s: would %s %s statement %s (rule %s)",
                session.session_id,
                session.agent,
                decision.action,
                event.kind,
                decision.fingerprint or "<unparseable>",
                rules,
            )
            self._let_through(session, state, decision, event)
            return ALLOW
        categories = ", ".join(decision.categories) or "none"
        detail = "; ".join(decision.reasons) or None
        log.info(
            "session %s agent %s: %s %s statement %s (rule %s, categories %s)",
            session.session_id,
            session.agent,
            decision.action,
            event.kind,
            decision.fingerprint or "<unparseable>",
            rules,
            categories,
        )
        if decision.action == "deny":
            return Deny(hold_notices.policy_denied(rules, categories, detail))
        if self.approvals is None:
            return Deny(hold_notices.no_approvals(rules, categories, detail))
        if (decision.hold_mode or self.hold_modes.get(session.agent, "wait")) == "return":
            return self._deferred(
                self._returned(session, state, decision, event),
                lambda exc: Deny(hold_notices.store_unavailable()),
            )
        return self._hold(session, state, decision, event)

    # --- holds -----------------------------------------------------------------------------

    def _hold(
        self, session: SessionView, state: _SessionPolicy, decision: Decision, event: SqlEvent
    ) -> Hold:
        """Ask for approval; the session waits on the returned future (and nothing else does)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Allow | Deny] = loop.create_future()
        premasked, state.premasked = state.premasked, None
        masked = premasked[1] if premasked is not None and premasked[0] == event.sql else None
        role = self.upstream.parsed().user if self.upstream is not None else ""
        new = new_request(
            session, decision, event, self.masking, self.instance_id, role or "", masked
        )
        functions = tuple(f for s in decision.statements for f in s.functions)
        state.hold_future = future
        state.hold_request_id = None
        state.hold_outcome = ""
        started = COUNTS.hold_started()
        future.add_done_callback(lambda f: COUNTS.hold_ended(started, _hold_outcome(state, f)))
        record = StatementRecord(event.kind, event.sql, decision)
        state.hold_record = record
        started = loop.time()  # the statement's own clock, as the server's statement_timeout
        state.hold_task = loop.create_task(
            self._await_approval(
                session, record, new, future, state, functions, event.bind, started
            )
        )
        return Hold(future)

    async def _await_approval(
        self,
        session: SessionView,
        record: StatementRecord,
        new: NewRequest,
        future: asyncio.Future[Allow | Deny],
        state: _SessionPolicy,
        functions: tuple[str, ...],
        bind: bytes | None,
        started: float,
    ) -> None:
        assert self.approvals is not None
        try:
            ahead = await self._approved_ahead(session, record, new, bind)
            if ahead is not None:  # asked and approved ahead of time (MCP): this is its run
                record.request = ahead
                settle(future, await self._record_decision(session, state, record, ALLOW))
                return
            deadline = await self._deadline(session, state, started)
            # A row estimate parses the text on the loop: long texts go without (best effort).
            long_text = self.offload is not None and len(record.sql) > self.offload.threshold
            if self.upstream is not None and not long_text:
                text = record.sql.decode("utf-8", "replace")
                estimate = await estimate_rows(self.upstream, new.database, text, functions)
                new = dataclasses.replace(new, touches={**new.touches, **estimate.touches()})
            request, final = await self.approvals.hold(new, record.sql, bind)
            state.hold_request_id = request.id
            # libpg_query's fingerprint (literals removed), not the remember key: a hash over
            # the parameter values could confirm a guessed value.
            fingerprint = record.decision.fingerprint if record.decision is not None else ""
            log_decision("hold", request.id, new.agent, new.rule_ids, fingerprint)
            decided = await self._wait_for_decision(session, request, final, deadline)
            outcome: Allow | Deny
            if decided is None:  # the session's statement_timeout ran out first
                state.hold_outcome = "cancelled"
                log_decision("cancelled", request.id, new.agent, new.rule_ids, fingerprint)
                outcome = await self._timed_out(session, state, record, request)
            else:
                record.request = decided
                state.hold_outcome = decided.state.value
                log_decision(decided.state.value, decided.id, new.agent, new.rule_ids, fingerprint)
                outcome = await self._record_decision(
                    session, state, record, outcome_of(decided, self.public_url)
                )
        except asyncio.CancelledError:
            settle(future, Deny(hold_notices.cancelled_by_client(state.hold_request_id)))
            raise
        except AdminShutdown:
            outcome = Deny(
                PolicyDenied(
                    "pgguard is shutting down; the held statement was not run",
                    detail="pgguard stopped while the statement waited for approval.",
                    hint="Reconnect and send it again: a retry opens a new request.",
                )
            )
        except Exception as exc:  # fail closed: no approval could be recorded or awaited
            log.error("hold for agent %s failed: %s", new.agent, exc)
            outcome = Deny(hold_notices.store_unavailable())
        finally:
            state.hold_task = None
        settle(future, outcome)

    async def _returned(
        self, session: SessionView, state: _SessionPolicy, decision: Decision, event: SqlEvent
    ) -> Allow | Deny:
        """Return mode (`pgguard.proxy.returned`): run an approved request once, else 55000."""
        assert self.approvals is not None
        plain = plain_event(event)
        new = new_request(session, decision, plain, self.masking, self.instance_id)
        verdict, request = await judge_returned(self.approvals, new, plain, self.public_url)
        record = StatementRecord(event.kind, event.sql, decision)
        record.request = request  # the ledger names the request, refused or run
        if isinstance(verdict, Deny):
            if self.ledger is not None:
                self.ledger.refused(session, record, verdict.error.sqlstate, verdict.error.message)
            return verdict
        log.info("request %s: agent %s runs its approved statement", request.id, session.agent)
        return await self._record_decision(session, state, record, verdict)

    async def _approved_ahead(
        self, session: SessionView, record: StatementRecord, new: NewRequest, bind: bytes | None
    ) -> ApprovalRequest | None:
        assert self.approvals is not None
        assert record.decision is not None
        plain = plain_event(SqlEvent("execute" if bind else "query", record.sql, bind=bind))
        if plain.bind is not bind:  # a parameterless Bind dropped: the key without it
            # (computed anew only then: it normalizes the text, which is costly for long ones)
            fingerprint = request_fingerprint(session, record.decision, plain)
            new = dataclasses.replace(new, fingerprint=fingerprint)
        return await approved_ahead(self.approvals, new, plain)

    async def _deadline(
        self, session: SessionView, state: _SessionPolicy, started: float
    ) -> float | None:
        """When the session's statement_timeout ends a statement that started at ``started``
        (loop time); None without one. Asked from the server once when pgguard cannot know."""
        timeouts = state.timeouts
        if timeouts.needs_server_default and self.upstream is not None:
            timeouts.server_default_ms = await server_default_ms(self.upstream, session.database)
        ms = timeouts.current_ms
        return started + ms / 1000 if ms else None

    async def _wait_for_decision(
        self,
        session: SessionView,
        request: ApprovalRequest,
        final: asyncio.Future[ApprovalRequest],
        deadline: float | None,
    ) -> ApprovalRequest | None:
        """Wait for the final request, telling the agent (NOTICE) now and every
        ``notice_interval``; None when ``deadline`` (the session's statement_timeout, loop
        time) comes first."""
        if final.done():  # a remembered approval: nothing to wait for
            return final.result()
        notice = hold_notices.held_notice(request, self.public_url)
        session.send_notice(notice.text, notice.detail, notice.hint)
        loop = asyncio.get_running_loop()
        while True:
            wait = self.notice_interval
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return None
            try:
                return await asyncio.wait_for(asyncio.shield(final), wait)
            except TimeoutError:
                pass
            if deadline is not None and loop.time() >= deadline:
                return None
            left = request.seconds_left()
            notice = hold_notices.reminder_notice(request, self.public_url, left)
            session.send_notice(notice.text, notice.detail, notice.hint)

    async def _timed_out(
        self,
        session: SessionView,
        state: _SessionPolicy,
        record: StatementRecord,
        request: ApprovalRequest,
    ) -> Deny:
        """The session's statement_timeout ended the hold: 57014, as the server would cancel,
        and the request is cancelled with that reason."""
        assert self.approvals is not None
        limit = _seconds(state.timeouts.current_ms)
        reason = f"the session's statement_timeout ({limit}) ran out while it waited"
        await self.approvals.cancel(request.id, reason)
        error = QueryCanceled(
            "canceling statement due to statement timeout",
            detail=f"Request {request.id} was still pending when {reason}; the request is "
            "cancelled and nothing was run.",
            hint="Raise statement_timeout (SET statement_timeout = ...) to wait longer, or "
            "retry later: a retry opens a new request.",
        )
        if self.ledger is not None:
            self.ledger.refused(session, record, error.sqlstate, error.message)
        return Deny(error)

    async def _record_decision(
        self,
        session: SessionView,
        state: _SessionPolicy,
        record: StatementRecord,
        outcome: Allow | Deny,
    ) -> Allow | Deny:
        """The ledger learns the decision; an approval must be durable before it runs."""
        if self.ledger is None:
            return outcome
        if isinstance(outcome, Deny):
            self.ledger.refused(session, record, outcome.error.sqlstate, outcome.error.message)
            return outcome
        try:
            await self.ledger.approved(session, record)
        except PgGuardError as exc:  # LedgerUnavailable: fail closed
            log.error("approved statement not run: the ledger cannot record it (%s)", exc)
            return Deny(
                PolicyDenied(
                    "pgguard: the statement was approved, but the ledger cannot record it, "
                    "so it was not run",
                    hint="The state database and the local spool are both unavailable.",
                )
            )
        state.approved_record = record
        return outcome

    # --- ledger hooks -------------------------------------------------------------------------

    @property
    def tracks_outcomes(self) -> bool:
        return self.ledger is not None

    def statement_token(self, session: SessionView, kind: str, sql: bytes) -> object | None:
        if self.ledger is None:
            return None
        state = session.gate_state
        record = None
        if isinstance(state, _SessionPolicy):  # else no statement of the session was checked
            record = state.approved_record or state.last_record
            state.approved_record = state.last_record = None
        return record if record is not None else StatementRecord(kind, sql, None)

    def outcome_sink(self, session: SessionView) -> Callable[[list[Outcome]], None]:
        if self.ledger is None:
            return super().outcome_sink(session)
        return functools.partial(self.ledger.finished_many, session)

    def session_started(self, session: SessionView) -> None:
        if self.routines is not None:
            self.routines.session_started(session.database)
        if self.ledger is not None:
            self.ledger.session_started(session)

    def session_ended(self, session: SessionView) -> None:
        if self.routines is not None:
            self.routines.session_ended(session.database)
        if self.ledger is not None:
            self.ledger.session_ended(session)

    def auth_failed(self, agent: str, database: str, client_address: str, reason: str) -> None:
        if self.ledger is not None:
            self.ledger.auth_failed(agent, database, client_address, reason)

    def cancel_hold(self, session: SessionView) -> bool:
        state = session.gate_state
        if not isinstance(state, _SessionPolicy) or state.hold_future is None:
            return False
        future, state.hold_future = state.hold_future, None
        if future.done():
            return False
        shutdown = self.shutting_down
        state.hold_outcome = "shutdown" if shutdown else "cancelled"
        if shutdown:
            settle(future, Deny(QueryCanceled("canceling statement due to user request")))
        else:
            settle(future, Deny(hold_notices.cancelled_by_client(state.hold_request_id)))
        why = "pgguard shut down" if shutdown else "cancelled by the client"
        record = state.hold_record
        if self.ledger is not None and record is not None:
            self.ledger.refused(session, record, "57014", why)
        request_id, task = state.hold_request_id, state.hold_task
        if task is not None:
            task.cancel()
        decision = record.decision if record is not None else None
        log_decision(
            "cancelled" if not shutdown else "shutdown",
            request_id or "-",
            session.agent,
            decision.rule_ids if decision is not None else (),
            decision.fingerprint if decision is not None else "",
        )
        if request_id is not None and self.approvals is not None:
            reason = why if shutdown else "the client cancelled or disconnected"
            cancel = asyncio.get_running_loop().create_task(
                self.approvals.cancel(request_id, reason)
            )
            self._cancelling.add(cancel)
            cancel.add_done_callback(self._cancelling.discard)
        return True

    async def settle_cancellations(self, limit: float = 5.0) -> None:
        """Wait (bounded) for held requests being marked cancelled: at shutdown, before the
        approval store closes under them."""
        if self._cancelling:
            await asyncio.wait(set(self._cancelling), timeout=limit)

    # --- session state ---------------------------------------------------------------------

    def _state(self, session: SessionView) -> _SessionPolicy:
        state = session.gate_state
        if state is None:
            state = _SessionPolicy(tracker=self.engine.new_session())
            with contextlib.suppress(StartupOptionError):  # refused at start-up already
                state.timeouts.start_up(settings_from_startup(session.startup_parameters))
            session.gate_state = state
        return cast(_SessionPolicy, state)  # only this gate sets it

    def _context(self, session: SessionView, state: _SessionPolicy) -> Context:
        if state.lex_pending_until and state.lex_pending_until > session.ready_count:
            return Context(session.agent, session.database, PENDING_LEX_STATE, state.tracker)
        version = session.parameters_version
        if state.context is not None and state.context_version == version:
            return state.context  # no ParameterStatus since: the same lexing state
        params = session.server_parameters
        key = (
            params.get("standard_conforming_strings", "on") == "on",
            params.get("client_encoding", "UTF8"),
        )
        ctx = state.contexts.get(key)
        if ctx is None:
            ctx = Context(session.agent, session.database, LexState(*key), state.tracker)
            state.contexts[key] = ctx
        state.context, state.context_version = ctx, version
        return ctx

    def _let_through(
        self, session: SessionView, state: _SessionPolicy, decision: Decision, event: SqlEvent
    ) -> None:
        """What a statement let through changes in the session's state as pgguard follows it:
        the lexing state (`_note_lexing`) and the statement_timeout (`_note_timeout`). Both
        checks are one field each for the ordinary statement."""
        if decision.changes_lexing or state.lex_changed:
            self._note_lexing(session, state, decision)
        if decision.moves_settings:
            _note_timeout(state, decision, event)

    def _note_lexing(self, session: SessionView, state: _SessionPolicy, decision: Decision) -> None:
        """Read what follows a lexing change as pending until the server confirms its state.

        A transaction end (ROLLBACK, ROLLBACK TO SAVEPOINT, COMMIT ending a SET LOCAL) changes
        lexing when it undoes a change let through earlier in the session."""
        undoes = state.lex_changed and any(f.undoes_settings for f in decision.facts)
        if decision.changes_lexing or undoes:
            state.lex_changed = True
            # Confirmed by the ReadyForQuery that follows every reply owed so far.
            state.lex_pending_until = session.ready_count + session.replies_owed + 1


_MAX_FUNCTIONS = 1024  # resolved OIDs a session remembers


def _hold_outcome(state: _SessionPolicy, future: asyncio.Future[Allow | Deny]) -> str:
    """The label of a finished hold: the request's state when it reached one, else what the
    session got (cancelled by the client, or refused because the hold could not be recorded)."""
    if state.hold_outcome:
        return state.hold_outcome
    if future.cancelled():
        return "cancelled"
    result = future.result()
    if isinstance(result, Deny) and isinstance(result.error, QueryCanceled):
        return "cancelled"
    return "approved" if result is ALLOW else "failed"


def log_decision(
    what: str, request_id: str, agent: str, rule_ids: tuple[str, ...], fingerprint: str
) -> None:
    """One line per hold decision (hold, approved, denied, expired, cancelled): names and
    fingerprints only, never the statement or a value (invariant 4)."""
    log.info(
        "decision %s: request %s agent %s rules %s fingerprint %s",
        what,
        request_id,
        agent,
        ",".join(rule_ids) or "default",
        fingerprint,
        extra={
            "event": "decision",
            "decision": what,
            "request_id": request_id,
            "agent": agent,
            "rule_ids": list(rule_ids),
            "fingerprint": fingerprint,
        },
    )


def _function_call_event(name: tuple[str, str], body: bytes) -> SqlEvent:
    schema, function = (_quote_ident(part) for part in name)
    return SqlEvent("query", f'SELECT "{schema}"."{function}"()'.encode(), bind=body)


def _count(decision: Decision) -> None:
    """pgguard_statements_total: a dict update keyed by the Decision's own categories tuple
    (no key built); `pgguard.metrics` turns the counts into labelled samples at each scrape."""
    counts = _STATEMENTS[decision.action]
    categories = decision.categories
    counts[categories] = counts.get(categories, 0) + 1


def _note_timeout(state: _SessionPolicy, decision: Decision, event: SqlEvent) -> None:
    """Follow the session's statement_timeout through a statement let through that moves
    settings (`Decision.moves_settings`)."""
    if any(v.kind in _TIMEOUT_KINDS for v in decision.statements):
        state.timeouts.observe(event.sql)
    if state.timeouts.local_ms is not None and any(f.undoes_settings for f in decision.facts):
        state.timeouts.transaction_ended()


_TIMEOUT_KINDS = frozenset({"VariableSetStmt", "DiscardStmt"})


def _seconds(ms: int | None) -> str:
    return "unknown" if ms is None else f"{ms / 1000:g} s"


def _quote_ident(name: str) -> str:
    return name.replace('"', '""')


def _set_statement(name: str, value: str) -> str:
    quoted = value.replace("'", "''")
    return f"SET \"{_quote_ident(name)}\" TO '{quoted}'"
