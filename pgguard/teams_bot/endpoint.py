"""The bot's messaging endpoint, ``POST /api/messages``: Approve/Deny clicks from Teams.

Owns: `MessagesEndpoint` (verify, refuse replays, resolve the clicker, decide, answer) and the
Universal Actions invoke responses (`card_response`, `message_response`).

Invariants:
- Nothing in the body is read before the bearer token verified; nothing in the activity is
  believed before its channel, service URL and tenant matched that token. A failure is a 401
  with a generic body, the reason goes to the log.
- Only ``invoke`` activities named ``adaptiveCard/action`` with the verb ``approve`` or ``deny``
  act; everything else is acknowledged (200, empty) and ignored.
- An invoke acts at most once: its activity id is recorded in the shared state database before
  anything is decided, and an id seen before (on any instance) is refused.
- The clicker is the verified tenant plus ``from.aadObjectId``, mapped through the approver
  directory; the decision goes through `ApprovalService`, so groups, self-approval and quorum
  hold exactly as for the other channels, and it is recorded with channel ``teams``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pgguard.approvals.cards import CARD_CONTENT_TYPE, Json
from pgguard.approvals.model import ApprovalError, ApprovalRequest, RequestState
from pgguard.approvals.service import ApprovalService
from pgguard.errors import PgGuardError
from pgguard.teams_bot.cards import APPROVE, COMMENT_INPUT, COMMENT_MAX_CHARS, DENY, card_for
from pgguard.teams_bot.channel_auth import (
    ChannelAuthError,
    ChannelKeysUnavailable,
    ChannelVerifier,
    VerifiedActivity,
)
from pgguard.web.auth import ApproverDirectory, VerifiedIdentity

log = logging.getLogger(__name__)

MESSAGES_PATH = "/api/messages"
ACTION_INVOKE = "adaptiveCard/action"
MESSAGE_TYPE = "application/vnd.microsoft.activity.message"
MAX_BODY_BYTES = 256 * 1024  # an invoke is a few KB; Teams' own messages stay under 100 KB
# Seen invoke ids are kept this long past their token's expiry (plus skew): clocks of the
# instances and the database may differ, and a replay after that fails the token's expiry.
REPLAY_MARGIN_S = 3600.0
_NAME_MAX_CHARS = 200
_ID_MAX_CHARS = 512  # Bot Framework activity ids are short; longer ones are not stored


def card_response(card: Json) -> Json:
    """Universal Actions: show this card to the clicker in place of the one they clicked."""
    return {"statusCode": 200, "type": CARD_CONTENT_TYPE, "value": card}


def message_response(text: str) -> Json:
    """Universal Actions: leave the card as it is and tell the clicker ``text``."""
    return {"statusCode": 200, "type": MESSAGE_TYPE, "value": text}


class MessagesEndpoint:
    """Handles what the Bot Connector posts to the bot; see the module docstring."""

    def __init__(
        self,
        verifier: ChannelVerifier,
        service: ApprovalService,
        approvers: ApproverDirectory,
        *,
        public_url: str,
        clock_skew: float,
        still_pending: Callable[[ApprovalRequest], None],
    ) -> None:
        self._verifier = verifier
        self._service = service
        self._approvers = approvers
        self._public_url = public_url
        self._skew = clock_skew
        self._still_pending = still_pending  # update the posted card: a partial approval

    async def handle(self, request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        try:
            token = await self._verifier.verify_token(request.headers.get("authorization"))
        except ChannelAuthError as exc:
            return _refused(peer, exc.reason)
        except ChannelKeysUnavailable as exc:
            log.error("teams bot: cannot verify a request from %s: %s", peer, exc)
            return JSONResponse({"detail": "temporarily unable to verify the request"}, 503)
        body = await _read_capped(request)
        if body is None:
            return JSONResponse({"detail": "request too large"}, 413)
        try:
            activity = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            activity = None
        if not isinstance(activity, dict):
            return JSONResponse({"detail": "the body is not an activity"}, 400)
        try:
            verified = self._verifier.verify_activity(token, activity)
        except ChannelAuthError as exc:
            return _refused(peer, exc.reason)
        answer = await self._act(verified)
        if answer is None:
            return Response(status_code=200)
        return JSONResponse(answer)

    async def _act(self, verified: VerifiedActivity) -> Json | None:
        activity = verified.activity
        if activity.get("type") != "invoke" or activity.get("name") != ACTION_INVOKE:
            return None
        action = _mapping(_mapping(activity.get("value")).get("action"))
        verb = action.get("verb")
        data = _mapping(action.get("data"))
        request_id = data.get("request_id")
        if verb not in (APPROVE, DENY) or not isinstance(request_id, str) or not request_id:
            return message_response("pgguard does not know this action.")
        activity_id = activity.get("id")
        if not isinstance(activity_id, str) or not activity_id or len(activity_id) > _ID_MAX_CHARS:
            log.warning("teams bot: invoke without a usable activity id refused")
            return message_response("pgguard refused this click: it carries no activity id.")
        refusal = await self._refuse_replay(activity_id, verified)
        if refusal is not None:
            return refusal
        sender = _mapping(activity.get("from"))
        subject = sender.get("aadObjectId")
        name = sender.get("name")
        if not isinstance(subject, str) or not subject:
            return message_response("pgguard could not tell who clicked: no Entra identity.")
        identity = VerifiedIdentity(
            tenant=verified.tenant,
            subject=subject,
            name=name[:_NAME_MAX_CHARS] if isinstance(name, str) else "",
        )
        approver = self._approvers.by_identity(identity)
        if approver is None:
            log.warning(
                "teams bot: %r clicked %s on %r but is no approver", subject[:64], verb, request_id
            )
            return message_response(
                f"You are not a pgguard approver (Entra object id {subject} is not configured)."
            )
        comment = data.get(COMMENT_INPUT)
        comment = comment.strip()[:COMMENT_MAX_CHARS] if isinstance(comment, str) else ""
        decide = self._service.approve if verb == APPROVE else self._service.deny
        try:
            decided = await decide(request_id, approver, comment, "teams")
        except ApprovalError as exc:
            log.info("teams bot: %s could not %s %r: %s", approver.id, verb, request_id[:64], exc)
            return message_response(exc.message)
        except PgGuardError as exc:
            log.warning("teams bot: decision on %r not recorded: %s", request_id[:64], exc)
            return message_response(
                "pgguard could not record your decision right now; nothing was decided. Try the "
                "approval page."
            )
        log.info("teams bot: %s (%r) %s request %s", approver.id, subject[:64], verb, request_id)
        if decided.state is RequestState.PENDING:
            self._still_pending(decided)
        # A final request's card is updated for everyone by the notifier, like every channel's.
        return card_response(card_for(decided, self._public_url))

    async def _refuse_replay(self, activity_id: str, verified: VerifiedActivity) -> Json | None:
        keep_until = datetime.fromtimestamp(
            verified.token.expires_at + self._skew + REPLAY_MARGIN_S, UTC
        )
        try:
            first = await self._service.store.first_sighting(activity_id, keep_until)
        except PgGuardError as exc:
            log.warning("teams bot: could not record invoke %r: %s", activity_id[:64], exc)
            return message_response(
                "pgguard could not record your click right now; nothing was decided. Try again."
            )
        if first:
            return None
        log.warning("teams bot: replayed invoke %r refused", activity_id[:64])
        return message_response("pgguard already acted on this click; it is never acted on twice.")


def _refused(peer: str, reason: str) -> Response:
    log.warning("teams bot: refused a request from %s: %s", peer, reason)
    return JSONResponse(
        {"detail": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


async def _read_capped(request: Request) -> bytes | None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}
