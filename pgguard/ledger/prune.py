"""Retention: removing a ledger's old entries while keeping what proves the rest (asyncpg).

Owns: `Cut`, `prune`, `prune_bases` (what `reader.verify` starts pruned chains from).

A chain can only be cut at a **signed checkpoint**: its head hash covers every entry before
it, so once the entries up to it are gone, the first remaining entry still links to the signed
head (its ``prev_hash`` and ``prev_entry_id``), and `verify` proves everything after the cut
from that signature. `prune` picks, per chain, the newest checkpoint whose signature verifies
with the given public keys, whose head is the stored entry at its seq, and before which every
entry was received before ``before``; then, in one transaction per chain, it records the cut in
``ledger_prunes``, deletes the entries up to it (``ledger_entries``, ``ledger_rows``; packs are
expanded first, so no pack straddles a cut) and the checkpoints older than it - the cut's own
checkpoint is kept. Cuts only move forward.

What a cut cannot prove: that the removed entries were as recorded - they are gone; `verify`
lists each cut (chain, seq, the ``before`` date asked, when), so a prune nobody ordered shows,
and without a signed checkpoint at the cut `verify` reports the chain's start as deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pgguard.approvals.schema import checked_schema
from pgguard.ledger.checkpoint import KeyRing, from_stored
from pgguard.ledger.expander import expand_all


@dataclass(frozen=True, slots=True)
class Cut:
    """One chain cut at a signed checkpoint: entries #1..#seq are gone."""

    chain_id: str
    seq: int
    head_hash: str
    head_entry_id: str
    removed: int  # entries deleted by this prune
    before: datetime | None = None
    pruned_at: datetime | None = None


async def prune_bases(conn: asyncpg.Connection, schema: str) -> dict[str, Cut]:
    """The recorded cuts, by chain (none when the table predates retention)."""
    table = f"{checked_schema(schema)}.ledger_prunes"
    if await conn.fetchval("SELECT to_regclass($1)::text", table) is None:
        return {}
    rows = await conn.fetch(
        f"SELECT chain_id, seq, head_hash, head_entry_id, removed, before, pruned_at FROM {table}"
    )
    return {row["chain_id"]: Cut(**dict(row)) for row in rows}


async def prune(
    conn: asyncpg.Connection,
    *,
    schema: str,
    before: datetime,
    keys: KeyRing,
    dry_run: bool = False,
) -> list[Cut]:
    """Cut every chain at its newest provable checkpoint before ``before``; the cuts made."""
    quoted = checked_schema(schema)
    if not dry_run:
        await expand_all(conn, schema)
    done = await prune_bases(conn, schema)
    checkpoints = await conn.fetch(
        f"SELECT chain_id, seq, head_hash, head_entry_id, payload, signature "
        f"FROM {quoted}.ledger_checkpoints ORDER BY chain_id, seq DESC"
    )
    cuts: list[Cut] = []
    chain = ""
    limit, settled = 0, False
    for row in checkpoints:
        if row["chain_id"] != chain:
            chain = str(row["chain_id"])
            limit = await _first_kept(conn, quoted, chain, before)
            settled = False
        if settled or row["seq"] >= limit:
            continue
        previous = done.get(chain)
        if previous is not None and row["seq"] <= previous.seq:
            settled = True  # cuts only move forward
            continue
        if not await _provable(conn, quoted, schema, keys, row):
            continue
        settled = True
        cut = Cut(chain, row["seq"], row["head_hash"], row["head_entry_id"], 0, before)
        cuts.append(cut if dry_run else await _cut(conn, quoted, cut, before))
    return cuts


async def _first_kept(
    conn: asyncpg.Connection, quoted: str, chain_id: str, before: datetime
) -> int:
    """The lowest seq of ``chain_id`` received at or after ``before`` (a cut must stay below
    it); past the chain's end when there is none."""
    found = await conn.fetchval(
        f"SELECT min(seq) FROM (SELECT min(seq) AS seq FROM {quoted}.ledger_entries "
        "WHERE chain_id = $1 AND received_at >= $2 UNION ALL SELECT min(seq) "
        f"FROM {quoted}.ledger_rows WHERE chain_id = $1 AND received_at >= $2 UNION ALL "
        f"SELECT min(first_seq) FROM {quoted}.ledger_packs WHERE chain_id = $1) s",
        chain_id,
        before,
    )
    return int(found) if found is not None else 2**62


async def _provable(
    conn: asyncpg.Connection, quoted: str, schema: str, keys: KeyRing, row: asyncpg.Record
) -> bool:
    """The checkpoint row verifies, names this ledger, and its head is the stored entry."""
    try:
        signed = from_stored(row["payload"], row["signature"])
    except ValueError:
        return False
    c = signed.checkpoint
    if keys.check(signed) is not None or c.ledger != schema:
        return False
    if (c.chain_id, c.seq, c.head_hash, c.head_entry_id) != (
        row["chain_id"],
        row["seq"],
        row["head_hash"],
        row["head_entry_id"],
    ):
        return False
    head = await conn.fetchrow(
        f"SELECT hash, entry_id FROM {quoted}.ledger_entries WHERE chain_id = $1 AND seq = $2 "
        f"UNION ALL SELECT hash, entry_id FROM {quoted}.ledger_rows "
        "WHERE chain_id = $1 AND seq = $2",
        c.chain_id,
        c.seq,
    )
    return head is not None and (head["hash"], head["entry_id"]) == (c.head_hash, c.head_entry_id)


async def _cut(conn: asyncpg.Connection, quoted: str, cut: Cut, before: datetime) -> Cut:
    async with conn.transaction():
        removed = 0
        for table in ("ledger_entries", "ledger_rows"):
            status = await conn.execute(
                f"DELETE FROM {quoted}.{table} WHERE chain_id = $1 AND seq <= $2",
                cut.chain_id,
                cut.seq,
            )
            removed += int(status.split()[-1])
        await conn.execute(
            f"DELETE FROM {quoted}.ledger_checkpoints WHERE chain_id = $1 AND seq < $2",
            cut.chain_id,
            cut.seq,
        )
        await conn.execute(
            f"INSERT INTO {quoted}.ledger_prunes (chain_id, seq, head_hash, head_entry_id, "
            "before, removed) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (chain_id) DO UPDATE "
            "SET seq = excluded.seq, head_hash = excluded.head_hash, "
            "head_entry_id = excluded.head_entry_id, before = excluded.before, "
            f"removed = {quoted}.ledger_prunes.removed + excluded.removed, pruned_at = now()",
            cut.chain_id,
            cut.seq,
            cut.head_hash,
            cut.head_entry_id,
            before,
            removed,
        )
    return Cut(cut.chain_id, cut.seq, cut.head_hash, cut.head_entry_id, removed, before)
