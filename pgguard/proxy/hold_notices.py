"""What an agent reads about its held statement: the NOTICEs while it waits, and every refusal.

Agents (AI tools) decide what to do next from error text, so each text here says what happened
(message), the facts (DETAIL: categories, rules, who may approve, the expiry, who decided and
their comment) and what the agent can do (HINT: the request's page, that a retry opens a new
request, whom to ask). The message prefixes are contracts tools match on:
``pgguard: held for approval as request <id>`` and, in return mode,
``pgguard: approval required, request <id> is pending``.

Invariant: pure (no I/O); only masked or agent-visible facts (the statement text never appears).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pgguard.approvals.model import ApprovalRequest, RequestState
from pgguard.errors import ApprovalPending, PgGuardError, PolicyDenied, QueryCanceled


@dataclass(frozen=True, slots=True)
class Notice:
    text: str
    detail: str
    hint: str


def page_url(public_url: str, request_id: str) -> str:
    return f"{public_url.rstrip('/')}/requests/{request_id}"


def held_notice(request: ApprovalRequest, public_url: str) -> Notice:
    """Sent once the request exists, before the session starts waiting."""
    return Notice(
        f"pgguard: held for approval as request {request.id}",
        _facts(request),
        f"Review page: {page_url(public_url, request.id)} . The statement runs as soon as it is "
        "approved; cancel the query to withdraw the request.",
    )


def reminder_notice(request: ApprovalRequest, public_url: str, seconds_left: float) -> Notice:
    """Sent every ``[holds] notice_interval`` while the session waits."""
    return Notice(
        f"pgguard: held for approval as request {request.id}: still waiting, "
        f"{max(0, round(seconds_left))} s left",
        _facts(request),
        f"Review page: {page_url(public_url, request.id)} .",
    )


def pending_refusal(request: ApprovalRequest, public_url: str) -> ApprovalPending:
    """Return mode: the statement is refused now and runs once when re-sent after approval."""
    return ApprovalPending(
        f"pgguard: approval required, request {request.id} is pending",
        detail=_facts(request),
        hint=f"Send the same statement (same text and parameters) again once request "
        f"{request.id} is approved and before it expires: it then runs once. Sending it while "
        f"pending returns this request. Review page: {page_url(public_url, request.id)} .",
    )


def refusal(request: ApprovalRequest, public_url: str) -> PgGuardError:
    """The error a held (or returned) statement gets when its request ended without approval."""
    rules = _rules(request)
    if request.state == RequestState.DENIED:
        denial = next((d for d in request.decisions if d.verdict == "deny"), None)
        by = f" by {denial.approver_name}" if denial else ""
        comment = f": {denial.comment}" if denial and denial.comment else ""
        said = f'with the comment "{denial.comment}"' if denial and denial.comment else ""
        when = _time(denial.decided_at) if denial else "?"
        return PolicyDenied(
            f"pgguard: request {request.id} was denied{by}{comment}",
            detail=f"Request {request.id} was denied{by} at {when} "
            f"{said or 'without a comment'} (rules: {rules}).",
            hint="Do not retry unchanged: a retry opens a new request. Ask the approver or the "
            f"agent's owner ({request.owner}) what would be acceptable (rules: {rules}).",
        )
    if request.state == RequestState.EXPIRED:
        return PolicyDenied(
            f"pgguard: request {request.id} expired without a decision",
            detail=f"Nobody decided on request {request.id} within "
            f"{round(request.expires_in_s)} s ({request.state_reason or 'expired'}). "
            f"Who can approve: {_approvers(request)}. Rules: {rules}.",
            hint="A retry opens a new request. Ask the agent's owner "
            f"({request.owner}) to have it reviewed, and say why in a comment "
            "/* reason='...' */ in the statement.",
        )
    return QueryCanceled(
        f"canceling statement: request {request.id} was cancelled",
        detail=f"Request {request.id} was cancelled: {request.state_reason or 'no reason given'}.",
        hint="A retry opens a new request.",
    )


def cancelled_by_client(request_id: str | None) -> QueryCanceled:
    """The client cancelled (CancelRequest) or left while its statement waited."""
    which = f"request {request_id}" if request_id else "its approval"
    return QueryCanceled(
        "canceling statement due to user request",
        detail=f"The client cancelled the statement while it waited for {which}; "
        "the request is cancelled and nothing was run.",
        hint="A retry opens a new request.",
    )


def store_unavailable() -> PolicyDenied:
    return PolicyDenied(
        "pgguard: this statement requires approval, and the approval request could not be recorded",
        detail="The approval state database did not answer; nothing was run.",
        hint="Try again later (a retry opens a new request); if it persists, tell the agent's "
        "owner that pgguard's state database is unavailable.",
    )


def no_approvals(rules: str, categories: str, reasons: str | None) -> PolicyDenied:
    return PolicyDenied(
        f"pgguard: this statement requires approval (rule {rules}; categories {categories})",
        detail=(reasons + ". " if reasons else "")
        + "The approval flow is not enabled on this pgguard, so nobody can approve it.",
        hint="Privileged statements wait for a human approval: ask the agent's owner to enable "
        f"approvals or to change the rule ({rules}).",
    )


def policy_denied(rules: str, categories: str, reasons: str | None) -> PolicyDenied:
    return PolicyDenied(
        f"pgguard policy denies this statement (rule {rules})",
        detail=reasons or f"Rule {rules} denies statements of categories: {categories}.",
        hint=f"No approval can allow it; do something else, or ask the agent's owner about "
        f"rule {rules}.",
    )


def _facts(request: ApprovalRequest) -> str:
    return (
        f"Categories: {', '.join(request.categories) or 'none'}. Rules: {_rules(request)}. "
        f"Who can approve: {_approvers(request)}. Expires at {_time(request.expires_at)}."
    )


def _rules(request: ApprovalRequest) -> str:
    return ", ".join(request.rule_ids) or "default"


def _approvers(request: ApprovalRequest) -> str:
    groups = ", ".join(request.approver_groups)
    who = f"an approver in group {groups}" if groups else "any configured approver"
    if request.min_approvals > 1:
        who = f"{request.min_approvals} distinct approvers ({who})"
    return f"{who}, never the agent's owner ({request.owner})"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
