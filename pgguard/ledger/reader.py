"""Reading the ledger back: filtered streaming queries and chain verification (asyncpg).

Owns: `LedgerFilters`, `LedgerRow`, `query`, `verify`, `VerifyReport` (and re-exports `Problem`).

`query` streams statement-level rows (every kind but ``outcome``) of the ``ledger`` view, with
only the filters given as (indexed) conditions (`query_sql`), each joined with the outcome
entry that completes it, through a server-side cursor in a transaction, so an export of millions
of rows never holds more than a prefetch window. Rows are built from the hashed ``content``.

`verify` walks every chain in seq order, one row in memory at a time, recomputing each hash from
``content`` (full entries), from the pack (packs) or from the columns (expanded rows, packed
again), and checking the columns, seq and links. Problems are reported by entry id:
``modified`` (content does not match its hash, a column disagrees with the content, or an entry
was rewritten and rehashed so its successor no longer links to it), ``deleted`` (a seq gap; the
id is the missing predecessor's, as its successor recorded it), ``inserted`` (a row that does not
link to its predecessor), ``reordered`` (a row sealed at another seq or chain than where it is).
What the hash checks cannot see on their own: anything done by someone who rewrites hashes too.
Given the public keys (``keys``), `verify` also checks the signed checkpoints of
``ledger_checkpoints`` and of the anchor files against the same walk (`pgguard.ledger.audit`),
which catches a rehashed rewrite, a cut tail and - with the anchor files - a deleted chain or
deleted checkpoints; problems it finds there are reported with the same `Problem`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
import orjson

from pgguard.approvals.schema import checked_schema
from pgguard.ledger.audit import CheckpointAudit, StoredCheckpoint
from pgguard.ledger.chain import GENESIS, canonical_bytes, envelope_hash
from pgguard.ledger.checkpoint import KeyRing, SignedCheckpoint
from pgguard.ledger.model import LedgerEntry, entry_content, entry_from_content
from pgguard.ledger.packed import SESSION_KEYS, Unpacked, record_ref, unpack
from pgguard.ledger.problems import Problem, ProblemKind
from pgguard.ledger.prune import Cut, prune_bases
from pgguard.ledger.store import (
    CHECKPOINT_COLUMNS,
    COLUMNS,
    JSONB_COLUMNS,
    OUTCOME_COLUMNS,
    content_row_values,
)

__all__ = [
    "ChainHead",
    "LedgerFilters",
    "LedgerRow",
    "Problem",
    "ProblemKind",
    "VerifyReport",
    "query",
    "verify",
]


@dataclass(frozen=True, slots=True)
class LedgerFilters:
    """Which rows `query` returns; None means no restriction."""

    agent: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    category: str | None = None
    action: str | None = None
    approver: str | None = None  # an approver's id or name
    request_id: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger entry with its place in its chain, and its outcome entry if it has one."""

    entry: LedgerEntry
    chain_id: str
    seq: int
    hash: str
    outcome: LedgerEntry | None = None

    def to_record(self) -> dict[str, object]:
        """Flat JSON-ready fields: the entry's, its chain position, and the outcome folded in."""
        record: dict[str, object] = {"chain_id": self.chain_id, "seq": self.seq, "hash": self.hash}
        record.update(entry_content(self.entry))
        outcome = self.outcome
        record["outcome_entry_id"] = outcome.entry_id if outcome is not None else None
        if outcome is not None:
            done = entry_content(outcome)
            for name in OUTCOME_COLUMNS:
                record[name] = done[name]
        return record


@dataclass(frozen=True, slots=True)
class ChainHead:
    entries: int
    last_seq: int
    head_hash: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    entries: int
    chains: dict[str, ChainHead] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    signed: bool = False  # checkpoints were checked (public keys were given)
    checkpoints: int = 0  # valid signed checkpoints, from the table and the anchor files
    other_ledgers: int = 0  # anchored checkpoints of another ledger (schema), set aside
    pruned: dict[str, Cut] = field(default_factory=dict)  # chains cut by `pgguard ledger prune`

    @property
    def ok(self) -> bool:
        return not self.problems


async def query(
    conn: asyncpg.Connection,
    filters: LedgerFilters,
    *,
    schema: str = "pgguard",
    newest_first: bool = True,
    prefetch: int = 500,
) -> AsyncIterator[LedgerRow]:
    """Stream the rows matching ``filters`` (a transaction is opened on ``conn`` meanwhile)."""
    async with conn.transaction(readonly=True):
        sparse = await sparse_category(conn, filters, schema)
        sql, args = query_sql(filters, schema=schema, newest_first=newest_first, sparse=sparse)
        async for record in conn.cursor(sql, *args, prefetch=prefetch):
            done = record["done"]
            yield LedgerRow(
                entry=_entry_from_view(record),
                chain_id=record["chain_id"],
                seq=record["seq"],
                hash=record["hash"],
                outcome=None if done is None else entry_from_content(json.loads(done)["entry"]),
            )


SPARSE = 5000  # fewer matches of a category than this in a table: find them all and sort


async def sparse_category(
    conn: asyncpg.Connection, filters: LedgerFilters, schema: str
) -> tuple[bool, bool]:
    """For full entries and for ordinary (packed) ones: whether a ``--category`` with a
    ``--limit`` matches so few of them (``export`` among ordinary statements, ``read`` among
    full entries) that they are best found through the categories index and sorted - walking
    the time index newest first would read every row to find none."""
    if filters.category is None or filters.limit is None:
        return False, False
    quoted = checked_schema(schema)
    found = []
    for table in ("ledger_entries", "ledger_rows"):
        found.append(
            await conn.fetchval(
                f"SELECT count(*) FROM (SELECT 1 FROM {quoted}.{table} "
                f"WHERE categories @> ARRAY[$1::text] LIMIT {SPARSE}) s",
                filters.category,
            )
        )
    return found[0] < SPARSE, found[1] < SPARSE


def query_sql(
    filters: LedgerFilters,
    *,
    schema: str = "pgguard",
    newest_first: bool = True,
    sparse: tuple[bool, bool] = (False, False),
    select: str | None = None,
) -> tuple[str, list[object]]:
    """The SQL and arguments of `query`: only the filters given become conditions, each one an
    index can serve (``ledger_entries`` and ``ledger_rows`` index time, agent, session, action,
    categories, request and approvers), in the indexes' order. With a ``limit``, full and
    packed entries are each limited first (``sparse``: sorted rather than read in index order,
    see `sparse_category`), and only the rows returned are joined with their outcomes.
    ``select``: the columns of ``e`` (the view) to return instead of `LedgerRow`'s; the
    outcome's ``content`` comes last, as ``done``."""
    quoted = checked_schema(schema)
    columns = select or _VIEW_COLUMNS
    order = "DESC" if newest_first else "ASC"
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    where = ["e.kind <> 'outcome'"]
    if filters.agent is not None:
        where.append(f"e.agent = {arg(filters.agent)}")
    if filters.since is not None:
        where.append(f"e.received_at >= {arg(filters.since)}")
    if filters.until is not None:
        where.append(f"e.received_at < {arg(filters.until)}")
    if filters.category is not None:
        where.append(f"e.categories @> ARRAY[{arg(filters.category)}::text]")
    if filters.action is not None:
        where.append(f"e.action = {arg(filters.action)}")
    if filters.approver is not None:
        by_id = arg(json.dumps([{"id": filters.approver}]))
        by_name = arg(json.dumps([{"name": filters.approver}]))
        where.append(f"(e.approvers @> {by_id}::jsonb OR e.approvers @> {by_name}::jsonb)")
    if filters.request_id is not None:
        where.append(f"e.request_id = {arg(filters.request_id)}")
    conditions = " AND ".join(where)

    def ordered(by: str, *, unindexed: bool = False) -> str:
        shift = _UNINDEXED if unindexed else ""
        return f"ORDER BY {by}received_at{shift} {order}, {by}chain_id {order}, {by}seq {order}"

    outcome = (
        f"LEFT JOIN LATERAL (SELECT x.content FROM {quoted}.ledger_entries x WHERE NOT e.packed "
        "AND x.statement_entry_id = e.entry_id AND x.kind = 'outcome' "
        "ORDER BY x.received_at LIMIT 1) o ON true"
    )
    if filters.limit is None:
        sql = (
            f"SELECT {columns}, o.content::text AS done FROM {quoted}.ledger e {outcome} "
            f"WHERE {conditions} {ordered('e.')}"
        )
        return sql, args
    limit = arg(filters.limit)
    # `packed` is a constant of each branch of the view: each part keeps its own branches only.
    parts = [
        f"(SELECT * FROM {quoted}.ledger e WHERE {packed} AND {conditions} "
        f"{ordered('e.', unindexed=few)} LIMIT {limit})"
        for packed, few in (("NOT e.packed", sparse[0]), ("e.packed", sparse[1]))
    ]
    sql = (
        f"SELECT {columns}, o.content::text AS done "
        f"FROM ({' UNION ALL '.join(parts)}) e {outcome} {ordered('e.')} LIMIT {limit}"
    )
    return sql, args


# Orders by the same value, but not by an index's order: the planner then finds the matches
# through the other indexes and sorts them (see `sparse_category`).
_UNINDEXED = " + interval '0 s'"

# The entry's own fields, in the table's order (between its chain position and ``content``).
_ENTRY_FIELDS = COLUMNS[COLUMNS.index("entry_id") : COLUMNS.index("content")]
_VIEW_COLUMNS = ", ".join(
    ["e.chain_id", "e.seq", "e.hash"]
    + [f"e.{c}::text AS {c}" if c in ("approvers", "detail") else f"e.{c}" for c in _ENTRY_FIELDS]
)


def _entry_from_view(record: asyncpg.Record) -> LedgerEntry:
    """An entry from a row of the ``ledger`` view (full and packed entries alike)."""
    fields: dict[str, object] = {}
    for name in _ENTRY_FIELDS:
        value = record[name]
        if name in JSONB_COLUMNS:
            value = json.loads(value) if value is not None else None
        if value is None:
            value = _EMPTY.get(name)
        fields[name] = tuple(value) if name in _SEQUENCES else value
    return LedgerEntry(**fields)  # type: ignore[arg-type]


# A NULL in the view (a field the kind of entry does not have) becomes the field's default.
_EMPTY: dict[str, object] = {
    f.name: f.default
    for f in dataclasses.fields(LedgerEntry)
    if f.default is not dataclasses.MISSING and f.default is not None
}
_EMPTY["detail"] = {}
_SEQUENCES = frozenset({"categories", "rule_ids", "approvers"})


async def verify(
    conn: asyncpg.Connection,
    *,
    schema: str = "pgguard",
    keys: KeyRing | None = None,
    anchors: Sequence[SignedCheckpoint] | None = None,
    open_grace: float = 10.0,
    now: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every chain; the report lists each problem by entry id.

    Full entries (``ledger_entries``), expanded packed ones (``ledger_rows``, each re-packed
    to check its hash) and packs not expanded yet (``ledger_packs``) are walked together in
    (chain, seq) order, two batches of rows (`WALK_BATCH`) and a few packs in memory at a
    time; ``progress`` is called with the number of entries walked so far, every
    `PROGRESS_EVERY` entries. With ``keys``, the walk is
    also checked against the signed checkpoints (the table's and ``anchors``, the lines of the
    anchor files; None: no anchor file); ``open_grace`` (seconds) is how young an open chain's
    unsigned tail may be to be a warning rather than a problem (twice ``checkpoint_seconds``).
    """
    if anchors is not None and keys is None:
        raise ValueError("checking anchors needs the public keys")
    quoted = checked_schema(schema)
    walker = _Walker()
    async with (
        conn.transaction(readonly=True, isolation="repeatable_read"),
        contextlib.AsyncExitStack() as stack,  # closes the prefetching stream before the end
    ):
        walker.bases = await prune_bases(conn, schema)
        if keys is not None:
            walker.audit = CheckpointAudit(
                keys,
                await _stored_checkpoints(conn, quoted),
                anchors or (),
                ledger=schema,
                anchored=anchors is not None,
                open_grace=open_grace,
                now=time.time() if now is None else now,
                pruned={
                    c: (cut.seq, cut.head_hash, cut.head_entry_id)
                    for c, cut in walker.bases.items()
                },
                report=walker.problems.append,
                warn=walker.warnings.append,
            )
        turns = _Turns()
        rows = _prefetched(conn, _walk_sql(quoted), WALK_BATCH, turns)
        stack.push_async_callback(rows.aclose)
        packed = _one_at_a_time(
            _packed_items(
                _batches(
                    conn,
                    f"SELECT chain_id, first_seq, last_seq, body FROM {quoted}.ledger_packs "
                    "ORDER BY chain_id, first_seq",
                    20,
                    turns,
                ),
                walker,
            )
        )
        await _merge_walk(walker, rows, packed, progress)
    if walker.audit is not None:
        walker.audit.finish()
    return VerifyReport(
        entries=walker.entries,
        chains=walker.chain_heads(),
        problems=walker.problems,
        warnings=walker.warnings,
        signed=walker.audit is not None,
        checkpoints=walker.audit.checkpoints if walker.audit is not None else 0,
        other_ledgers=walker.audit.other_ledgers if walker.audit is not None else 0,
        pruned=walker.bases,
    )


async def _stored_checkpoints(conn: asyncpg.Connection, quoted: str) -> list[StoredCheckpoint]:
    """Every row of ``ledger_checkpoints`` (none when a ledger predates the table)."""
    table = f"{quoted}.ledger_checkpoints"
    if await conn.fetchval("SELECT to_regclass($1)::text", table) is None:
        return []
    rows = await conn.fetch(
        f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM {table} ORDER BY chain_id, seq, final"
    )
    return [StoredCheckpoint(**dict(row)) for row in rows]


async def _packed_items(
    packs: AsyncIterable[list[asyncpg.Record]], walker: _Walker
) -> AsyncIterator[tuple[str, Unpacked]]:
    """Each pack's entries in seq order; entries out of their stored place are reported."""
    async for batch in packs:
        for item in _pack_entries(batch, walker):
            yield item


def _pack_entries(batch: list[asyncpg.Record], walker: _Walker) -> Iterator[tuple[str, Unpacked]]:
    for pack in batch:
        chain_id = pack["chain_id"]
        try:
            items = unpack(pack["body"])
        except ValueError as exc:
            walker.report(
                f"pack {chain_id}#{pack['first_seq']}",
                chain_id,
                pack["first_seq"],
                "modified",
                f"pack #{pack['first_seq']}..#{pack['last_seq']} is unreadable: {exc}",
            )
            continue
        in_order = sorted(items, key=lambda i: i.seq)
        for stored, expected in zip(items, in_order, strict=True):
            if stored is not expected:
                walker.report(
                    stored.entry_id,
                    chain_id,
                    stored.seq,
                    "reordered",
                    f"sealed as #{stored.seq}, stored in the place of #{expected.seq}",
                )
                walker.displaced.add(stored.entry_id)
        for item in in_order:
            if not pack["first_seq"] <= item.seq <= pack["last_seq"]:
                walker.report(
                    item.entry_id,
                    chain_id,
                    item.seq,
                    "reordered",
                    f"sealed as #{item.seq}, stored in the pack of "
                    f"#{pack['first_seq']}..#{pack['last_seq']}",
                )
                walker.displaced.add(item.entry_id)
            yield chain_id, item


PROGRESS_EVERY = 10_000

# Full entries (``ledger_entries``) and expanded rows (``ledger_rows``) are read as one stream
# in (chain, seq) order, a full entry first on a tie: ``src`` (0 full, 1 expanded), then
# `COLUMNS` (an expanded row has its own in their places, NULL for the others), then what only
# an expanded row has: the session's and the statement's fields each as one JSON array (one
# value to decode and one cache key per row instead of thirteen) and its times as whole
# microseconds, the form its hash covers. One stream, so one fetch can be in flight while the
# walk checks the batch before it (`_prefetched`).
_EXPANDED_OWN = frozenset(
    {
        "chain_id",
        "seq",
        "prev_hash",
        "prev_entry_id",
        "hash",
        "entry_id",
        "command_tag",
        "rows",
        "sqlstate",
        "error_message",
    }
)
_EXPANDED_EXTRA = (
    "json_build_array(instance_id, session_id, agent, owner, client_address, application_name, "
    "database, upstream_role)::text, "
    "json_build_array(statement, fingerprint, categories, rule_ids, action)::text, "
    "(extract(epoch FROM received_at) * 1000000)::bigint, "
    "(extract(epoch FROM completed_at) * 1000000)::bigint"
)


def _walk_sql(quoted: str) -> str:
    full = ", ".join(f"{c}::text AS {c}" if c in JSONB_COLUMNS else c for c in COLUMNS)
    expanded = ", ".join(c if c in _EXPANDED_OWN else "NULL" for c in COLUMNS)
    return (
        f"SELECT 0 AS src, {full}, NULL::text AS session_key, NULL::text AS text_key, "
        f"NULL::bigint AS received_us, NULL::bigint AS completed_us "
        f"FROM {quoted}.ledger_entries "
        f"UNION ALL SELECT 1, {expanded}, {_EXPANDED_EXTRA} FROM {quoted}.ledger_rows "
        "ORDER BY chain_id, seq, src"
    )


# Where a row of the stream has each value (`_walk_sql`).
_AT = {name: 1 + i for i, name in enumerate(COLUMNS)}
_FULL_COLUMNS = slice(1, 1 + len(COLUMNS))
# An expanded row's values in the order of its canonical array (`packed.PACKED_FIELDS`), with
# its hash and chain: seq, entry_id, prev_entry_id, prev_hash, session key, text key,
# received_us, completed_us, command_tag, rows, sqlstate, error_message; hash; chain_id.
_EXPANDED_AT = (
    *(_AT[name] for name in ("seq", "entry_id", "prev_entry_id", "prev_hash")),
    *range(1 + len(COLUMNS), 5 + len(COLUMNS)),
    *(_AT[name] for name in ("command_tag", "rows", "sqlstate", "error_message")),
    _AT["hash"],
    _AT["chain_id"],
)
WALK_BATCH = 1000  # rows a fetch: small enough that the next batch is computed meanwhile
_REF_CACHE_MAX = 100_000  # distinct session and statement records remembered between rows
_NO_SEQ = 2**63  # above every seq (a bigint)


Item = tuple[str, "Unpacked | _Repacked"]  # (chain, packed entry)


class _Turns:
    """The fetches of several cursors of one connection take turns: at most one is in flight,
    the prefetch of `_prefetched`, which any other waits for before it fetches."""

    def __init__(self) -> None:
        self.in_flight: asyncio.Future[list[asyncpg.Record]] | None = None

    async def wait(self) -> None:
        if self.in_flight is not None:
            await asyncio.wait([self.in_flight])


async def _prefetched(
    conn: asyncpg.Connection, sql: str, size: int, turns: _Turns
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The rows of ``sql`` through a server-side cursor, ``size`` at a time, each fetch sent
    before the batch before it is handed out: the server computes the next batch while the
    walk checks this one (the two share no lock, and on two cores they overlap)."""
    cursor = await conn.cursor(sql)
    ahead = turns.in_flight = fetch_ahead(cursor, size)
    try:
        while True:
            rows = await ahead
            if not rows:
                return
            ahead = turns.in_flight = fetch_ahead(cursor, size)
            await asyncio.sleep(0)  # the fetch is sent now, not when the walk next waits
            yield rows
    finally:
        turns.in_flight = None
        if not ahead.done():  # the walk failed: the transaction can end once it is back
            await asyncio.wait([ahead])


def fetch_ahead(cursor: asyncpg.cursor.Cursor, size: int) -> asyncio.Task[list[asyncpg.Record]]:
    """``cursor.fetch(size)`` as a task of its own; if it fails after its reader stopped
    waiting (the connection closed under it), its error is not logged as never retrieved."""
    task: asyncio.Task[list[asyncpg.Record]] = asyncio.ensure_future(cursor.fetch(size))
    task.add_done_callback(_retrieved)
    return task


def _retrieved(task: asyncio.Task[list[asyncpg.Record]]) -> None:
    if not task.cancelled():
        task.exception()


async def _batches(
    conn: asyncpg.Connection, sql: str, size: int, turns: _Turns
) -> AsyncIterator[list[asyncpg.Record]]:
    """The rows of ``sql`` through a server-side cursor, ``size`` at a time, each fetch in its
    turn."""
    await turns.wait()
    cursor = await conn.cursor(sql)
    while True:
        await turns.wait()
        rows = await cursor.fetch(size)
        if not rows:
            return
        yield rows


async def _one_at_a_time(items: AsyncIterator[Item]) -> AsyncIterator[list[Item]]:
    async for item in items:
        yield [item]


_T = TypeVar("_T")


class _Stream(Generic[_T]):
    """A sorted stream of batches, read one item at a time."""

    def __init__(self, batches: AsyncIterator[list[_T]]) -> None:
        self._batches = batches
        self.items: list[_T] = []
        self.at = 0  # the head's index in items

    async def fill(self) -> None:
        """After `advance` said so: the next batch (none at the end)."""
        self.items = await anext(self._batches, [])
        self.at = 0

    @property
    def head(self) -> _T | None:
        return self.items[self.at] if self.at < len(self.items) else None

    def advance(self) -> bool:
        """Move on; True when the batch is used up (call `fill`)."""
        self.at += 1
        return self.at >= len(self.items)


async def _merge_walk(
    walker: _Walker,
    rows: AsyncIterator[list[asyncpg.Record]],
    packed: AsyncIterator[list[Item]],
    progress: Callable[[int], None] | None,
) -> None:
    """Visit the two sorted streams as one, in (chain, seq) order: full entries and expanded
    rows (`_walk_sql`) first on a tie, then packs (a duplicated seq is then seen as such).
    Expanded rows, most of a ledger, are walked a run at a time (`_Walker.run_expanded`)."""
    entries: _Stream[asyncpg.Record] = _Stream(rows)
    packs: _Stream[Item] = _Stream(packed)
    await entries.fill()
    await packs.fill()
    next_report = PROGRESS_EVERY
    while True:
        row, item = entries.head, packs.head
        pack_key = (item[0], item[1].seq) if item is not None else None
        if row is not None and (pack_key is None or (row[1], row[2]) <= pack_key):
            if row[0] == 0:
                walker.visit(row)
                entries.at += 1
            else:  # expanded rows up to the next full entry, or past the next pack entry
                stop = (pack_key[0], pack_key[1] + 1) if pack_key is not None else None
                entries.at = walker.run_expanded(entries.items, entries.at, stop)
            if entries.at >= len(entries.items):
                await entries.fill()
        elif item is not None:
            walker.visit_packed(item[0], item[1])
            if packs.advance():
                await packs.fill()
        else:
            break
        if progress is not None and walker.entries >= next_report:
            progress(walker.entries)
            next_report = walker.entries + PROGRESS_EVERY
    if progress is not None:
        progress(walker.entries)


class _Repacked:
    """An expanded row packed again: what `_Walker.visit_packed` reads of an `Unpacked` (a
    plain slotted class: one is made per row, and a frozen dataclass costs several times
    more)."""

    __slots__ = ("canonical", "entry_id", "fields", "hash", "prev_entry_id", "prev_hash", "seq")
    refs_ok = True  # the refs are recomputed from the columns: a changed column fails the hash

    def __init__(self, fields: list[object], hash: str, canonical: bytes) -> None:
        self.seq: int = fields[0]  # type: ignore[assignment]
        self.entry_id: str = fields[1]  # type: ignore[assignment]
        self.prev_entry_id: str = fields[2]  # type: ignore[assignment]
        self.prev_hash: str = fields[3]  # type: ignore[assignment]
        self.hash = hash
        self.canonical = canonical
        self.fields = fields


_TEXT_KEYS = ("statement", "fingerprint", "categories", "rule_ids", "action")
_SESSION_FIELDS = dict.fromkeys(SESSION_KEYS)


class _Refs(dict[str, str]):
    """The refs of the session and statement records of expanded rows, by the record's JSON
    array as the server spells it (`_walk_sql`), each computed from the columns once. The
    arrays of the two kinds of record never look alike (8 strings; 3 strings and 2 arrays),
    so one dict serves both."""

    def session(self, key: str) -> str:
        ref = self.get(key)
        if ref is None:
            ref = self[key] = record_ref(dict(zip(_SESSION_FIELDS, orjson.loads(key), strict=True)))
            self._bound()
        return ref

    def text(self, key: str) -> str:
        ref = self.get(key)
        if ref is None:
            ref = self[key] = record_ref(dict(zip(_TEXT_KEYS, orjson.loads(key), strict=True)))
            self._bound()
        return ref

    def _bound(self) -> None:
        if len(self) > _REF_CACHE_MAX:
            self.clear()


def _repack(r: asyncpg.Record, refs: _Refs) -> _Repacked:
    """An expanded row (`_walk_sql`) packed again: its records' refs and its canonical array
    are recomputed from the columns, so any column that differs from what was sealed fails the
    entry's hash."""
    fields: list[object] = [r[i] for i in _EXPANDED_AT[:12]]
    fields[4] = refs.session(r[_EXPANDED_AT[4]])
    fields[5] = refs.text(r[_EXPANDED_AT[5]])
    fields.append(fields[7] - fields[6])  # type: ignore[operator]
    return _Repacked(fields, r[_EXPANDED_AT[12]], orjson.dumps(fields))


@dataclass(slots=True)
class _Seen:
    """What the walk remembers of the previous row of the current chain."""

    chain_id: str
    seq: int
    entry_id: str
    hash: str
    flagged: ProblemKind | None


class _Walker:
    def __init__(self) -> None:
        self.entries = 0
        self.heads: dict[str, list[object]] = {}  # chain: [entries, last seq, head hash]
        self.problems: list[Problem] = []
        self.displaced: set[str] = set()  # packed entries already reported as out of place
        self.warnings: list[Problem] = []
        self.audit: CheckpointAudit | None = None
        self.bases: dict[str, Cut] = {}  # pruned chains: where they start now
        self._prev: _Seen | None = None
        self._refs = _Refs()

    def _base(self, chain_id: str) -> _Seen:
        """A pruned chain's first remaining entry links to the head it was cut at."""
        cut = self.bases[chain_id]
        return _Seen(chain_id, cut.seq, cut.head_entry_id, cut.head_hash, None)

    def chain_heads(self) -> dict[str, ChainHead]:
        return {
            chain_id: ChainHead(entries=h[0], last_seq=h[1], head_hash=h[2])  # type: ignore[arg-type]
            for chain_id, h in self.heads.items()
        }

    def run_expanded(
        self, rows: Sequence[asyncpg.Record], at: int, stop: tuple[str, int] | None
    ) -> int:
        """Walk the expanded rows of ``rows[at:]`` (`_walk_sql`) up to the first full entry,
        row of another chain or row at or past ``stop`` (chain, seq); the index reached.

        The common case is checked inline, without an object per row: the row is the next seq
        of the chain of an intact predecessor, links to it by id and hash, and its hash,
        recomputed from its columns (`_repack`'s canonical array), is the stored one. A row
        that is anything else ends the run and goes through `visit_packed`, which reports it.
        The checkpoint audit is told each entry it needs (`CheckpointAudit.quiet_until`) and
        the others in bulk."""
        prev = self._prev
        first = rows[at]
        refs = self._refs
        if prev is None or prev.flagged is not None or prev.chain_id != first[_AT["chain_id"]]:
            self.visit_packed(first[_AT["chain_id"]], _repack(first, refs))
            return at + 1
        chain = prev.chain_id
        last_seq, last_id, last_hash = prev.seq, prev.entry_id, prev.hash
        limit = stop[1] if stop is not None and stop[0] == chain else _NO_SEQ
        displaced, audit = self.displaced, self.audit
        known, session_ref, text_ref = refs.get, refs.session, refs.text
        dumps, sha256 = orjson.dumps, hashlib.sha256
        (seq_at, id_at, prev_id_at, prev_hash_at, session_at, text_at, received_at) = _EXPANDED_AT[
            :7
        ]
        (completed_at, tag_at, rows_at, sqlstate_at, error_at, hash_at, chain_at) = _EXPANDED_AT[7:]
        quiet = audit.quiet_until(chain) if audit is not None else _NO_SEQ
        told = 0  # rows walked and not told to the audit yet
        end, i, odd = len(rows), at, False
        while i < end:
            r = rows[i]
            seq = r[seq_at]
            if r[0] != 1 or r[chain_at] != chain or seq >= limit:
                break
            entry_id, received, completed = r[id_at], r[received_at], r[completed_at]
            if seq != last_seq + 1 or r[prev_id_at] != last_id or r[prev_hash_at] != last_hash:
                odd = True
                break
            canonical = dumps(
                [
                    seq,
                    entry_id,
                    last_id,
                    last_hash,
                    known(r[session_at]) or session_ref(r[session_at]),
                    known(r[text_at]) or text_ref(r[text_at]),
                    received,
                    completed,
                    r[tag_at],
                    r[rows_at],
                    r[sqlstate_at],
                    r[error_at],
                    completed - received,
                ]
            )
            digest = r[hash_at]
            if sha256(last_hash.encode() + canonical).hexdigest() != digest or (
                displaced and entry_id in displaced
            ):
                odd = True
                break
            if seq < quiet:
                told += 1
            else:
                assert audit is not None
                if told:
                    audit.passed(told, last_seq, last_id)
                    told = 0
                audit.entry(chain, seq, entry_id, digest, received / 1e6)
                quiet = audit.quiet_until(chain)
            last_seq, last_id, last_hash = seq, entry_id, digest
            i += 1
        if told and audit is not None:
            audit.passed(told, last_seq, last_id)
        if i > at:
            self.entries += i - at
            head = self.heads[chain]
            head[0] += i - at  # type: ignore[operator]
            head[1], head[2] = last_seq, last_hash
            self._prev = _Seen(chain, last_seq, last_id, last_hash, None)
        if odd:  # not the common case: the full checks and their reports
            self.visit_packed(rows[i][chain_at], _repack(rows[i], refs))
            return i + 1
        return i

    def visit_packed(self, chain_id: str, item: Unpacked | _Repacked) -> None:
        """One packed entry: its records and hash, then its link to its predecessor."""
        self.entries += 1
        seq = item.seq
        prev = self._prev if self._prev is not None and self._prev.chain_id == chain_id else None
        if prev is None and chain_id in self.bases:
            prev = self._base(chain_id)
        head = self.heads.get(chain_id)
        if head is None:
            self.heads[chain_id] = [1, seq, item.hash]
        else:
            head[0] += 1  # type: ignore[operator]
            head[1], head[2] = seq, item.hash
        flagged: ProblemKind | None = "reordered" if item.entry_id in self.displaced else None
        if flagged is None and not item.refs_ok:
            self.report(
                item.entry_id, chain_id, seq, "modified", "its session or statement record differs"
            )
            flagged = "modified"
        elif flagged is None and envelope_hash(item.prev_hash, item.canonical) != item.hash:
            self.report(item.entry_id, chain_id, seq, "modified", "content does not match its hash")
            flagged = "modified"
        if flagged != "reordered":
            self._check_link(
                (chain_id, seq, item.entry_id), (item.prev_entry_id, item.prev_hash), prev, flagged
            )
        self._prev = _Seen(chain_id, seq, item.entry_id, item.hash, flagged)
        if self.audit is not None:
            received = item.fields[6]
            self.audit.entry(
                chain_id,
                seq,
                item.entry_id,
                item.hash,
                received / 1e6 if isinstance(received, int) else None,
            )

    def visit(self, record: asyncpg.Record) -> None:
        self.entries += 1
        chain_id, seq = record["chain_id"], record["seq"]
        prev = self._prev if self._prev is not None and self._prev.chain_id == chain_id else None
        if prev is None and chain_id in self.bases:
            prev = self._base(chain_id)
        head = self.heads.get(chain_id)
        if head is None:
            self.heads[chain_id] = [1, seq, record["hash"]]
        else:
            head[0] += 1  # type: ignore[operator]
            head[1], head[2] = seq, record["hash"]
        row_id = record["entry_id"]
        try:
            sealed: _Full | None = _Full(_loads(record["content"]))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # hand-written rows too
            sealed = None
            self.report(row_id, chain_id, seq, "modified", f"content is unreadable: {exc}")
        flagged: ProblemKind | None = "modified" if sealed is None else None
        if sealed is not None:
            flagged = self._check_self(record, sealed)
            if flagged != "reordered":
                self._check_link(
                    (chain_id, seq, sealed.entry_id),
                    (sealed.prev_entry_id, sealed.prev_hash),
                    prev,
                    flagged,
                )
        self._prev = _Seen(chain_id, seq, row_id, record["hash"], flagged)
        if self.audit is not None:
            self.audit.entry(
                chain_id, seq, row_id, record["hash"], record["received_at"].timestamp()
            )

    def _check_self(self, record: asyncpg.Record, sealed: _Full) -> ProblemKind | None:
        chain_id, seq, entry_id = record["chain_id"], record["seq"], sealed.entry_id
        if (sealed.chain_id, sealed.seq) != (chain_id, seq):
            self.report(
                entry_id,
                chain_id,
                seq,
                "reordered",
                f"sealed as {sealed.chain_id} #{sealed.seq}, found at #{seq}",
            )
            return "reordered"
        if envelope_hash(sealed.prev_hash, sealed.canonical) != record["hash"]:
            self.report(entry_id, chain_id, seq, "modified", "content does not match its hash")
            return "modified"
        try:
            differing = _differing_columns(record, sealed)
        except (KeyError, TypeError) as exc:  # a field missing from content sealed by hand
            self.report(entry_id, chain_id, seq, "modified", f"content is unreadable: {exc}")
            return "modified"
        if differing:
            self.report(
                entry_id,
                chain_id,
                seq,
                "modified",
                f"columns differ from the sealed content: {', '.join(differing)}",
            )
            return "modified"
        return None

    def _check_link(
        self,
        this: tuple[str, int, str],
        links_to: tuple[str, str],
        prev: _Seen | None,
        flagged: ProblemKind | None,
    ) -> None:
        """``this`` is (chain, seq, entry id); ``links_to`` the (id, hash) it sealed as its
        predecessor's."""
        chain_id, seq, entry_id = this
        prev_entry_id, prev_hash = links_to
        if prev is not None and prev.flagged == "reordered":
            return  # its neighbour's displacement is already reported
        expected_seq = prev.seq + 1 if prev else 1
        expected_hash = prev.hash if prev else GENESIS
        expected_id = prev.entry_id if prev else ""
        if seq > expected_seq:
            self._link_broken(chain_id)
            missing = (
                f"#{expected_seq}" if seq == expected_seq + 1 else f"#{expected_seq}..#{seq - 1}"
            )
            self.report(
                prev_entry_id or entry_id,
                chain_id,
                seq - 1,
                "deleted",
                f"{missing} missing before entry {entry_id}",
            )
            return
        if prev_entry_id == expected_id and prev_hash == expected_hash:
            return
        self._link_broken(chain_id)
        if prev is not None and prev_entry_id == expected_id:
            if prev.flagged is None:
                self.report(
                    prev.entry_id,
                    chain_id,
                    prev.seq,
                    "modified",
                    f"rewritten and rehashed: entry {entry_id} no longer links to it",
                )
            return
        if flagged is None or flagged == "modified":
            after = f"entry {expected_id}" if expected_id else "the chain's start"
            self.report(
                entry_id, chain_id, seq, "inserted", f"does not link to its predecessor, {after}"
            )

    def _link_broken(self, chain_id: str) -> None:
        if self.audit is not None:
            self.audit.link_broken(chain_id)

    def report(
        self, entry_id: str, chain_id: str, seq: int, kind: ProblemKind, detail: str
    ) -> None:
        self.problems.append(Problem(entry_id, chain_id, seq, kind, detail))


def _loads(text: str | bytes) -> Any:
    """orjson (several times faster), or the standard parser for what orjson refuses (integers
    beyond 64 bits, which canonical_bytes also writes with the standard encoder)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class _Full:
    """A full entry's envelope as read back from ``content``, without the `LedgerEntry` (what
    `chain.unseal` checks and builds, less what `verify` does not need); raises ValueError,
    KeyError or TypeError for an envelope pgguard cannot have written."""

    __slots__ = (
        "canonical",
        "chain_id",
        "content",
        "entry_id",
        "prev_entry_id",
        "prev_hash",
        "seq",
        "times",
    )

    def __init__(self, envelope: Any) -> None:
        if not isinstance(envelope, dict):
            raise ValueError("ledger envelope is not an object")
        entry = envelope.get("entry")
        if not isinstance(entry, dict):
            raise ValueError("ledger envelope has no entry")
        seq = envelope.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError("ledger envelope has no seq")
        self.seq = seq
        self.chain_id = str(envelope.get("chain_id"))
        self.prev_hash = str(envelope.get("prev_hash"))
        self.prev_entry_id = str(envelope.get("prev_entry_id"))
        self.entry_id = str(entry["entry_id"])
        self.content: dict[str, object] = entry
        self.times = (
            datetime.fromisoformat(str(entry["received_at"])),
            _parse_time(entry.get("decided_at")),
            _parse_time(entry.get("completed_at")),
        )
        self.canonical = canonical_bytes(envelope)


def _parse_time(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


# Where `_differing_columns` finds each kind of column in a row (the `COLUMNS` order).
_CONTENT_AT = COLUMNS.index("content")
_JSONB_AT = frozenset(i for i, name in enumerate(COLUMNS) if name in JSONB_COLUMNS)


def _differing_columns(record: asyncpg.Record, sealed: _Full) -> Sequence[str]:
    expected = content_row_values(
        (record["chain_id"], record["seq"], sealed.prev_hash, sealed.prev_entry_id, record["hash"]),
        sealed.times,
        sealed.content,
        sealed.canonical,
    )
    differing = []
    for i, (got, want) in enumerate(zip(record[_FULL_COLUMNS], expected, strict=True)):
        if got == want or i == _CONTENT_AT:
            continue
        if i in _JSONB_AT:
            try:
                same = got is not None and _loads(got) == _loads(str(want))
            except (ValueError, RecursionError):  # a column rewritten beyond reading back
                same = False
        elif isinstance(want, list):
            same = got is not None and list(got) == want
        else:
            same = False
        if not same:
            differing.append(COLUMNS[i])
    return differing
