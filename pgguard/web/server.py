"""Running the HTTP app inside pgguard's event loop, next to the proxy.

uvicorn's ``Server.serve`` installs its own SIGINT/SIGTERM handlers; pgguard owns the signals
(shutdown is one recipe for the proxy and the HTTP side), so the subclass leaves them alone.
The listening socket is bound here, not by uvicorn (which logs and calls ``sys.exit``), so a
port in use is one ConfigError naming ``http.port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from pgguard.errors import ConfigError

_START_TIMEOUT = 10.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # uvicorn's lines go through pgguard's handler ([log] format)
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self._host, self._port = host, port

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"http.port: cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from None
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._bind()
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(_START_TIMEOUT):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # re-raise why it could not start
                    raise RuntimeError("the HTTP server stopped during start-up")
                await asyncio.sleep(0.02)

    @property
    def port(self) -> int:
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("the HTTP server is not listening")

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
