"""Streaming the ledger out: flat records, JSON lines, CSV and OCSF events (asyncpg).

Owns: `records` (the rows of `reader.query_sql` as flat JSON-ready dicts, streamed through a
server-side cursor), `CSV_FIELDS`, `ocsf_event` (one record as an OCSF 1.1 *Datastore Activity*
event, class 6005) and `write` (records to a binary stream in one of the `FORMATS`).

Invariants: memory does not grow with the ledger - one cursor window (``prefetch`` rows) and one
output buffer at a time. A record has the fields of `LedgerRow.to_record` (the entry's fields
in the ledger's JSON spelling: times UTC ISO 8601 with microseconds), built straight from the
view's columns without the `LedgerEntry` round trip, which is what keeps an export above 50,000
entries/s. Errors writing the output (a closed pipe) propagate as `OSError` for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import operator
from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from typing import Protocol

import asyncpg
import orjson

from pgguard.ledger.reader import LedgerFilters, fetch_ahead, query_sql
from pgguard.ledger.store import OUTCOME_COLUMNS

FORMATS = ("jsonl", "csv", "ocsf")


class Sink(Protocol):
    """Where `write` writes (a binary file, stdout's buffer)."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


CSV_FIELDS = (
    "entry_id",
    "kind",
    "chain_id",
    "seq",
    "hash",
    "instance_id",
    "session_id",
    "received_at",
    "decided_at",
    "completed_at",
    "agent",
    "owner",
    "client_address",
    "application_name",
    "database",
    "upstream_role",
    "statement",
    "fingerprint",
    "categories",
    "rule_ids",
    "action",
    "request_id",
    "approvers",
    "reason",
    "statement_entry_id",
    "outcome_entry_id",
    "command_tag",
    "rows",
    "sqlstate",
    "error_message",
    "duration_ms",
    "detail",
)
_TIMES = ("received_at", "decided_at", "completed_at")


# A record's keys in sorted order: the JSON lines come out sorted without orjson sorting each.
RECORD_KEYS = tuple(sorted({*CSV_FIELDS, "chain_id", "seq", "hash"}))


async def records(
    conn: asyncpg.Connection,
    filters: LedgerFilters,
    *,
    schema: str = "pgguard",
    newest_first: bool = False,
    batch: int = 2000,
    raw_json: bool = False,
) -> AsyncGenerator[list[dict[str, object]], None]:
    """The matching entries as flat records, ``batch`` at a time, through a server-side cursor
    (a read-only transaction is open meanwhile); each fetch is sent before the batch before
    it is handed out, so the server reads the next batch while the caller writes this one.
    ``approvers`` and ``detail`` are passed through as the database's JSON: ``orjson.Fragment``
    objects, or with ``raw_json`` their text."""
    sql, args = query_sql(filters, schema=schema, newest_first=newest_first, select=_SELECT)
    fragments: dict[str, orjson.Fragment] = {}  # the few distinct texts of most entries
    async with conn.transaction(readonly=True):
        cursor = await conn.cursor(sql, *args)
        ahead = fetch_ahead(cursor, batch)
        try:
            while True:
                rows = await ahead
                if not rows:
                    return
                ahead = fetch_ahead(cursor, batch)
                await asyncio.sleep(0)  # the fetch is sent now, not when the caller next waits
                yield [_record(row, raw_json, fragments) for row in rows]
        finally:
            if not ahead.done():  # the caller stopped early (a closed pipe): let it finish
                await asyncio.wait([ahead])


def _column(key: str) -> str:
    if key in _TIMES:  # the ledger's spelling of a time, made by the server (cheaper there)
        return f"to_char(e.{key} AT TIME ZONE 'UTC', {_ISO}) AS {key}"
    if key in ("approvers", "detail"):
        return f"e.{key}::text AS {key}"
    if key == "outcome_entry_id":
        return f"NULL::text AS {key}"
    return f"e.{key}"


_ISO = '\'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"\''
# The view's columns in the record's (sorted) key order: a row's items are the record.
_SELECT = ", ".join(_column(key) for key in RECORD_KEYS)


_ROW_KEYS = (*RECORD_KEYS, "done")  # the columns of `_SELECT` and the outcome's content


def _record(
    row: asyncpg.Record, raw_json: bool, fragments: dict[str, orjson.Fragment]
) -> dict[str, object]:
    fields = dict(zip(_ROW_KEYS, row, strict=True))
    done = fields.pop("done")
    if not raw_json:  # jsonb text, passed through as it is
        for name in ("approvers", "detail"):
            text = fields[name]
            fragment = fragments.get(text)
            if fragment is None:
                fragment = orjson.Fragment(text)
                if len(fragments) < _FRAGMENTS_MAX:
                    fragments[text] = fragment
            fields[name] = fragment
    if done is not None:
        outcome = orjson.loads(done)["entry"]
        fields["outcome_entry_id"] = outcome["entry_id"]
        for name in OUTCOME_COLUMNS:
            fields[name] = outcome.get(name)
    return fields


_FRAGMENTS_MAX = 1000


def json_lines(objects: list[dict[str, object]], first_key: bytes) -> bytes:
    """``objects`` as JSON lines, the bytes of ``orjson.dumps(o)`` and a newline for each,
    where every object's first key is ``first_key``.

    One ``orjson.dumps`` of the whole list, cut at the commas between the objects, costs a fifth
    of one call per object. The cut is where ``},{"first_key":`` follows: inside a string
    orjson escapes every quote, and nested JSON here is either orjson's own (where no
    object has ``first_key``) or jsonb's text passed through as a `orjson.Fragment`,
    which has a space after each comma - so only the commas between the objects match. That
    every line is one object is checked (a newline is escaped in a string, and jsonb's text
    has none), and a batch that fails it is written one object at a time.
    """
    if not objects:
        return b""
    cut = b'},{"' + first_key + b'":'
    lines = orjson.dumps(objects)[1:-1].replace(cut, b'}\n{"' + first_key + b'":') + b"\n"
    if lines.count(b"\n") == len(objects):
        return lines
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    return b"".join([dumps(o, option=newline) for o in objects])


# The columns of a CSV row that hold lists (categories, rule_ids: text arrays, written as JSON),
# and those an outcome's content fills (JSON values: a list or an object is written as JSON).
_CSV_LISTS = tuple(i for i, name in enumerate(CSV_FIELDS) if name in ("categories", "rule_ids"))
_CSV_OUTCOME = tuple(i for i, name in enumerate(CSV_FIELDS) if name in OUTCOME_COLUMNS)
_csv_fields = operator.itemgetter(*CSV_FIELDS)


def _csv_rows(batch: list[dict[str, object]]) -> list[list[object]]:
    """The CSV rows of ``batch`` (records of `records` with ``raw_json``: approvers and detail
    are JSON text already, the other columns scalars but for the lists and the outcome's
    fields; None is written as an empty field by the csv module)."""
    arrays: dict[tuple[str, ...], object] = {}  # the few distinct lists, each dumped once
    rows = []
    for record in batch:
        row = list(_csv_fields(record))
        for i in _CSV_LISTS:
            key = tuple(row[i])
            text = arrays.get(key)
            if text is None:
                text = arrays[key] = _csv_value(row[i])
            row[i] = text
        if record["outcome_entry_id"] is not None:  # fields from the outcome's JSON
            for i in _CSV_OUTCOME:
                if isinstance(row[i], list | dict):
                    row[i] = _csv_value(row[i])
        rows.append(row)
    return rows


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    return value


# --- OCSF -------------------------------------------------------------------------------------

OCSF_VERSION = "1.1.0"
_CLASS_UID = 6005  # Datastore Activity
_CATEGORY_UID = 6  # Application Activity
# activity_id of the class: 1 Read, 2 Update, 3 Connect, 4 Query, 5 Write, 6 Create, 7 Delete
_ACTIVITIES = {1: "Read", 2: "Update", 3: "Connect", 4: "Query", 5: "Write", 6: "Create"}
_ACTIVITY_OF_CATEGORY = (
    ("export", 1),
    ("ddl", 6),
    ("destructive", 7),
    ("write", 5),
    ("read", 4),
)


def _activity(record: dict[str, object]) -> int:
    kind = record["kind"]
    if kind in ("session_start", "session_end", "auth_failure"):
        return 3
    categories = record.get("categories") or []
    assert isinstance(categories, list)
    for category, activity in _ACTIVITY_OF_CATEGORY:
        if category in categories:
            return activity
    return 99


def _epoch_ms(iso: object) -> int | None:
    return None if iso is None else int(datetime.fromisoformat(str(iso)).timestamp() * 1000)


def ocsf_event(record: dict[str, object]) -> dict[str, object]:
    """One ledger record as an OCSF Datastore Activity event; pgguard's own fields (chain
    position, hash, classification, approval) go to ``unmapped``."""
    activity = _activity(record)
    failed = record.get("sqlstate") is not None or record["kind"] == "auth_failure"
    refused = record.get("action") == "deny"
    address = str(record.get("client_address") or "")
    ip, _, port = address.rpartition(":")
    event: dict[str, object] = {
        "class_uid": _CLASS_UID,
        "class_name": "Datastore Activity",
        "category_uid": _CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": activity,
        "activity_name": _ACTIVITIES.get(activity, str(record["kind"])),
        "type_uid": _CLASS_UID * 100 + activity,
        "time": _epoch_ms(record["received_at"]),
        "severity_id": 3 if refused or failed else 1,  # 3 Medium, 1 Informational
        "status_id": 2 if failed or refused else 1,  # 1 Success, 2 Failure
        "status": "Failure" if failed or refused else "Success",
        "action_id": 2 if refused else 1,  # 1 Allowed, 2 Denied
        "action": "Denied" if refused else "Allowed",
        "message": record.get("statement") or record["kind"],
        "metadata": {
            "version": OCSF_VERSION,
            "uid": record["entry_id"],
            "product": {"name": "pgguard", "vendor_name": "pgguard"},
            "log_name": "ledger",
        },
        "actor": {
            "user": {"name": record.get("agent"), "email_addr": record.get("owner")},
            "session": {"uid": record.get("session_id")},
            "app_name": record.get("application_name"),
        },
        "src_endpoint": {"ip": ip or address, "port": int(port) if port.isdigit() else None},
        "database": {"name": record.get("database"), "type_id": 99, "type": "PostgreSQL"},
        "query_info": {"query_string": record.get("statement")},
        "unmapped": {
            key: record.get(key)
            for key in (
                "chain_id",
                "seq",
                "hash",
                "kind",
                "instance_id",
                "upstream_role",
                "fingerprint",
                "categories",
                "rule_ids",
                "action",
                "request_id",
                "approvers",
                "reason",
                "decided_at",
                "completed_at",
                "command_tag",
                "rows",
                "sqlstate",
                "error_message",
                "outcome_entry_id",
                "statement_entry_id",
                "detail",
            )
        },
    }
    if record.get("duration_ms") is not None:
        event["duration"] = round(float(record["duration_ms"]))  # type: ignore[arg-type]
    return event


# --- writing ----------------------------------------------------------------------------------


async def write(
    batches: AsyncGenerator[list[dict[str, object]], None],
    out: Sink,
    fmt: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the records of ``batches`` to ``out`` in ``fmt``, one write per batch; the number
    written. ``progress`` gets the count after each batch."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    count = 0
    text = io.StringIO()
    writer = csv.writer(text) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_FIELDS)
    async with contextlib.aclosing(batches):  # its cursor ends here also when a write fails
        async for batch in batches:
            if writer is not None:
                writer.writerows(_csv_rows(batch))
                out.write(text.getvalue().encode("utf-8"))
                text.seek(0)
                text.truncate()
            elif fmt == "ocsf":
                out.write(json_lines([ocsf_event(r) for r in batch], b"class_uid"))
            else:
                out.write(json_lines(batch, b"action"))
            count += len(batch)
            if progress is not None:
                progress(count)
    if writer is not None and text.tell():
        out.write(text.getvalue().encode("utf-8"))
    out.flush()
    return count
