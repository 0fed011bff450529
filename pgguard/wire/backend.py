"""Following the server's stream (sans-IO): transaction status, parameters, outcomes, rewrites.

``BackendTracker`` observes ReadyForQuery (transaction status), ParameterStatus (protocol docs
53.2.6, 53.7) and ErrorResponse (which makes the server skip to Sync: the `SessionModel` learns
which of its group's operations may not have run), forwards bytes unchanged on its fast path,
can report completions and errors to an ``OutcomeTracker`` (for the ledger), and can replace the
one ErrorResponse caused by a statement the proxy substituted for a refused one (see
``pgguard.proxy.connection``) with pgguard's own.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from pgguard.errors import ProtocolViolation
from pgguard.wire import messages as m
from pgguard.wire.outcomes import Outcome, OutcomeTracker
from pgguard.wire.session import SessionModel

_unpack_u32 = struct.Struct("!I").unpack_from
_FATAL_FIELDS = (b"SFATAL\0", b"SPANIC\0")
_WATCHED = frozenset(b"ZSE")  # ReadyForQuery, ParameterStatus, ErrorResponse (rare)
_WATCHED_FOR_OUTCOMES = frozenset(b"ZSCEIs")  # + CommandComplete, Error, EmptyQuery, Suspended
# One answer per extended message, counted per group: ParseComplete, BindComplete, CloseComplete,
# RowDescription or NoData (the end of a Describe's answer), and CommandComplete, EmptyQuery or
# PortalSuspended (the end of an Execute's). At an error their number says which of the group's
# messages ran: the first that many (SessionModel.error, OutcomeTracker.error).
_ACKS = frozenset(b"123TnCIs")


class _Replacement:
    __slots__ = ("group", "marker", "replacement")

    def __init__(self, marker: bytes, replacement: bytes, group: int) -> None:
        self.marker = marker
        self.replacement = replacement
        self.group = group


class BackendTracker:
    """Follows the server's stream: transaction status, reported parameters, error rewriting.

    ``feed`` returns the bytes to forward to the client: the same object it was given, unless a
    pending replacement rewrote an ErrorResponse. While one is pending, only an ErrorResponse
    is held back until whole; every other message goes out as its bytes arrive (O(1) per byte
    however large the message).
    """

    __slots__ = (
        "_head",
        "_held",
        "_partial_type",
        "_partial_want",
        "_pending",
        "_replacements",
        "_skip",
        "_watched",
        "acks",
        "model",
        "on_finished",
        "outcomes",
        "parameters",
        "parameters_version",
        "ready_count",
        "saw_fatal",
        "txn_status",
    )

    def __init__(self, parameters: dict[str, str] | None = None) -> None:
        self.txn_status = b"I"
        self.parameters: dict[str, str] = dict(parameters or {})
        self.parameters_version = 0  # bumped by every ParameterStatus (the lexing state may move)
        self.ready_count = 0  # ReadyForQuery messages seen since the session started
        self.acks = 0  # answers of Parse/Bind/Close/Describe in the group being answered
        self.saw_fatal = False  # the server sent a FATAL error (it is about to close)
        self.outcomes: OutcomeTracker | None = None
        # The session's statements and portals, confirmed by what this stream answers.
        self.model: SessionModel | None = None
        self.on_finished: Callable[[list[Outcome]], None] | None = None
        self._watched = _WATCHED
        self._skip = 0
        self._head = b""  # start of a header already forwarded, kept to read its length
        self._held = b""  # rewriting mode: bytes not yet forwarded (an incomplete message)
        self._partial_type = 0
        self._partial_want = 0
        self._pending = bytearray()
        self._replacements: deque[_Replacement] = deque()

    def replace_error(self, marker: bytes, replacement: bytes, group: int) -> None:
        """The ErrorResponse containing ``marker`` (in Sync group ``group``) becomes
        ``replacement``."""
        self._replacements.append(_Replacement(marker, replacement, group))

    def feed(self, data: bytes) -> bytes:
        if self._replacements:
            return self._feed_rewriting(data)
        self._observe(data)
        return data

    # --- fast path: observe only -------------------------------------------------------------

    def _observe(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        if self._skip:
            take = min(self._skip, n)
            self._skip -= take
            pos = take
        if self._partial_want:
            pos = self._continue_partial(data, pos)
        if self._head:
            data = self._head + data[pos:]
            self._head = b""
            pos = 0
            n = len(data)
        acks = self.acks  # counted in a local: one attribute store per chunk, not per message
        watched = self._watched
        while pos + 5 <= n:
            type_byte = data[pos]
            length = _unpack_u32(data, pos + 1)[0]
            if length < 4:
                self.acks = acks
                raise ProtocolViolation(f"server sent invalid message length {length}")
            end = pos + 1 + length
            if type_byte in _ACKS:
                acks += 1
            if type_byte in watched:  # whole bodies needed: Z, S, E (+ C, I, s for outcomes)
                self.acks = acks
                if end > n:
                    self._partial_type = type_byte
                    self._partial_want = end - n
                    self._pending = bytearray(data[pos + 5 :])
                    return
                self._handle(type_byte, data[pos + 5 : end])
                acks = self.acks  # a ReadyForQuery starts the count again
            elif end > n:
                self.acks = acks
                self._skip = end - n
                return
            pos = end
        self.acks = acks
        if pos < n:
            self._head = data[pos:]

    def _continue_partial(self, data: bytes, pos: int) -> int:
        take = min(self._partial_want, len(data) - pos)
        self._pending += data[pos : pos + take]
        self._partial_want -= take
        if not self._partial_want:
            self._handle(self._partial_type, bytes(self._pending))
            self._pending = bytearray()
        return pos + take

    def track_outcomes(
        self, outcomes: OutcomeTracker, on_finished: Callable[[list[Outcome]], None]
    ) -> None:
        """Also report completions and errors to ``outcomes``; finished statements (at each
        ReadyForQuery) go to ``on_finished``. Costs a little per reply, so only for the ledger."""
        self.outcomes = outcomes
        self.on_finished = on_finished
        self._watched = _WATCHED_FOR_OUTCOMES

    def _handle(self, type_byte: int, body: bytes) -> None:
        if type_byte == 0x5A:
            self.ready_count += 1
            if len(body) != 1 or body not in (b"I", b"T", b"E"):
                raise ProtocolViolation("server sent an invalid ReadyForQuery")
            self.txn_status = body
            if self.model is not None:
                self.model.ready(body)
            self.acks = 0
            if self._replacements:  # also when this ReadyForQuery came in pieces
                self._expire_replacements()
            if self.outcomes is not None:
                finished = self.outcomes.ready()
                if finished and self.on_finished is not None:
                    self.on_finished(finished)
        elif type_byte == 0x53:
            name, value = m.decode_parameter_status(body)
            self.parameters[name] = value
            self.parameters_version += 1
        elif type_byte == 0x45:
            self.saw_fatal = self.saw_fatal or body.startswith(_FATAL_FIELDS)
            if self.model is not None:
                self.model.error(self.acks)
            if self.outcomes is not None:
                fields = m.decode_error_fields(body)
                self.outcomes.error(fields.sqlstate, fields.message, self.acks)
        elif self.outcomes is not None:
            if type_byte == 0x43:  # CommandComplete
                self.outcomes.command_complete(body.rstrip(b"\0").decode("utf-8", "replace"))
            elif type_byte == 0x49:  # EmptyQueryResponse
                self.outcomes.empty_query()
            elif type_byte == 0x73:  # PortalSuspended
                self.outcomes.portal_suspended()

    # --- slow path: whole messages, so an ErrorResponse can be replaced ------------------------

    def _feed_rewriting(self, data: bytes) -> bytes:
        # Bytes of a message whose start was already forwarded on the fast path go out unchanged;
        # after that, whole messages are held in _held until complete so an error can be swapped.
        consumed = self._finish_forwarded(data)
        out = [data[:consumed]] if consumed else []
        buf = self._held + data[consumed:]
        pos = 0
        n = len(buf)
        while pos + 5 <= n:
            type_byte = buf[pos]
            length = _unpack_u32(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server sent invalid message length {length}")
            end = pos + 1 + length
            if end > n:
                if type_byte != m.B_ERROR:
                    # Only an ErrorResponse may be replaced, so only one is held until whole:
                    # the start of any other goes out now and the fast path's state follows
                    # its rest (_finish_forwarded). Holding a 64 MiB DataRow whole joined each
                    # chunk to every byte before it: 5.8 s of the shared loop's CPU.
                    tail = buf[pos:]
                    self._observe(tail)
                    out.append(tail)
                    pos = n
                break
            if type_byte in _ACKS:
                self.acks += 1
            body = buf[pos + 5 : end]
            if type_byte == m.B_ERROR:
                sent = self._maybe_replace(body, buf[pos:end])
                self._handle(type_byte, sent[5:])
                out.append(sent)
            else:
                if type_byte in self._watched:
                    self._handle(type_byte, body)
                    if type_byte == 0x5A:
                        self._expire_replacements()
                out.append(buf[pos:end])
            pos = end
        self._held = buf[pos:]
        if not self._replacements and self._held:
            # Back to the fast path: forward the incomplete tail and let _observe track it.
            tail, self._held = self._held, b""
            self._observe(tail)
            out.append(tail)
        return b"".join(out)

    def _finish_forwarded(self, data: bytes) -> int:
        """Consume the rest of a message the fast path already began forwarding."""
        pos = 0
        if self._head:
            need = 5 - len(self._head)
            if len(data) < need:
                self._head += data
                return len(data)
            header = self._head + data[:need]
            self._head = b""
            pos = need
            body_len = _unpack_u32(header, 1)[0] - 4
            if body_len < 0:
                raise ProtocolViolation("server sent invalid message length")
            if header[0] in _ACKS:
                self.acks += 1
            if header[0] in self._watched:
                self._partial_type = header[0]
                self._partial_want = body_len
                self._pending = bytearray()
            else:
                self._skip = body_len
        if self._skip:
            take = min(self._skip, len(data) - pos)
            self._skip -= take
            pos += take
        if self._partial_want:
            pos = self._continue_partial(data, pos)
        return pos

    def _maybe_replace(self, body: bytes, raw: bytes) -> bytes:
        # Only a replacement of the group being answered can be this error's (older ones
        # expired at their ReadyForQuery; later groups have not run): not a scan of every
        # pending one per error, which made a pipeline of refusals between errors quadratic.
        answering = self.ready_count
        for item in self._replacements:
            if item.group > answering:
                break
            if item.marker in body:
                self._replacements.remove(item)
                return item.replacement
        return raw

    def _expire_replacements(self) -> None:
        done = self.ready_count
        while self._replacements and self._replacements[0].group < done:
            self._replacements.popleft()

    @property
    def rewriting(self) -> bool:
        return bool(self._replacements)

    @property
    def at_message_boundary(self) -> bool:
        """True when everything forwarded so far ends with a whole message: a message of the
        proxy's own (a NoticeResponse) may be written to the client now without splitting one."""
        return not (self._skip or self._head or self._partial_want)
