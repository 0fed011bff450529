"""What a hold asks and what it answers: the review payload, and the outcome of a decision.

``new_request`` builds the approval request a reviewer sees - everything masked (the statement,
its parameters, the agent's reason and application_name), plus what the statement touches.
``outcome`` turns a request that is no longer pending into what the held session gets:
``ALLOW`` only for an approved request; every other state is a refusal.
"""

from __future__ import annotations

import asyncio
import logging

from pgguard.approvals.model import ApprovalRequest, NewRequest, RequestState, extract_reason
from pgguard.errors import PgGuardError
from pgguard.masking import MaskedStatement, MaskingRules, mask_parameters, mask_sql, mask_text
from pgguard.policy import Decision
from pgguard.policy.remember import remember_key
from pgguard.proxy.gate import ALLOW, Allow, Deny, SessionView, SqlEvent
from pgguard.proxy.hold_notices import refusal
from pgguard.wire.extended import decode_bind_parameters

log = logging.getLogger(__name__)


def new_request(
    session: SessionView,
    decision: Decision,
    event: SqlEvent,
    masking: MaskingRules,
    instance_id: str,
    upstream_role: str = "",
    masked: MaskedStatement | None = None,
) -> NewRequest:
    """The approval request (the review payload) for a held statement: all of it masked.

    `upstream_role`: the role pgguard (and so every agent) uses upstream; a statement naming it
    is flagged (`touches["own_role"]`): changing it changes what every agent can do.
    `masked`: the statement already masked with ``masking`` (off the loop, for long texts).
    """
    text = event.sql.decode("utf-8", "replace")
    if masked is None:
        masked = mask_sql(text, masking)
    parameters: tuple[str, ...] = ()
    if event.bind is not None:
        try:
            parameters = tuple(mask_parameters(decode_bind_parameters(event.bind), masking))
        except PgGuardError:
            parameters = ("<unreadable parameters>",)
    touches = masked.touches
    return NewRequest(
        agent=session.agent,
        owner=session.owner,
        database=session.database,
        client_address=session.client_address,
        application_name=mask_text(session.application_name, masking),
        statement=masked.text,
        parameters=parameters,
        fingerprint=request_fingerprint(session, decision, event),
        categories=decision.categories,
        rule_ids=decision.rule_ids,
        reason=_reason(text, masking),
        approver_groups=decision.approver_groups,
        min_approvals=decision.min_approvals,
        remember_s=decision.remember_s,
        expires_in_s=decision.hold_timeout_s,
        session_id=session.session_id,
        instance_id=instance_id,
        touches={
            "reads": list(touches.reads),
            "writes": list(touches.writes),
            "columns_read": list(touches.columns_read),
            "columns_written": list(touches.columns_written),
            "export": touches.export,
            "masked_columns": _masked_columns(
                (*touches.columns_read, *touches.columns_written), masking
            ),
            "roles": list(touches.roles),
            "own_role": _names_own_role(touches.roles, upstream_role),
            "lock": touches.lock,
        },
    )


def request_fingerprint(session: SessionView, decision: Decision, event: SqlEvent) -> str:
    """The request's key for remembered approvals (`pgguard.policy.remember`), stored as its
    fingerprint: the approvals store, the remembered lookup and the MAC binding all use it."""
    parameters: list[bytes | None] | bytes | None = None
    if event.bind is not None:
        try:
            parameters = decode_bind_parameters(event.bind)
        except PgGuardError:
            parameters = event.bind
    params = session.server_parameters
    lexing = (
        params.get("standard_conforming_strings", "on"),
        params.get("client_encoding", "UTF8"),
    )
    return remember_key(
        bytes(event.sql), decision.facts, decision.categories, decision.rule_ids, lexing, parameters
    )


def _masked_columns(columns: tuple[str, ...], masking: MaskingRules) -> list[str]:
    """The columns whose values the masking rules treat as sensitive (flagged to reviewers)."""
    return [
        name
        for name in dict.fromkeys(columns)
        if any(rule.columns.search(name) for rule in masking.column_rules)
    ]


_SELF = frozenset({"CURRENT_USER", "SESSION_USER", "CURRENT_ROLE"})


def _names_own_role(roles: tuple[str, ...], upstream_role: str) -> bool:
    return any(role in _SELF or (upstream_role and role == upstream_role) for role in roles)


def _reason(text: str, masking: MaskingRules) -> str | None:
    """The agent's reason, masked by the same detectors as its statement."""
    reason = extract_reason(text)
    return None if reason is None else mask_text(reason, masking)


def settle(future: asyncio.Future[Allow | Deny], outcome: Allow | Deny) -> None:
    if not future.done():
        future.set_result(outcome)


def outcome(request: ApprovalRequest, public_url: str = "") -> Allow | Deny:
    """What the held session gets once its request is no longer pending."""
    if request.state == RequestState.APPROVED:
        who = ", ".join(d.approver_name for d in request.decisions if d.verdict == "approve")
        if request.remembered_from:
            who = f"remembered approval of request {request.remembered_from}"
        log.info("hold %s: approved (%s)", request.id, who)
        return ALLOW
    return Deny(refusal(request, public_url))
