"""Prometheus metrics: cheap counting on the hot path, exposition at scrape time.

Owns: the process-wide counters and histograms (`COUNTS`), the `Instruments` collector that
turns them (plus gauges read from a running pgguard) into Prometheus metric families, and
`exposition` (the text format served at ``GET /metrics``).

Invariants:
- Counting is a dict lookup and an integer add on the event loop's thread: no lock, no label
  object created per statement (prometheus_client's own Counter takes a lock per ``inc``), no
  key built (statements are counted by the Decision's own categories tuple and labelled by its
  first category at the scrape). Only the scrape builds metric families, from the plain numbers.
- ``pgguard_classify_seconds`` observes only the texts the policy engine really reads (its exact
  and literal-blind caches missed: `PolicyEngine.on_read`); a cached decision is not timed, since
  two clock reads and an observe would be a sizeable share of the hit itself (see there).
- Labels never carry data: actions, categories, SQLSTATEs, verdicts, channels, outcomes and
  configured agent names only - never statement text or values.
- Gauges (sessions, holds pending, ledger queue and spool) are read when scraped, from the
  running objects, so they cannot drift from what they describe.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Classification is usually microseconds; holds are human time.
CLASSIFY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HOLD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)


_bisect = bisect.bisect_left


class Histogram:
    """Bucket counts and a sum, as plain numbers (observed on one thread, read by the scrape)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bisect(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


@dataclass
class Counts:
    """Every counter of this process. Mutated only on the event loop."""

    # action -> a Decision's own categories tuple -> count; labelled by the first category only
    # at the scrape, so counting builds no key. Never replaced: the policy gate counts inline.
    statements: dict[str, dict[tuple[str, ...], int]] = field(
        default_factory=lambda: {"allow": {}, "hold": {}, "deny": {}}
    )
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (verdict, channel)
    errors: dict[str, int] = field(default_factory=dict)  # sqlstate
    hold_wait: dict[str, Histogram] = field(default_factory=dict)  # outcome
    holds_pending: int = 0
    classify: Histogram = field(default_factory=lambda: Histogram(CLASSIFY_BUCKETS))
    upstream_connect: Histogram = field(default_factory=lambda: Histogram(CONNECT_BUCKETS))

    def statement(self, action: str, categories: tuple[str, ...]) -> None:
        """What the policy gate does inline (`pgguard.proxy.policy_gate`)."""
        by_categories = self.statements.setdefault(action, {})
        by_categories[categories] = by_categories.get(categories, 0) + 1

    def statement_totals(self) -> dict[tuple[str, str], int]:
        """pgguard_statements_total's samples: (action, first category or "none") -> count."""
        totals: dict[tuple[str, str], int] = {}
        for action, by_categories in self.statements.items():
            for categories, count in by_categories.items():
                key = (action, categories[0] if categories else "none")
                totals[key] = totals.get(key, 0) + count
        return totals

    def error(self, sqlstate: str) -> None:
        self.errors[sqlstate] = self.errors.get(sqlstate, 0) + 1

    def decision(self, verdict: str, channel: str) -> None:
        key = (verdict, channel)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def hold_started(self) -> float:
        self.holds_pending += 1
        return time.monotonic()

    def hold_ended(self, started: float, outcome: str) -> None:
        self.holds_pending -= 1
        histogram = self.hold_wait.get(outcome)
        if histogram is None:
            histogram = self.hold_wait[outcome] = Histogram(HOLD_BUCKETS)
        histogram.observe(time.monotonic() - started)


COUNTS = Counts()


@dataclass
class Gauges:
    """Where the scrape reads what is current (set by assembly for a running pgguard)."""

    sessions_by_agent: Callable[[], dict[str, int]] = dict
    ledger_queue: Callable[[], int] = lambda: 0
    spool_dir: Path | None = None


def spool_bytes(directory: Path | None) -> int:
    """Bytes in the ledger's spool directory (0 when it has none)."""
    if directory is None or not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


class Instruments(Collector):
    """The Prometheus view of `COUNTS` and of one running pgguard's gauges."""

    def __init__(self, gauges: Gauges, counts: Counts = COUNTS) -> None:
        self.gauges = gauges
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        yield _counter(
            "pgguard_statements",
            "Statements judged, by action and (first) category.",
            ("action", "category"),
            c.statement_totals().items(),
        )
        sessions = GaugeMetricFamily(
            "pgguard_sessions", "Agent sessions open now.", labels=("agent",)
        )
        for agent, count in sorted(self.gauges.sessions_by_agent().items()):
            sessions.add_metric((agent,), count)
        yield sessions
        yield GaugeMetricFamily(
            "pgguard_holds_pending", "Statements held for approval now.", value=c.holds_pending
        )
        waits = HistogramMetricFamily(
            "pgguard_hold_wait_seconds",
            "How long held statements waited, by outcome.",
            labels=("outcome",),
        )
        for outcome, histogram in sorted(c.hold_wait.items()):
            waits.add_metric((outcome,), histogram.cumulative(), histogram.total)
        yield waits
        yield _counter(
            "pgguard_approval_decisions",
            "Approver decisions recorded, by verdict and channel.",
            ("verdict", "channel"),
            c.decisions.items(),
        )
        yield GaugeMetricFamily(
            "pgguard_ledger_queue_entries",
            "Ledger entries in memory, waiting for the state database.",
            value=self.gauges.ledger_queue(),
        )
        yield GaugeMetricFamily(
            "pgguard_ledger_spool_bytes",
            "Bytes in the ledger's local spool.",
            value=spool_bytes(self.gauges.spool_dir),
        )
        yield _counter(
            "pgguard_errors",
            "ErrorResponses pgguard itself sent to clients, by SQLSTATE.",
            ("sqlstate",),
            [((k,), v) for k, v in c.errors.items()],
        )
        yield _histogram(
            "pgguard_classify_seconds",
            "Time to classify one statement text that pgguard's decision cache did not answer "
            "by its exact or literal-blind text (cache hits are not observed).",
            c.classify,
        )
        yield _histogram(
            "pgguard_upstream_connect_seconds",
            "Time to open and authenticate an upstream session.",
            c.upstream_connect,
        )


def _counter(
    name: str, doc: str, labels: tuple[str, ...], items: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(items):
        family.add_metric(key, value)
    return family


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric((), histogram.cumulative(), histogram.total)
    return family


def registry(gauges: Gauges) -> CollectorRegistry:
    """A registry of its own (not the global default): one per running pgguard."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Instruments(gauges))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
