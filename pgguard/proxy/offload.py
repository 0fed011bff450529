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
  other sessions in that pool is retried once. Workers run at the lowest priority (SCHED_IDLE
  and nice 19, set before they load anything: `pgguard.proxy.offload_worker.lowest_priority`),
  so under a full CPU a long statement waits - and may be refused for its budget - rather than
  slow anyone else. The fork server they are forked from is lowered too
  (`pgguard.proxy.offload_server`), so a restarted worker is at the lowest priority from its
  first instruction, not only once its initializer runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pgguard.errors import StatementTooComplex
from pgguard.masking import MaskedStatement
from pgguard.policy import Context, Decision
from pgguard.proxy import offload_worker
from pgguard.sql.statenames import ProtectedNames

log = logging.getLogger(__name__)

_WARM_UP_TIMEOUT = 60.0  # starting a worker: a new interpreter, pglast, the rules
Judged = tuple[Decision, bytes | None, MaskedStatement | None]  # with the blind key, masked


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


# offload_server first: it lowers the fork server's priority, which every worker inherits.
_PRELOAD = [
    "pgguard.proxy.offload_server",
    "pgguard.proxy.offload_worker",
    "pgguard.policy",
    "pgguard.masking",
]


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
        self._initargs = (rules_dir, mode, protected.schema, protected.channels)
        self._pool = self._new_pool()
        self._warming: asyncio.Future[list[int]] | None = None

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        # forkserver: the proxy's process has threads (asyncpg, uvicorn), so it must not fork
        # itself; a fork server (started once, single-threaded, with pglast and the classifier
        # already imported) makes a restarted worker cost a fork and loading the rules.
        return concurrent.futures.ProcessPoolExecutor(
            self._workers,
            mp_context=_context(),
            initializer=offload_worker.init,
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
            futures = await asyncio.to_thread(
                lambda: [pool.submit(offload_worker.ready) for _ in range(workers)]
            )
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
            future = pool.submit(
                offload_worker.classify, bytes(sql), ctx.agent, ctx.database, ctx.lex, mask
            )
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

    def reload(self, *, rules_dir: Path | None, mode: str, protected: ProtectedNames) -> None:
        """New rules (a reload): new workers load them; the old ones finish what they have."""
        self._initargs = (rules_dir, mode, protected.schema, protected.channels)
        old, self._pool = self._pool, self._new_pool()
        old.shutdown(wait=False)
        self._warm()

    async def close(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._warming
        _stop(self._pool)


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()  # a parse in C cannot be interrupted any other way
    pool.shutdown(wait=False, cancel_futures=True)
