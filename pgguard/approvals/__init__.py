"""Approvals: the request state machine in the shared state database, and the service around it.

`ApprovalStore` persists requests and decisions (compare-and-swap transitions, NOTIFY on each);
`ApprovalService` holds a statement's request for the proxy and releases it when any instance
decides, expires or cancels it. Notifiers (Teams) and identity verification live beside these.
"""

from __future__ import annotations

from pgguard.approvals.model import (
    AlreadyDecided,
    ApprovalError,
    ApprovalRequest,
    ApprovalStoreUnavailable,
    Approver,
    DecisionRecord,
    DuplicateApproval,
    NewRequest,
    NotAllowedToApprove,
    RequestNotFound,
    RequestState,
    SelfApproval,
    extract_reason,
)
from pgguard.approvals.schema import NOTIFY_CHANNEL
from pgguard.approvals.service import ApprovalService, Notifier
from pgguard.approvals.store import ApprovalStore

__all__ = [
    "NOTIFY_CHANNEL",
    "AlreadyDecided",
    "ApprovalError",
    "ApprovalRequest",
    "ApprovalService",
    "ApprovalStore",
    "ApprovalStoreUnavailable",
    "Approver",
    "DecisionRecord",
    "DuplicateApproval",
    "NewRequest",
    "NotAllowedToApprove",
    "Notifier",
    "RequestNotFound",
    "RequestState",
    "SelfApproval",
    "extract_reason",
]
