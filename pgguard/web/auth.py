"""Who may decide: approver tokens, and identities verified by an identity provider.

Owns: `ApproverDirectory` (configured approvers by token, by id, and the mapping from a verified
identity to an approver) and `VerifiedIdentity` (what an identity provider vouched for).

Tokens: only the SHA-256 of each token is configured (``[[approvers]] token_sha256``), so the
configuration file holds no usable credential. Lookup hashes the presented token and compares it
against every configured hash in constant time, so the time taken says nothing about which is close.

Identities: an identity is keyed on its immutable subject (Entra: ``oid``, with the tenant checked
by whoever verified it), never on an e-mail address or display name. It maps to the configured
approver with that ``subject``; failing that, it is an approver in its own right when its group or
role claims hold one of the allowed groups or roles, and only those matched groups count for rules.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from pgguard.approvals.model import Approver
from pgguard.settings import ApproverSettings


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """A person as an identity provider vouched for them (after signature and claim checks)."""

    tenant: str  # "" for providers without tenants
    subject: str  # immutable id within the tenant (Entra: oid)
    name: str = ""  # display only
    username: str = ""  # preferred_username/UPN: display and self-approval refusal only
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ApproverDirectory:
    def __init__(
        self,
        approvers: list[ApproverSettings],
        *,
        allowed_groups: Iterable[str] = (),
        allowed_roles: Iterable[str] = (),
    ) -> None:
        self.replace(approvers, allowed_groups=allowed_groups, allowed_roles=allowed_roles)

    def replace(
        self,
        approvers: list[ApproverSettings],
        *,
        allowed_groups: Iterable[str] = (),
        allowed_roles: Iterable[str] = (),
    ) -> None:
        """A reload's new approvers; no await in here, so every lookup sees old or new."""
        self._configured = [
            (a, Approver(id=a.id, name=a.name, groups=tuple(a.groups))) for a in approvers
        ]
        self._allowed_groups = frozenset(allowed_groups)
        self._allowed_roles = frozenset(allowed_roles)

    def by_token(self, token: str) -> Approver | None:
        presented = token_hash(token)
        found: Approver | None = None
        for entry, approver in self._configured:
            expected = entry.token_sha256
            if expected is not None and hmac.compare_digest(presented, expected):
                found = approver
        return found

    def by_id(self, approver_id: str) -> Approver | None:
        for _, approver in self._configured:
            if approver.id == approver_id:
                return approver
        return None

    def by_identity(self, identity: VerifiedIdentity) -> Approver | None:
        """The approver a verified identity is, or None when it is nobody who may decide."""
        aliases = tuple(a for a in (identity.subject, identity.username) if a)
        for entry, approver in self._configured:
            if entry.subject is not None and hmac.compare_digest(
                entry.subject.encode(), identity.subject.encode()
            ):
                return Approver(approver.id, approver.name, approver.groups, aliases)
        matched = sorted(
            (set(identity.groups) & self._allowed_groups)
            | (set(identity.roles) & self._allowed_roles)
        )
        if not matched:
            return None
        name = identity.name or identity.username or identity.subject
        return Approver(identity.subject, name, tuple(matched), aliases)

    def __len__(self) -> int:
        return len(self._configured)
