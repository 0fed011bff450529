"""Bounding HTTP request bodies before anyone reads them (pure ASGI middleware).

Owns: `BoundedBodies`, which sits in front of the whole HTTP app (API, pages, Teams bot).

Invariants:
* A request whose ``Content-Length`` is above ``max_body_bytes`` gets 413 without a byte of its
  body being read; one without a length (chunked) is counted while it streams and gets 413 the
  moment it passes the limit. Either way the connection is closed after the answer, so the
  unread rest is never buffered.
* A request the ``admit`` callback refuses (an API call without a valid approver token) gets 401
  before its body is read: a stranger cannot make the process hold their upload.
* The HTTP server runs in the proxy's process, so these bounds protect every agent's sessions too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

# Who may send a body: None lets the request through, a string refuses it with 401 and that text.
Admit = Callable[[Scope], str | None]


class BoundedBodies:
    def __init__(self, app: Asgi, *, max_body_bytes: int, admit: Admit | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.admit(scope) if self.admit is not None else None
        if refusal is not None:
            await _answer(send, 401, refusal, {"www-authenticate": "Bearer"})
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _answer(send, 413, self._too_large_text())
            return
        started = False
        refused = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer; whatever the app makes of the cut-off is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        received = 0

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and not started:
                    # Answered here, not by an exception: the app's body parsing would turn an
                    # exception into its own 400. To the app, the client has gone.
                    refused = True
                    await _answer(send, 413, self._too_large_text())
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counting_receive, guarded_send)

    def _too_large_text(self) -> str:
        return f"request body larger than http.max_body_bytes ({self.max_body_bytes} bytes)"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def header(scope: Scope, wanted: bytes) -> str:
    """The first value of header ``wanted`` (lower case), or ""."""
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value).decode("latin-1")
    return ""


async def _answer(
    send: Send, status: int, detail: str, extra: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The unread body stays unread: the server closes instead of draining it.
        (b"connection", b"close"),
    ]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
