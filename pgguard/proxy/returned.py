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
from pgguard.proxy.gate import ALLOW, Allow, Deny, SqlEvent
from pgguard.proxy.hold_notices import pending_refusal
from pgguard.wire.extended import bind_values

FINGERPRINT_PREFIX = "return:"  # a waiting hold's approval (its own fingerprint) never matches


def returned_request(new: NewRequest) -> NewRequest:
    """``new`` as a return-mode request: its fingerprint (bound by the request MAC) marks it."""
    return dataclasses.replace(new, fingerprint=FINGERPRINT_PREFIX + new.fingerprint)


def digest_parameters(event: SqlEvent) -> bytes | None:
    """What the approval binds besides the text: the parameter values and formats, without
    the statement and portal names a driver picks anew on every send."""
    return None if event.bind is None else bind_values(event.bind)


async def judge_returned(
    approvals: ApprovalService, new: NewRequest, event: SqlEvent, public_url: str
) -> tuple[Allow | Deny, ApprovalRequest | None]:
    """(ALLOW, request) when this send is the one run of an approved request; else
    (Deny(55000 naming the pending request), None)."""
    new = returned_request(new)
    parameters = digest_parameters(event)
    found = await approvals.open_for(new, event.sql, parameters)
    if found is not None and found.state == RequestState.APPROVED:
        if await approvals.mark_run(found.id):
            return ALLOW, found
        found = None  # run already (or just expired): this send asks anew
    if found is None:
        found = await approvals.open_request(new, event.sql, parameters)
    return Deny(pending_refusal(found, public_url)), None
