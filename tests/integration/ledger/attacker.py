"""What an attacker with write access to the state database does to a chain: read it back,
change it, renumber it and recompute every link and hash - full entries and packed ones - then
write it back. Only the public sha256 chain is reproduced; no key is involved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from pgguard.ledger.chain import GENESIS, canonical_bytes, envelope_hash
from pgguard.ledger.packed import record_ref


@dataclass
class Item:
    """One entry of the chain as the attacker sees it."""

    entry_id: str
    packed: bool
    pack: int | None = None  # first_seq of the pack it came from
    row: dict[str, Any] | None = None  # full entry: every column
    envelope: dict[str, Any] | None = None  # full entry: the hashed content
    fields: list[Any] | None = None  # packed entry: the array
    refs: dict[str, Any] | None = None  # packed entry: its pack's records

    def set_statement(self, text: str) -> None:
        """Change what the entry says was run (both kinds)."""
        if self.envelope is not None and self.row is not None:
            self.envelope["entry"]["statement"] = text
            self.row["statement"] = text
            return
        assert self.fields is not None
        assert self.refs is not None
        record = dict(self.refs[self.fields[5]])
        record["statement"] = text
        ref = record_ref(record)
        self.refs = {**self.refs, ref: record}
        self.fields[5] = ref


async def read_chain(admin: asyncpg.Connection, schema: str, chain_id: str) -> list[Item]:
    items: list[Item] = []
    for row in await admin.fetch(
        f'SELECT * FROM "{schema}".ledger_entries WHERE chain_id = $1', chain_id
    ):
        columns = dict(row)
        items.append(
            Item(
                columns["entry_id"],
                packed=False,
                row=columns,
                envelope=json.loads(columns["content"]),
            )
        )
    for pack in await admin.fetch(
        f'SELECT first_seq, body FROM "{schema}".ledger_packs WHERE chain_id = $1', chain_id
    ):
        body = json.loads(pack["body"])
        for fields in body["entries"]:
            items.append(
                Item(
                    fields[1], packed=True, pack=pack["first_seq"], fields=fields, refs=body["refs"]
                )
            )
    items.sort(key=_seq)
    return items


async def rewrite_chain(
    admin: asyncpg.Connection,
    schema: str,
    chain_id: str,
    change: Callable[[list[Item]], list[Item]],
) -> list[Item]:
    """Apply ``change`` to the chain, renumber it 1..n, recompute links and hashes, store it."""
    items = change(await read_chain(admin, schema, chain_id))
    prev_hash, prev_id = GENESIS, ""
    hashes: dict[str, str] = {}
    for seq, item in enumerate(items, start=1):
        if item.packed:
            assert item.fields is not None
            item.fields[0], item.fields[2], item.fields[3] = seq, prev_id, prev_hash
            canonical = orjson.dumps(item.fields)
        else:
            assert item.envelope is not None
            assert item.row is not None
            item.envelope.update(seq=seq, prev_hash=prev_hash, prev_entry_id=prev_id)
            canonical = canonical_bytes(item.envelope)
        digest = envelope_hash(prev_hash, canonical)
        if not item.packed:
            assert item.row is not None
            assert item.envelope is not None
            item.row.update(
                seq=seq,
                prev_hash=prev_hash,
                prev_entry_id=prev_id,
                hash=digest,
                content=json.dumps(item.envelope),
            )
        hashes[item.entry_id] = digest
        prev_hash, prev_id = digest, item.entry_id
    async with admin.transaction():
        await admin.execute(f'DELETE FROM "{schema}".ledger_entries WHERE chain_id = $1', chain_id)
        await admin.execute(f'DELETE FROM "{schema}".ledger_packs WHERE chain_id = $1', chain_id)
        for item in items:
            if not item.packed:
                await _insert_row(admin, schema, item)
        for group in _packs(items):
            await _insert_pack(admin, schema, chain_id, group, hashes)
    return items


def _seq(item: Item) -> int:
    if item.packed:
        assert item.fields is not None
        return int(item.fields[0])
    assert item.row is not None
    return int(item.row["seq"])


def _packs(items: list[Item]) -> list[list[Item]]:
    """Runs of consecutive packed entries from the same original pack."""
    groups: list[list[Item]] = []
    for item in items:
        if not item.packed:
            continue
        if groups and groups[-1][-1].pack == item.pack and _seq(groups[-1][-1]) + 1 == _seq(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


async def _insert_row(admin: asyncpg.Connection, schema: str, item: Item) -> None:
    assert item.row is not None
    names = list(item.row)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    await admin.execute(
        f'INSERT INTO "{schema}".ledger_entries ({", ".join(names)}) VALUES ({placeholders})',
        *[item.row[n] for n in names],
    )


async def _insert_pack(
    admin: asyncpg.Connection,
    schema: str,
    chain_id: str,
    group: list[Item],
    hashes: dict[str, str],
) -> None:
    refs: dict[str, Any] = {}
    for item in group:
        assert item.fields is not None
        assert item.refs is not None
        refs[item.fields[4]] = item.refs[item.fields[4]]
        refs[item.fields[5]] = item.refs[item.fields[5]]
    body = {
        "entries": [item.fields for item in group],
        "hashes": [hashes[item.entry_id] for item in group],
        "refs": refs,
    }
    first, last = group[0].fields, group[-1].fields
    assert first is not None
    assert last is not None
    await admin.execute(
        f'INSERT INTO "{schema}".ledger_packs (chain_id, first_seq, last_seq, entries, '
        "first_received, last_received, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        chain_id,
        first[0],
        last[0],
        len(group),
        _EPOCH + timedelta(microseconds=first[6]),
        _EPOCH + timedelta(microseconds=last[6]),
        json.dumps(body),
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
