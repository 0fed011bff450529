"""Teams notifications for approval requests, posted to a Teams Workflows webhook with httpx.

Owns: `TeamsWebhookNotifier` (re-exports the card builders of `pgguard.approvals.cards`).

Invariants:
- `request_created` / `request_updated` never raise (cancellation of the caller's task aside): a
  notification that finally fails is logged and counted in `failures`, and the request stays
  pending, approvable through the other channels. Teams is a messenger, never a gate.
- Any 2xx is delivery (Workflows answers 202). 429, 5xx, timeouts and network errors are retried
  with full-jitter exponential backoff (429 honours Retry-After); other statuses are not retried.
  No attempt starts, and none runs, past the request's expiry (a follow-up card gets a short
  window of its own, since an expired request's expiry is already behind it).
- At most `max_per_second` posts per notifier (retries included), evenly spaced.
- Every message is at most `MAX_MESSAGE_BYTES` (the card builders guarantee it).
- The webhook URL is a secret (its query string signs the request): it is never logged, never in
  `repr`, never in an error message. Requests go straight to the httpx transport, so httpx's own
  "HTTP Request: POST <url>" log line is never emitted either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from pgguard.approvals.cards import (
    MAX_MESSAGE_BYTES,
    ApprovalView,
    DecisionView,
    Json,
    build_request_card,
    build_update_card,
    encode_envelope,
    envelope,
    request_page_url,
)
from pgguard.approvals.retry import full_jitter, retry_after
from pgguard.errors import ConfigError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ApprovalView",
    "DecisionView",
    "TeamsWebhookNotifier",
    "build_request_card",
    "build_update_card",
    "encode_envelope",
    "envelope",
    "request_page_url",
]

logger = logging.getLogger(__name__)

# How long a follow-up card (decided / expired / cancelled) may keep retrying.
FOLLOW_UP_WINDOW = timedelta(minutes=2)
_TERMINAL_STATES = frozenset({"approved", "denied", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What one POST came to. `retry_after` is Teams' own wish, when it said one."""

    delivered: bool
    retryable: bool
    what: str
    retry_after: float | None = None


class TeamsWebhookNotifier:
    """Posts a card when a request is held, and a follow-up when it is decided or ends."""

    __slots__ = (
        "_creating",
        "_interval",
        "_next_slot",
        "_owns_transport",
        "_public_url",
        "_superseded",
        "_timeout",
        "_transport",
        "_webhook",
        "failures",
        "sent",
    )

    def __init__(
        self,
        webhook_url: str,
        public_url: str,
        *,
        timeout: float = 10.0,
        max_per_second: float = 4.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._webhook = _webhook_url(webhook_url)
        self._public_url = public_url.rstrip("/")
        if timeout <= 0 or max_per_second <= 0:
            raise ConfigError("teams: timeout and max_per_second must be positive")
        self._timeout = timeout
        self._interval = 1.0 / max_per_second
        self._next_slot = 0.0
        self._owns_transport = transport is None
        self._transport = transport or httpx.AsyncHTTPTransport(retries=0)
        self._creating: set[str] = set()
        self._superseded: set[str] = set()
        self.sent = 0
        self.failures = 0

    def __repr__(self) -> str:
        return (
            f"TeamsWebhookNotifier(public_url={self._public_url!r}, "
            f"sent={self.sent}, failures={self.failures})"
        )

    async def aclose(self) -> None:
        """Close the connection pool (a transport passed in is closed too: it is ours now)."""
        await self._transport.aclose()

    async def request_created(self, request: ApprovalView) -> None:
        """Post the review card; retries until delivered, refused, superseded or expired."""
        self._creating.add(request.id)
        try:
            card = build_request_card(request, self._public_url)
            await self._deliver(request.id, card, _aware(request.expires_at), "request card")
        except asyncio.CancelledError:
            self._count_failure(request.id, "request card", "cancelled by the caller")
            raise
        except Exception as exc:  # never raise: the request stays pending for other channels
            self._count_failure(request.id, "request card", f"unexpected {type(exc).__name__}")
        finally:
            self._creating.discard(request.id)
            self._superseded.discard(request.id)

    async def request_updated(self, request: ApprovalView) -> None:
        """Post the follow-up card (decided, expired, cancelled; partial approvals too)."""
        try:
            state = str(request.state)
            if state in _TERMINAL_STATES and request.id in self._creating:
                # The review card is still being retried: asking for a review is moot now.
                self._superseded.add(request.id)
            if state not in _TERMINAL_STATES and not request.decisions:
                return  # nothing new to say about an untouched pending request
            card = build_update_card(request, self._public_url)
            deadline = max(_aware(request.expires_at), datetime.now(UTC) + FOLLOW_UP_WINDOW)
            await self._deliver(request.id, card, deadline, "follow-up card")
        except asyncio.CancelledError:
            self._count_failure(request.id, "follow-up card", "cancelled by the caller")
            raise
        except Exception as exc:  # never raise
            self._count_failure(request.id, "follow-up card", f"unexpected {type(exc).__name__}")

    async def _deliver(self, request_id: str, card: Json, deadline: datetime, kind: str) -> None:
        body = encode_envelope(envelope(card))
        attempts = 0
        while True:
            if request_id in self._superseded and kind == "request card":
                logger.info("teams webhook: %s for request %s superseded", kind, request_id)
                return
            await self._wait_for_slot()
            remaining = (deadline - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                self._count_failure(request_id, kind, f"request expired after {attempts} attempts")
                return
            attempts += 1
            result = await self._post(body, min(self._timeout, remaining))
            if result.delivered:
                self.sent += 1
                logger.info("teams webhook: %s for request %s %s", kind, request_id, result.what)
                return
            if not result.retryable:
                self._count_failure(request_id, kind, f"{result.what}, not retried")
                return
            delay = result.retry_after
            if delay is None:
                delay = full_jitter(attempts)
            if datetime.now(UTC) + timedelta(seconds=delay) >= deadline:
                self._count_failure(
                    request_id, kind, f"{result.what}; no retry before expiry ({attempts} attempts)"
                )
                return
            logger.debug(
                "teams webhook: %s for request %s %s; retry in %.2f s",
                kind,
                request_id,
                result.what,
                delay,
            )
            await asyncio.sleep(delay)

    async def _post(self, body: bytes, limit: float) -> _Attempt:
        """One POST, with foreign errors turned into an `_Attempt` (never the URL in words)."""
        request = httpx.Request(
            "POST",
            self._webhook,
            content=body,
            headers={"Content-Type": "application/json; charset=utf-8"},
            extensions={"timeout": httpx.Timeout(limit).as_dict()},
        )
        try:
            async with asyncio.timeout(limit):
                response = await self._transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            return _Attempt(False, True, f"timed out after {limit:.1f} s")
        except httpx.UnsupportedProtocol:
            return _Attempt(False, False, "unsupported webhook URL scheme")
        except httpx.TransportError as exc:
            return _Attempt(False, True, f"network error ({type(exc).__name__})")
        return _judge(response)

    async def _wait_for_slot(self) -> None:
        """Space posts `1/max_per_second` apart; slots are handed out first come, first served."""
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def _count_failure(self, request_id: str, kind: str, why: str) -> None:
        self.failures += 1
        logger.warning(
            "teams webhook: %s for request %s failed: %s; the request stays approvable "
            "through the other channels",
            kind,
            request_id,
            why,
        )


def _judge(response: httpx.Response) -> _Attempt:
    status = response.status_code
    if 200 <= status < 300:
        return _Attempt(True, False, f"delivered (HTTP {status})")
    retryable = status == 429 or status >= 500
    return _Attempt(False, retryable, f"HTTP {status}", retry_after(response))


def _webhook_url(url: str) -> httpx.URL:
    """Parse the webhook URL; errors name the setting, never the (secret) value."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigError("teams.webhook_url is not a valid URL") from exc
    if parsed.scheme not in {"https", "http"} or not parsed.host:
        raise ConfigError("teams.webhook_url must be an http(s) URL with a host")
    return parsed


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
