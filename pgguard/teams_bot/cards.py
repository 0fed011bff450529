"""The bot's Adaptive Cards: the review card with Approve/Deny buttons, and the outcome card.

Owns: `card_for` (the card a request shows now), `review_card`, `outcome_card`, and the verbs
and input id the buttons carry (`APPROVE`, `DENY`, `COMMENT_INPUT`).

Invariants:
- Built from `pgguard.approvals.cards` (masked text, Markdown made inert, sizes capped), so the
  bot's card shows what the webhook card shows; the bot only adds a comment field and two
  ``Action.Execute`` buttons (Universal Actions, card version 1.4) carrying ``{request_id}``.
- A pending request's card has the buttons; a final one's never does.
- Every card, wrapped as a message, is at most `MAX_MESSAGE_BYTES`: when the buttons push a
  card over, the statement gives way (head and tail kept, the cut marked); failing that, a
  minimal card with the buttons and a link to the approval page.
"""

from __future__ import annotations

import dataclasses

from pgguard.approvals.cards import (
    MAX_MESSAGE_BYTES,
    Json,
    build_request_card,
    build_update_card,
    encode_envelope,
    envelope,
    request_page_url,
)
from pgguard.approvals.model import ApprovalRequest, RequestState
from pgguard.masking import shorten_middle

APPROVE = "approve"
DENY = "deny"
COMMENT_INPUT = "comment"
COMMENT_MAX_CHARS = 500

_MARGIN_BYTES = 256  # the cut marker's digits and JSON escapes, with room to spare
_MIN_STATEMENT_BYTES = 256


def card_for(request: ApprovalRequest, public_url: str) -> Json:
    """The card this request should show now: buttons while pending, the outcome after."""
    if request.state is RequestState.PENDING:
        return review_card(request, public_url)
    return outcome_card(request, public_url)


def outcome_card(request: ApprovalRequest, public_url: str) -> Json:
    """Approved, denied, expired or cancelled: a receipt without buttons."""
    return build_update_card(request, public_url)


def review_card(request: ApprovalRequest, public_url: str) -> Json:
    """The review card plus, once someone approved, the progress towards the quorum."""
    statement = request.statement
    for _ in range(6):
        view = dataclasses.replace(request, statement=statement)
        card = _with_buttons(build_request_card(view, public_url), view, public_url)
        excess = message_size(card) - MAX_MESSAGE_BYTES
        if excess <= 0:
            return card
        shown = _shown_statement_bytes(card)
        if shown is None:
            break
        budget = shown - excess - _MARGIN_BYTES
        if budget < _MIN_STATEMENT_BYTES:
            break
        statement = shorten_middle(request.statement, budget)
    return _minimal_review_card(request, public_url)


def message_size(card: Json) -> int:
    """The bytes this card takes as the activity posted to the Bot Connector."""
    return len(encode_envelope(envelope(card)))


def _with_buttons(card: Json, request: ApprovalRequest, public_url: str) -> Json:
    body = list(_items(card.get("body")))
    if request.decisions:
        # The outcome card's first block is its status line ("Still pending: 1 of 2 approvals
        # (names)"), already cleaned and clipped: the next approver sees who approved so far.
        status = _items(build_update_card(request, public_url).get("body"))
        if status and status[0].get("type") == "Container":
            body.insert(0, status[0])
    body.append(_comment_input())
    return {
        **card,
        "body": body,
        "actions": [*_buttons(request.id), *_items(card.get("actions"))],
    }


def _buttons(request_id: str) -> list[Json]:
    data = {"request_id": request_id}
    return [
        {
            "type": "Action.Execute",
            "title": "Approve",
            "verb": APPROVE,
            "data": data,
            "style": "positive",
        },
        {
            "type": "Action.Execute",
            "title": "Deny",
            "verb": DENY,
            "data": data,
            "style": "destructive",
        },
    ]


def _comment_input() -> Json:
    return {
        "type": "Input.Text",
        "id": COMMENT_INPUT,
        "label": "Comment (recorded with your decision)",
        "placeholder": "optional",
        "isMultiline": True,
        "maxLength": COMMENT_MAX_CHARS,
    }


def _minimal_review_card(request: ApprovalRequest, public_url: str) -> Json:
    """The last resort when even a cut statement does not fit: the id, the link, the buttons."""
    return {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": [
            {
                "type": "TextBlock",
                "text": f"Approval needed: request {request.id}",
                "weight": "Bolder",
                "size": "Medium",
                "wrap": True,
            },
            {
                "type": "TextBlock",
                "text": "This request is too large to show in Teams: review it on the approval "
                "page before deciding.",
                "wrap": True,
            },
            _comment_input(),
        ],
        "actions": [
            *_buttons(request.id),
            {
                "type": "Action.OpenUrl",
                "title": "Review request",
                "url": request_page_url(public_url, request.id),
            },
        ],
    }


def _shown_statement_bytes(card: Json) -> int | None:
    """Size of the statement the review card shows (its first monospace text run)."""
    for block in _items(card.get("body")):
        for item in [block, *_items(block.get("inlines"))]:
            text = item.get("text")
            if item.get("fontType") == "Monospace" and isinstance(text, str):
                return len(text.encode("utf-8"))
    return None


def _items(value: object) -> list[Json]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
