"""Signed checkpoints of a chain's head: what makes the public hash chain unforgeable (pure).

Owns: `Checkpoint`, `SignedCheckpoint`, `CheckpointSigner`, `KeyRing`, `key_id`,
`CheckpointSchedule`, `parse_signed`.

The per-entry hash chain is public sha256: anyone who can write the state database can rewrite
an entry and recompute every later hash. So pgguard signs, with an Ed25519 key the database never
sees, a *checkpoint* of each chain's head every ``checkpoint_entries`` entries or
``checkpoint_seconds`` seconds (whichever first; `CheckpointSchedule`), and a final one when the
chain is closed. The head hash covers every entry before it through the chain's links, so one
signature authenticates them all, and the cost per statement does not grow.

A checkpoint is the JSON object ``{"ledger", "chain_id", "seq", "head_hash", "head_entry_id",
"signed_at", "instance_id", "key_id", "final"}``, where ``ledger`` is the state schema the chain
is recorded in (anchor files may serve several); what is signed is `DOMAIN` followed by its
canonical bytes (sorted keys, compact, UTF-8). ``key_id`` is the first 32 hex digits of the
sha256 of the raw 32-byte public key; it picks the key to verify with, the signature proves it.

Invariants: the payload bytes are the single source of truth - they are what the signature
covers and what the table, the spool and the anchor file store; readers take every field from a
payload whose signature verified, never from a column.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"pgguard ledger checkpoint v1\n"  # never valid as anything else this key could sign
FIELDS = frozenset(
    {
        "ledger",
        "chain_id",
        "seq",
        "head_hash",
        "head_entry_id",
        "signed_at",
        "instance_id",
        "key_id",
        "final",
    }
)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The id a checkpoint names its key by: sha256 of the raw public key, 32 hex digits."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The signed statement "chain ``chain_id`` had ``seq`` entries, the last ``head_hash``"."""

    ledger: str
    chain_id: str
    seq: int
    head_hash: str
    head_entry_id: str
    signed_at: str  # UTC, ISO 8601 with microseconds
    instance_id: str
    key_id: str
    final: bool

    def payload(self) -> bytes:
        return orjson.dumps(
            {
                "ledger": self.ledger,
                "chain_id": self.chain_id,
                "seq": self.seq,
                "head_hash": self.head_hash,
                "head_entry_id": self.head_entry_id,
                "signed_at": self.signed_at,
                "instance_id": self.instance_id,
                "key_id": self.key_id,
                "final": self.final,
            },
            option=orjson.OPT_SORT_KEYS,
        )


class SignedCheckpoint:
    """A checkpoint with its signature; queued, spooled and stored like an entry of its chain.

    ``seq`` is the head's seq, so in a chain's stream the checkpoint sorts right after the entry
    it signs. A plain slotted class (no ``__eq__``): the writer finds it in its queue by identity.
    """

    __slots__ = ("chain_id", "checkpoint", "payload", "seq", "signature")

    def __init__(self, checkpoint: Checkpoint, payload: bytes, signature: bytes) -> None:
        self.checkpoint = checkpoint
        self.chain_id = checkpoint.chain_id
        self.seq = checkpoint.seq
        self.payload = payload
        self.signature = signature

    def line(self) -> bytes:
        """One JSON line (spool and anchor file): ``{"checkpoint": {...}, "signature": b64}``."""
        return (
            b'{"checkpoint":'
            + self.payload
            + b',"signature":"'
            + base64.b64encode(self.signature)
            + b'"}\n'
        )

    spool_line = line

    def signature_text(self) -> str:
        return base64.b64encode(self.signature).decode("ascii")


def parse_signed(record: Mapping[str, object]) -> SignedCheckpoint:
    """A `SignedCheckpoint` from a parsed line (`SignedCheckpoint.line`); ValueError if it is
    not one. The signature is NOT checked here: see `KeyRing.check`."""
    body, signature = record.get("checkpoint"), record.get("signature")
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise ValueError("not a signed checkpoint")
    return from_stored(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), signature)


def from_stored(payload: bytes | str, signature: str) -> SignedCheckpoint:
    """A `SignedCheckpoint` from its payload bytes and base64 signature; ValueError if either is
    malformed. The signature is NOT checked here: see `KeyRing.check`."""
    raw = payload.encode("utf-8") if isinstance(payload, str) else payload
    try:
        body = orjson.loads(raw)
        decoded = base64.b64decode(signature, validate=True)
    except (orjson.JSONDecodeError, binascii.Error) as exc:
        raise ValueError(f"checkpoint is unreadable: {exc}") from None
    if not isinstance(body, dict) or set(body) != FIELDS:
        raise ValueError("checkpoint has the wrong fields")
    seq, final = body["seq"], body["final"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(final, bool):
        raise ValueError("checkpoint has the wrong field types")
    checkpoint = Checkpoint(
        ledger=_text(body, "ledger"),
        chain_id=_text(body, "chain_id"),
        seq=seq,
        head_hash=_text(body, "head_hash"),
        head_entry_id=_text(body, "head_entry_id"),
        signed_at=_text(body, "signed_at"),
        instance_id=_text(body, "instance_id"),
        key_id=_text(body, "key_id"),
        final=final,
    )
    return SignedCheckpoint(checkpoint, raw, decoded)


def _text(body: Mapping[str, object], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise ValueError(f"checkpoint field {name} is not text")
    return value


class CheckpointSigner:
    """Signs checkpoints of one instance's chains with its private key."""

    __slots__ = ("_key", "instance_id", "key_id", "ledger")

    def __init__(self, private_key: Ed25519PrivateKey, instance_id: str, ledger: str) -> None:
        self._key = private_key
        self.instance_id = instance_id
        self.ledger = ledger
        self.key_id = key_id(private_key.public_key())

    def sign(
        self,
        chain_id: str,
        seq: int,
        head_hash: str,
        head_entry_id: str,
        *,
        final: bool,
        now: datetime | None = None,
    ) -> SignedCheckpoint:
        checkpoint = Checkpoint(
            ledger=self.ledger,
            chain_id=chain_id,
            seq=seq,
            head_hash=head_hash,
            head_entry_id=head_entry_id,
            signed_at=(now or datetime.now(UTC)).astimezone(UTC).isoformat(),
            instance_id=self.instance_id,
            key_id=self.key_id,
            final=final,
        )
        payload = checkpoint.payload()
        return SignedCheckpoint(checkpoint, payload, self._key.sign(DOMAIN + payload))


class KeyRing:
    """The public keys an auditor trusts, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, signed: SignedCheckpoint) -> str | None:
        """None when ``signed`` verifies with a trusted key; else what is wrong, in words."""
        key = self._keys.get(signed.checkpoint.key_id)
        if key is None:
            return (
                f"signed with key {signed.checkpoint.key_id}, which is not among the "
                f"{len(self._keys)} public key(s) given"
            )
        try:
            key.verify(signed.signature, DOMAIN + signed.payload)
        except InvalidSignature:
            return f"its signature does not verify with key {signed.checkpoint.key_id}"
        return None


class CheckpointSchedule:
    """When a chain's head is due for a checkpoint: ``every_entries`` entries or
    ``every_seconds`` seconds after the last one, whichever comes first, and only when the head
    moved. Times are ``time.monotonic()`` values."""

    __slots__ = ("_at", "_seq", "every_entries", "every_seconds")

    def __init__(self, every_entries: int, every_seconds: float, now: float) -> None:
        self.every_entries = every_entries
        self.every_seconds = every_seconds
        self._seq = 0
        self._at = now

    @property
    def last_seq(self) -> int:
        return self._seq

    def due(self, head_seq: int, now: float) -> bool:
        if head_seq <= self._seq:
            return False
        return head_seq - self._seq >= self.every_entries or now - self._at >= self.every_seconds

    def signed(self, seq: int, now: float) -> None:
        self._seq = seq
        self._at = now
