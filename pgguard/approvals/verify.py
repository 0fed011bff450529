"""Judging a stored request by its MACs: which final states and approvals are authentic.

Owns: `final_state_problem` (is this row's final state one pgguard made?), `verified_approvers`
(the distinct approvers whose approvals carry valid MACs), `remembered_approval_problem` (may this
approved request cover a new one?).

Invariants: pure. The holding instance passes its OWN digest of the statement it holds, never
the stored one, so a writer who copies another request's digest and MACs gains nothing. An
owner's approval never counts, under any spelling (`pgguard.approvals.identity`). Anything that
does not verify is a problem (a string saying what failed), never an exception.
"""

from __future__ import annotations

from pgguard.approvals.identity import normalise_identity
from pgguard.approvals.model import ApprovalRequest, RequestState
from pgguard.approvals.signing import RequestBinding, StateKey


def verified_approvers(
    request: ApprovalRequest, key: StateKey, binding: RequestBinding
) -> frozenset[str]:
    """Normalised ids of the non-owners whose approve decisions verify against ``binding``."""
    owner = normalise_identity(request.owner)
    return frozenset(
        normalise_identity(d.approver_id)
        for d in request.decisions
        if d.verdict == "approve"
        and normalise_identity(d.approver_id) != owner
        and key.decision_verifies(binding, d.verdict, d.approver_id, d.channel, d.mac)
    )


def _verified_denial(request: ApprovalRequest, key: StateKey, binding: RequestBinding) -> bool:
    return any(
        d.verdict == "deny"
        and key.decision_verifies(binding, d.verdict, d.approver_id, d.channel, d.mac)
        for d in request.decisions
    )


def final_state_problem(
    request: ApprovalRequest, key: StateKey, statement_digest: str | None = None
) -> str | None:
    """None when ``request``'s final state is authentic; else what failed to verify.

    Approved needs ``min_approvals`` verified approvals (or, for a remembered approval, the
    state MAC pgguard wrote when it created it); denied needs one verified denial; expired and
    cancelled need pgguard's state MAC.
    """
    digest = statement_digest or request.statement_digest or ""
    binding = request.binding(digest)
    if not key.request_verifies(binding, request.request_mac):
        return "the request row fails its MAC (statement, context or terms were changed)"
    state = request.state
    if state == RequestState.APPROVED:
        if request.remembered_from is not None:
            if key.state_verifies(request.id, state.value, digest, request.state_mac):
                return None
            return "the remembered approval fails its MAC"
        approvers = verified_approvers(request, key, binding)
        if len(approvers) >= request.min_approvals:
            return None
        return (
            f"approved with {len(approvers)} verified approval(s) of {request.min_approvals} "
            "needed: a decision row was forged or altered"
        )
    if state == RequestState.DENIED:
        if _verified_denial(request, key, binding):
            return None
        return "denied without a verified denial: a decision row was forged or altered"
    if state in (RequestState.EXPIRED, RequestState.CANCELLED):
        if key.state_verifies(request.id, state.value, digest, request.state_mac):
            return None
        return f"{state.value} without pgguard's state MAC: the state was set by someone else"
    return None  # pending: nothing to release


def remembered_approval_problem(
    candidate: ApprovalRequest, key: StateKey, *, agent: str, database: str, fingerprint: str
) -> str | None:
    """None when ``candidate`` is an authentic approval that may cover the new statement."""
    if candidate.remembered_from is not None:
        return "an auto-approval is never itself remembered"
    if candidate.remember_s is None:
        return "the approval was not given to be remembered"
    if (candidate.agent, candidate.database, candidate.fingerprint) != (
        agent,
        database,
        fingerprint,
    ):
        return "the approval was for another agent, database or statement shape"
    if candidate.state != RequestState.APPROVED:
        return "the request is not approved"
    return final_state_problem(candidate, key)
