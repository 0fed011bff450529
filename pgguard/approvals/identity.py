"""Identities compared as identity providers compare them.

Owns: `normalise_identity`, the one form in which agent owners and approver ids are compared
(self-approval, distinct approvers for a quorum), and `identity_collisions`, which finds
configured names that differ as text but are one identity.

The rules (documented in the README): Unicode NFKC, then case folding (``Ops`` and ``ops`` are
one person, as they are to Entra ID and most directories), surrounding white space removed. For
an e-mail-shaped id (``local@domain``), a trailing dot of the domain is dropped and a ``+tag``
in the local part is ignored (``alice+ci@example.com`` is alice). Dots in the local part are
kept: most providers treat ``a.b`` and ``ab`` as different users.

Invariants: pure and total (any string normalises); normalising twice changes nothing. The rules
only ever merge names, never split one, so they can make a self-approval refusal stricter but
never weaker.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable


def normalise_identity(identity: str) -> str:
    """The comparison form of an owner or approver id."""
    folded = unicodedata.normalize("NFKC", identity).casefold().strip()
    if "@" not in folded:
        return folded
    local, domain = folded.rsplit("@", 1)
    local = local.split("+", 1)[0]
    return f"{local.strip()}@{domain.strip().rstrip('.')}"


def identity_collisions(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of different spellings that normalise to one identity (each group sorted)."""
    spellings: dict[str, set[str]] = {}
    for name in names:
        spellings.setdefault(normalise_identity(name), set()).add(name)
    return sorted(tuple(sorted(group)) for group in spellings.values() if len(group) > 1)
