"""Approver identities for the API: bearer tokens checked against configured SHA-256 hashes.

Only the hash of each token is configured (``[[approvers]] token_sha256``), so the configuration
file does not hold usable credentials. Lookup hashes the presented token and compares against
every configured hash in constant time, so the time taken says nothing about which hash is close.
"""

from __future__ import annotations

import hashlib
import hmac

from pgguard.approvals.model import Approver
from pgguard.settings import ApproverSettings


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ApproverDirectory:
    def __init__(self, approvers: list[ApproverSettings]) -> None:
        self._entries = [
            (a.token_sha256, Approver(id=a.id, name=a.name, groups=tuple(a.groups)))
            for a in approvers
        ]

    def by_token(self, token: str) -> Approver | None:
        presented = token_hash(token)
        found: Approver | None = None
        for expected, approver in self._entries:
            if hmac.compare_digest(presented, expected):
                found = approver
        return found

    def by_id(self, approver_id: str) -> Approver | None:
        for _, approver in self._entries:
            if approver.id == approver_id:
                return approver
        return None

    def __len__(self) -> int:
        return len(self._entries)
