"""One agent session: start-up, then the client <-> upstream relay with the gate in the path.

The relay is callback-driven (``Link.on_data``): client bytes go through the ``FrontendScanner``;
pass-through runs and allowed messages are written upstream in one write per chunk, so the hot
path has no per-message copies and no task switches. Only a held statement creates a task, and
only that session waits: its client transport stops reading until the decision arrives.

A refused statement is never forwarded. In its place the server receives a statement it rejects
with a syntax error naming a random marker (a Query for Query/FunctionCall, a named Parse in an
extended-protocol pipeline), and the ``BackendTracker`` swaps that one ErrorResponse for
pgguard's. The server thus raises the error at exactly the right point of the stream: it aborts
the transaction block and skips the pipeline up to Sync, so client and server agree on the
transaction state as if PostgreSQL itself had refused the statement.

pgguard's own NoticeResponses (a held statement's, `Session.send_notice`) reach the client only
between two whole server messages: while a reply is still streaming they wait for its end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgguard.errors import (
    AuthenticationFailed,
    InternalError,
    PgGuardError,
    ProtocolViolation,
    StartupRefused,
    UpstreamUnavailable,
)
from pgguard.metrics import COUNTS
from pgguard.proxy import gate as g
from pgguard.proxy import upstream
from pgguard.proxy.link import Link, LinkClosed
from pgguard.proxy.startup import AgentLogin, authenticate
from pgguard.wire import extended as x
from pgguard.wire import messages as m
from pgguard.wire.backend import BackendTracker
from pgguard.wire.framing import Frame, FrontendScanner
from pgguard.wire.outcomes import OutcomeTracker
from pgguard.wire.session import Bound, SessionModel, sql_prepared_text

if TYPE_CHECKING:
    from pgguard.proxy.server import ProxyContext

log = logging.getLogger(__name__)
_session_ids = itertools.count(1)
# Message types as module globals: `_decide_at` compares one per message (no attribute look-up).
_QUERY, _PARSE, _BIND, _EXECUTE = m.F_QUERY, m.F_PARSE, m.F_BIND, m.F_EXECUTE
_CLOSE, _FUNCTION_CALL, _TERMINATE = m.F_CLOSE, m.F_FUNCTION_CALL, m.F_TERMINATE


@dataclass(eq=False)
class Session:
    """What is known about one agent session; the gate sees it through ``SessionView``."""

    session_id: str
    agent: str
    owner: str
    database: str
    client_address: str
    tracker: BackendTracker = field(default_factory=BackendTracker)
    owed: Callable[[], int] = int  # ReadyForQuery messages still owed (set by the connection)
    portals: Callable[[str], tuple[bytes, ...]] = lambda _name: ()  # set by the connection
    notices: Callable[[bytes], None] = lambda _data: None  # set by the connection
    startup_parameters: list[tuple[str, str]] = field(default_factory=list)
    gate_state: object = None

    def portal_texts(self, name: str) -> tuple[bytes, ...]:
        return self.portals(name)

    def send_notice(self, text: str, detail: str | None = None, hint: str | None = None) -> None:
        self.notices(m.notice_response(text, detail=detail, hint=hint))

    @property
    def ready_count(self) -> int:
        return self.tracker.ready_count

    @property
    def replies_owed(self) -> int:
        return self.owed()

    @property
    def application_name(self) -> str:
        return self.tracker.parameters.get("application_name", "")

    @property
    def txn_status(self) -> bytes:
        return self.tracker.txn_status

    @property
    def server_parameters(self) -> dict[str, str]:
        return self.tracker.parameters

    @property
    def parameters_version(self) -> int:
        return self.tracker.parameters_version


def error_message(error: PgGuardError) -> bytes:
    COUNTS.error(error.sqlstate)  # every ErrorResponse to a client is built here
    return m.error_response(
        error.severity, error.sqlstate, error.message, detail=error.detail, hint=error.hint
    )


class Connection:
    """Drives one client connection from its StartupMessage to its close."""

    def __init__(self, ctx: ProxyContext, client: Link, client_address: str) -> None:
        self.ctx = ctx
        self.client = client
        self.client_address = client_address
        self.session: Session | None = None
        self.upstream: Link | None = None
        self.backend_key: tuple[int, bytes] | None = None
        tracking = ctx.gate.tracks_outcomes
        self._scanner = FrontendScanner(ctx.settings.limits.max_message_bytes)
        self._outcomes: OutcomeTracker | None = OutcomeTracker() if tracking else None
        # The server's statements and portals, confirmed by its answers (pgguard.wire.session).
        self._model = SessionModel()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held: tuple[Frame, g.Hold] | None = None
        self._hold_task: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()  # set when the server answered while a frame waits
        # Query/FunctionCall frames forwarded (each ends with ReadyForQuery). With the scanner's
        # Sync count it numbers the ReadyForQuery messages owed: a statement forwarded now is
        # ended by number _zcount + syncs (a Query, counted already) or that + 1 (an Execute,
        # whose Sync is still to come) - the group the OutcomeTracker files it under.
        self._zcount = 0
        # Extended messages forwarded in the current group that the server answers one for one
        # (Parse, Bind, Close, Execute; Describe is counted by the scanner), and that group's
        # number: at an error, the number of answers says which of them ran
        # (OutcomeTracker.error, SessionModel.error).
        self._acked = 0
        self._acked_group = 0
        self._upstream_write: Callable[[bytes], None] = _discard
        self._client_write: Callable[[bytes], None] = _discard
        self._tracker_feed: Callable[[bytes], bytes] = bytes
        self._terminating = False
        self._slot_of: str | None = None  # the agent whose upstream slot this session holds
        # NoticeResponses of pgguard's own that wait for the server's stream to reach the end
        # of a message (a held statement's notices while earlier replies are still relayed).
        self._notices: list[bytes] = []

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(
        self, startup: m.StartupMessage, channel_binding: bytes | None, pipelined: bytes
    ) -> None:
        """Authenticate, connect upstream, relay until either side closes."""
        try:
            async with asyncio.timeout(self.ctx.settings.limits.startup_timeout):
                login = await authenticate(
                    self.client, startup, self.ctx.agents, channel_binding, pipelined
                )
                up = await self._connect_upstream(login)
            self._start_relay(login, up)
            await self._done
        except TimeoutError:
            self.fail(ProtocolViolation("timeout during connection start-up"))
        except LinkClosed:
            pass
        except AuthenticationFailed as exc:
            self.ctx.gate.auth_failed(
                startup.get("user") or "",
                startup.get("database") or "",
                self.client_address,
                exc.message,
            )
            self.fail(exc)
        except upstream.UpstreamError as exc:
            self._send_and_close(exc.raw)
        except PgGuardError as exc:
            self.fail(exc)
        finally:
            self._cleanup()

    async def _connect_upstream(self, login: AgentLogin) -> upstream.UpstreamSession:
        refusal = self.ctx.gate.check_startup(login.agent.name, login.database, login.parameters)
        if refusal is not None:
            raise StartupRefused(refusal.message, detail=refusal.detail, hint=refusal.hint)
        self._take_slot(login.agent.name)
        up = await upstream.connect(
            self.ctx.settings.upstream, login.version, login.parameters, login.database
        )
        if self.client.closed:
            up.link.abort()
            raise LinkClosed("client closed the connection during start-up")
        return up

    def _take_slot(self, agent: str) -> None:
        """One upstream session slot (TooManyConnections, 53300, names the limit); returned in
        ``_cleanup`` however the session ends."""
        slots = self.ctx.slots
        if slots is not None:
            slots.take(agent)
            self._slot_of = agent

    def _start_relay(self, login: AgentLogin, up: upstream.UpstreamSession) -> None:
        session = Session(
            session_id=f"{self.ctx.instance_id}-{next(_session_ids)}",
            agent=login.agent.name,
            owner=login.agent.owner,
            database=login.database,
            client_address=self.client_address,
            tracker=BackendTracker(up.parameters),
            startup_parameters=list(login.parameters),
        )
        session.tracker.txn_status = up.txn_status
        session.tracker.model = self._model
        session.owed = self._replies_owed
        session.portals = self._portal_texts
        session.notices = self._send_notice
        self.session = session
        self.upstream = up.link
        self.backend_key = (up.pid, up.key)
        self.ctx.register(self)
        log.info(
            "session %s: agent %s connected to database %s from %s",
            session.session_id,
            session.agent,
            session.database,
            self.client_address,
        )
        notices = b"".join(
            m.error_response("NOTICE", "00000", text, notice=True)
            for text in self.ctx.gate.session_notices(session)
        )
        # The welcome ends with ReadyForQuery (6 bytes); notices go just before it.
        welcome = up.welcome[:-6] + notices + up.welcome[-6:]
        self.client.write(login.sasl_final + m.auth_ok() + welcome)
        pending_server = up.link.take_buffered()
        pending_client = login.leftover + self.client.take_buffered()
        up.link.relay_to(self._from_server)
        up.link.on_close = self._upstream_closed
        self.client.on_close = self._client_closed
        self.client.relay_to(self._from_client)
        self.client.peer, up.link.peer = up.link, self.client
        assert up.link.transport is not None
        assert self.client.transport is not None
        # Bound methods of the transports themselves: the relay writes without indirection.
        self._upstream_write = up.link.transport.write
        self._client_write = self.client.transport.write
        self._tracker_feed = session.tracker.feed
        if self._outcomes is not None:
            # Straight to the gate's sink: a ReadyForQuery's statements cost one call.
            session.tracker.track_outcomes(self._outcomes, self.ctx.gate.outcome_sink(session))
        self.ctx.gate.session_started(session)
        if pending_server:
            self._from_server(pending_server)
        if pending_client:
            self._from_client(pending_client)
        if self.client.closed:
            self._client_closed(None)

    def _replies_owed(self) -> int:
        assert self.session is not None
        return self._zcount + self._scanner.syncs - self.session.tracker.ready_count

    def _cleanup(self) -> None:
        self.ctx.unregister(self)
        if self._slot_of is not None and self.ctx.slots is not None:
            self.ctx.slots.give_back(self._slot_of)
            self._slot_of = None
        if self.session is not None:
            self.ctx.gate.session_ended(self.session)
        if self._hold_task is not None:
            self._hold_task.cancel()
        if self.upstream is not None:
            self.upstream.on_close = None
            self.upstream.close()
            self.ctx.closing.add(self.upstream)
        self.client.on_close = None
        self.client.close()
        self.ctx.closing.add(self.client)
        if self.session is not None:
            log.info("session %s: closed", self.session.session_id)

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def fail(self, error: PgGuardError) -> None:
        """Send ``error`` to the client (FATAL ends the session)."""
        if error.severity == "FATAL":
            log.info(
                "closing client %s: %s (%s)", self.client_address, error.message, error.sqlstate
            )
            self._send_and_close(error_message(error))
        else:
            self.client.write(error_message(error))

    def _send_and_close(self, data: bytes) -> None:
        self.client.write(data)
        self.client.close()
        self._finish()

    def end_hold(self) -> None:
        """pgguard itself ends a held statement (shutdown): its request does not stay pending."""
        if self._held is not None and self.session is not None:
            self.ctx.gate.cancel_hold(self.session)

    def _client_closed(self, exc: Exception | None) -> None:
        if self._held is not None:
            self.ctx.gate.cancel_hold(self._session())
        self._finish()

    def _upstream_closed(self, exc: Exception | None) -> None:
        session = self.session
        expected = self._terminating or self.client.closed or session is None
        if not expected and session is not None and not session.tracker.saw_fatal:
            lost = UpstreamUnavailable("the upstream server closed the connection unexpectedly")
            self.client.write(error_message(lost))
        self.client.close()
        self._finish()

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    # --- cancel -------------------------------------------------------------------------------

    async def cancel(self) -> None:
        """A CancelRequest matched this session: end a hold, or cancel the running statement."""
        if self._held is not None and self.ctx.gate.cancel_hold(self._session()):
            return
        if self.backend_key is not None:
            await upstream.send_cancel(self.ctx.settings.upstream, *self.backend_key)

    # --- relay: server -> client ----------------------------------------------------------------

    def _send_notice(self, data: bytes) -> None:
        """Send a NoticeResponse of pgguard's own between two of the server's messages."""
        if self.client.closed:
            return
        if self._notices or not self._session().tracker.at_message_boundary:
            self._notices.append(data)  # written by _from_server at the next message boundary
            return
        self._client_write(data)

    def _from_server(self, data: bytes) -> None:
        try:
            self._client_write(self._tracker_feed(data))
            if self._notices and self._session().tracker.at_message_boundary:
                notices, self._notices = b"".join(self._notices), []
                self._client_write(notices)
            if self._held is not None:
                self._answered.set()  # a deferred Execute may be waiting for these answers
        except ProtocolViolation as exc:
            log.error(
                "session %s: upstream broke the protocol: %s", self._session().session_id, exc
            )
            self.fail(UpstreamUnavailable("the upstream server sent an invalid message"))
        except Exception:
            if self._client_gone():
                self._client_went_away()
            else:
                self._internal_error("relaying the server's reply")

    def _client_gone(self) -> bool:
        transport = self.client.transport
        return self.client.closed or transport is None or transport.is_closing()

    def _client_went_away(self) -> None:
        """The client vanished mid-reply (uvloop raises on writes to a reset transport): an
        ordinary end of a session, not a bug - no error to send, nobody to send it to."""
        session_id = self.session.session_id if self.session is not None else "-"
        log.info("session %s: client went away while its reply was relayed", session_id)
        self._client_write = _discard
        self.client.close()
        self._finish()

    # --- relay: client -> server ----------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        scanner = self._scanner
        if self._held is not None:
            # Keep reading while held, so a disconnect is seen at once (and cancels the
            # request); what arrives waits in the scanner, up to one message's worth.
            scanner.receive_data(data)
            if scanner.buffered > self.ctx.settings.limits.max_message_bytes:
                self.client.pause_reading("hold")
            return
        if scanner.idle:
            self._fast_path(data)
            if scanner.idle:
                return
        else:
            scanner.receive_data(data)
        self._pump()

    def _fast_path(self, data: bytes) -> None:
        """Decide in place and forward the chunk in one write (see FrontendScanner.scan_chunk)."""
        try:
            pos, verdict = self._scanner.scan_chunk(data, self._decide_at, g.ALLOW)
        except PgGuardError as exc:
            self._gate_failed(exc, [])
            return
        except Exception:  # nothing of this chunk was forwarded: fail closed, visibly
            self._internal_error("deciding on a statement")
            return
        if pos:
            self._upstream_write(data if pos == len(data) else data[:pos])
        if verdict is not None:
            frame = self._scanner.take_frame()
            assert isinstance(verdict, (g.Deny, g.Hold))
            self._apply(frame, verdict)

    def _apply(self, frame: Frame, verdict: g.Deny | g.Hold) -> None:
        if isinstance(verdict, g.Deny):
            self._upstream_write(self._refusal(frame, verdict.error))
        else:
            self._hold(frame, verdict)

    def _pump(self) -> None:
        out: list[bytes] = []
        try:
            self._scan(out)
        except ProtocolViolation as exc:
            self._write_upstream(out)
            self.fail(exc)
            return
        except PgGuardError as exc:
            self._gate_failed(exc, out)
            return
        except Exception:  # the message that raised was not forwarded: fail closed, visibly
            self._write_upstream(out)
            self._internal_error("deciding on a statement")
            return
        self._write_upstream(out)

    def _internal_error(self, doing: str) -> None:
        """A bug met this session: log it whole, end only this session with a proper error."""
        session_id = self.session.session_id if self.session is not None else "-"
        log.exception("session %s: internal error while %s", session_id, doing)
        self.fail(InternalError(f"pgguard internal error while {doing}; the session ends"))

    def _gate_failed(self, exc: PgGuardError, out: list[bytes]) -> None:
        if isinstance(exc, ProtocolViolation):
            self._write_upstream(out)
            self.fail(exc)
            return
        # A gate that raised: never forward the statement; end the session.
        log.error("session %s: gate failed: %s", self._session().session_id, exc)
        self._write_upstream(out)
        self.fail(ProtocolViolation(f"pgguard could not decide on a statement: {exc.message}"))

    def _write_upstream(self, out: list[bytes]) -> None:
        if out:
            self._upstream_write(out[0] if len(out) == 1 else b"".join(out))

    def _scan(self, out: list[bytes]) -> None:
        scanner = self._scanner
        while self._held is None and (event := scanner.next_event()) is not None:
            if type(event) is bytes:
                out.append(event)
                continue
            assert isinstance(event, Frame)
            verdict = self._decide_at(event.type, event.raw, 0, len(event.raw))
            if verdict is g.ALLOW:
                out.append(event.raw)
            else:
                assert isinstance(verdict, (g.Deny, g.Hold))
                self._write_upstream(out)
                out.clear()
                self._apply(event, verdict)

    def _decide_at(self, kind: int, data: bytes, start: int, end: int) -> g.Verdict:
        """Track extended-protocol state and ask the gate about messages that carry SQL.

        The message is ``data[start:end]``. ``ALLOW`` means forward it; its bookkeeping (the
        count of messages that end with ReadyForQuery) is done here so both paths share it.
        """
        session = self.session
        assert session is not None
        if kind == _QUERY:
            if data[end - 1] != 0:
                raise ProtocolViolation("invalid Query message: missing terminator")
            self._refuse_unsynced("a simple Query")
            sql = data[start + 5 : end - 1]
            verdict = self.ctx.gate.check(session, g.SqlEvent("query", sql))
            if verdict is g.ALLOW:
                self._zcount += 1
                self._model.query(self._zcount + self._scanner.syncs)
                if self._outcomes is not None:
                    token = self.ctx.gate.statement_token(session, "query", sql)
                    self._outcomes.query(token, self._zcount + self._scanner.syncs)
            return verdict
        if kind == _PARSE:
            parse = x.decode_parse(data[start + 5 : end])
            self._scanner.unsynced = True
            verdict = self.ctx.gate.check(
                session, g.SqlEvent("parse", parse.sql, statement=parse.statement)
            )
            if not isinstance(verdict, g.Deny):
                group, acks_before = self._answered_one()
                self._model.parse(group, parse.statement, parse.sql, acks_before)
            return verdict
        if kind == _BIND:
            bind = x.decode_bind(data[start + 5 : end])
            group, acks_before = self._answered_one()
            self._model.bind(group, bind.portal, bind.statement, bind.body, acks_before)
            return g.ALLOW
        if kind == _EXECUTE:
            self._scanner.unsynced = True
            return self._decide_execute(session, x.decode_portal_name(data[start + 5 : end]))
        if kind == _CLOSE:
            close_kind, name = x.decode_close(data[start + 5 : end])
            group, acks_before = self._answered_one()
            self._model.close(group, close_kind, name, acks_before)
            return g.ALLOW
        if kind == _FUNCTION_CALL:
            self._refuse_unsynced("a function call")
            body = data[start + 5 : end]
            if len(body) < 4:
                raise ProtocolViolation("invalid FunctionCall message")
            oid = int.from_bytes(body[:4], "big")
            verdict = self.ctx.gate.check_function_call(session, oid, body)
            if verdict is g.ALLOW:
                self._zcount += 1
                if self._outcomes is not None:
                    token = self.ctx.gate.statement_token(session, "query", b"")
                    self._outcomes.query(token, self._zcount + self._scanner.syncs)
            return verdict
        if kind == _TERMINATE:
            self._terminating = True
        return g.ALLOW

    def _portal_texts(self, name: str) -> tuple[bytes, ...]:
        """What portal ``name`` may run for a message forwarded now (SQL FETCH/MOVE of it).

        With ``EXECUTE "s"`` for each named statement ``s`` it may be bound from: the server
        may hold under ``s`` a body a SQL PREPARE made instead of the text the model knows
        (the gate judges that by every body prepared under the name: stricter, never laxer)."""
        bindings = self._model.portal(name, self._extended_group())
        texts = [b.sql for b in bindings]
        texts.extend(sql_prepared_text(b.statement) for b in bindings if b.statement)
        return tuple(dict.fromkeys(texts))

    def _answered_one(self) -> tuple[int, int]:
        """An extended message the server answers one for one goes upstream now: its group (the
        ReadyForQuery ordinal that ends it) and how many answered messages of that group went
        before it (`_acks_before`); counted (`_count_acked`). One call on the hot path."""
        scanner = self._scanner
        scanner.unsynced = True
        group = self._zcount + scanner.syncs + 1
        if group != self._acked_group:
            self._acked_group, self._acked = group, 0
        before = self._acked + scanner.describes
        self._acked += 1
        return group, before

    def _count_acked(self) -> None:
        group = self._extended_group()
        if group != self._acked_group:
            self._acked_group, self._acked = group, 0
        self._acked += 1

    def _acks_before(self) -> int:
        """Answered messages of the current group forwarded so far (Describe included)."""
        acked = self._acked if self._acked_group == self._extended_group() else 0
        return acked + self._scanner.describes

    def _extended_group(self) -> int:
        """The ReadyForQuery ordinal that ends an extended message forwarded now (its Sync's)."""
        return self._zcount + self._scanner.syncs + 1

    def _refuse_unsynced(self, what: str) -> None:
        """A Query or FunctionCall after unsynced extended messages is refused unless the server
        has already answered every one of them, none with an error.

        If one of those messages fails, the server skips everything up to Sync - this Query too,
        which then gets no ReadyForQuery (postgres.c ignore_till_sync) - so neither the judged
        statement nor the ledger's numbering of replies could be trusted while an answer is
        outstanding. Once all are answered successfully the Query runs, and its ReadyForQuery
        ends their group too (the group numbers already agree: the Query is counted into
        ``_zcount``, so it is filed under the open group's number). asyncpg relies on this:
        its prepare is Parse, Describe, Flush, and ``Connection.execute`` without arguments or
        ``copy_records_to_table`` then sends a simple Query with no Sync in between.
        """
        if not self._scanner.unsynced:
            return
        if self._unsynced_answered():
            scanner = self._scanner
            scanner.unsynced = False
            scanner.describes = 0
            return
        raise ProtocolViolation(
            f"pgguard refuses {what} sent after extended-protocol messages without a Sync"
            " before the server answered them",
            hint="Send Sync to end the extended-protocol pipeline first.",
        )

    def _unsynced_answered(self) -> bool:
        """Every earlier group is over and each message of the open one got its success answer
        (an ErrorResponse takes the place of the failing message's answer, so after an error
        the count stays short)."""
        tracker = self._session().tracker
        return (
            tracker.ready_count == self._zcount + self._scanner.syncs
            and tracker.acks == self._acks_before()
        )

    def _decide_execute(self, session: Session, portal_name: str) -> g.Verdict:
        group = self._extended_group()
        bindings, may_be_missing = self._model.portal_states(portal_name, group)
        if (len(bindings) > 1 or (may_be_missing and bindings)) and self._model.unanswered_before(
            group
        ):
            # What the portal runs depends on answers the server has not sent yet: wait for
            # them (only this session waits; the earlier groups' Syncs are already upstream),
            # then judge the one text it will run. Whether it exists at all waits too: an
            # Execute of a portal that does not exist is answered by pgguard, never forwarded
            # (see PolicyGate._no_unnamed_portal).
            loop = asyncio.get_running_loop()
            return g.Hold(loop.create_task(self._decide_when_answered(session, portal_name)))
        event = self._execute_event(portal_name, bindings)
        verdict = self.ctx.gate.check(session, event)
        if verdict is g.ALLOW:
            _, acks_before = self._answered_one()
            if self._outcomes is not None:
                token = self.ctx.gate.statement_token(session, "execute", event.sql)
                self._outcomes.execute(token, group, acks_before)
        return verdict

    async def _decide_when_answered(self, session: Session, portal_name: str) -> g.Allow | g.Deny:
        """The verdict on a deferred Execute, once every earlier group has been answered."""
        group = self._extended_group()
        while self._model.unanswered_before(group):
            self._answered.clear()
            await self._answered.wait()
        event = self._execute_event(portal_name, self._model.portal(portal_name, group))
        verdict = self.ctx.gate.check(session, event)
        if isinstance(verdict, g.Hold):
            return await verdict.decision
        return verdict

    def _execute_event(self, portal_name: str, bindings: tuple[Bound, ...]) -> g.SqlEvent:
        if len(bindings) == 1:  # the usual case
            only = bindings[0]
            return g.SqlEvent(
                "execute",
                only.sql,
                statement=only.statement,
                portal=portal_name,
                candidates=(only.sql,),
                bind=only.bind,
            )
        if not bindings:
            # No Bind made it (a Bind of a statement only a SQL PREPARE made is bound as the
            # EXECUTE it amounts to: pgguard.wire.session.sql_prepared_text), so the server has
            # no such portal either - or a SQL cursor of that name, which the gate refuses.
            event = g.SqlEvent("execute", b"", portal=portal_name)
        else:
            # Should the model ever be unsure, every binding the server may hold: the gate
            # judges the strictest and never shows a reviewer one of several.
            texts = tuple(dict.fromkeys(b.sql for b in bindings))
            event = g.SqlEvent(
                "execute",
                texts[-1],
                statement=bindings[0].statement,
                portal=portal_name,
                candidates=texts,
                ambiguous=True,
                statements=tuple(dict.fromkeys(b.statement for b in bindings)),
            )
        return event

    def _refusal(self, frame: Frame, error: PgGuardError) -> bytes:
        """What goes upstream instead of a refused message (see the module docstring)."""
        marker = f"pgguard_refused_{secrets.token_hex(8)}"
        group = self._zcount + self._scanner.syncs
        self._session().tracker.replace_error(marker.encode("ascii"), error_message(error), group)
        if frame.type in (m.F_QUERY, m.F_FUNCTION_CALL):
            self._zcount += 1
            self._model.query(self._zcount + self._scanner.syncs)  # the marker is a Query
            if self._outcomes is not None:  # the refusal is recorded by the gate
                self._outcomes.query(None, self._zcount + self._scanner.syncs)
            return m.query(marker)
        if self._outcomes is not None:
            self._outcomes.execute(None, self._extended_group(), self._acks_before())
        self._count_acked()  # the marker Parse is answered (by its error) like any message
        return m.parse(marker, marker)

    # --- holds ----------------------------------------------------------------------------------

    def _hold(self, frame: Frame, hold: g.Hold) -> None:
        self._held = (frame, hold)
        self._hold_task = asyncio.get_running_loop().create_task(self._await_hold(frame, hold))

    async def _await_hold(self, frame: Frame, hold: g.Hold) -> None:
        try:
            outcome = await hold.decision
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail closed: an error while waiting is a refusal
            log.exception("session %s: hold failed", self._session().session_id)
            outcome = g.Deny(PgGuardError(f"pgguard could not complete the approval: {exc}"))
        self._held = None
        self._hold_task = None
        if self.upstream is None or self.client.closed:
            return
        if isinstance(outcome, g.Deny):
            self._upstream_write(self._refusal(frame, outcome.error))
        else:
            if frame.type in (m.F_QUERY, m.F_FUNCTION_CALL):
                self._zcount += 1
                if frame.type == m.F_QUERY:
                    self._model.query(self._zcount + self._scanner.syncs)
            if self._outcomes is not None:
                kind = "query" if frame.type == m.F_QUERY else "execute"
                token = self.ctx.gate.statement_token(self._session(), kind, b"")
                if frame.type == m.F_EXECUTE:
                    self._outcomes.execute(token, self._extended_group(), self._acks_before())
                else:
                    self._outcomes.query(token, self._zcount + self._scanner.syncs)
            if frame.type == m.F_EXECUTE:
                self._count_acked()
            self._upstream_write(frame.raw)
        self.client.resume_reading("hold")
        self._pump()


def _discard(data: bytes) -> None:
    """Writes before the relay starts go nowhere (there is no peer yet)."""
