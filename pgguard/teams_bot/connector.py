"""Posting and updating the bot's messages through the Bot Connector REST API.

Owns: `BotConnector` — ``POST {service_url}/v3/conversations/{conversation}/activities`` (a new
card) and ``PUT .../activities/{activity_id}`` (the same message, updated for everyone).

Invariants:
- The only URLs are built from the configured ``service_url`` and ``conversation_id``; a service
  URL taken from an incoming activity never gets here, so the bot's bearer token goes nowhere else.
- Any 2xx is delivery. 429, 5xx, timeouts and network errors are retried with full-jitter
  exponential backoff (429 honours Retry-After); a 401/403 drops the cached token and retries
  once with a fresh one; other statuses are not retried. No attempt starts, and none runs, past
  the caller's deadline (a review card's deadline is its request's expiry).
- At most `max_per_second` requests per bot (retries included), evenly spaced, so a burst of held
  statements does not run into the Bot Connector's per-conversation throttling.
- Never raises for a delivery problem: the outcome is a return value, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx

from pgguard.approvals.cards import Json, encode_envelope, envelope
from pgguard.approvals.retry import full_jitter
from pgguard.teams_bot.credentials import AppCredentials, TokenUnavailable
from pgguard.teams_bot.transport import Exchange, exchange

log = logging.getLogger(__name__)


class BotConnector:
    """One conversation's messages: post a card, update a posted card."""

    __slots__ = (
        "_conversation",
        "_credentials",
        "_interval",
        "_next_slot",
        "_service_url",
        "_timeout",
        "_transport",
        "failures",
        "sent",
    )

    def __init__(
        self,
        service_url: str,
        conversation_id: str,
        credentials: AppCredentials,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: float,
        max_per_second: float = 4.0,
    ) -> None:
        self._service_url = service_url.rstrip("/")
        self._conversation = conversation_id
        self._credentials = credentials
        self._transport = transport
        self._timeout = timeout
        self._interval = 1.0 / max_per_second
        self._next_slot = 0.0
        self.sent = 0
        self.failures = 0

    def __repr__(self) -> str:
        return (
            f"BotConnector(service_url={self._service_url!r}, sent={self.sent}, "
            f"failures={self.failures})"
        )

    @property
    def conversation_id(self) -> str:
        return self._conversation

    def activities_url(self) -> str:
        return (
            f"{self._service_url}/v3/conversations/{quote(self._conversation, safe='')}/activities"
        )

    async def post(
        self,
        request_id: str,
        card: Json,
        deadline: datetime,
        *,
        superseded: Callable[[], bool] = lambda: False,
    ) -> str | None:
        """Post ``card`` as a new message; its activity id, or None when it was not posted."""
        what = f"card for request {request_id}"
        result = await self._deliver(
            "POST", self.activities_url(), envelope(card), deadline, what, superseded
        )
        if result is None:
            return None
        body = result.json_object()
        activity_id = body.get("id") if body else None
        if not isinstance(activity_id, str) or not activity_id:
            # Delivered, but it can never be updated: the clickers' own views still update.
            log.warning(
                "teams bot: the Bot Connector gave no activity id for request %s", request_id
            )
            return None
        return activity_id

    async def update(
        self,
        request_id: str,
        activity_id: str,
        card: Json,
        deadline: datetime,
        *,
        superseded: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Replace the posted message ``activity_id`` with ``card`` for everyone."""
        url = f"{self.activities_url()}/{quote(activity_id, safe='')}"
        message = {**envelope(card), "id": activity_id}
        what = f"update for request {request_id}"
        result = await self._deliver("PUT", url, message, deadline, what, superseded)
        return result is not None

    async def _deliver(
        self,
        method: str,
        url: str,
        message: Json,
        deadline: datetime,
        what: str,
        superseded: Callable[[], bool],
    ) -> Exchange | None:
        body = encode_envelope(message)
        attempts = 0
        fresh_token_tried = False
        while True:
            if superseded():
                log.info("teams bot: %s superseded by a newer state of the request", what)
                return None
            await self._wait_for_slot()
            remaining = (deadline - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                self._fail(what, f"deadline passed after {attempts} attempts")
                return None
            attempts += 1
            limit = min(self._timeout, remaining)
            try:
                token = await self._credentials.token(limit)
            except TokenUnavailable as exc:
                result = Exchange(None if exc.retryable else 400, b"", exc.what, exc.retry_after)
            else:
                result = await exchange(
                    self._transport,
                    method,
                    url,
                    limit=limit,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json; charset=utf-8",
                    },
                )
                if result.status in (401, 403) and not fresh_token_tried:
                    # The token may have been revoked or rotated early: one retry with a new one.
                    fresh_token_tried = True
                    self._credentials.forget(token)
                    log.info("teams bot: %s got %s; retrying with a fresh token", what, result.what)
                    continue
            if result.ok:
                self.sent += 1
                log.info("teams bot: %s delivered (%s)", what, result.what)
                return result
            if not result.retryable:
                self._fail(what, f"{result.what}, not retried")
                return None
            delay = result.retry_after if result.retry_after is not None else full_jitter(attempts)
            if datetime.now(UTC) + timedelta(seconds=delay) >= deadline:
                self._fail(
                    what, f"{result.what}; no retry before the deadline ({attempts} attempts)"
                )
                return None
            log.debug("teams bot: %s %s; retry in %.2f s", what, result.what, delay)
            await asyncio.sleep(delay)

    async def _wait_for_slot(self) -> None:
        """Space requests `1/max_per_second` apart; first come, first served."""
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def _fail(self, what: str, why: str) -> None:
        self.failures += 1
        log.warning(
            "teams bot: %s failed: %s; the request stays decidable through the other channels",
            what,
            why,
        )
