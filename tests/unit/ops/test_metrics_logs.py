"""The metrics' arithmetic and exposition, and the JSON log format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgguard.logs import JsonFormatter
from pgguard.metrics import Counts, Gauges, Histogram, Instruments, spool_bytes


def families(counts: Counts, gauges: Gauges) -> dict[str, dict[tuple[str, ...], float]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Instruments(gauges, counts))
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = tuple(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[key] = sample.value
    return out


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram((1.0, 5.0))
    for value in (0.5, 1.0, 3.0, 9.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("1.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert histogram.total == 13.5


def test_counts_reach_the_exposition(tmp_path: Path) -> None:
    counts = Counts()
    counts.statement("allow", ())
    counts.statement("allow", ())
    # Labelled by the first category: two category sets that start alike are one sample.
    counts.statement("hold", ("ddl",))
    counts.statement("hold", ("ddl", "privilege"))
    counts.statement("hold", ("privilege", "ddl"))
    counts.error("42501")
    counts.decision("approve", "api")
    started = counts.hold_started()
    (tmp_path / "segment").write_bytes(b"x" * 1234)
    gauges = Gauges(
        sessions_by_agent=lambda: {"etl": 3}, ledger_queue=lambda: 7, spool_dir=tmp_path
    )
    pending = families(counts, gauges)
    assert pending["pgguard_holds_pending"][()] == 1
    counts.hold_ended(started, "approved")
    seen = families(counts, gauges)
    assert seen["pgguard_statements_total"][("action=allow", "category=none")] == 2
    assert seen["pgguard_statements_total"][("action=hold", "category=ddl")] == 2
    assert seen["pgguard_statements_total"][("action=hold", "category=privilege")] == 1
    assert ("action=deny", "category=none") not in seen["pgguard_statements_total"]
    assert seen["pgguard_errors_total"][("sqlstate=42501",)] == 1
    assert seen["pgguard_approval_decisions_total"][("channel=api", "verdict=approve")] == 1
    assert seen["pgguard_sessions"][("agent=etl",)] == 3
    assert seen["pgguard_holds_pending"][()] == 0
    assert seen["pgguard_hold_wait_seconds_count"][("outcome=approved",)] == 1
    assert seen["pgguard_ledger_queue_entries"][()] == 7
    assert seen["pgguard_ledger_spool_bytes"][()] == 1234
    assert spool_bytes(tmp_path / "missing") == 0


def test_json_log_lines_carry_the_structured_fields() -> None:
    record = logging.LogRecord("pgguard.x", logging.INFO, "f.py", 1, "hold %s", ("r1",), None)
    record.event = "decision"
    record.rule_ids = ["a", "b"]
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hold r1"
    assert line["level"] == "INFO"
    assert line["logger"] == "pgguard.x"
    assert line["event"] == "decision"
    assert line["rule_ids"] == ["a", "b"]
    assert "args" not in line
    assert "msg" not in line
