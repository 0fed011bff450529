"""The query ledger: every statement, decision and outcome, hash-chained, in the state database.

Public API: `LedgerEntry` (what the proxy records), `LedgerWriter` (`record` on the hot path,
`record_durable` before a privileged statement is forwarded), `query`/`LedgerFilters`/`LedgerRow`
(reading) and `verify`/`VerifyReport`/`Problem` (tamper evidence; `KeyRing` and the signed
checkpoints of `pgguard.ledger.checkpoint`), `LedgerUnavailable` (fail closed). The tables and
the ``ledger`` view are documented in the README (for auditors).
"""

from __future__ import annotations

from pgguard.ledger.chain import GENESIS, Chain, SealedEntry, canonical_bytes, envelope_hash
from pgguard.ledger.checkpoint import KeyRing, SignedCheckpoint
from pgguard.ledger.model import LedgerEntry, LedgerUnavailable, new_entry_id
from pgguard.ledger.reader import (
    ChainHead,
    LedgerFilters,
    LedgerRow,
    Problem,
    VerifyReport,
    query,
    verify,
)
from pgguard.ledger.spool import Spool, SpoolError
from pgguard.ledger.store import LedgerStore, LedgerStoreUnavailable
from pgguard.ledger.writer import LedgerWriter, WriterStats

__all__ = [
    "GENESIS",
    "Chain",
    "ChainHead",
    "KeyRing",
    "LedgerEntry",
    "LedgerFilters",
    "LedgerRow",
    "LedgerStore",
    "LedgerStoreUnavailable",
    "LedgerUnavailable",
    "LedgerWriter",
    "Problem",
    "SealedEntry",
    "SignedCheckpoint",
    "Spool",
    "SpoolError",
    "VerifyReport",
    "WriterStats",
    "canonical_bytes",
    "envelope_hash",
    "new_entry_id",
    "query",
    "verify",
]
