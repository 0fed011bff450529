"""Packed entries: the compact, batched form of ordinary statements in the ledger.

Owns: `PackedEntry`, `session_record`, `text_record`, `record_ref`, `seal_packed_many` (used by
`Chain`), `pack_body`, `unpack`, `PACKED_FIELDS`.

Why: an ordinary statement (allowed, no approval) is most of what the proxy sees; a full entry
(a 30-column row with a jsonb envelope and its indexes) costs the state database far more CPU
than the statement it records. So ordinary statements are sealed as a short JSON array and
shipped many to a row of ``ledger_packs``; the view ``ledger`` shows them as ordinary rows.

A packed entry is the array ``[seq, entry_id, prev_entry_id, prev_hash, session_ref, text_ref,
received_us, completed_us, command_tag, rows, sqlstate, error_message, duration_us]`` (times
are microseconds since the Unix epoch, UTC). What repeats - the session's fields, the masked
statement with its classification - is a *record* stored once per pack and named by its ref,
the first 32 hex digits of the sha256 of its canonical JSON: the entry's hash covers the ref,
and the ref covers the record. The hash is ``sha256(prev_hash_ascii + canonical array)``, in the
same chain as full entries (full envelopes are JSON objects, packed entries arrays: the two
can never be mistaken for each other).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from pgguard.ledger.model import JsonValue

PACKED_FIELDS = (
    "seq",
    "entry_id",
    "prev_entry_id",
    "prev_hash",
    "session_ref",
    "text_ref",
    "received_us",
    "completed_us",
    "command_tag",
    "rows",
    "sqlstate",
    "error_message",
    "duration_us",
)
SESSION_KEYS = (
    "instance_id",
    "session_id",
    "agent",
    "owner",
    "client_address",
    "application_name",
    "database",
    "upstream_role",
)

Ref = tuple[str, Mapping[str, JsonValue]]  # (ref, record)
# (received_us, completed_us, command_tag, rows, sqlstate, error_message)
PackedOutcome = tuple[int, int, str | None, int | None, str | None, str | None]


def epoch_us(moment: float) -> int:
    """A ``time.time()`` value as whole microseconds since the epoch."""
    return round(moment * 1e6)


class PackedEntry:
    """One sealed ordinary statement; ``canonical`` is exactly what ``hash`` covers.

    A plain slotted class rather than a frozen dataclass: one is built per statement, and the
    frozen ``__init__`` costs several times more. Treat it as immutable.
    """

    __slots__ = (
        "canonical",
        "chain_id",
        "entry_id",
        "hash",
        "received_us",
        "seq",
        "session",
        "text",
    )

    def __init__(
        self,
        chain_id: str,
        seq: int,
        entry_id: str,
        hash: str,
        canonical: bytes,
        session: Ref,
        text: Ref,
        received_us: int,
    ) -> None:
        self.chain_id = chain_id
        self.seq = seq
        self.entry_id = entry_id
        self.hash = hash
        self.canonical = canonical
        self.session = session
        self.text = text
        self.received_us = received_us

    def spool_line(self) -> bytes:
        """One JSON line for the spool: the entry with the records it names."""
        refs = {self.session[0]: self.session[1], self.text[0]: self.text[1]}
        return (
            b'{"hash":"'
            + self.hash.encode("ascii")
            + b'","chain_id":'
            + orjson.dumps(self.chain_id)
            + b',"packed":'
            + self.canonical
            + b',"refs":'
            + orjson.dumps(refs, option=orjson.OPT_SORT_KEYS)
            + b"}\n"
        )


def record_ref(record: Mapping[str, JsonValue]) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def session_record(fields: Mapping[str, str]) -> Ref:
    """The ref'd record of a session's fields (values must already be jsonb-clean text)."""
    record: dict[str, JsonValue] = {key: fields[key] for key in SESSION_KEYS}
    return record_ref(record), record


def text_record(
    statement: str,
    fingerprint: str,
    categories: Sequence[str],
    rule_ids: Sequence[str],
    action: str,
) -> Ref:
    """The ref'd record of a masked statement and its classification."""
    record: dict[str, JsonValue] = {
        "statement": statement,
        "fingerprint": fingerprint,
        "categories": list(categories),
        "rule_ids": list(rule_ids),
        "action": action,
    }
    return record_ref(record), record


def seal_packed_many(
    chain_id: str,
    id_prefix: str,
    seq: int,
    prev: tuple[str, str],
    items: Iterable[tuple[Ref, Ref, PackedOutcome]],
) -> list[PackedEntry]:
    """Seal ``items`` in order, the first after ``prev``, with seqs from ``seq`` on.

    One loop with everything in local variables: this runs for every ordinary statement.
    """
    prev_hash, prev_entry_id = prev
    dumps = orjson.dumps
    sha256 = hashlib.sha256
    sealed: list[PackedEntry] = []
    append = sealed.append
    for session, text, (received_us, completed_us, tag, rows, sqlstate, error) in items:
        # The chain's 16 random hex digits and the seq: as unique as a random id, without a
        # system call per statement.
        entry_id = f"{id_prefix}{seq:016x}"
        canonical = dumps(
            [
                seq,
                entry_id,
                prev_entry_id,
                prev_hash,
                session[0],
                text[0],
                received_us,
                completed_us,
                tag,
                rows,
                sqlstate,
                error,
                completed_us - received_us,
            ]
        )
        prev_hash = sha256(prev_hash.encode("ascii") + canonical).hexdigest()
        append(
            PackedEntry(chain_id, seq, entry_id, prev_hash, canonical, session, text, received_us)
        )
        prev_entry_id = entry_id
        seq += 1
    return sealed


def pack_body(entries: Sequence[PackedEntry]) -> str:
    """The ``ledger_packs.body`` of ``entries`` (one chain, seq order)."""
    # Entries of one session and statement share their record objects: collect each once.
    records = {id(e.session): e.session for e in entries}
    records.update({id(e.text): e.text for e in entries})
    refs: dict[str, Mapping[str, JsonValue]] = dict(records.values())
    body = (
        b'{"entries":['
        + b",".join([e.canonical for e in entries])
        + b'],"hashes":'
        + orjson.dumps([e.hash for e in entries])
        + b',"refs":'
        + orjson.dumps(refs, option=orjson.OPT_SORT_KEYS)
        + b"}"
    )
    return body.decode("utf-8")


@dataclass(frozen=True, slots=True)
class Unpacked:
    """One entry read back from a pack: its stored hash, the canonical bytes to check it with,
    and its fields (records resolved; None where the pack does not hold the named record)."""

    seq: int
    entry_id: str
    prev_entry_id: str
    prev_hash: str
    hash: str
    canonical: bytes
    fields: list[object]
    session: Mapping[str, object] | None
    text: Mapping[str, object] | None

    refs_ok: bool  # both records are in the pack and still match the refs the entry sealed


def unpack(body: str | bytes) -> list[Unpacked]:
    """The entries of a pack body, in stored order; ValueError when it is not a pack (a body
    someone wrote by hand included: too deep to re-encode, numbers beyond 64 bits, ...)."""
    try:
        return _unpack(body)
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"pack body cannot be read back: {exc}") from None


def _unpack(body: str | bytes) -> list[Unpacked]:
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError("pack body is not an object")
    entries, hashes, refs = data.get("entries"), data.get("hashes"), data.get("refs")
    if not isinstance(entries, list) or not isinstance(hashes, list) or not isinstance(refs, dict):
        raise ValueError("pack body lacks entries, hashes or refs")
    if len(entries) != len(hashes):
        raise ValueError("pack body has a different number of entries and hashes")
    return [
        _unpack_one(fields, stored, refs) for fields, stored in zip(entries, hashes, strict=True)
    ]


def _unpack_one(fields: object, stored: object, refs: Mapping[str, object]) -> Unpacked:
    if not isinstance(fields, list) or len(fields) != len(PACKED_FIELDS):
        raise ValueError("a packed entry has the wrong shape")
    seq = fields[0]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("a packed entry has no seq")
    session, text = _resolved(refs, fields[4]), _resolved(refs, fields[5])
    return Unpacked(
        seq=seq,
        entry_id=str(fields[1]),
        prev_entry_id=str(fields[2]),
        prev_hash=str(fields[3]),
        hash=str(stored),
        canonical=orjson.dumps(fields),
        fields=fields,
        session=session,
        text=text,
        refs_ok=(
            session is not None
            and text is not None
            and record_ref(session) == fields[4]  # type: ignore[arg-type]
            and record_ref(text) == fields[5]  # type: ignore[arg-type]
        ),
    )


def _resolved(refs: Mapping[str, object], ref: object) -> Mapping[str, object] | None:
    record = refs.get(ref) if isinstance(ref, str) else None
    return record if isinstance(record, dict) else None
