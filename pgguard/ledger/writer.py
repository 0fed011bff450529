"""The ledger writer: seals every entry on the hot path and ships it, in order, exactly once.

Owns: `LedgerWriter` (`record`, `record_durable`, `flush`, `close`, `stats`).

One ordered pipeline per writer: ``seal → memory queue → database``, with the spool file as the
overflow and failure path. Entries are sealed (chain seq + hash) in the order they are recorded.

- `record` (ordinary statements, outcomes, sessions): seal and append to a bounded deque, a few
  microseconds, never blocks, never raises. When the deque is full, or while the writer is in
  *spool mode*, the entry is appended to the spool file instead (fsync'd in batches by the
  shipper), so memory stays bounded under sustained load.
- `record_durable` (privileged statements, before they are forwarded): under the ship lock, the
  queued entries plus this one go to the database in one transaction within the timeout; if the
  database fails (or the writer is in spool mode), they are appended to the spool and fsync'd.
  Only if both fail does it raise `LedgerUnavailable` (the proxy refuses the statement); the
  entries stay queued in memory so the chain has no gap.
- The shipper task ships the queue in batches every ``flush_interval`` (or when a batch is full),
  and in spool mode drains the spool into the database when it is reachable again.

Order: while in spool mode every new entry goes to the spool, behind what is already there; the
queue then only holds entries older than the spool's, and the shipper ships the queue first. The
writer leaves spool mode only once the spool is drained (no await between the check and the
switch). So for each chain, seq n reaches the database or the spool before seq n+1, and
everything sealed before a durable entry is durable once `record_durable` returns: a crash can
lose only a not-yet-shipped TAIL of ordinary entries, never a middle.

Restart: a new writer opens a new chain (see `chain`); entries an earlier process left in the
spool keep their chain and are shipped first (the writer starts in spool mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pgguard.ledger.chain import Chain, SealedEntry, new_chain_id
from pgguard.ledger.model import LedgerEntry, LedgerUnavailable
from pgguard.ledger.spool import Spool, SpoolError
from pgguard.ledger.store import LedgerStore, LedgerStoreUnavailable

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters since the writer opened."""

    recorded: int
    shipped: int
    spooled: int
    lost: int
    queued: int
    spool_mode: bool


class LedgerWriter:
    """See the module docstring. Create with `open`; one per process, on one event loop."""

    def __init__(
        self,
        store: LedgerStore,
        spool: Spool | None,
        chain: Chain,
        *,
        timeout: float,
        batch_size: int,
        flush_interval: float,
        max_queue: int,
    ) -> None:
        self._store = store
        self._spool = spool
        self._chain = chain
        self._timeout = timeout
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._queue: deque[SealedEntry] = deque()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._spooling = False
        self._db_retry_at = 0.0
        self._backoff = 0.0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._recorded = self._shipped = self._spooled = self._lost = 0

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = "pgguard",
        spool_dir: Path,
        instance_id: str,
        timeout: float = 5.0,  # noqa: ASYNC109 - the per-operation timeout, not one deadline
        batch_size: int = 500,
        flush_interval: float = 0.2,
        max_queue: int = 10000,
    ) -> LedgerWriter:
        """Open the spool, try the database (an unreachable one is retried in the background),
        start a new chain and the shipper."""
        store = LedgerStore(dsn, schema=schema, timeout=timeout)
        spool: Spool | None
        try:
            spool = Spool.open(spool_dir)
        except SpoolError as exc:
            log.error("ledger spool unavailable (privileged statements need the database): %s", exc)
            spool = None
        writer = cls(
            store,
            spool,
            Chain(new_chain_id(instance_id)),
            timeout=timeout,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_queue=max_queue,
        )
        try:
            await store.connect()
        except LedgerStoreUnavailable as exc:
            log.warning("ledger: %s; spooling until it is back", exc.message)
            writer._database_failed()
        if spool is not None and not spool.drained():
            writer._spooling = True  # an earlier process's entries go first
        writer._task = asyncio.create_task(writer._ship_forever(), name="pgguard-ledger-shipper")
        return writer

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    def stats(self) -> WriterStats:
        return WriterStats(
            recorded=self._recorded,
            shipped=self._shipped,
            spooled=self._spooled,
            lost=self._lost,
            queued=len(self._queue),
            spool_mode=self._spooling,
        )

    # --- recording ------------------------------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Seal and enqueue ``entry`` (or spool it when the queue is full). Never raises."""
        try:
            sealed = self._chain.seal(entry)
        except (ValueError, TypeError) as exc:
            self._lost += 1
            log.error("ledger: cannot seal entry %s: %s", entry.entry_id, exc)
            return
        self._recorded += 1
        if not self._spooling and len(self._queue) < self._max_queue:
            self._queue.append(sealed)
            if len(self._queue) >= self._batch_size:
                self._wake.set()
            return
        self._overflow(sealed)

    async def record_durable(self, entry: LedgerEntry) -> None:
        """Return only once ``entry`` (and everything recorded before it) is in the database or
        fsync'd in the spool; raise `LedgerUnavailable` when neither is possible."""
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        try:
            sealed = self._chain.seal(entry)
        except (ValueError, TypeError) as exc:
            raise LedgerUnavailable(f"cannot seal ledger entry: {exc}") from exc
        self._recorded += 1
        self._queue.append(sealed)  # behind everything recorded earlier
        try:
            await asyncio.wait_for(self._lock.acquire(), self._timeout)
        except TimeoutError:
            raise LedgerUnavailable("the ledger is busy; entry kept in memory") from None
        try:
            if sealed not in self._queue:
                return  # the shipper made it durable while we waited for the lock
            batch = list(self._queue)
            if not self._spooling and self._database_due():
                try:
                    await self._store.insert(batch)
                except LedgerStoreUnavailable as exc:
                    log.warning("ledger: %s; spooling", exc.message)
                    self._database_failed()
                else:
                    self._database_ok()
                    self._forget(batch)
                    return
            if not self._spool_durably(batch):
                raise LedgerUnavailable(
                    "the ledger can record this statement neither in the state database nor "
                    "in its spool",
                    hint="check the state database and the [ledger] spool_dir",
                )
            self._forget(batch)
            self._spooling = True
        finally:
            self._lock.release()

    async def flush(self) -> None:
        """Ship (or spool and fsync) everything recorded so far; drain the spool if possible."""
        await self._ship_once(drain_all=True)

    async def close(self) -> None:
        """Stop the shipper and leave nothing in memory: ship it, or spool it and fsync."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._ship_once(drain_all=True)
        finally:
            async with self._lock:
                if self._queue:
                    batch = list(self._queue)
                    if self._spool_durably(batch):
                        self._forget(batch)
                    else:
                        self._lost += len(batch)
                        log.error("ledger: %d entries lost at shutdown", len(batch))
                if self._spool is not None:
                    with contextlib.suppress(SpoolError):
                        self._spool.close()
            await self._store.close()

    # --- shipping -------------------------------------------------------------------------------

    async def _ship_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            try:
                await self._ship_once(drain_all=False)
            except Exception:  # the shipper must survive anything; entries stay queued
                log.exception("ledger shipper failed; retrying")

    async def _ship_once(self, *, drain_all: bool) -> None:
        while self._queue:
            async with self._lock:
                if not await self._ship_queue_batch():
                    break
        if self._spool is not None and self._spooling:
            with contextlib.suppress(SpoolError):
                self._spool.flush()
            while self._spooling and self._database_due():
                async with self._lock:
                    more = await self._ship_spool_batch()
                if not more or not drain_all:
                    break

    async def _ship_queue_batch(self) -> bool:
        """Ship the oldest queued batch; on failure spool the whole queue. True if shipped."""
        if not self._queue:
            return False
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        if not self._spooling and self._database_due():
            try:
                await self._store.insert(batch)
            except LedgerStoreUnavailable as exc:
                log.warning("ledger: %s; spooling", exc.message)
                self._database_failed()
            else:
                self._database_ok()
                self._forget(batch)
                return True
        everything = list(self._queue)
        if self._spool_durably(everything):
            self._forget(everything)
            self._spooling = True
        return False

    async def _ship_spool_batch(self) -> bool:
        """Ship one batch from the spool; leave spool mode when drained. True if more may wait."""
        spool = self._spool
        if spool is None or self._queue:  # older queued entries go first
            return False
        try:
            batch = spool.read_batch(self._batch_size)
            if batch:
                await self._store.insert(batch)
                self._database_ok()
            spool.commit()
        except LedgerStoreUnavailable as exc:
            log.warning("ledger: %s; keeping the spool", exc.message)
            self._database_failed()
            return False
        except SpoolError as exc:
            log.error("ledger: %s", exc.message)
            return False
        self._shipped += len(batch)
        if batch:
            return True
        if spool.drained():
            with contextlib.suppress(SpoolError):
                spool.reset()
            self._spooling = False
            log.info("ledger: spool drained")
        return False

    # --- helpers --------------------------------------------------------------------------------

    def _overflow(self, sealed: SealedEntry) -> None:
        if self._spool is not None:
            try:
                self._spool.append([sealed])
            except SpoolError as exc:
                log.error("ledger: %s", exc.message)
            else:
                self._spooled += 1
                self._spooling = True
                return
        if len(self._queue) < 2 * self._max_queue:  # no spool: some slack before dropping
            self._queue.append(sealed)
            return
        self._lost += 1
        log.error("ledger: entry %s lost (queue full, spool unavailable)", sealed.entry.entry_id)

    def _spool_durably(self, batch: list[SealedEntry]) -> bool:
        if self._spool is None:
            return False
        try:
            self._spool.append(batch)
            self._spool.flush()
        except SpoolError as exc:
            log.error("ledger: %s", exc.message)
            return False
        self._spooled += len(batch)
        return True

    def _forget(self, batch: list[SealedEntry]) -> None:
        """Drop ``batch`` (the oldest queued entries) from the queue once they are safe."""
        for _ in batch:
            self._queue.popleft()

    def _database_due(self) -> bool:
        return time.monotonic() >= self._db_retry_at

    def _database_failed(self) -> None:
        self._backoff = min(_MAX_BACKOFF, max(0.25, self._backoff * 2))
        self._db_retry_at = time.monotonic() + self._backoff

    def _database_ok(self) -> None:
        self._backoff = 0.0
        self._db_retry_at = 0.0
