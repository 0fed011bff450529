"""One HTTP exchange with a Microsoft endpoint, and its outcome in words.

Owns: `Exchange` (what one request came to) and `exchange` (send it, with a hard time limit).
Retry timing is `pgguard.approvals.retry`, shared with the webhook notifier.

Invariants: requests go straight to the httpx transport, so no redirect is ever followed (a
bearer token or a client secret is never carried to a host nobody configured) and httpx's own
"HTTP Request: ..." log line is never emitted. Foreign errors become an `Exchange` saying what
happened without the body or any header, so nothing secret reaches a log through here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx

from pgguard.approvals.retry import retry_after

MAX_RESPONSE_BYTES = 1024 * 1024  # metadata, keys and tokens are a few KB; more is not theirs


@dataclass(frozen=True, slots=True)
class Exchange:
    """What one request came to: a status and body, or a failure before any status."""

    status: int | None  # None: no response (timeout, network error)
    body: bytes
    what: str  # for logs: "HTTP 503", "timed out after 2.0 s", "network error (ConnectError)"
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """429, 5xx, timeouts and network errors are worth another try; the rest are not."""
        return self.status is None or self.status == 429 or self.status >= 500

    def json_object(self) -> dict[str, object] | None:
        """The body as a JSON object, or None when it is not one."""
        try:
            parsed = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None
        return parsed if isinstance(parsed, dict) else None


async def exchange(
    transport: httpx.AsyncBaseTransport,
    method: str,
    url: str,
    *,
    limit: float,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Exchange:
    """One request, bounded by ``limit`` seconds in all (connect, send, wait, read)."""
    if limit <= 0:
        return Exchange(None, b"", "no time left")
    request = httpx.Request(
        method,
        url,
        content=content,
        headers=headers or {},
        extensions={"timeout": httpx.Timeout(limit).as_dict()},
    )
    try:
        async with asyncio.timeout(limit):
            response = await transport.handle_async_request(request)
            try:
                body = await _read_capped(response)
            finally:
                await response.aclose()
    except TimeoutError:
        return Exchange(None, b"", f"timed out after {limit:.1f} s")
    except httpx.UnsupportedProtocol:
        return Exchange(599, b"", "unsupported URL scheme")  # a configuration error: no retry
    except httpx.TransportError as exc:
        return Exchange(None, b"", f"network error ({type(exc).__name__})")
    except _TooLarge:
        return Exchange(599, b"", "response too large")
    return Exchange(
        response.status_code, body, f"HTTP {response.status_code}", retry_after(response)
    )


class _TooLarge(Exception):
    pass


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)
