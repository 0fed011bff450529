"""The hash chain: canonical bytes are stable, entries link, any content change changes the hash."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard.ledger.chain import (
    GENESIS,
    Chain,
    canonical_bytes,
    envelope_hash,
    parse_spool_line,
    unseal,
)
from pgguard.ledger.model import LedgerEntry, entry_content, entry_from_content

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def entry(**changes: object) -> LedgerEntry:
    base = LedgerEntry(
        entry_id="e" * 32,
        kind="statement",
        instance_id="i1",
        session_id="s1",
        received_at=T0,
        decided_at=T0 + timedelta(seconds=3),
        agent="agent",
        owner="alice@example.com",
        client_address="127.0.0.1:5555",
        application_name="etl",
        database="postgres",
        upstream_role="pgguard",
        statement="COPY finance.invoices TO STDOUT WHERE amount > ?",
        fingerprint="fp1",
        categories=("export",),
        rule_ids=("export.copy",),
        action="hold",
        request_id="req1",
        approvers=({"id": "bob", "name": "Bob", "channel": "teams", "comment": "ok"},),
        reason="nightly export",
        detail={"tables": ["finance.invoices"], "n": 1.5},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_canonical_bytes_are_sorted_compact_utc() -> None:
    content = entry_content(entry(received_at=T0.astimezone(timezone(timedelta(hours=2)))))
    data = canonical_bytes(content)
    assert data == canonical_bytes(dict(reversed(list(content.items()))))
    assert b'"received_at":"2024-05-01T12:00:00.123456+00:00"' in data
    assert b", " not in data
    assert b": " not in data
    assert list(json.loads(data)) == sorted(content)


def test_canonical_bytes_are_a_known_value() -> None:
    # A golden hash: changing the canonical form silently would orphan every stored chain.
    sealed = Chain("c").seal(entry())
    assert sealed.hash == envelope_hash(GENESIS, sealed.canonical)
    assert sealed.canonical.startswith(b'{"chain_id":"c","entry":{"action":"hold","agent":"agent"')


def test_entries_link_in_order() -> None:
    chain = Chain("c")
    first = chain.seal(entry(entry_id="a" * 32))
    second = chain.seal(entry(entry_id="b" * 32))
    assert (first.seq, first.prev_hash, first.prev_entry_id) == (1, GENESIS, "")
    assert (second.seq, second.prev_hash, second.prev_entry_id) == (2, first.hash, "a" * 32)
    assert chain.next_seq == 3
    assert chain.last_hash == second.hash


def test_content_round_trips() -> None:
    original = entry()
    assert entry_from_content(entry_content(original)) == original


def test_unseal_and_spool_line_round_trip() -> None:
    sealed = Chain("c").seal(entry())
    again = unseal(json.loads(sealed.canonical), sealed.hash)
    assert again.canonical == sealed.canonical
    assert again.entry == sealed.entry
    assert parse_spool_line(sealed.spool_line()) == sealed


def test_jsonb_hostile_values_are_cleaned() -> None:
    content = entry_content(entry(statement="a\x00b\ud800", duration_ms=1e16, detail={"x": 2e-7}))
    assert content["statement"] == "a\ufffdb?"
    assert content["duration_ms"] == 10**16
    assert isinstance(content["duration_ms"], int)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        entry(received_at=datetime(2024, 1, 1))


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.floats(allow_nan=False)
)


@given(
    field=st.sampled_from(["statement", "agent", "action", "reason", "request_id", "fingerprint"]),
    value=st.text(max_size=40),
    detail=st.dictionaries(st.text(max_size=5), json_leaf, max_size=3),
)
def test_any_change_of_content_changes_the_hash(
    field: str, value: str, detail: dict[str, object]
) -> None:
    original = Chain("c").seal(entry())
    changed_entry = replace(entry(), **{field: value})  # type: ignore[arg-type]
    changed = Chain("c").seal(changed_entry)
    if entry_content(changed_entry) != entry_content(entry()):
        assert changed.hash != original.hash
    with_detail = Chain("c").seal(entry(detail=detail))
    if entry_content(entry(detail=detail)) != entry_content(entry()):
        assert with_detail.hash != original.hash


@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=4))
def test_any_byte_flip_in_the_envelope_changes_the_hash(position: int, noise: bytes) -> None:
    sealed = Chain("c").seal(entry())
    data = bytearray(sealed.canonical)
    i = position % len(data)
    data[i] = (data[i] + noise[0] % 255 + 1) % 256
    assert envelope_hash(sealed.prev_hash, bytes(data)) != sealed.hash
