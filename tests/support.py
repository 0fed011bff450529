"""Test support: an embedded or external upstream, a proxy on its own thread, a raw client.

The proxy runs on a dedicated thread with its own event loop, exactly as ``pgguard serve`` runs
it, so synchronous clients (psql subprocesses, psycopg) and asyncio clients (asyncpg, on the test
loop) all reach it over real sockets without blocking it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgguard.policy import SHIPPED_RULES_DIR
from pgguard.proxy.gate import Gate
from pgguard.proxy.server import ProxyServer
from pgguard.settings import Settings
from pgguard.wire import messages as m
from pgguard.wire.scram import ScramClient

# One data directory for every pgguard a test run starts, so they share one state MAC key, as
# the instances of one deployment must (keys are made there at first start).
TEST_DATA_DIR = Path(tempfile.mkdtemp(prefix="pgguard-test-data-"))

AGENT = "agent"
AGENT_PASSWORD = "agent-password"
OWNER = "alice@example.com"


class ProxyThread:
    """A ProxyServer on its own thread and event loop."""

    def __init__(self, settings: Settings, gate: Gate | None = None) -> None:
        self.settings = settings
        self._gate = gate
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ProxyServer | None = None

    def start(self) -> ProxyThread:
        self._thread.start()
        self.server = ProxyServer(self.settings, self._gate)
        self.call(self.server.start())
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def dsn(
        self,
        user: str = AGENT,
        password: str = AGENT_PASSWORD,
        dbname: str = "postgres",
        **params: str,
    ) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}?{query}"

    def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            self.call(self.server.shutdown(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def agent_settings(upstream_dsn: str, state_dsn: str | None = None, **overrides: Any) -> Settings:
    """Settings for the test agents; ``state_dsn`` goes into ``[state] dsn`` when given."""
    if state_dsn is not None:
        overrides["state"] = {"dsn": state_dsn, **overrides.get("state", {})}
    agents = overrides.pop(
        "agents",
        [
            {"name": AGENT, "password": AGENT_PASSWORD, "owner": OWNER},
            {
                "name": "limited",
                "password": "limited-password",
                "owner": "bob@example.com",
                "databases": ["allowed_db"],
            },
        ],
    )
    overrides.setdefault("data_dir", str(TEST_DATA_DIR))
    # The HTTP side (health, metrics) starts even without approvers: never on a fixed port.
    overrides["http"] = {"port": 0, **overrides.get("http", {})}
    return Settings.load(
        listen={"host": "127.0.0.1", "port": 0, **overrides.pop("listen", {})},
        upstream={"dsn": upstream_dsn, **overrides.pop("upstream", {})},
        agents=agents,
        **overrides,
    )


# --- a raw protocol client, for byte-level tests ------------------------------------------------

OPEN_RAW_CLIENTS: list[RawClient] = []  # closed after each test by a conftest fixture


@dataclass
class RawClient:
    """A blocking PostgreSQL client that speaks the protocol byte by byte, for adversity tests."""

    sock: socket.socket
    buffer: bytes = b""
    received: list[tuple[str, bytes]] = field(default_factory=list)

    @classmethod
    def connect(cls, port: int, timeout: float = 10) -> RawClient:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        client = cls(sock)
        OPEN_RAW_CLIENTS.append(client)
        return client

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_message(self) -> tuple[str, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack("!I", self.buffer[1:5])[0]
                if len(self.buffer) >= length + 1:
                    type_char = chr(self.buffer[0])
                    body = self.buffer[5 : length + 1]
                    self.buffer = self.buffer[length + 1 :]
                    return type_char, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk

    def recv_until(self, type_char: str) -> list[tuple[str, bytes]]:
        out = []
        while True:
            msg = self.recv_message()
            out.append(msg)
            if msg[0] == type_char:
                return out

    def recv_byte(self) -> bytes:
        if self.buffer:
            b, self.buffer = self.buffer[:1], self.buffer[1:]
            return b
        return self.sock.recv(1)

    def is_closed(self, timeout: float = 5) -> bool:
        """True when the server closed the connection (after draining what it sent)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def startup(
        self,
        user: str = AGENT,
        database: str = "postgres",
        version: int = m.PROTOCOL_3_0,
        **params: str,
    ) -> None:
        self.send(
            m.startup_message(version, [("user", user), ("database", database), *params.items()])
        )

    def login(
        self,
        user: str = AGENT,
        password: str = AGENT_PASSWORD,
        database: str = "postgres",
        **params: str,
    ) -> list[tuple[str, bytes]]:
        """Start up and authenticate with SCRAM; returns the messages up to ReadyForQuery."""
        self.startup(user, database, **params)
        type_char, body = self.recv_message()
        while type_char == "v":
            type_char, body = self.recv_message()
        if type_char == "E":
            return [(type_char, body)]
        assert type_char == "R", (type_char, body)
        assert m.decode_auth_code(body) == m.AUTH_SASL
        scram = ScramClient(password, m.decode_sasl_mechanisms(body), None)
        self.send(m.sasl_initial_response(scram.mechanism, scram.first()))
        type_char, body = self.recv_message()
        if type_char == "E":
            return [(type_char, body)]
        self.send(m.password_message(scram.final(body[4:])))
        out = []
        while True:
            msg = self.recv_message()
            out.append(msg)
            if msg[0] in ("Z", "E"):
                return out

    def close(self) -> None:
        self.sock.close()


def error_fields(body: bytes) -> m.ErrorFields:
    return m.decode_error_fields(body)


class PgguardThread:
    """All of pgguard (proxy, approvals, HTTP API) from ``assembly.start``, on its own loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: Any = None

    def start(self) -> PgguardThread:
        from pgguard.proxy import assembly

        self._thread.start()
        self.running = self.call(assembly.start(self.settings))
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return int(self.running.proxy.port)

    @property
    def http_url(self) -> str:
        return str(self.running.http_url)

    def dsn(
        self,
        user: str = AGENT,
        password: str = AGENT_PASSWORD,
        dbname: str = "postgres",
        **params: str,
    ) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}?{query}"

    def stop(self) -> None:
        if self.running is not None:
            self.call(self.running.stop(2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def shipped_rules_with(directory: Path, name: str, text: str) -> Path:
    """``directory`` holding the shipped rules plus one more file, ``name``, with ``text``."""
    for path in SHIPPED_RULES_DIR.glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    (directory / name).write_text(text)
    return directory


@contextmanager
def ledgered_pgguard(upstream_dsn: str, state_dsn: str, name: str) -> Iterator[PgguardThread]:
    """A running pgguard in front of ``upstream_dsn`` with the ledger on, in a state schema and
    a spool directory of its own (``name`` tells whose), stopped on the way out."""
    settings = agent_settings(
        upstream_dsn,
        state_dsn,
        state={"schema": f"pgguard_{name}_{secrets.token_hex(4)}"},
        ledger={"spool_dir": tempfile.mkdtemp(prefix="pgguard-spool-")},
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()
