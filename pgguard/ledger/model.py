"""Values of the query ledger: one `LedgerEntry` per recorded event, and the ledger's errors.

Owns: `LedgerEntry` (a statement, its outcome, a session start/end or an authentication
failure), its JSON form (`entry_content` / `entry_from_content`), `new_entry_id` and
`LedgerUnavailable`.

Invariants: entries are frozen and carry MASKED statement text only (the caller masks). Every
time is timezone-aware. The JSON form is made of JSON types only (str, int, float, bool, None,
list, dict with str keys), with strings PostgreSQL's ``jsonb`` accepts (no NUL, no lone
surrogates) and floats that survive a ``jsonb`` round trip, so the hash of an entry computed
before it is stored can be recomputed from what the database gives back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, cast

from pgguard.errors import PgGuardError

EntryKind = Literal[
    "statement", "outcome", "session_start", "session_end", "auth_failure", "integrity_alert"
]
ENTRY_KINDS: tuple[EntryKind, ...] = (
    "statement",
    "outcome",
    "session_start",
    "session_end",
    "auth_failure",
    "integrity_alert",  # pgguard found a row in its state it did not write (a forged decision)
)
APPROVER_KEYS = ("id", "name", "channel", "comment")

JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]


class LedgerUnavailable(PgGuardError):
    """The ledger could make an entry durable neither in the state database nor in its spool.

    A privileged statement whose decision cannot be recorded is refused (fail closed).
    """

    sqlstate = "58030"


def new_entry_id() -> str:
    """A unique entry id: 32 lowercase hex digits (128 random bits; uuid4() costs 10x more)."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One ledger event. Outcome fields are set on ``kind="outcome"`` entries only."""

    kind: EntryKind
    instance_id: str
    session_id: str
    received_at: datetime
    entry_id: str = field(default_factory=new_entry_id)
    decided_at: datetime | None = None
    agent: str = ""
    owner: str = ""
    client_address: str = ""
    application_name: str = ""
    database: str = ""
    upstream_role: str = ""
    statement: str = ""  # masked text, never raw
    fingerprint: str = ""
    categories: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    action: str = ""  # "allow" | "hold" | "deny" | ""
    request_id: str | None = None
    approvers: tuple[Mapping[str, str], ...] = ()  # each {"id", "name", "channel", "comment"}
    reason: str | None = None
    statement_entry_id: str | None = None  # the statement an outcome completes
    completed_at: datetime | None = None
    command_tag: str | None = None
    rows: int | None = None
    sqlstate: str | None = None
    error_message: str | None = None
    duration_ms: float | None = None
    detail: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ENTRY_KINDS:
            raise ValueError(f"unknown ledger entry kind {self.kind!r}")
        for name in ("received_at", "decided_at", "completed_at"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"ledger entry {name} must be timezone-aware")


def utc_iso(value: datetime) -> str:
    """UTC ISO 8601 with microseconds: the one spelling of a time in the ledger's JSON."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def entry_content(entry: LedgerEntry) -> dict[str, JsonValue]:
    """The entry as JSON-ready values (the part of a sealed entry that its hash covers)."""
    return {
        "entry_id": _text(entry.entry_id),
        "kind": entry.kind,
        "instance_id": _text(entry.instance_id),
        "session_id": _text(entry.session_id),
        "received_at": utc_iso(entry.received_at),
        "decided_at": _time(entry.decided_at),
        "agent": _text(entry.agent),
        "owner": _text(entry.owner),
        "client_address": _text(entry.client_address),
        "application_name": _text(entry.application_name),
        "database": _text(entry.database),
        "upstream_role": _text(entry.upstream_role),
        "statement": _text(entry.statement),
        "fingerprint": _text(entry.fingerprint),
        "categories": [_text(c) for c in entry.categories],
        "rule_ids": [_text(r) for r in entry.rule_ids],
        "action": _text(entry.action),
        "request_id": _optional_text(entry.request_id),
        "approvers": [
            {key: _text(str(a.get(key, ""))) for key in APPROVER_KEYS} for a in entry.approvers
        ],
        "reason": _optional_text(entry.reason),
        "statement_entry_id": _optional_text(entry.statement_entry_id),
        "completed_at": _time(entry.completed_at),
        "command_tag": _optional_text(entry.command_tag),
        "rows": entry.rows,
        "sqlstate": _optional_text(entry.sqlstate),
        "error_message": _optional_text(entry.error_message),
        "duration_ms": None if entry.duration_ms is None else _number(entry.duration_ms),
        "detail": {_text(str(k)): json_ready(v) for k, v in entry.detail.items()},
    }


def entry_from_content(content: Mapping[str, object]) -> LedgerEntry:
    """The inverse of `entry_content` (for entries read back from the spool or the database)."""
    duration = content.get("duration_ms")
    rows = content.get("rows")
    detail = content.get("detail")
    return LedgerEntry(
        entry_id=str(content["entry_id"]),
        kind=cast(EntryKind, content["kind"]),
        instance_id=str(content["instance_id"]),
        session_id=str(content["session_id"]),
        received_at=datetime.fromisoformat(str(content["received_at"])),
        decided_at=_parse_time(content.get("decided_at")),
        agent=str(content.get("agent", "")),
        owner=str(content.get("owner", "")),
        client_address=str(content.get("client_address", "")),
        application_name=str(content.get("application_name", "")),
        database=str(content.get("database", "")),
        upstream_role=str(content.get("upstream_role", "")),
        statement=str(content.get("statement", "")),
        fingerprint=str(content.get("fingerprint", "")),
        categories=tuple(str(c) for c in _list(content.get("categories"))),
        rule_ids=tuple(str(r) for r in _list(content.get("rule_ids"))),
        action=str(content.get("action", "")),
        request_id=_optional_str(content.get("request_id")),
        approvers=tuple(
            {key: str(a.get(key, "")) for key in APPROVER_KEYS}
            for a in _list(content.get("approvers"))
            if isinstance(a, dict)
        ),
        reason=_optional_str(content.get("reason")),
        statement_entry_id=_optional_str(content.get("statement_entry_id")),
        completed_at=_parse_time(content.get("completed_at")),
        command_tag=_optional_str(content.get("command_tag")),
        rows=rows if isinstance(rows, int) and not isinstance(rows, bool) else None,
        sqlstate=_optional_str(content.get("sqlstate")),
        error_message=_optional_str(content.get("error_message")),
        duration_ms=float(duration) if isinstance(duration, int | float) else None,
        detail=dict(detail) if isinstance(detail, dict) else {},
    )


def json_ready(value: object) -> JsonValue:
    """``value`` as JSON types jsonb keeps unchanged; anything unknown becomes its ``str``."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, datetime):
        return utc_iso(value) if value.utcoffset() is not None else _text(value.isoformat())
    if isinstance(value, Mapping):
        return {_text(str(k)): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [json_ready(v) for v in items]
    return _text(str(value))


def jsonb_text(value: str) -> str:
    """``value`` with what jsonb refuses (NUL, lone surrogates) replaced."""
    return _text(value)


def _text(value: str) -> str:
    # jsonb refuses NUL and lone surrogates; replace them so an entry is always storable.
    if value.isascii() and "\x00" not in value:
        return value
    cleaned = value.replace("\x00", "\ufffd")
    return cleaned.encode("utf-8", "replace").decode("utf-8")


def _optional_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _number(value: float) -> JsonValue:
    if not math.isfinite(value):
        return str(value)  # jsonb has no NaN or infinity
    if value.is_integer() and abs(value) >= 1e15:
        return int(value)  # jsonb prints these without a decimal point: they come back as ints
    return value


def _time(value: datetime | None) -> str | None:
    return None if value is None else utc_iso(value)


def _parse_time(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []
