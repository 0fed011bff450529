"""The worker side of `pgguard.proxy.offload`: what runs in the pool's processes, and only there.

Invariant: nothing heavy is imported at module level (and the initializer's arguments are plain
values), so a new worker lowers its priority before it loads pglast and the rules: a worker
(re)starting competes with the proxy's loop as little as a worker parsing.
"""

from __future__ import annotations

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
    os.nice(19)  # the proxy's own loop, the server and every client come first
    from pgguard.masking import MaskingRules
    from pgguard.policy import PolicyEngine
    from pgguard.sql.statenames import ProtectedNames

    protected = ProtectedNames(schema=schema, channels=channels)
    _engine = PolicyEngine.load(rules_dir, mode=mode, protected=protected)  # type: ignore[arg-type]
    _masking = MaskingRules.load()  # the rules the ledger and reviews mask with (assembly)


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
