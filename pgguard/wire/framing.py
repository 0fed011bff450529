"""Incremental framing of the PostgreSQL byte streams, in both directions (sans-IO).

Three decoders, one per situation:

* ``StartupDecoder`` - the untyped first messages (SSLRequest, GSSENCRequest, CancelRequest,
  StartupMessage; protocol docs 53.2.1 and 53.7), capped like the server caps them.
* ``MessageDecoder`` - whole typed messages, for the authentication phases where every message
  is looked at.
* ``FrontendScanner`` - the client's stream once the session is established. It only cuts out
  the messages the proxy must inspect (those carrying SQL, or changing what later SQL means) and
  hands everything else back as pass-through byte runs, never copying more than it must. Large
  pass-through messages (COPY data) stream through without being buffered.
The server's stream is followed by ``pgguard.wire.backend.BackendTracker``.

"Need more data" is a ``None`` return, never an exception. A peer that breaks the protocol gets a
``ProtocolViolation``; the caller answers it with FATAL 08P01 and closes that one connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pgguard.errors import ProtocolViolation
from pgguard.wire import messages as m
from pgguard.wire.messages import FirstMessage, decode_first_message

_U32 = struct.Struct("!I")
_unpack_u32 = _U32.unpack_from

# 53.7/postgres.c: the server caps startup packets at 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
# postgres.c SocketBackend: "small" messages (Describe, Close, Execute, Sync, Flush, Terminate,
# CopyDone, CopyFail) are capped at PQ_SMALL_MESSAGE_LIMIT; the others at a large limit.
SMALL_MESSAGE_LIMIT = 10_000
LARGE_MESSAGE_LIMIT = 0x3FFFFFFF  # PQ_LARGE_MESSAGE_LIMIT: 1 GB - 1

Decider = Callable[[int, bytes, int, int], object]

_INSPECTED = frozenset(b"QPBECFX")
_PASSED = frozenset(b"DSHdcf")
_SMALL = frozenset(b"EDCSHXcf")
_EMPTY = frozenset(b"SHXc")  # Sync, Flush, Terminate, CopyDone carry no body


class StartupDecoder:
    """Decodes the untyped first message(s) of a connection."""

    def __init__(self, initial: bytes = b"") -> None:
        self._buf = bytearray(initial)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> FirstMessage | None:
        if len(self._buf) < 4:
            return None
        length = _unpack_u32(self._buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation("invalid length of startup packet")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return decode_first_message(body)

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buf)


class MessageDecoder:
    """Decodes whole typed messages: ``(type, body)`` pairs."""

    def __init__(self, max_length: int) -> None:
        self._buf = bytearray()
        self._max = max_length

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> tuple[int, bytes] | None:
        if len(self._buf) < 5:
            return None
        type_byte = self._buf[0]
        length = _unpack_u32(self._buf, 1)[0]
        if length < 4 or length > self._max:
            raise ProtocolViolation(
                f"invalid message length {length} for message type 0x{type_byte:02x}"
            )
        if len(self._buf) < length + 1:
            return None
        body = bytes(self._buf[5 : length + 1])
        del self._buf[: length + 1]
        return type_byte, body

    def take_remaining(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class Frame:
    """One inspected frontend message: its type, its body, and its original bytes."""

    __slots__ = ("body", "raw", "type")

    def __init__(self, type_byte: int, body: bytes, raw: bytes) -> None:
        self.type = type_byte
        self.body = body
        self.raw = raw

    def __repr__(self) -> str:
        return f"Frame({chr(self.type)!r}, {len(self.body)} bytes)"


class FrontendScanner:
    """Cuts the inspected messages out of the client's stream; everything else passes as runs.

    ``next_event`` returns, in stream order, either ``bytes`` to forward unchanged, a ``Frame``
    the caller must decide on, or ``None`` when more data is needed. Concatenating every returned
    run and every forwarded frame's ``raw`` reproduces the input exactly.
    """

    __slots__ = (
        "_buf",
        "_max",
        "_parts",
        "_parts_len",
        "_pos",
        "_skip",
        "_want",
        "describes",
        "syncs",
        "unsynced",
    )

    def __init__(self, max_message: int) -> None:
        self.syncs = 0  # Sync messages passed so far; each ends an extended-protocol group
        # An extended-protocol message passed since the last Sync (the caller sets it for the
        # messages it inspects): a simple Query now could be skipped by the server, see
        # pgguard.proxy.connection.
        self.unsynced = False
        self.describes = 0  # Describe messages passed since the last Sync (each is answered)
        self._buf = b""
        self._pos = 0
        self._skip = 0
        self._max = max_message
        # A large inspected message arrives in many chunks: they wait in _parts until the
        # _want bytes it needs (from _pos) are all here, then are joined once - not copied
        # again with every chunk, which made one 1 MiB statement cost megabytes of copying on
        # the event loop every other session shares (issue 18).
        self._want = 0
        self._parts: list[bytes] = []
        self._parts_len = 0

    def receive_data(self, data: bytes) -> None:
        if self._want:
            self._parts.append(data)
            self._parts_len += len(data)
            if len(self._buf) - self._pos + self._parts_len < self._want:
                return
            data = b"".join(self._parts)
            self._parts, self._parts_len, self._want = [], 0, 0
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + self._parts_len

    @property
    def idle(self) -> bool:
        """No buffered bytes and no message in flight: ``scan_chunk`` may be used."""
        return not self._skip and self._pos >= len(self._buf)

    def scan_chunk(self, data: bytes, decide: Decider, allow: object) -> tuple[int, object]:
        """The fast path for a chunk that starts on a message boundary (``idle`` is True).

        Calls ``decide(type, data, start, end)`` for each complete inspected message, in order,
        and stops at the first answer that is not the ``allow`` sentinel (by identity). Returns
        ``(pos, verdict)``: ``data[:pos]`` may be forwarded as it is; when ``verdict`` is not
        None the message at ``pos`` got that answer and ``take_frame`` hands it over. Anything
        after ``pos`` - an incomplete or invalid message - stays buffered for ``next_event``.
        No Frame, no slice and no copy is made for allowed messages.
        """
        pos = 0
        n = len(data)
        max_len = self._max
        inspected = _INSPECTED
        passed = _PASSED
        while pos + 5 <= n:
            type_byte = data[pos]
            length = _unpack_u32(data, pos + 1)[0]
            end = pos + 1 + length
            if type_byte in inspected:
                if length < 4 or length > max_len:
                    break
                if end > n:
                    self._want = end - pos  # incomplete: gather the rest (receive_data)
                    break
                if type_byte in _SMALL and length > SMALL_MESSAGE_LIMIT:
                    break
                verdict = decide(type_byte, data, pos, end)
                if verdict is not allow:
                    self._buf, self._pos = data, pos
                    return pos, verdict
            elif type_byte in passed and (
                # Sync and Describe, every pipeline: their lengths checked here, not by a call
                (type_byte == 0x53 and length == 4)
                or (type_byte == 0x44 and 4 < length <= SMALL_MESSAGE_LIMIT)
                or self._length_ok(type_byte, length)
            ):
                if type_byte == 0x53:
                    self.syncs += 1
                    self.unsynced = False
                    self.describes = 0
                elif type_byte == 0x44:  # Describe (a Flush cannot fail, so it does not count)
                    self.unsynced = True
                    self.describes += 1
                if end > n:
                    self._skip = end - n
                    pos = n
                    break
            else:
                break
            pos = end
        self._buf, self._pos = data, pos
        return pos, None

    def take_frame(self) -> Frame:
        """The complete inspected message at the current position (after ``scan_chunk``)."""
        event = self.next_event()
        assert isinstance(event, Frame)
        return event

    def next_event(self) -> bytes | Frame | None:
        buf = self._buf
        pos = self._pos
        n = len(buf)
        if self._skip:
            take = min(self._skip, n - pos)
            if take == 0:
                return None
            self._skip -= take
            self._pos = pos + take
            return buf[pos : pos + take]
        start = pos
        inspected = _INSPECTED
        passed = _PASSED
        while pos + 5 <= n:
            type_byte = buf[pos]
            length = _unpack_u32(buf, pos + 1)[0]
            end = pos + 1 + length
            if type_byte in inspected:
                if pos > start:
                    break
                self._check_length(type_byte, length)
                if end > n:
                    self._want = end - pos  # incomplete: gather the rest (receive_data)
                    return None
                self._pos = end
                raw = buf if (pos == 0 and end == n) else buf[pos:end]
                return Frame(type_byte, buf[pos + 5 : end], raw)
            if type_byte not in passed or not self._length_ok(type_byte, length):
                if pos > start:
                    break  # hand over the good bytes first; the bad message raises next call
                self._reject(type_byte, length)
            if type_byte == 0x53:
                self.syncs += 1
                self.unsynced = False
                self.describes = 0
            elif type_byte == 0x44:  # Describe (a Flush cannot fail, so it does not count)
                self.unsynced = True
                self.describes += 1
            if end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        if pos == start:
            return None
        self._pos = pos
        return buf if (start == 0 and pos == n) else buf[start:pos]

    def _length_ok(self, type_byte: int, length: int) -> bool:
        if type_byte in _SMALL:
            limit = SMALL_MESSAGE_LIMIT
        elif type_byte == m.F_COPY_DATA:
            limit = LARGE_MESSAGE_LIMIT  # streamed, never buffered whole
        else:
            limit = self._max
        if length < 4 or length > limit:
            return False
        return length == 4 or type_byte not in _EMPTY

    def _check_length(self, type_byte: int, length: int) -> None:
        if not self._length_ok(type_byte, length):
            self._reject(type_byte, length)

    def _reject(self, type_byte: int, length: int) -> None:
        if type_byte not in _INSPECTED and type_byte not in _PASSED:
            raise ProtocolViolation(f"invalid frontend message type {type_byte}")
        raise ProtocolViolation(
            f"invalid message length {length} for message type {chr(type_byte)!r}"
        )
