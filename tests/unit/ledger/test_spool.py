"""The spool: append order, torn lines, watermark, exactly-once reading across reopen."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pgguard.ledger.chain import Chain, SealedEntry
from pgguard.ledger.model import LedgerEntry
from pgguard.ledger.spool import Spool


def sealed_entries(chain: Chain, n: int) -> list[SealedEntry]:
    now = datetime.now(UTC)
    return [
        chain.seal(LedgerEntry(kind="statement", instance_id="i", session_id="s", received_at=now))
        for _ in range(n)
    ]


def test_reads_in_order_and_commits_exactly_once(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    entries = sealed_entries(Chain("c"), 5)
    spool.append(entries[:3])
    spool.append(entries[3:])
    spool.flush()
    first = spool.read_batch(2)
    assert [e.seq for e in first] == [1, 2]
    assert [e.seq for e in spool.read_batch(2)] == [1, 2]  # not committed: read again
    spool.commit()
    rest = spool.read_batch(10)
    assert [e.seq for e in rest] == [3, 4, 5]
    spool.commit()
    assert spool.read_batch(10) == []
    assert spool.drained()
    spool.close()


def test_reopen_skips_shipped_and_ignores_a_torn_line(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    entries = sealed_entries(Chain("c"), 4)
    spool.append(entries)
    spool.flush()
    assert len(spool.read_batch(2)) == 2
    spool.commit()
    spool.close()
    segment = next(tmp_path.glob("*.jsonl"))
    with segment.open("ab") as f:
        f.write(entries[0].spool_line()[:40])  # a crash mid-line
    again = Spool.open(tmp_path)
    assert [e.seq for e in again.read_batch(10)] == [3, 4]
    again.commit()
    later = sealed_entries(Chain("d"), 1)
    again.append(later)  # goes to a new segment, never after the torn line
    assert [e.chain_id for e in again.read_batch(10)] == ["d"]
    again.commit()
    assert again.drained()
    again.reset()
    assert list(tmp_path.glob("*.jsonl")) == []
