"""PostgreSQL protocol message vocabulary: type bytes, codes, value types, encoders and parsers.

Sans-IO: bytes in, values out; values in, bytes out. Nothing here touches a socket.
References are to the PostgreSQL documentation, chapter 53 "Frontend/Backend Protocol"
(section 53.7 "Message Formats" for every layout below).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pgguard.errors import ProtocolViolation

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")

# --- Untyped first messages (53.7: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage) ---
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def protocol_version(major: int, minor: int) -> int:
    return (major << 16) | minor


PROTOCOL_3_0 = protocol_version(3, 0)
PROTOCOL_3_2 = protocol_version(3, 2)
# 3.1 was skipped (it collided with old pgbouncer deployments); a server treats it as 3.0.
PROTOCOL_LATEST = PROTOCOL_3_2

TLS_HANDSHAKE_BYTE = 0x16  # first byte of a TLS record: PostgreSQL 17 direct SSL (53.2.10)
MAX_CANCEL_KEY = (
    256  # 53.7 BackendKeyData: "The minimum and maximum key length are 4 and 256 bytes"
)

# --- Frontend (client -> server) message types ---
F_QUERY = ord("Q")
F_PARSE = ord("P")
F_BIND = ord("B")
F_EXECUTE = ord("E")
F_DESCRIBE = ord("D")
F_CLOSE = ord("C")
F_SYNC = ord("S")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_TERMINATE = ord("X")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse

# --- Backend (server -> client) message types ---
B_AUTH = ord("R")
B_KEY_DATA = ord("K")
B_PARAMETER_STATUS = ord("S")
B_READY = ord("Z")
B_ERROR = ord("E")
B_NOTICE = ord("N")
B_COMMAND_COMPLETE = ord("C")
B_NEGOTIATE_VERSION = ord("v")
B_COPY_IN = ord("G")
B_COPY_OUT = ord("H")
B_COPY_BOTH = ord("W")

# Authentication request codes (53.7 AuthenticationXXX)
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A StartupMessage: requested protocol version and the key/value parameters, in order."""

    version: int
    parameters: tuple[tuple[str, str], ...]

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.parameters:
            if k == key:
                return v
        return default


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: bytes


FirstMessage = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """The fields of an ErrorResponse/NoticeResponse (53.8 "Error and Notice Message Fields")."""

    fields: tuple[tuple[str, str], ...]

    def get(self, code: str) -> str | None:
        for k, v in self.fields:
            if k == code:
                return v
        return None

    @property
    def sqlstate(self) -> str:
        return self.get("C") or "XX000"

    @property
    def message(self) -> str:
        return self.get("M") or ""

    @property
    def severity(self) -> str:
        return self.get("V") or self.get("S") or "ERROR"


# ----------------------------------------------------------------------------------------------
# Decoding helpers


def read_cstring(body: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    """Read a NUL-terminated string starting at ``pos``; returns (value, position after NUL)."""
    end = bytes(body[pos:]).find(b"\0") if isinstance(body, memoryview) else body.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("unterminated string in protocol message")
    if isinstance(body, memoryview):
        end += pos
    return bytes(body[pos:end]), end + 1


def decode_first_message(body: bytes) -> FirstMessage:
    """Decode an untyped first message; ``body`` excludes the 4-byte length word."""
    if len(body) < 4:
        raise ProtocolViolation("invalid length of startup packet")
    code = _U32.unpack_from(body, 0)[0]
    if code == SSL_REQUEST_CODE:
        _expect_len(body, 4, "SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _expect_len(body, 4, "GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        key = body[8:]
        if len(body) < 12 or len(key) > MAX_CANCEL_KEY:
            raise ProtocolViolation("invalid length of cancel request packet")
        return CancelRequest(pid=_I32.unpack_from(body, 4)[0], key=bytes(key))
    return StartupMessage(version=code, parameters=_decode_startup_parameters(body))


def _expect_len(body: bytes, n: int, what: str) -> None:
    if len(body) != n:
        raise ProtocolViolation(f"invalid length of {what} packet")


def _decode_startup_parameters(body: bytes) -> tuple[tuple[str, str], ...]:
    # 53.7 StartupMessage: pairs of NUL-terminated strings, then a terminating NUL.
    if len(body) < 5 or not body.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    payload = body[4:-1]
    if not payload:
        return ()
    if not payload.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = payload[:-1].split(b"\0")
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without a value")
    try:
        texts = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid startup packet: parameters are not valid UTF-8") from exc
    pairs = tuple(zip(texts[0::2], texts[1::2], strict=True))
    if any(not k for k, _ in pairs):
        raise ProtocolViolation("invalid startup packet layout: empty parameter name")
    # PostgreSQL takes the LAST value of a repeated key (and setting names are case-blind), so
    # judging the first would judge something else: a repeated key is refused outright.
    seen: set[str] = set()
    for key, _ in pairs:
        folded = key.lower()
        if folded in seen:
            raise ProtocolViolation(f"invalid startup packet: parameter {key!r} given twice")
        seen.add(folded)
    return pairs


def decode_error_fields(body: bytes) -> ErrorFields:
    """Decode an ErrorResponse/NoticeResponse body into its fields."""
    fields: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstring(body, pos + 1)
        fields.append((code, value.decode("utf-8", "replace")))
    return ErrorFields(tuple(fields))


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def decode_auth_code(body: bytes) -> int:
    if len(body) < 4:
        raise ProtocolViolation("authentication message too short")
    return int(_U32.unpack_from(body, 0)[0])


def decode_sasl_mechanisms(body: bytes) -> list[str]:
    """AuthenticationSASL: a list of NUL-terminated mechanism names ending with an empty one."""
    names: list[str] = []
    pos = 4
    while pos < len(body) and body[pos] != 0:
        name, pos = read_cstring(body, pos)
        names.append(name.decode("ascii", "replace"))
    return names


def decode_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: mechanism name, Int32 length (-1 = none), data."""
    mechanism, pos = read_cstring(body, 0)
    if pos + 4 > len(body):
        raise ProtocolViolation("malformed SASLInitialResponse")
    length = _I32.unpack_from(body, pos)[0]
    data = body[pos + 4 :]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolViolation("malformed SASLInitialResponse: length does not match")
    return mechanism.decode("ascii", "replace"), data


# ----------------------------------------------------------------------------------------------
# Encoding helpers


def message(type_byte: int, body: bytes = b"") -> bytes:
    """Frame a typed message: type byte, Int32 length including itself, body."""
    return _HEADER.pack(bytes((type_byte,)), len(body) + 4) + body


def cstring(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError("protocol strings cannot contain NUL")
    return raw + b"\0"


def startup_message(version: int, parameters: Iterable[tuple[str, str]]) -> bytes:
    body = _U32.pack(version) + b"".join(cstring(k) + cstring(v) for k, v in parameters) + b"\0"
    return _U32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, key: bytes) -> bytes:
    body = _U32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + key
    return _U32.pack(len(body) + 4) + body


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(B_AUTH, _U32.pack(code) + data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\0")


def password_message(data: bytes) -> bytes:
    return message(F_PASSWORD, data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(F_PASSWORD, cstring(mechanism) + _I32.pack(len(data)) + data)


def negotiate_protocol_version(newest_minor: int, unrecognized: Iterable[str]) -> bytes:
    names = list(unrecognized)
    body = _U32.pack(newest_minor) + _U32.pack(len(names)) + b"".join(cstring(n) for n in names)
    return message(B_NEGOTIATE_VERSION, body)


def ready_for_query(status: bytes) -> bytes:
    return message(B_READY, status)


def query(sql: str) -> bytes:
    return message(F_QUERY, cstring(sql))


def parse(name: str, sql: str) -> bytes:
    return message(F_PARSE, cstring(name) + cstring(sql) + b"\0\0")


def terminate() -> bytes:
    return message(F_TERMINATE)


def error_response(
    severity: str,
    sqlstate: str,
    text: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """ErrorResponse (or NoticeResponse) with the fields libpq shows: S, V, C, M, D, H."""
    fields: list[tuple[str, str]] = [("S", severity), ("V", severity), ("C", sqlstate), ("M", text)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return encode_error_fields(fields, notice=notice)


def notice_response(text: str, *, detail: str | None = None, hint: str | None = None) -> bytes:
    """A NoticeResponse of severity NOTICE (SQLSTATE 00000); the server may send one at any
    time (protocol docs 53.2.6, asynchronous operations), so clients accept it mid-statement."""
    return error_response("NOTICE", "00000", text, detail=detail, hint=hint, notice=True)


def encode_error_fields(fields: Iterable[tuple[str, str]], *, notice: bool = False) -> bytes:
    body = b"".join(code.encode("ascii") + cstring(_scrub(value)) for code, value in fields)
    return message(B_NOTICE if notice else B_ERROR, body + b"\0")


def _scrub(value: str) -> str:
    return value.replace("\0", "\\0")


def parameter_map(pairs: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    return dict(pairs)
