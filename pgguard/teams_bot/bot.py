"""The Teams bot as pgguard sees it: a notifier that posts cards, and the endpoint for clicks.

Owns: `TeamsBot` — `request_created` posts the review card (Approve/Deny buttons) to the
configured conversation and remembers its activity id in the state database; `request_updated`
and partial approvals update that message for everyone; `register` mounts ``POST /api/messages``;
`aclose` ends its background work and connections.

Invariants:
- `request_created` / `request_updated` never raise (the caller's cancellation aside): a card
  that finally fails is logged and counted, and the request stays decidable through the other
  channels. Teams is a messenger, never a gate.
- The activity id of each posted card is stored in ``bot_messages``, so any instance (or this
  one after a restart) can update the message when it decides, expires or cancels the request.
  A decision racing the post is caught on both sides: the updater waits for a post in flight on
  this instance (or looks the id up again for a while), and the poster re-reads the request
  after saving the id and updates the card itself when the request already ended elsewhere.
- A review card is not posted once its request has ended, and nothing is posted past expiry.
- Secrets (app password, private key, tokens) never reach ``repr`` or the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from pgguard.approvals.model import ApprovalRequest, RequestState
from pgguard.approvals.service import ApprovalService
from pgguard.approvals.store import ApprovalStore
from pgguard.errors import PgGuardError
from pgguard.settings import TeamsBotSettings
from pgguard.teams_bot.cards import card_for
from pgguard.teams_bot.channel_auth import ChannelKeys, ChannelVerifier
from pgguard.teams_bot.connector import BotConnector
from pgguard.teams_bot.credentials import AppCredentials
from pgguard.teams_bot.endpoint import MESSAGES_PATH, MessagesEndpoint
from pgguard.web.auth import ApproverDirectory

log = logging.getLogger(__name__)

# How long a follow-up (decided / expired / cancelled) may keep trying, like the webhook's.
FOLLOW_UP_WINDOW = timedelta(minutes=2)
# Another instance may still be posting the card when this one ends the request: look again.
LOOKUP_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
LOCAL_IDS_KEPT = 10_000  # activity ids also kept in memory, for when the database was down
CLOSE_GRACE_S = 2.0


class TeamsBot:
    """Cards with Approve/Deny buttons in one Teams conversation; see the module docstring."""

    def __init__(
        self,
        settings: TeamsBotSettings,
        public_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_per_second: float = 4.0,
    ) -> None:
        self.settings = settings
        self.public_url = public_url.rstrip("/")
        self._transport = transport or httpx.AsyncHTTPTransport(retries=0)
        self._credentials = AppCredentials(settings, self._transport)
        self._connector = BotConnector(
            settings.service_url,
            settings.conversation_id,
            self._credentials,
            self._transport,
            timeout=settings.timeout,
            max_per_second=max_per_second,
        )
        self._verifier = ChannelVerifier(
            settings,
            ChannelKeys(settings.openid_metadata_url, self._transport, timeout=settings.timeout),
        )
        self._store: ApprovalStore | None = None
        self._registered = asyncio.Event()
        self._posting: dict[str, asyncio.Event] = {}  # request id → set when its post ended
        self._ended: set[str] = set()  # requests that ended while their card was being posted
        self._posted: OrderedDict[str, str] = OrderedDict()  # request id → activity id
        self._order: OrderedDict[str, _UpdateOrder] = OrderedDict()  # request id → update order
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"TeamsBot(app_id={self.settings.app_id!r}, "
            f"conversation_id={self.settings.conversation_id!r}, connector={self._connector!r})"
        )

    @property
    def sent(self) -> int:
        return self._connector.sent

    @property
    def failures(self) -> int:
        return self._connector.failures

    # --- the HTTP side --------------------------------------------------------------------------

    def register(
        self, app: FastAPI, service: ApprovalService, approvers: ApproverDirectory
    ) -> None:
        """Mount ``POST /api/messages`` (the Azure Bot's messaging endpoint) on ``app``."""
        endpoint = MessagesEndpoint(
            self._verifier,
            service,
            approvers,
            public_url=self.public_url,
            clock_skew=self.settings.clock_skew,
            still_pending=self._show_progress,
        )
        app.add_api_route(MESSAGES_PATH, endpoint.handle, methods=["POST"], include_in_schema=False)
        self._store = service.store
        self._registered.set()

    # --- the notifier side ----------------------------------------------------------------------

    async def request_created(self, request: ApprovalRequest) -> None:
        """Post the review card; remember its activity id; never raises."""
        done = self._posting.setdefault(request.id, asyncio.Event())
        try:
            deadline = _aware(request.expires_at)
            store = await self._wait_for_store(deadline)
            if store is None:
                self._connector.failures += 1
                log.warning("teams bot: no state store before request %s expired", request.id)
                return
            activity_id = await self._connector.post(
                request.id,
                card_for(request, self.public_url),
                deadline,
                superseded=lambda: request.id in self._ended,
            )
            if activity_id is None:
                return
            self._remember(request.id, activity_id)
            await self._save(store, request.id, activity_id)
            if request.id not in self._ended:
                await self._catch_up(store, request.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never raise: the request stays decidable elsewhere
            self._connector.failures += 1
            log.warning("teams bot: card for request %s failed: %s", request.id, type(exc).__name__)
        finally:
            done.set()
            self._posting.pop(request.id, None)
            self._ended.discard(request.id)

    async def request_updated(self, request: ApprovalRequest) -> None:
        """Update the posted card for everyone (decided, expired, cancelled); never raises."""
        try:
            if not request.state.final and not request.decisions:
                return  # nothing new to show on an untouched pending request
            deadline = max(_aware(request.expires_at), datetime.now(UTC) + FOLLOW_UP_WINDOW)
            posting = self._posting.get(request.id)
            if posting is not None:
                if request.state.final:
                    self._ended.add(request.id)  # a review card not yet posted need not be
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(posting.wait(), _seconds_until(deadline))
            await self._update_in_order(request, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never raise
            self._connector.failures += 1
            log.warning(
                "teams bot: update for request %s failed: %s", request.id, type(exc).__name__
            )

    async def _update_in_order(self, request: ApprovalRequest, deadline: datetime) -> None:
        """PUT this snapshot unless a newer one is already on its way.

        A partial approval's update can still be retrying when the final one starts; updates of
        one request run one at a time, and an older snapshot gives way (stops retrying, or never
        starts) once a newer one exists, so the message never falls back to showing buttons.
        """
        rank = _rank(request)
        order = self._order.get(request.id)
        if order is None:
            order = self._order[request.id] = _UpdateOrder()
            while len(self._order) > LOCAL_IDS_KEPT:
                self._order.popitem(last=False)
        if rank < order.newest:
            return
        order.newest = rank
        async with order.lock:
            if rank < order.newest:
                return
            activity_id = await self._find_activity(request.id, deadline)
            if activity_id is None:
                log.info("teams bot: no card to update for request %s", request.id)
                return
            await self._connector.update(
                request.id,
                activity_id,
                card_for(request, self.public_url),
                deadline,
                superseded=lambda: rank < order.newest,
            )

    async def aclose(self) -> None:
        """Let card updates finish briefly, then drop them; close the connection pool."""
        if self._background:
            _, late = await asyncio.wait(self._background, timeout=CLOSE_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._transport.aclose()

    # --- helpers --------------------------------------------------------------------------------

    def _show_progress(self, request: ApprovalRequest) -> None:
        """A partial approval: show the next approver who approved so far (in the background)."""
        task = asyncio.create_task(self.request_updated(request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_for_store(self, deadline: datetime) -> ApprovalStore | None:
        # A statement can be held in the moment between the proxy and the HTTP side starting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._registered.wait(), _seconds_until(deadline))
        return self._store

    async def _save(self, store: ApprovalStore, request_id: str, activity_id: str) -> None:
        try:
            await store.save_bot_message(request_id, self.settings.conversation_id, activity_id)
        except PgGuardError as exc:
            # Kept in memory: this instance can still update it, other instances cannot.
            log.warning("teams bot: could not store the card id of request %s: %s", request_id, exc)

    async def _catch_up(self, store: ApprovalStore, request_id: str) -> None:
        """The request may have ended on another instance while the card was being posted."""
        try:
            current = await store.get(request_id)
        except PgGuardError:
            return
        if current is not None and current.state is not RequestState.PENDING:
            await self._update_in_order(current, datetime.now(UTC) + FOLLOW_UP_WINDOW)

    async def _find_activity(self, request_id: str, deadline: datetime) -> str | None:
        for delay in (0.0, *LOOKUP_DELAYS_S):
            if delay:
                if datetime.now(UTC) + timedelta(seconds=delay) >= deadline:
                    return None
                await asyncio.sleep(delay)
            local = self._posted.get(request_id)
            if local is not None:
                return local
            if self._store is None:
                continue
            try:
                found = await self._store.bot_message(request_id)
            except PgGuardError as exc:
                log.warning("teams bot: could not look up the card of %s: %s", request_id, exc)
                continue
            if found is not None:
                conversation, activity_id = found
                if conversation != self.settings.conversation_id:
                    return None  # posted to a conversation this configuration no longer uses
                return activity_id
        return None

    def _remember(self, request_id: str, activity_id: str) -> None:
        self._posted[request_id] = activity_id
        while len(self._posted) > LOCAL_IDS_KEPT:
            self._posted.popitem(last=False)


class _UpdateOrder:
    """One request's updates: run one at a time; ``newest`` is the rank of the newest snapshot."""

    __slots__ = ("lock", "newest")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.newest = -1


def _rank(request: ApprovalRequest) -> int:
    """Later snapshots rank higher: more decisions while pending; any final state above all."""
    return sys.maxsize if request.state.final else len(request.decisions)


def _seconds_until(moment: datetime) -> float:
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
