"""Extended-query messages (protocol docs 53.2.3, 55.7): decoding Parse, Bind, Execute, Close.

What each name holds on the server is `pgguard.wire.session`'s business; this module only reads
the messages, and fails with `ProtocolViolation` on a malformed one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pgguard.errors import ProtocolViolation
from pgguard.wire.messages import read_cstring

_I16 = struct.Struct("!h")


# Plain slotted dataclasses, not frozen: these are built for every extended-protocol message,
# and a frozen dataclass's __init__ (object.__setattr__ per field) costs several times more.


@dataclass(slots=True)
class ParseMessage:
    statement: str
    sql: bytes


@dataclass(slots=True)
class BindMessage:
    portal: str
    statement: str
    body: bytes  # kept whole; parameters are only decoded when a decision needs them


def decode_parse(body: bytes) -> ParseMessage:
    """Parse: statement name, query text, Int16 count of parameter type OIDs, the OIDs."""
    name_end = body.find(b"\0")
    sql_end = body.find(b"\0", name_end + 1) if name_end >= 0 else -1
    if sql_end < 0 or sql_end + 3 > len(body):
        raise ProtocolViolation("malformed Parse message")
    count = _I16.unpack_from(body, sql_end + 1)[0]
    if count < 0 or sql_end + 3 + 4 * count != len(body):
        raise ProtocolViolation("malformed Parse message: parameter type count")
    return ParseMessage(_name(body, 0, name_end), body[name_end + 1 : sql_end])


def decode_bind(body: bytes) -> BindMessage:
    portal_end = body.find(b"\0")
    statement_end = body.find(b"\0", portal_end + 1) if portal_end >= 0 else -1
    if statement_end < 0:
        raise ProtocolViolation("malformed Bind message")
    return BindMessage(_name(body, 0, portal_end), _name(body, portal_end + 1, statement_end), body)


def decode_portal_name(body: bytes) -> str:
    """Execute: portal name then Int32 row limit."""
    end = body.find(b"\0")
    if end < 0 or end + 5 != len(body):
        raise ProtocolViolation("malformed Execute message")
    return _name(body, 0, end)


def decode_close(body: bytes) -> tuple[bytes, str]:
    kind = body[:1]
    end = body.find(b"\0", 1)
    if kind not in (b"S", b"P") or end < 0 or end + 1 != len(body):
        raise ProtocolViolation("invalid CLOSE message subtype")
    return kind, _name(body, 1, end)


def _name(body: bytes, start: int, end: int) -> str:
    # Most drivers use the unnamed statement and portal; skip the decode for those.
    return body[start:end].decode("utf-8", "surrogateescape") if end > start else ""


def bind_values(body: bytes) -> bytes:
    """A Bind message body without its portal and statement names: the formats, values and
    result formats - what stays the same when a driver re-sends a statement under new names."""
    _, pos = read_cstring(body, 0)
    _, pos = read_cstring(body, pos)
    return body[pos:]


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
