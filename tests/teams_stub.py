"""A local HTTP server that plays the Teams Workflows webhook, for notifier tests.

Owns: `TeamsStub` (an async context manager), `Reply` and `HANG`. It listens on 127.0.0.1 on a
free port over real sockets, with a minimal HTTP/1.1 parser (keep-alive, Content-Length bodies),
records every POST (JSON body, path, headers, arrival time) and answers each one with the next
scripted reply: a status with headers, or `HANG` (read until the client gives up, never answer).
When the script runs out it answers `default` (202 Accepted, like Workflows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

_REASONS: Final = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found"}
_REASONS_MORE: Final = {413: "Payload Too Large", 429: "Too Many Requests", 500: "Server Error"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer."""

    status: int = 202
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def too_many(cls, retry_after: float | None = None) -> Reply:
        headers = () if retry_after is None else (("Retry-After", f"{retry_after:g}"),)
        return cls(429, headers)


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG: Final = _Hang()
Script = Reply | _Hang | int


@dataclass(frozen=True, slots=True)
class Received:
    """One POST as the stub saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the body was complete

    @property
    def json(self) -> dict[str, object]:
        parsed = json.loads(self.body)
        assert isinstance(parsed, dict)
        return parsed


@dataclass
class TeamsStub:
    """`async with TeamsStub() as stub:` then post to `stub.url`; inspect `stub.received`."""

    default: Reply = field(default_factory=Reply)
    path: str = "/workflows/abc/triggers/manual/paths/invoke?api-version=1&sig=s3cr3t-signature"
    requests: list[Received] = field(default_factory=list)
    _script: list[Script] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}{self.path}"

    @property
    def received(self) -> list[dict[str, object]]:
        """Every POST body, parsed as JSON, in arrival order."""
        return [r.json for r in self.requests]

    def script(self, responses: Iterable[Script]) -> None:
        """Answer the next POSTs with these, in order (an int is a bare status)."""
        self._script.extend(responses)

    async def start(self) -> TeamsStub:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Abort the connections rather than cancel their handlers: asyncio logs an error for a
        # cancelled client-connected callback. An aborted connection ends its handler's read.
        handlers = dict(self._handlers)
        for writer in handlers.values():
            writer.transport.abort()
        if handlers:
            await asyncio.wait(handlers.keys(), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TeamsStub:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            while await self._one_exchange(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; that is its right
        finally:
            self._handlers.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request, answer it; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method != "POST":
            await self._answer(writer, Reply(405))
            return True
        self.requests.append(Received(target, headers, body, time.monotonic()))
        reply = self._script.pop(0) if self._script else self.default
        if isinstance(reply, _Hang):
            await reader.read()  # until the client times out and closes
            return False
        await self._answer(writer, Reply(reply) if isinstance(reply, int) else reply)
        return headers.get("connection", "").lower() != "close"

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, reply: Reply) -> None:
        reason = {**_REASONS, **_REASONS_MORE}.get(reply.status, "Status")
        lines = [f"HTTP/1.1 {reply.status} {reason}", f"Content-Length: {len(reply.body)}"]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
        await writer.drain()
