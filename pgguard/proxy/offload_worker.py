"""The worker side of `pgguard.proxy.offload`: what runs in the pool's processes, and only there.

Invariant: nothing heavy is imported at module level (and the initializer's arguments are plain
values), so a new worker lowers its priority before it loads pglast and the rules: a worker
(re)starting competes with the proxy's loop as little as a worker parsing.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgguard.masking import MaskedStatement, MaskingRules
    from pgguard.policy import Decision, LexState, PolicyEngine

    Judged = tuple[Decision, bytes | None, MaskedStatement | None]

_engine: PolicyEngine | None = None  # this process's own engine
_masking: MaskingRules | None = None


def init(rules_dir: Path | None, mode: str, schema: str | None, channels: tuple[str, ...]) -> None:
    global _engine, _masking
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pgguard's shutdown stops the pool itself
    lowest_priority()
    from pgguard.masking import MaskingRules
    from pgguard.policy import PolicyEngine
    from pgguard.sql.statenames import ProtectedNames

    protected = ProtectedNames(schema=schema, channels=channels)
    _engine = PolicyEngine.load(rules_dir, mode=mode, protected=protected)  # type: ignore[arg-type]
    _masking = MaskingRules.load()  # the rules the ledger and reviews mask with (assembly)


def lowest_priority() -> None:
    """Run only on CPU time nobody else wants: the proxy's own loop, the server and every client
    come first.

    nice 19 alone is not enough: Linux's scheduler lets a running nice-19 task finish a slice of
    a few milliseconds before a woken task of the proxy gets the CPU, and on a small machine that
    is every other session's latency. A SCHED_IDLE task is preempted at once by any ordinary
    task that wakes (sched(7)). Where that policy does not exist, nice 19 is what there is."""
    os.nice(19)
    set_idle = getattr(os, "sched_setscheduler", None)
    idle_policy = getattr(os, "SCHED_IDLE", None)
    if set_idle is not None and idle_policy is not None:
        with contextlib.suppress(OSError):  # a platform that refuses it: nice 19 stays
            set_idle(0, idle_policy, os.sched_param(0))


def classify(sql: bytes, agent: str, database: str, lex: LexState, mask: bool) -> Judged:
    from pgguard.masking import mask_sql
    from pgguard.policy import Context

    assert _engine is not None
    assert _masking is not None
    decision, blind = _engine.classify_keyed(sql, Context(agent, database, lex, None))
    masked = mask_sql(sql.decode("utf-8", "replace"), _masking) if mask else None
    return decision, blind, masked


def ready() -> int:
    return os.getpid()
