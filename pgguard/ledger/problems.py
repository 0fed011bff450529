"""What `pgguard.ledger.reader.verify` finds: `Problem` and its kinds.

Owns: `Problem`, `ProblemKind`.

Kinds: ``modified``, ``deleted``, ``inserted``, ``reordered`` (the hash chain's own checks);
``truncated`` (a signed checkpoint names entries past the chain's end), ``chain_missing`` (a
signed checkpoint names a chain with no entries), ``bad_signature`` (a checkpoint row or anchor
line that does not verify with the keys given), ``checkpoint_deleted`` (an anchored checkpoint
missing from the table), ``unanchored`` (entries no signed checkpoint covers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProblemKind = Literal[
    "modified",
    "deleted",
    "inserted",
    "reordered",
    "truncated",
    "chain_missing",
    "bad_signature",
    "checkpoint_deleted",
    "unanchored",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of `verify`: an entry by id, or a run of entries from ``entry_id`` (at
    ``seq``) to ``last_entry_id`` (at ``last_seq``) when a finding covers a run."""

    entry_id: str
    chain_id: str
    seq: int
    kind: ProblemKind
    detail: str
    last_entry_id: str | None = None
    last_seq: int | None = None
    count: int = 1
