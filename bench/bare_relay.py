"""The floor under any Python proxy here: a relay that forwards bytes and does nothing else.

Used by ``pgbench_compare.py`` as the ``bare-relay`` target. It is the relay the proxy issue
describes as its reference (``asyncio.Protocol`` + uvloop, each chunk written to the peer from
``data_received``): no parsing, no authentication of its own (the client authenticates with
PostgreSQL through it), no policy, no ledger. Upstream is PostgreSQL's unix socket, as for
pgguard and pgbouncer, so ``pgguard tps / bare-relay tps`` is what pgguard's own work costs and
``bare-relay tps / pgbouncer tps`` is what Python and its event loop cost on this machine.

Usage: ``python bench/bare_relay.py UNIX_SOCKET_PATH PORT`` (listens on 127.0.0.1:PORT).
Not a product: it has no limits and no error handling beyond closing both sides.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class Side(asyncio.Protocol):
    """One socket of a pair; what it receives is written to the other one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # client bytes that arrive before upstream is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(socket_path: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # strong references until each is done

    def accepted() -> Side:
        client = Side()
        task = loop.create_task(connect(client))
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    async def connect(client: Side) -> None:
        try:
            transport, upstream = await loop.create_unix_connection(Side, socket_path)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        upstream.peer, client.peer = client, upstream
        for chunk in client.early:
            transport.write(chunk)
        client.early.clear()

    server = await loop.create_server(accepted, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    socket_path, port = sys.argv[1], int(sys.argv[2])
    uvloop.run(serve(socket_path, port))


if __name__ == "__main__":
    main()
