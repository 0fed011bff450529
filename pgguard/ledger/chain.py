"""The ledger's hash chain: canonical serialization and sealing (pure, no I/O).

Owns: `canonical_bytes`, `envelope_hash`, `SealedEntry`, `Chain`, `new_chain_id`, `GENESIS`.

A sealed entry is an *envelope*: ``{"chain_id", "seq", "prev_hash", "prev_entry_id", "entry"}``,
where ``entry`` is `entry_content` of the `LedgerEntry`. Its hash is
``sha256(prev_hash_ascii + canonical_bytes(envelope))`` in lowercase hex, where the canonical
bytes are compact JSON with sorted keys, UTF-8 (orjson), times in UTC ISO 8601 with microseconds.
The envelope is what the database keeps in ``content``, so anyone can recompute every hash from
the table.

Invariants: a chain is ``(chain_id, seq = 1, 2, 3, ...)`` with no gaps; seq 1 links to
`GENESIS` (64 zeros) and every later entry to its predecessor's hash and id. Each `LedgerWriter`
(one per pgguard process start) opens a NEW chain, ``<instance_id>:<UTC start>:<random>``, so a
restarted instance never has to learn its old chain's head before it can record; spooled entries
of the previous process keep their own chain and are shipped as they were sealed. Seq and chain
id are inside the hashed envelope, so moving a row changes nothing but is still detected.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from pgguard.ledger.checkpoint import SignedCheckpoint, parse_signed
from pgguard.ledger.model import JsonValue, LedgerEntry, entry_content, entry_from_content
from pgguard.ledger.packed import (
    PACKED_FIELDS,
    PackedEntry,
    PackedOutcome,
    Ref,
    record_ref,
    seal_packed_many,
)

GENESIS = "0" * 64


def canonical_bytes(value: Mapping[str, object]) -> bytes:
    """Sorted-key compact JSON in UTF-8: the bytes a hash covers."""
    # orjson: sorted keys, compact, UTF-8, in C - the hash is on every statement's path.
    # Floats print in their shortest round-trip form (``1e-7``); verification re-encodes the
    # stored values with this same function, so the bytes always agree. Values orjson refuses
    # (integers beyond 64 bits) take the standard encoder, deterministically on both sides.
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return _FALLBACK.encode(value).encode("utf-8")


_FALLBACK = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def envelope_hash(prev_hash: str, canonical: bytes) -> str:
    """sha256 over the predecessor's hash (ASCII hex) followed by the canonical envelope."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(canonical)
    return digest.hexdigest()


def new_chain_id(instance_id: str, now: datetime | None = None) -> str:
    """A fresh chain id for one process start of ``instance_id``."""
    started = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{instance_id}:{started}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class SealedEntry:
    """An entry with its place in a chain; ``canonical`` is exactly what ``hash`` covers."""

    entry: LedgerEntry
    chain_id: str
    seq: int
    prev_hash: str
    prev_entry_id: str
    hash: str
    canonical: bytes

    def spool_line(self) -> bytes:
        """One JSON line for the spool file: the hash and the canonical envelope."""
        return b'{"hash":"' + self.hash.encode("ascii") + b'","envelope":' + self.canonical + b"}\n"


def unseal(envelope: Mapping[str, object], stored_hash: str) -> SealedEntry:
    """A `SealedEntry` rebuilt from an envelope read back; ``hash`` is the STORED one.

    Compare ``envelope_hash(result.prev_hash, result.canonical)`` with ``result.hash`` to check it.
    """
    entry = envelope.get("entry")
    if not isinstance(entry, dict):
        raise ValueError("ledger envelope has no entry")
    seq = envelope.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("ledger envelope has no seq")
    return SealedEntry(
        entry=entry_from_content(entry),
        chain_id=str(envelope.get("chain_id")),
        seq=seq,
        prev_hash=str(envelope.get("prev_hash")),
        prev_entry_id=str(envelope.get("prev_entry_id")),
        hash=stored_hash,
        canonical=canonical_bytes(envelope),
    )


# What a chain seals, in order: its entries, and the signed checkpoints of its head, each right
# after the entry it signs (see `pgguard.ledger.checkpoint`).
Sealed = SealedEntry | PackedEntry | SignedCheckpoint


def parse_spool_line(line: bytes) -> Sealed:
    """The inverse of ``spool_line`` (any kind); ValueError when the line is damaged."""
    record = json.loads(line)
    if isinstance(record, dict) and "packed" in record:
        return _parse_packed_line(record)
    if isinstance(record, dict) and "checkpoint" in record:
        return parse_signed(record)
    if not isinstance(record, dict) or not isinstance(record.get("envelope"), dict):
        raise ValueError("not a spooled ledger entry")
    sealed = unseal(record["envelope"], str(record.get("hash")))
    if envelope_hash(sealed.prev_hash, sealed.canonical) != sealed.hash:
        raise ValueError("spooled ledger entry fails its hash")
    return sealed


def _parse_packed_line(record: Mapping[str, object]) -> PackedEntry:
    fields, refs = record.get("packed"), record.get("refs")
    if not isinstance(fields, list) or len(fields) != len(PACKED_FIELDS):
        raise ValueError("not a spooled packed entry")
    if not isinstance(refs, dict):
        raise ValueError("spooled packed entry lacks its records")
    session, text = refs.get(fields[4]), refs.get(fields[5])
    if not isinstance(session, dict) or not isinstance(text, dict):
        raise ValueError("spooled packed entry lacks its records")
    if record_ref(session) != fields[4] or record_ref(text) != fields[5]:
        raise ValueError("spooled packed entry's records fail their refs")
    canonical = orjson.dumps(fields)
    stored_hash = str(record.get("hash"))
    if envelope_hash(str(fields[3]), canonical) != stored_hash:
        raise ValueError("spooled packed entry fails its hash")
    return PackedEntry(
        chain_id=str(record.get("chain_id")),
        seq=int(fields[0]),
        entry_id=str(fields[1]),
        hash=stored_hash,
        canonical=canonical,
        session=(fields[4], session),
        text=(fields[5], text),
        received_us=int(fields[6]),
    )


class Chain:
    """The head of one chain: seals entries in order (not thread-safe; one event loop)."""

    __slots__ = ("_id_prefix", "_last_entry_id", "_last_hash", "_next_seq", "chain_id")

    def __init__(
        self, chain_id: str, *, next_seq: int = 1, last_hash: str = GENESIS, last_entry_id: str = ""
    ) -> None:
        self.chain_id = chain_id
        self._id_prefix = secrets.token_hex(8)
        self._next_seq = next_seq
        self._last_hash = last_hash
        self._last_entry_id = last_entry_id

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    @property
    def last_entry_id(self) -> str:
        return self._last_entry_id

    def seal(self, entry: LedgerEntry) -> SealedEntry:
        """Give ``entry`` the next seq and link it to the head; the head then moves to it."""
        envelope: dict[str, JsonValue] = {
            "chain_id": self.chain_id,
            "seq": self._next_seq,
            "prev_hash": self._last_hash,
            "prev_entry_id": self._last_entry_id,
            "entry": entry_content(entry),
        }
        canonical = canonical_bytes(envelope)
        digest = envelope_hash(self._last_hash, canonical)
        sealed = SealedEntry(
            entry=entry,
            chain_id=self.chain_id,
            seq=self._next_seq,
            prev_hash=self._last_hash,
            prev_entry_id=self._last_entry_id,
            hash=digest,
            canonical=canonical,
        )
        self._next_seq += 1
        self._last_hash = digest
        self._last_entry_id = entry.entry_id
        return sealed

    def seal_packed(self, session: Ref, text: Ref, outcome: PackedOutcome) -> PackedEntry:
        """Seal an ordinary statement in the packed form (see `pgguard.ledger.packed`)."""
        return self.seal_packed_many([(session, text, outcome)])[0]

    def seal_packed_many(
        self, items: Iterable[tuple[Ref, Ref, PackedOutcome]]
    ) -> list[PackedEntry]:
        """`seal_packed` for each item, in order, in one loop."""
        sealed = seal_packed_many(
            self.chain_id,
            self._id_prefix,
            self._next_seq,
            (self._last_hash, self._last_entry_id),
            items,
        )
        if sealed:
            last = sealed[-1]
            self._next_seq = last.seq + 1
            self._last_hash = last.hash
            self._last_entry_id = last.entry_id
        return sealed
