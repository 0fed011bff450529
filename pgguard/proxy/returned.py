"""Return mode: a held statement is refused at once, and runs once when re-sent after approval.

Owns: `judge_returned` - what a statement whose hold mode is ``return`` gets: the run of its
approved request, or the refusal (55000) naming its pending request (a new one, or the one
already open for this exact statement).

Invariants (what runs is what was judged): a request is found only by the agent, the database
and the statement's return-mode fingerprint (text, parameters, lexing, rules), and it releases a
run only when its MACs verify against pgguard's own digest of the re-sent text and parameter
values (`pgguard.approvals.service.ApprovalService.open_for`) - so another text, other
parameters, another agent or another database never runs on it. The run is claimed by a
compare-and-swap in the state database before the statement is forwarded: exactly once, on any
instance, and never after the request's expiry. A run's ledger entry names the request.
"""

from __future__ import annotations

import dataclasses

from pgguard.approvals.model import ApprovalRequest, NewRequest, RequestState
from pgguard.approvals.service import ApprovalService
from pgguard.errors import PgGuardError
from pgguard.proxy.gate import ALLOW, Allow, Deny, SqlEvent
from pgguard.proxy.hold_notices import pending_refusal
from pgguard.wire.extended import bind_values, decode_bind_parameters

FINGERPRINT_PREFIX = "return:"  # a waiting hold's approval (its own fingerprint) never matches


def returned_request(new: NewRequest) -> NewRequest:
    """``new`` as a return-mode request: its fingerprint (bound by the request MAC) marks it."""
    return dataclasses.replace(new, fingerprint=FINGERPRINT_PREFIX + new.fingerprint)


def plain_event(event: SqlEvent) -> SqlEvent:
    """``event`` without a Bind when it binds no parameters: a statement sent as a simple
    Query and as an Execute of a parameterless prepared statement is one statement here."""
    if event.bind is None:
        return event
    try:
        if decode_bind_parameters(event.bind):
            return event
    except PgGuardError:
        return event
    return dataclasses.replace(event, bind=None)


def digest_parameters(event: SqlEvent) -> bytes | None:
    """What the approval binds besides the text: the parameter values and formats, without
    the statement and portal names a driver picks anew on every send."""
    return None if event.bind is None else bind_values(event.bind)


async def approved_ahead(
    approvals: ApprovalService, new: NewRequest, event: SqlEvent
) -> ApprovalRequest | None:
    """An approval asked ahead of time (MCP ``request_approval``) for exactly this statement,
    claimed for this run; None when there is none (the statement is held as usual)."""
    found = await approvals.open_for(returned_request(new), event.sql, digest_parameters(event))
    approved = found is not None and found.state == RequestState.APPROVED
    return found if approved and found is not None and await approvals.mark_run(found.id) else None


async def judge_returned(
    approvals: ApprovalService, new: NewRequest, event: SqlEvent, public_url: str
) -> tuple[Allow | Deny, ApprovalRequest]:
    """(ALLOW, request) when this send is the one run of an approved request; else
    (Deny(55000 naming the pending request), that request). ``new`` and ``event`` as
    `plain_event` made them."""
    new = returned_request(new)
    parameters = digest_parameters(event)
    found = await approvals.open_for(new, event.sql, parameters)
    if found is not None and found.state == RequestState.APPROVED:
        if await approvals.mark_run(found.id):
            return ALLOW, found
        found = None  # run already (or just expired): this send asks anew
    if found is None:
        found = await approvals.open_request(new, event.sql, parameters)
    return Deny(pending_refusal(found, public_url)), found
