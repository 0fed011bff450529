"""Values of the approval state machine, its errors, and the agent's stated reason.

Owns: `RequestState` (pending → approved | denied | expired | cancelled), `Approver`,
`DecisionRecord`, `NewRequest` (what the gate asks for), `ApprovalRequest` (what the store holds),
the approval errors, `new_request_id` and `extract_reason`.

Invariants: values are frozen. A request's statement and parameters are masked before they get
here; nothing in this module ever sees raw SQL values. Request ids are short and unguessable
(80 random bits, lowercase base32). Only `pending` is a non-final state.
"""

from __future__ import annotations

import base64
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal
from urllib.parse import unquote

from pglast import parser as pg

from pgguard.approvals.identity import normalise_identity
from pgguard.approvals.signing import RequestBinding
from pgguard.errors import PgGuardError

Verdict = Literal["approve", "deny"]

REASON_MAX_CHARS = 500


class RequestState(StrEnum):
    """Where a request is in its life; every state but PENDING is final."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self is not RequestState.PENDING


# --- errors -----------------------------------------------------------------------------------


class ApprovalError(PgGuardError):
    """Base of the approval errors an approver (HTTP API, Teams, CLI) can cause."""

    sqlstate = "55000"


class RequestNotFound(ApprovalError):
    """No approval request has this id."""

    sqlstate = "42704"


class AlreadyDecided(ApprovalError):
    """The request is no longer pending (approved, denied, expired or cancelled)."""

    sqlstate = "55000"


class SelfApproval(ApprovalError):
    """The approver owns the requesting agent; nobody approves their own request."""

    sqlstate = "42501"


class NotAllowedToApprove(ApprovalError):
    """The approver is in none of the groups the matching rule requires."""

    sqlstate = "42501"


class DuplicateApproval(ApprovalError):
    """This approver has already decided on this request; quorum needs distinct approvers."""

    sqlstate = "55000"


class IntegrityFailure(ApprovalError):
    """A stored request or decision fails its MAC: written by someone other than pgguard."""

    sqlstate = "XX001"  # data_corrupted


class ApprovalStoreUnavailable(PgGuardError):
    """The approval state database could not be reached or answered in time (fail closed)."""

    sqlstate = "58000"


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Approver:
    """A verified approver identity: stable id (e.g. Entra object id or UPN), name, groups.

    ``aliases`` are other names the same person goes by (identity-provider subject, user name).
    They only ever make a refusal stricter: an agent owned by any of them cannot be approved by
    this approver. They never identify anyone.
    """

    id: str
    name: str
    groups: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def is_owner(self, owner: str) -> bool:
        """Whether ``owner`` (an agent's configured owner) names this approver.

        Compared in normalised form (`pgguard.approvals.identity`): ``Ops`` owns what ``ops``
        owns, and so does ``ops+ci@example.com``.
        """
        target = normalise_identity(owner)
        return any(normalise_identity(name) == target for name in (self.id, *self.aliases) if name)


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One approver's verdict on one request."""

    approver_id: str
    approver_name: str
    verdict: Verdict
    channel: str
    comment: str
    decided_at: datetime
    mac: str | None = None  # pgguard.approvals.signing.StateKey.decision_mac; not shown

    def to_json(self) -> dict[str, object]:
        return {
            "approver_id": self.approver_id,
            "approver_name": self.approver_name,
            "verdict": self.verdict,
            "channel": self.channel,
            "comment": self.comment,
            "decided_at": self.decided_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class NewRequest:
    """What the gate asks to hold: the masked statement, who sends it, and the rule's terms."""

    agent: str
    owner: str
    database: str
    client_address: str
    application_name: str
    statement: str  # masked SQL text, never raw
    parameters: tuple[str, ...]  # masked Bind parameters
    fingerprint: str  # the remember key (pgguard.policy.remember), not libpg_query's fingerprint
    categories: tuple[str, ...]
    rule_ids: tuple[str, ...]
    reason: str | None
    approver_groups: tuple[str, ...]  # empty: any approver except the owner
    min_approvals: int = 1
    remember_s: float | None = None
    expires_in_s: float = 300.0
    session_id: str = ""
    instance_id: str = ""
    touches: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_approvals < 1:
            raise ValueError("min_approvals must be at least 1")
        if self.expires_in_s <= 0:
            raise ValueError("expires_in_s must be positive")
        if self.remember_s is not None and self.remember_s <= 0:
            raise ValueError("remember_s must be positive when set")


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A stored request: everything in NewRequest plus its id, state, times and decisions."""

    id: str
    state: RequestState
    agent: str
    owner: str
    database: str
    client_address: str
    application_name: str
    statement: str
    parameters: tuple[str, ...]
    fingerprint: str
    categories: tuple[str, ...]
    rule_ids: tuple[str, ...]
    reason: str | None
    approver_groups: tuple[str, ...]
    min_approvals: int
    remember_s: float | None
    expires_in_s: float
    session_id: str
    instance_id: str
    touches: Mapping[str, object]
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decisions: tuple[DecisionRecord, ...]
    remembered_from: str | None
    state_reason: str | None
    # pgguard.approvals.signing: what the holding instance bound the request to, and its MACs
    statement_digest: str | None = None
    request_mac: str | None = None
    state_mac: str | None = None

    def binding(self, statement_digest: str | None = None) -> RequestBinding:
        """What the request's MAC covers; pass the holder's own digest to check it against."""
        return RequestBinding(
            request_id=self.id,
            statement_digest=statement_digest or self.statement_digest or "",
            agent=self.agent,
            owner=self.owner,
            database=self.database,
            session_id=self.session_id,
            fingerprint=self.fingerprint,
            approver_groups=self.approver_groups,
            min_approvals=self.min_approvals,
            remember_s=self.remember_s,
        )

    @property
    def approvals(self) -> tuple[DecisionRecord, ...]:
        return tuple(d for d in self.decisions if d.verdict == "approve")

    def seconds_left(self, now: datetime | None = None) -> float:
        """Seconds until a pending request expires; 0 for any other state."""
        if self.state != RequestState.PENDING:
            return 0.0
        moment = now or datetime.now(self.expires_at.tzinfo)
        return max(0.0, round((self.expires_at - moment).total_seconds(), 1))

    def to_json(self) -> dict[str, object]:
        """The review payload (HTTP API, Teams card, CLI); all values JSON-able."""
        return {
            "id": self.id,
            "state": self.state.value,
            "agent": self.agent,
            "owner": self.owner,
            "database": self.database,
            "client_address": self.client_address,
            "application_name": self.application_name,
            "statement": self.statement,
            "parameters": list(self.parameters),
            "fingerprint": self.fingerprint,
            "categories": list(self.categories),
            "rule_ids": list(self.rule_ids),
            "reason": self.reason,
            "approver_groups": list(self.approver_groups),
            "min_approvals": self.min_approvals,
            "remember_s": self.remember_s,
            # Time left now (0 once decided or expired); the hold's timeout is hold_timeout_s.
            "expires_in_s": self.seconds_left(),
            "seconds_left": self.seconds_left(),
            "hold_timeout_s": self.expires_in_s,
            "session_id": self.session_id,
            "instance_id": self.instance_id,
            "touches": dict(self.touches),
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "decisions": [d.to_json() for d in self.decisions],
            "remembered_from": self.remembered_from,
            "state_reason": self.state_reason,
        }


def new_request_id() -> str:
    """16 lowercase base32 characters carrying 80 random bits."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


# --- the agent's stated reason ----------------------------------------------------------------

# sqlcommenter: key='value' pairs joined by commas; values url-encoded, then quotes escaped as \'.
_REASON_PAIR = re.compile(r"(?:^|,)\s*reason\s*=\s*'((?:[^'\\]|\\.)*)'", re.IGNORECASE)


def extract_reason(sql: str) -> str | None:
    """The agent's stated reason: a sqlcommenter ``reason='...'`` in a real SQL comment.

    Comments are found by PostgreSQL's scanner, so a "comment" inside a string literal or a
    dollar quote is not one. The value is url-decoded as sqlcommenter specifies, control
    characters become spaces, and the result is capped at 500 characters. Returns None when no
    comment gives a reason (application_name is never a reason: it is shown as what it is).
    The caller masks the result like any text an agent controls.
    """
    try:
        tokens = pg.scan(sql)
    except (pg.ParseError, ValueError, UnicodeError):
        return None
    for token in tokens:
        if token.name != "C_COMMENT":
            continue
        comment = sql[token.start : token.end + 1]
        match = _REASON_PAIR.search(comment[2:-2].strip())
        if match:
            reason = _clean(unquote(re.sub(r"\\(.)", r"\1", match.group(1))))
            if reason:
                return reason
    return None


def _clean(text: str) -> str:
    printable = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    return " ".join(printable.split())[:REASON_MAX_CHARS]
