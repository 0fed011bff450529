"""Connecting to the upstream server: socket, optional TLS, authentication, startup replies.

pgguard logs in with its own upstream credentials (never the agent's). Every failure becomes a
``PgGuardError`` in the 08xxx family, worded for an operator, without the upstream password.
Errors the server itself raises that mean something to the agent (database does not exist, too
many connections) are relayed as the server sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from dataclasses import dataclass
from typing import cast

from pgguard.dsn import Dsn
from pgguard.errors import PgGuardError, UpstreamRejected, UpstreamUnavailable
from pgguard.metrics import COUNTS
from pgguard.proxy.link import Link, LinkClosed
from pgguard.settings import UpstreamSettings
from pgguard.wire import messages as m
from pgguard.wire.framing import MessageDecoder
from pgguard.wire.scram import ScramClient, certificate_end_point_hash, md5_password

log = logging.getLogger(__name__)

_AUTH_MAX_MESSAGE = 1 << 20


class UpstreamError(UpstreamRejected):
    """The server refused the connection with an ErrorResponse; ``raw`` is relayed verbatim."""

    def __init__(self, fields: m.ErrorFields, raw: bytes) -> None:
        super().__init__(fields.message)
        self.sqlstate = fields.sqlstate
        self.fields = fields
        self.raw = raw


@dataclass(slots=True)
class UpstreamSession:
    link: Link
    welcome: bytes  # ParameterStatus/BackendKeyData/Notice messages up to and incl. ReadyForQuery
    pid: int
    key: bytes
    parameters: dict[str, str]
    txn_status: bytes
    tls: bool


async def connect(
    settings: UpstreamSettings, version: int, parameters: list[tuple[str, str]], database: str
) -> UpstreamSession:
    """Open and authenticate an upstream session for one agent session."""
    dsn = settings.parsed()
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            link, tls = await _open(dsn, settings)
            try:
                opened = await _login(link, dsn, tls, version, parameters, database)
            except BaseException:
                link.abort()
                raise
            COUNTS.upstream_connect.observe(time.monotonic() - started)
            return opened
    except TimeoutError:
        raise UpstreamUnavailable(
            f"timed out connecting to the upstream server at {dsn.describe()}"
        ) from None
    except LinkClosed:
        raise UpstreamUnavailable(
            "the upstream server closed the connection during start-up"
        ) from None


async def _open(dsn: Dsn, settings: UpstreamSettings) -> tuple[Link, bool]:
    loop = asyncio.get_running_loop()
    link = Link("upstream")
    try:
        if dsn.is_unix_socket:
            await loop.create_unix_connection(lambda: link, dsn.socket_path)
        else:
            await loop.create_connection(lambda: link, dsn.host, dsn.port)
    except OSError as exc:
        raise UpstreamUnavailable(
            f"could not connect to the upstream server at {dsn.describe()}: {exc.strerror or exc}"
        ) from exc
    mode = settings.effective_sslmode()
    if dsn.is_unix_socket or mode in ("disable", "allow"):
        return link, False
    try:
        return link, await _negotiate_tls(link, dsn, settings, mode)
    except BaseException:
        link.abort()  # never leave the socket to the garbage collector
        raise


async def _negotiate_tls(link: Link, dsn: Dsn, settings: UpstreamSettings, mode: str) -> bool:
    link.write(m.ssl_request())
    answer = await link.read_exactly(1)
    if answer == b"N":
        if mode == "prefer":
            return False
        raise UpstreamUnavailable(f"the upstream server at {dsn.describe()} does not support TLS")
    if answer != b"S":
        raise UpstreamUnavailable("the upstream server sent an invalid answer to SSLRequest")
    if link.take_buffered():
        # CVE-2021-23222: bytes after 'S' were not protected by TLS; refuse them.
        raise UpstreamUnavailable("the upstream server sent unencrypted data after SSLRequest")
    context = _client_tls_context(settings, mode)
    loop = asyncio.get_running_loop()
    assert link.transport is not None
    try:
        transport = await loop.start_tls(
            link.transport,
            link,
            context,
            server_hostname=dsn.host if context.check_hostname else None,
        )
    except (ssl.SSLError, OSError) as exc:
        raise UpstreamUnavailable(f"TLS handshake with the upstream server failed: {exc}") from exc
    link.transport = cast(asyncio.Transport, transport)
    return True


def _client_tls_context(settings: UpstreamSettings, mode: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if settings.sslrootcert is not None:
        context.load_verify_locations(cafile=str(settings.sslrootcert))
    if mode in ("prefer", "require"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        context.check_hostname = False
    return context


async def _login(
    link: Link,
    dsn: Dsn,
    tls: bool,
    version: int,
    parameters: list[tuple[str, str]],
    database: str,
) -> UpstreamSession:
    params = [("user", dsn.user), ("database", database)]
    params += [(k, v) for k, v in parameters if k not in ("user", "database")]
    link.write(m.startup_message(version, params))
    decoder = MessageDecoder(_AUTH_MAX_MESSAGE)
    await _authenticate(link, decoder, dsn, tls)
    return await _collect_welcome(link, decoder, tls)


async def _next(link: Link, decoder: MessageDecoder) -> tuple[int, bytes]:
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        decoder.receive_data(await link.read())


async def _authenticate(link: Link, decoder: MessageDecoder, dsn: Dsn, tls: bool) -> None:
    scram: ScramClient | None = None
    while True:
        type_byte, body = await _next(link, decoder)
        if type_byte == m.B_ERROR:
            raise _server_error(body)
        if type_byte == m.B_NEGOTIATE_VERSION:
            continue  # an older minor version is fine: see startup.negotiate_version
        if type_byte != m.B_AUTH:
            raise UpstreamUnavailable("the upstream server sent an unexpected message during login")
        code = m.decode_auth_code(body)
        if code == m.AUTH_OK:
            return
        if code == m.AUTH_CLEARTEXT:
            link.write(m.password_message(m.cstring(_password(dsn))))
        elif code == m.AUTH_MD5:
            link.write(
                m.password_message(md5_password(_password(dsn), dsn.user, body[4:8]) + b"\0")
            )
        elif code == m.AUTH_SASL:
            scram = ScramClient(_password(dsn), m.decode_sasl_mechanisms(body), _binding(link, tls))
            link.write(m.sasl_initial_response(scram.mechanism, scram.first()))
        elif code == m.AUTH_SASL_CONTINUE and scram is not None:
            link.write(m.password_message(scram.final(body[4:])))
        elif code == m.AUTH_SASL_FINAL and scram is not None:
            scram.verify(body[4:])
        else:
            raise UpstreamUnavailable(
                f"the upstream server asks for an unsupported authentication method ({code})"
            )


def _password(dsn: Dsn) -> str:
    if dsn.password is None:
        raise UpstreamUnavailable("the upstream server requires a password and none is configured")
    return dsn.password


def _binding(link: Link, tls: bool) -> bytes | None:
    if not tls or link.transport is None:
        return None
    ssl_object = link.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return certificate_end_point_hash(der) if der else None


async def _collect_welcome(link: Link, decoder: MessageDecoder, tls: bool) -> UpstreamSession:
    welcome: list[bytes] = []
    parameters: dict[str, str] = {}
    pid, key = 0, b""
    while True:
        type_byte, body = await _next(link, decoder)
        if type_byte == m.B_ERROR:
            raise _server_error(body)
        if type_byte == m.B_NEGOTIATE_VERSION:
            continue
        welcome.append(m.message(type_byte, body))
        if type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            parameters[name] = value
        elif type_byte == m.B_KEY_DATA:
            if len(body) < 8 or len(body) > 4 + m.MAX_CANCEL_KEY:
                raise UpstreamUnavailable("the upstream server sent invalid BackendKeyData")
            pid, key = struct.unpack_from("!i", body, 0)[0], body[4:]
        elif type_byte == m.B_READY:
            leftover = decoder.take_remaining()
            if leftover:
                raise UpstreamUnavailable("the upstream server sent data before it was asked")
            return UpstreamSession(
                link=link,
                welcome=b"".join(welcome),
                pid=pid,
                key=key,
                parameters=parameters,
                txn_status=body,
                tls=tls,
            )


def _server_error(body: bytes) -> PgGuardError:
    fields = m.decode_error_fields(body)
    if fields.sqlstate.startswith("28"):
        log.error("upstream login rejected: %s (%s)", fields.message, fields.sqlstate)
        return UpstreamRejected(
            "pgguard could not log in to the upstream server",
            hint="The proxy's upstream credentials were refused; see the pgguard log.",
        )
    return UpstreamError(fields, m.message(m.B_ERROR, body))


async def send_cancel(settings: UpstreamSettings, pid: int, key: bytes) -> None:
    """Forward a CancelRequest to the upstream server (53.2.7); best effort, like libpq's."""
    dsn = settings.parsed()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            link, _tls = await _open(dsn, settings)
            try:
                link.write(m.cancel_request(pid, key))
                with contextlib.suppress(LinkClosed):
                    await link.read()  # the server closes the connection when done
            finally:
                link.abort()  # also when the server did not close it in time
    except (TimeoutError, PgGuardError) as exc:
        log.warning("could not forward a cancel request upstream: %s", exc)
