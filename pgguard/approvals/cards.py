"""Adaptive Cards (1.4) telling Teams about an approval request, and the envelope carrying them.

Owns: `build_request_card`, `build_update_card`, `envelope`, `encode_envelope` and
`MAX_MESSAGE_BYTES`, plus the read-only views (`ApprovalView`, `DecisionView`) of the approval
model that the cards need, so this module does not depend on the model's storage details.

Invariants:
- Pure: no I/O, no clock but the `now` a caller may pass.
- Every card, wrapped in `envelope` and measured with `encode_envelope`, is at most
  `MAX_MESSAGE_BYTES`, whatever the size of the statement, the reason or any other field. The
  statement is shortened in the middle (head and tail kept) with a visible note, other long
  fields are clipped, and the card always says the full text is on the approval page.
- Cards only show what they are given: the statement and parameters are already masked upstream.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeAlias

from pgguard.masking import shorten_middle

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ApprovalView",
    "DecisionView",
    "build_request_card",
    "build_update_card",
    "encode_envelope",
    "envelope",
    "request_page_url",
]

# Teams rejects (413) a message whose JSON body is larger than 28 KB.
MAX_MESSAGE_BYTES = 28 * 1024

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
FULL_TEXT_HINT = "full text on the approval page"

# Room left for rounding in the cut note's digits while fitting the statement.
_SLACK_BYTES = 64
_UNSHOWABLE_STATEMENT = f"[statement too large to show in Teams; {FULL_TEXT_HINT}]"


class DecisionView(Protocol):
    """What a card reads from one approver's decision."""

    @property
    def approver_id(self) -> str: ...
    @property
    def approver_name(self) -> str: ...
    @property
    def verdict(self) -> str: ...
    @property
    def channel(self) -> str: ...
    @property
    def comment(self) -> str | None: ...
    @property
    def decided_at(self) -> datetime: ...


class ApprovalView(Protocol):
    """What a card reads from an approval request (`pgguard.approvals.model.ApprovalRequest`)."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def client_address(self) -> str: ...
    @property
    def application_name(self) -> str: ...
    @property
    def statement(self) -> str: ...
    @property
    def parameters(self) -> Sequence[str]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def categories(self) -> Sequence[str]: ...
    @property
    def rule_ids(self) -> Sequence[str]: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def touches(self) -> Mapping[str, object]: ...
    @property
    def approver_groups(self) -> Sequence[str]: ...
    @property
    def min_approvals(self) -> int: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def decided_at(self) -> datetime | None: ...
    @property
    def decisions(self) -> Sequence[DecisionView]: ...
    @property
    def remembered_from(self) -> str | None: ...
    @property
    def state_reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class _Caps:
    """How much of each secondary field a card shows, in UTF-8 bytes or items."""

    field: int
    long: int
    items: int


# Tried in order until the card fits with a useful amount of statement left.
_LEVELS = (_Caps(field=400, long=3000, items=20), _Caps(160, 800, 8), _Caps(48, 160, 3))
_MIN_STATEMENT_BYTES = 2048

Json: TypeAlias = dict[str, object]
_Render: TypeAlias = Callable[[_Caps, str, int], Json]


def request_page_url(public_url: str, request_id: str) -> str:
    """The approval page of one request: `{public_url}/requests/{id}`."""
    return f"{public_url.rstrip('/')}/requests/{request_id}"


def envelope(card: Json) -> Json:
    """The message body a Teams Workflows webhook expects around one Adaptive Card."""
    return {
        "type": "message",
        "attachments": [{"contentType": CARD_CONTENT_TYPE, "content": card}],
    }


def encode_envelope(message: Json) -> bytes:
    """The exact bytes posted to Teams (compact UTF-8 JSON); its length is what must fit."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def build_request_card(
    request: ApprovalView, public_url: str, *, now: datetime | None = None
) -> Json:
    """The card asking approvers to review a newly held statement."""
    moment = now or datetime.now(UTC)
    url = request_page_url(public_url, request.id)

    def render(caps: _Caps, statement: str, total: int) -> Json:
        clip = _clipper(caps)
        body: list[Json] = [
            _text(
                f"Approval needed: {clip(request.agent)} wants to "
                f"{wants_text(request.categories)} on {clip(request.database)}",
                weight="Bolder",
                size="Medium",
            ),
            _text(f"Request {clip(request.id)}", isSubtle=True, spacing="None"),
            _facts(
                ("Agent", clip(request.agent)),
                ("Owner", clip(request.owner)),
                ("Database", clip(request.database)),
                ("Categories", _clip(_joined(request.categories, "none"), caps.long)),
                ("Rules", _clip(_joined(request.rule_ids, "none"), caps.long)),
                ("Reason", _clip(_clean(request.reason or NO_REASON), caps.long)),
                ("Application", clip(request.application_name or "(not set)")),
                ("Touches", _clip(_clean(touches_text(request.touches)), caps.long)),
                *(
                    (title, _clip(_clean(value), caps.long))
                    for title, value in detail_facts(request.touches)
                ),
                ("Expires", _expiry_text(request.expires_at, moment)),
                ("Client", clip(request.client_address)),
                ("Approvals", _approvals_needed(request, caps)),
            ),
            _text("Statement (values masked)", weight="Bolder"),
            _code(statement),
        ]
        if len(statement.encode("utf-8")) != total:
            shown = len(statement.encode("utf-8"))
            body.append(_shortened_note(shown, total))
        if request.parameters:
            body.append(_text("Parameters (masked)", weight="Bolder"))
            body.append(_code(_parameters_text(request.parameters, caps)))
        return _card(body, url, "Review request")

    return _fit(render, _clean(request.statement))


def build_update_card(
    request: ApprovalView, public_url: str, *, now: datetime | None = None
) -> Json:
    """The follow-up card: approved, denied, expired, cancelled (or partly approved)."""
    moment = now or datetime.now(UTC)
    url = request_page_url(public_url, request.id)

    def render(caps: _Caps, statement: str, total: int) -> Json:
        clip = _clipper(caps)
        headline, style = _outcome(request, caps)
        body: list[Json] = [
            {
                "type": "Container",
                "style": style,
                "items": [_text(headline, weight="Bolder", size="Medium")],
            },
            _text(f"Request {clip(request.id)}", isSubtle=True, spacing="None"),
            _facts(
                ("Agent", clip(request.agent)),
                ("Owner", clip(request.owner)),
                ("Database", clip(request.database)),
                ("Categories", _clip(_joined(request.categories, "none"), caps.long)),
                ("Rules", _clip(_joined(request.rule_ids, "none"), caps.long)),
                _settled_fact(request, moment),
            ),
        ]
        decisions = _decision_facts(request.decisions, caps)
        if decisions:
            body.append(_text("Decisions", weight="Bolder"))
            body.append(_facts(*decisions))
        body.append(_code(statement, isSubtle=True))
        if len(statement.encode("utf-8")) != total:
            body.append(_shortened_note(len(statement.encode("utf-8")), total))
        return _card(body, url, "Open request")

    # The follow-up is a receipt, not a review: a short excerpt of the statement is enough.
    return _fit(render, _clean(request.statement), statement_cap=1024)


def _fit(render: _Render, statement: str, *, statement_cap: int | None = None) -> Json:
    """Render with the most detail that keeps the envelope within `MAX_MESSAGE_BYTES`."""
    total = len(statement.encode("utf-8"))
    for caps in _LEVELS:
        overhead = _size(render(caps, "", total))
        budget = MAX_MESSAGE_BYTES - overhead - _SLACK_BYTES
        if statement_cap is not None:
            budget = min(budget, statement_cap)
        if budget < _MIN_STATEMENT_BYTES and caps is not _LEVELS[-1] and statement_cap is None:
            continue
        for _ in range(8):  # each round removes at least the excess; escapes converge fast
            if budget <= 0:
                break
            card = render(caps, shorten_middle(statement, budget), total)
            excess = _size(card) - MAX_MESSAGE_BYTES
            if excess <= 0:
                return card
            budget -= excess + _SLACK_BYTES
    return render(_LEVELS[-1], _UNSHOWABLE_STATEMENT, total)


def _size(card: Json) -> int:
    return len(encode_envelope(envelope(card)))


def _card(body: list[Json], url: str, button: str) -> Json:
    return {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
        "actions": [{"type": "Action.OpenUrl", "title": button, "url": url}],
    }


def _text(text: str, **style: object) -> Json:
    return {"type": "TextBlock", "text": markdown_escaped(text), "wrap": True, **style}


def _code(text: str, **style: object) -> Json:
    """SQL as a TextRun: Teams renders TextBlock text as Markdown (`price*qty, tax*rate` would
    turn italic) and clients disagree on backslash escapes, but a TextRun is never Markdown."""
    run: Json = {"type": "TextRun", "text": text, "fontType": "Monospace", **style}
    return {"type": "RichTextBlock", "inlines": [run]}


def _facts(*facts: tuple[str, str]) -> Json:
    return {
        "type": "FactSet",
        "facts": [{"title": markdown_escaped(t), "value": markdown_escaped(v)} for t, v in facts],
    }


_MARKDOWN = re.compile(r"([\\*_~`\[\]<>#|])")
_LINE_START = re.compile(r"(?m)^(\s*)([-+]|\d+\.)(\s)")


def markdown_escaped(text: str) -> str:
    """`text` with the characters of Teams' Markdown subset escaped, so it reads as written."""
    return _LINE_START.sub(r"\1\\\2\3", _MARKDOWN.sub(r"\\\1", text))


def _settled_fact(request: ApprovalView, now: datetime) -> tuple[str, str]:
    """When the request stopped waiting, named truthfully for its state."""
    state = str(request.state)
    if state == "expired":
        return "Expired at", _when(request.decided_at or request.expires_at)
    if state == "cancelled":
        return "Cancelled at", _when(request.decided_at or now)
    if state in ("approved", "denied"):
        return "Decided at", _when(request.decided_at or now)
    return "Expires", _expiry_text(request.expires_at, now)


def _shortened_note(shown: int, total: int) -> Json:
    cut = max(total - shown, 0)
    return _text(
        f"… [{cut:,} bytes cut; {FULL_TEXT_HINT}] … (statement is {total:,} bytes)",
        isSubtle=True,
        size="Small",
    )


def _outcome(request: ApprovalView, caps: _Caps) -> tuple[str, str]:
    """The follow-up's headline and container style for the request's current state."""
    state = str(request.state)
    approvers = [d for d in request.decisions if d.verdict == "approve"]
    deniers = [d for d in request.decisions if d.verdict == "deny"]
    names = _clip(", ".join(_clean(d.approver_name) for d in approvers), caps.long)
    if state == "approved":
        if not approvers and request.remembered_from:
            return f"Approved (remembered decision from request {request.remembered_from})", "good"
        return f"Approved by {names or 'an approver'}", "good"
    if state == "denied":
        if not deniers:
            return "Denied", "attention"
        denier = deniers[-1]
        headline = f"Denied by {_clip(_clean(denier.approver_name), caps.field)}"
        if denier.comment:
            headline += f": {_clip(_clean(denier.comment), caps.long)}"
        return headline, "attention"
    if state == "expired":
        return "Expired: nobody decided in time; the statement was not executed", "warning"
    if state == "cancelled":
        why = _clip(_clean(request.state_reason), caps.long) if request.state_reason else ""
        return f"Cancelled{': ' + why if why else ''}; the statement was not executed", "warning"
    got, needed = len(approvers), request.min_approvals
    return f"Still pending: {got} of {needed} approvals{' (' + names + ')' if names else ''}", (
        "default"
    )


def _decision_facts(decisions: Sequence[DecisionView], caps: _Caps) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    for decision in decisions[: caps.items]:
        verdict = "approved" if decision.verdict == "approve" else "denied"
        value = f"{verdict} via {_clip(_clean(decision.channel), caps.field)}"
        value += f" at {_when(decision.decided_at)}"
        if decision.comment:
            value += f": {_clip(_clean(decision.comment), caps.long)}"
        facts.append((_clip(_clean(decision.approver_name), caps.field), value))
    if len(decisions) > caps.items:
        facts.append(("…", f"{len(decisions) - caps.items} more on the approval page"))
    return facts


def _approvals_needed(request: ApprovalView, caps: _Caps) -> str:
    groups = _clip(_joined(request.approver_groups, "any approver"), caps.long)
    return f"{request.min_approvals} from {groups}"


def _parameters_text(parameters: Sequence[str], caps: _Caps) -> str:
    lines = [f"${i} = {_clip(_clean(p), caps.field)}" for i, p in enumerate(parameters, 1)]
    shown = lines[: caps.items]
    if len(lines) > caps.items:
        shown.append(f"… {len(lines) - caps.items} more; {FULL_TEXT_HINT}")
    return _clip("\n".join(shown), caps.long)


def _expiry_text(expires_at: datetime, now: datetime) -> str:
    left = (_aware(expires_at) - _aware(now)).total_seconds()
    if left <= 0:
        return f"{_when(expires_at)} (already expired)"
    if left < 60:
        return f"{_when(expires_at)} (in under a minute)"
    return f"{_when(expires_at)} (in {math.ceil(left / 60)} min)"


def _when(moment: datetime) -> str:
    return _aware(moment).astimezone(UTC).isoformat(timespec="seconds")


def _aware(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (the model stores aware ones; be lenient anyway)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _joined(items: Sequence[str], empty: str) -> str:
    return ", ".join(_clean(item) for item in items) or empty


def _clipper(caps: _Caps) -> Callable[[str], str]:
    return lambda text: _clip(_clean(text), caps.field)


def _clip(text: str, max_bytes: int) -> str:
    """`text` if it fits in `max_bytes` UTF-8 bytes, else its head and a note of the cut."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes].decode("utf-8", errors="ignore")
    return f"{head}… [{len(data) - len(head.encode('utf-8')):,} bytes cut]"


def _clean(text: str) -> str:
    """Text that is valid to encode and inert as Markdown.

    Lone surrogates (from odd client bytes) become U+FFFD. Teams renders TextBlock and FactSet
    text as Markdown, so an agent's reason or a quoted identifier could otherwise become a
    convincing link on the approver's card; link syntax and auto-linked addresses are broken
    with zero-width spaces, so the text reads the same but links nowhere.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    for pattern, inert in _INERT:
        text = text.replace(pattern, inert)
    return text


_ZWSP = "\u200b"
_INERT = (
    ("](", "]" + _ZWSP + "("),
    ("://", ":" + _ZWSP + "//"),
    ("www.", "www." + _ZWSP),
    ("mailto:", "mailto" + _ZWSP + ":"),
)


NO_REASON = "(no reason given)"
OWN_ROLE_NOTE = "pgguard's own upstream role, which every agent uses"
_WANTS = {
    "privilege": "change privileges",
    "ddl": "change the schema",
    "export": "export data",
    "execute": "run code pgguard cannot inspect",
    "admin": "run an administrative command",
    "unparseable": "run a statement pgguard could not read",
}


def wants_text(categories: Sequence[str]) -> str:
    """What an agent wants to do, in words: "change privileges and export data"."""
    words = [_WANTS.get(str(c), f"run a {c} statement") for c in categories] or [
        "run a statement that needs approval"
    ]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def detail_facts(touches: Mapping[str, object]) -> list[tuple[str, str]]:
    """What a DBA needs beyond the tables: columns, the lock taken, the roles named."""
    facts: list[tuple[str, str]] = []
    masked = touches.get("masked_columns")
    sensitive = {str(n) for n in masked} if isinstance(masked, list | tuple) else set()
    for key, title in (("columns_read", "Columns read"), ("columns_written", "Columns written")):
        names = touches.get(key)
        if isinstance(names, list | tuple) and names:
            shown = [f"{n} (sensitive)" if str(n) in sensitive else str(n) for n in names]
            facts.append((title, ", ".join(shown)))
    lock = touches.get("lock")
    if isinstance(lock, str) and lock:
        facts.append(("Lock", f"{lock} (from the statement kind)"))
    roles = touches.get("roles")
    if isinstance(roles, list | tuple) and roles:
        text = ", ".join(str(r) for r in roles)
        if touches.get("own_role"):
            text += f" — includes {OWN_ROLE_NOTE}"
        facts.append(("Roles", text))
    return facts


def touches_text(touches: Mapping[str, object]) -> str:
    """What the statement touches, in one line: tables, the kind of export, estimated rows."""
    parts: list[str] = []
    for key, label in (("reads", "reads"), ("writes", "writes")):
        names = touches.get(key)
        if isinstance(names, list | tuple) and names:
            parts.append(f"{label} {', '.join(str(n) for n in names)}")
    export = touches.get("export")
    if export:
        parts.append(f"export to {export}".replace("_", " "))
    rows = touches.get("estimated_rows")
    skipped = touches.get("estimate_skipped")
    if isinstance(rows, int):
        parts.append(f"~{rows:,} rows (planner estimate)")
    elif isinstance(skipped, str) and skipped:
        parts.append(f"estimate skipped: {skipped}")
    roles = touches.get("roles")
    if isinstance(roles, list | tuple) and roles:
        parts.append(f"roles {', '.join(str(r) for r in roles)}")
        if touches.get("own_role"):
            parts.append(OWN_ROLE_NOTE)
    return "; ".join(parts) or "(not known)"
