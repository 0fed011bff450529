"""Extended-query bookkeeping: which SQL text a portal will run when it is Executed (53.2.3).

The proxy decides on an Execute by the statement text behind its portal, so it must know what the
server knows. It cannot see whether a Parse succeeded on the server, so a statement name maps to
*every* text it may hold: a named statement whose re-Parse the server may have rejected ("already
exists") keeps its old text as a candidate. Candidates are only forgotten on Close, when the
server forgets them too. The caller judges an Execute by the strictest candidate (fail closed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pgguard.errors import ProtocolViolation
from pgguard.wire.messages import read_cstring

_I16 = struct.Struct("!h")


@dataclass(frozen=True, slots=True)
class ParseMessage:
    statement: str
    sql: bytes


@dataclass(frozen=True, slots=True)
class BindMessage:
    portal: str
    statement: str
    body: bytes  # kept whole; parameters are only decoded when a decision needs them


@dataclass(frozen=True, slots=True)
class BoundPortal:
    statement: str
    candidates: tuple[bytes, ...]
    bind: bytes


def decode_parse(body: bytes) -> ParseMessage:
    name, pos = read_cstring(body, 0)
    sql, pos = read_cstring(body, pos)
    if pos + 2 > len(body):
        raise ProtocolViolation("malformed Parse message")
    count = _I16.unpack_from(body, pos)[0]
    if count < 0 or pos + 2 + 4 * count != len(body):
        raise ProtocolViolation("malformed Parse message: parameter type count")
    return ParseMessage(statement=_text(name), sql=sql)


def decode_bind(body: bytes) -> BindMessage:
    portal, pos = read_cstring(body, 0)
    statement, _ = read_cstring(body, pos)
    return BindMessage(portal=_text(portal), statement=_text(statement), body=body)


def decode_portal_name(body: bytes) -> str:
    """Execute: portal name then Int32 row limit."""
    name, pos = read_cstring(body, 0)
    if pos + 4 != len(body):
        raise ProtocolViolation("malformed Execute message")
    return _text(name)


def decode_close(body: bytes) -> tuple[bytes, str]:
    if not body or body[:1] not in (b"S", b"P"):
        raise ProtocolViolation("invalid CLOSE message subtype")
    name, pos = read_cstring(body, 1)
    if pos != len(body):
        raise ProtocolViolation("malformed Close message")
    return body[:1], _text(name)


def decode_bind_parameters(body: bytes) -> list[bytes | None]:
    """The parameter values of a Bind message (formats and result formats skipped)."""
    _, pos = read_cstring(body, 0)
    _, pos = read_cstring(body, pos)
    try:
        nformats = _I16.unpack_from(body, pos)[0]
        pos += 2 + 2 * nformats
        nparams = _I16.unpack_from(body, pos)[0]
        pos += 2
        values: list[bytes | None] = []
        for _ in range(nparams):
            length = struct.unpack_from("!i", body, pos)[0]
            pos += 4
            if length == -1:
                values.append(None)
                continue
            if length < 0 or pos + length > len(body):
                raise ProtocolViolation("malformed Bind message: parameter length")
            values.append(body[pos : pos + length])
            pos += length
    except struct.error as exc:
        raise ProtocolViolation("malformed Bind message") from exc
    return values


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class ExtendedState:
    """Prepared statements and portals of one session, as far as the proxy can know them."""

    __slots__ = ("_portals", "_statements")

    def __init__(self) -> None:
        self._statements: dict[str, tuple[bytes, ...]] = {}
        self._portals: dict[str, BoundPortal] = {}

    def parsed(self, msg: ParseMessage) -> None:
        if msg.statement == "":
            # postgres.c exec_parse_message drops any prior unnamed statement before it parses,
            # so after this Parse the unnamed statement is this text or nothing at all.
            self._statements[""] = (msg.sql,)
            return
        old = self._statements.get(msg.statement, ())
        if msg.sql not in old:
            self._statements[msg.statement] = (*old, msg.sql)

    def bound(self, msg: BindMessage) -> None:
        candidates = self._statements.get(msg.statement, ())
        self._portals[msg.portal] = BoundPortal(msg.statement, candidates, msg.body)

    def portal(self, name: str) -> BoundPortal | None:
        return self._portals.get(name)

    def statement(self, name: str) -> tuple[bytes, ...]:
        return self._statements.get(name, ())

    def closed(self, kind: bytes, name: str) -> None:
        if kind == b"S":
            self._statements.pop(name, None)
        else:
            self._portals.pop(name, None)
