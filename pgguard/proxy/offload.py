"""Classifying large statements off the event loop, each within a time budget.

Owns: `ParseOffload`, a process pool of ``[limits] parse_workers`` workers, each with its own
`PolicyEngine` loaded from the same rules; a worker also masks the text (ledger, reviewers). pglast
holds the GIL while it parses, so a thread would stall every session just the same; a process
does not.

Invariants:
* The worker decides with an empty session tracker; the caller replays what the statement
  prepares into the session's tracker, and refuses (54000) a large text that EXECUTEs prepared
  names, whose judgement needs the session (fail closed).
* A statement whose analysis takes longer than ``[limits] parse_budget`` seconds (queueing
  behind other long statements included, restarting workers not) is refused with 54000. Its
  worker is stopped (the pool is replaced), so a runaway parse never holds a worker; work of
  other sessions in that pool is retried once. Workers run at a lower priority (nice 10).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pgguard.errors import StatementTooComplex
from pgguard.masking import MaskedStatement, MaskingRules, mask_sql
from pgguard.policy import Context, Decision, LexState, PolicyEngine
from pgguard.sql.statenames import ProtectedNames

log = logging.getLogger(__name__)

_WARM_UP_TIMEOUT = 60.0  # starting a worker: a new interpreter, pglast, the rules
_engine: PolicyEngine | None = None  # the worker process's own engine
_masking: MaskingRules | None = None


def _init_worker(rules_dir: Path | None, mode: str, protected: ProtectedNames) -> None:
    global _engine, _masking
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pgguard's shutdown stops the pool itself
    os.nice(10)  # on a busy machine the proxy's own loop comes first
    _engine = PolicyEngine.load(rules_dir, mode=mode, protected=protected)  # type: ignore[arg-type]
    _masking = MaskingRules.load()  # the rules the ledger masks with (assembly.start)


Judged = tuple[Decision, bytes | None, MaskedStatement | None]  # with the blind key, masked


def _classify(sql: bytes, agent: str, database: str, lex: LexState, mask: bool) -> Judged:
    assert _engine is not None
    assert _masking is not None
    decision, blind = _engine.classify_keyed(sql, Context(agent, database, lex, None))
    masked = mask_sql(sql.decode("utf-8", "replace"), _masking) if mask else None
    return decision, blind, masked


def _ready() -> int:
    return os.getpid()


class ParseOffload:
    def __init__(
        self,
        *,
        rules_dir: Path | None,
        mode: str,
        protected: ProtectedNames,
        workers: int,
        threshold: int,
        budget: float,
    ) -> None:
        self.threshold = threshold
        self.budget = budget
        self._workers = workers
        self._initargs = (rules_dir, mode, protected)
        self._pool = self._new_pool()
        self._warming: asyncio.Future[list[int]] | None = None

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        # spawn: the proxy's process has threads (asyncpg, uvicorn); forking them is unsafe.
        return concurrent.futures.ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=self._initargs,
        )

    async def start(self) -> None:
        """Start every worker now (loading rules takes a while), not at the first big text."""
        self._warm()
        assert self._warming is not None
        await self._warming

    def _warm(self) -> None:
        # Submitting starts the worker processes in the submitting thread (fork, exec, pipes):
        # a helper thread does it, so restarting the pool never stalls the loop.
        pool, workers = self._pool, self._workers
        loop = asyncio.get_running_loop()

        async def warm() -> list[int]:
            futures = await asyncio.to_thread(lambda: [pool.submit(_ready) for _ in range(workers)])
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

        self._warming = loop.create_task(warm())

    def wants(self, sql: bytes) -> bool:
        return len(sql) > self.threshold

    async def classify(self, sql: bytes, ctx: Context, *, mask: bool = False) -> Judged:
        """The decision for ``sql`` in ``ctx`` (without its session; see the module docstring),
        its literal-blind key, and (``mask``) the text masked for the ledger and reviewers.

        StatementTooComplex (54000) when it is not reached within the budget.
        """
        for attempt in (1, 2):
            if self._warming is not None:
                # A pool just restarted is not this statement's time: the budget starts after.
                async with asyncio.timeout(_WARM_UP_TIMEOUT):
                    await asyncio.shield(self._warming)
            pool = self._pool
            future = pool.submit(_classify, bytes(sql), ctx.agent, ctx.database, ctx.lex, mask)
            try:
                async with asyncio.timeout(self.budget):
                    return await asyncio.wrap_future(future)
            except TimeoutError:
                future.cancel()
                self._replace(pool)
                raise StatementTooComplex(
                    f"pgguard could not analyse this statement within {self.budget:g} s "
                    "([limits] parse_budget)",
                    hint="Send smaller statements.",
                ) from None
            except BrokenProcessPool:
                # Another statement's runaway analysis stopped the pool under this one.
                if attempt == 2:
                    raise
                self._replace(pool)
        raise AssertionError("unreachable")

    def _replace(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        if pool is not self._pool:
            return  # someone replaced it already
        self._pool = self._new_pool()
        _stop(pool)
        self._warm()
        log.warning("statement analysis over budget: its worker processes were restarted")

    async def close(self) -> None:
        _stop(self._pool)


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()  # a parse in C cannot be interrupted any other way
    pool.shutdown(wait=False, cancel_futures=True)
