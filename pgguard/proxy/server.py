"""The listening side: accept, negotiate encryption, hand each client to a ``Connection``.

Before a transport exists the socket is read raw, byte-exact, so nothing is consumed that belongs
to the TLS handshake: PostgreSQL 17's direct TLS is recognised by peeking at the first byte
(0x16, a TLS handshake record; protocol docs 53.2.10), an SSLRequest is answered 'S' or 'N' and a
GSSENCRequest 'N' (53.2.11). Only then does asyncio wrap the socket, with TLS if agreed.

Also owned here: the map from BackendKeyData to sessions that routes a CancelRequest (53.2.7) to
the right session, the connection limit, and graceful shutdown (stop accepting, let sessions
finish within the grace period, then end them with FATAL 57P01).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pgguard.errors import (
    AdminShutdown,
    ConfigError,
    PgGuardError,
    ProtocolViolation,
    TooManyConnections,
)
from pgguard.proxy import upstream
from pgguard.proxy.capacity import SessionSlots
from pgguard.proxy.connection import Connection, error_message
from pgguard.proxy.gate import Gate
from pgguard.proxy.link import Link, LinkClosed
from pgguard.proxy.startup import AgentDirectory, read_first_message
from pgguard.settings import Settings
from pgguard.wire import messages as m
from pgguard.wire.framing import MAX_STARTUP_PACKET, StartupDecoder
from pgguard.wire.scram import certificate_end_point_hash

log = logging.getLogger(__name__)
_U32 = struct.Struct("!I")


@dataclass
class ProxyContext:
    """Shared by every connection of one proxy instance."""

    settings: Settings
    agents: AgentDirectory
    gate: Gate
    tls: ssl.SSLContext | None
    channel_binding: bytes | None
    slots: SessionSlots | None = None  # upstream sessions per agent and in total
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sessions: dict[tuple[int, bytes], Connection] = field(default_factory=dict)
    connections: set[Connection] = field(default_factory=set)
    # Links closed but perhaps not gone: a TLS link's close waits for the peer's close_notify.
    # Shutdown aborts what is left, so no socket outlives the event loop (weak: a link that is
    # really closed is collected and drops out by itself).
    closing: weakref.WeakSet[Link] = field(default_factory=weakref.WeakSet)

    def register(self, conn: Connection) -> None:
        if conn.backend_key is not None:
            self.sessions[conn.backend_key] = conn

    def unregister(self, conn: Connection) -> None:
        if conn.backend_key is not None and self.sessions.get(conn.backend_key) is conn:
            del self.sessions[conn.backend_key]


def server_tls_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, bytes]:
    """TLS for agents, with the channel-binding data of our certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["postgresql"])
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificate(cert.read_bytes())  # the first certificate is ours
    return context, certificate_end_point_hash(leaf.public_bytes(Encoding.DER))


class ProxyServer:
    def __init__(self, settings: Settings, gate: Gate | None = None) -> None:
        tls, binding = (None, None)
        if settings.listen.tls_cert is not None and settings.listen.tls_key is not None:
            tls, binding = server_tls_context(settings.listen.tls_cert, settings.listen.tls_key)
        self.ctx = ProxyContext(
            settings=settings,
            agents=AgentDirectory(settings.agents),
            gate=gate or Gate(),
            tls=tls,
            channel_binding=binding,
            # Until assembly.start has read the upstream's capacity: the configured limits.
            slots=SessionSlots.from_settings(settings, None),
        )
        self._sockets: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1])

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    async def start(self) -> None:
        listen = self.settings.listen
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = listen.port
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((addr[0], port, *addr[2:]))
            except OSError as exc:
                sock.close()
                for bound in self._sockets:
                    bound.close()
                self._sockets.clear()
                raise ConfigError(
                    f"listen.port: cannot listen on {listen.host}:{port}: {exc.strerror}"
                ) from None
            port = sock.getsockname()[1]  # with port 0, bind every address to the same port
            sock.listen(512)
            sock.setblocking(False)
            self._sockets.append(sock)
        for sock in self._sockets:
            self._accept_tasks.append(loop.create_task(self._accept_loop(sock)))
        log.info("pgguard listening on %s:%d", listen.host, self.port)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                client, addr = await loop.sock_accept(sock)
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._handle(client, _format_address(addr)))
            self._client_tasks.add(task)
            task.add_done_callback(self._client_tasks.discard)

    async def _handle(self, sock: socket.socket, address: str) -> None:
        try:
            async with asyncio.timeout(self.settings.limits.startup_timeout):
                opened = await self._negotiate(sock)
        except (TimeoutError, OSError, PgGuardError) as exc:
            log.debug("client %s dropped during negotiation: %s", address, exc)
            sock.close()
            return
        if opened is None:
            sock.close()
            return
        link, initial, tls = opened
        await self._serve(link, address, initial, tls)

    async def _negotiate(self, sock: socket.socket) -> tuple[Link, bytes, bool] | None:
        """SSL/GSS negotiation on the raw socket; returns the link and bytes already read."""
        loop = asyncio.get_running_loop()
        while True:
            first = await _peek(loop, sock)
            if first and first[0] == m.TLS_HANDSHAKE_BYTE:
                if self.ctx.tls is None:
                    return None
                return await self._wrap(sock, tls=True, direct=True), b"", True
            header = await _recv_exactly(loop, sock, 8)
            length, code = _U32.unpack(header[:4])[0], _U32.unpack(header[4:])[0]
            if length < 8 or length > MAX_STARTUP_PACKET:
                await loop.sock_sendall(
                    sock, error_message(ProtocolViolation("invalid length of startup packet"))
                )
                return None
            if length == 8 and code == m.SSL_REQUEST_CODE:
                if self.ctx.tls is None:
                    await loop.sock_sendall(sock, b"N")
                    continue
                await loop.sock_sendall(sock, b"S")
                return await self._wrap(sock, tls=True, direct=False), b"", True
            if length == 8 and code == m.GSSENC_REQUEST_CODE:
                await loop.sock_sendall(sock, b"N")
                continue
            return await self._wrap(sock, tls=False, direct=False), header, False

    async def _wrap(self, sock: socket.socket, *, tls: bool, direct: bool) -> Link:
        loop = asyncio.get_running_loop()
        link = Link("client")
        await loop.connect_accepted_socket(
            lambda: link,
            sock,
            ssl=self.ctx.tls if tls else None,
            ssl_handshake_timeout=self.settings.limits.startup_timeout if tls else None,
        )
        if direct:
            assert link.transport is not None
            ssl_object = link.transport.get_extra_info("ssl_object")
            # Direct TLS requires ALPN "postgresql" (53.2.10), so a client that is not
            # PostgreSQL cannot be confused into speaking to us.
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "postgresql":
                link.abort()
                raise ProtocolViolation('direct TLS connection without ALPN "postgresql"')
        return link

    async def _serve(self, link: Link, address: str, initial: bytes, tls: bool) -> None:
        decoder = StartupDecoder(initial)
        try:
            first = await asyncio.wait_for(
                read_first_message(link, decoder), self.settings.limits.startup_timeout
            )
        except (TimeoutError, LinkClosed):
            link.close()
            return
        except PgGuardError as exc:
            link.write(error_message(exc))
            link.close()
            return
        if isinstance(first, m.CancelRequest):
            # Close the client's cancel connection only once the server has closed ours, i.e.
            # the cancel was delivered: libpq waits for this close before it sends its next
            # statement, which must not be the one the late cancel hits (53.2.7).
            try:
                await self._cancel(first)
            finally:
                link.close()
            return
        if not isinstance(first, m.StartupMessage):
            # SSLRequest/GSSENCRequest inside TLS, or after a StartupMessage was expected.
            link.write(error_message(ProtocolViolation("unexpected negotiation request")))
            link.close()
            return
        if self._closing:
            link.write(error_message(AdminShutdown("the pgguard proxy is shutting down")))
            link.close()
            return
        if len(self.ctx.connections) >= self.settings.listen.max_connections:
            link.write(error_message(TooManyConnections("sorry, too many clients already")))
            link.close()
            return
        conn = Connection(self.ctx, link, address)
        self.ctx.connections.add(conn)
        try:
            await conn.serve(
                first, self.ctx.channel_binding if tls else None, decoder.trailing_data
            )
        finally:
            self.ctx.connections.discard(conn)

    async def _cancel(self, request: m.CancelRequest) -> None:
        conn = self.ctx.sessions.get((request.pid, request.key))
        if conn is not None:
            await conn.cancel()
            return
        # Not one of our sessions - behind a load balancer it may be another instance's. Keys are
        # the server's own (passed through unchanged), so the server can judge it: forward it, as
        # a client with direct access could (53.2.7; the server ignores a wrong key silently).
        log.info("cancel request for a session of another instance forwarded upstream")
        await upstream.send_cancel(self.settings.upstream, request.pid, request.key)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions end within ``grace`` seconds, then close the rest."""
        grace = self.settings.limits.shutdown_grace if grace is None else grace
        self._closing = True
        for task in self._accept_tasks:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        if self._client_tasks:
            _done, pending = await asyncio.wait(set(self._client_tasks), timeout=grace)
            for conn in list(self.ctx.connections):
                conn.end_hold()
                conn.fail(AdminShutdown("terminating connection due to pgguard shutdown"))
            for task in pending:
                task.cancel()
            if pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*pending, return_exceptions=True)
        for link in list(self.ctx.closing):
            link.abort()
        log.info("pgguard stopped")


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket."""
    while True:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if not data:
            raise LinkClosed("client closed the connection")
        return data


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise LinkClosed("client closed the connection")
        data += chunk
    return data


def _format_address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "local"
