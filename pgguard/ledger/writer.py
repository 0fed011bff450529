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
- *Feeders* (`add_feeder`) let a producer defer its cheapest entries: a feeder is called before
  anything else is sealed (`record`, `record_durable`), before each shipping round, and by
  `flush`/`stats`, and hands over what it holds through `record_packed_many`. Sealing then runs
  as one tight loop per batch instead of once per statement inside the relay's callbacks, and
  the chain order is still the order in which the producer recorded.

Order: while in spool mode every new entry goes to the spool, behind what is already there; the
queue then only holds entries older than the spool's, and the shipper ships the queue first. The
writer leaves spool mode only once the spool is drained (no await between the check and the
switch). So for each chain, seq n reaches the database or the spool before seq n+1, and
everything sealed before a durable entry is durable once `record_durable` returns: a crash can
lose only a not-yet-shipped TAIL of ordinary entries, never a middle.

Expansion (``expand``): a `LedgerExpander` task of its own, on its own connection, moves shipped
packs into the indexed ``ledger_rows``; it never touches the queue, the chain or the shipper.

Restart: a new writer opens a new chain (see `chain`); entries an earlier process left in the
spool keep their chain and are shipped first (the writer starts in spool mode).

Checkpoints (when opened with a signing key; see `pgguard.ledger.checkpoint` and
`pgguard.ledger.checkpointer`): before each shipping round the shipper asks its `Checkpointer`
whether the chain's head is due, and if so queues the signed checkpoint right behind the head
entry, so it travels to the database or the spool in the chain's order. `close` signs a final
one. Nothing of this runs per statement. After each round, checkpoints that have left the queue
and are durable (shipped, or in the fsync'd spool) go to the anchor file and the anchor URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pgguard.ledger.chain import Chain, Sealed, new_chain_id
from pgguard.ledger.checkpointer import Checkpointer
from pgguard.ledger.expander import LedgerExpander
from pgguard.ledger.model import LedgerEntry, LedgerUnavailable
from pgguard.ledger.packed import PackedOutcome, Ref
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
        checkpoints: Checkpointer | None = None,
    ) -> None:
        self._store = store
        self._spool = spool
        self._chain = chain
        self._timeout = timeout
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._queue: deque[Sealed] = deque()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._spooling = False
        self._db_retry_at = 0.0
        self._backoff = 0.0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._recorded = self._shipped = self._spooled = self._lost = 0
        self._durable_seq = 0  # every entry of this chain up to here is in the DB or fsync'd
        self._spooled_seq = 0  # the newest entry of this chain appended to the spool
        self._feeders: list[Callable[[], None]] = []
        self._checkpoints = checkpoints
        self._expander: LedgerExpander | None = None

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
        signing_key_file: Path | None = None,
        checkpoint_entries: int = 10_000,
        checkpoint_seconds: float = 5.0,
        anchor_file: Path | None = None,
        anchor_url: str | None = None,
        server_settings: Mapping[str, str] | None = None,
        expand: bool = False,
    ) -> LedgerWriter:
        """Open the spool, try the database (an unreachable one is retried in the background),
        start a new chain and the shipper.

        With ``signing_key_file`` (created when missing; `ConfigError` when unusable) the chain's
        head is signed every ``checkpoint_entries`` entries or ``checkpoint_seconds`` seconds,
        and each checkpoint also goes to ``anchor_file`` and ``anchor_url`` when given. With
        ``expand``, a `LedgerExpander` moves shipped packs into indexed rows in the background.
        """
        checkpoints = None
        if signing_key_file is not None:
            checkpoints = Checkpointer.open(
                signing_key_file,
                instance_id=instance_id,
                ledger=schema,
                every_entries=checkpoint_entries,
                every_seconds=checkpoint_seconds,
                anchor_file=anchor_file,
                anchor_url=anchor_url,
                timeout=timeout,
            )
        store = LedgerStore(dsn, schema=schema, timeout=timeout, server_settings=server_settings)
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
            checkpoints=checkpoints,
        )
        try:
            await store.connect()
        except LedgerStoreUnavailable as exc:
            log.warning("ledger: %s; spooling until it is back", exc.message)
            writer._database_failed()
        if spool is not None and not spool.drained():
            writer._spooling = True  # an earlier process's entries go first
        writer._task = asyncio.create_task(writer._ship_forever(), name="pgguard-ledger-shipper")
        if expand:
            writer._expander = LedgerExpander(
                dsn, schema=schema, timeout=timeout, server_settings=server_settings
            )
            writer._expander.start()
        return writer

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    def add_feeder(self, feeder: Callable[[], None]) -> None:
        """Call ``feeder`` before sealing or shipping anything (see the module docstring)."""
        self._feeders.append(feeder)

    def wake(self) -> None:
        """Ask the shipper to run soon (a feeder holds a batch's worth)."""
        self._wake.set()

    def _feed(self) -> None:
        for feeder in self._feeders:
            try:
                feeder()
            except Exception:  # a producer's bug must not stop the ledger
                log.exception("ledger: a feeder failed")

    def stats(self) -> WriterStats:
        self._feed()
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
        self._feed()
        try:
            sealed = self._chain.seal(entry)
        except (ValueError, TypeError) as exc:
            self._lost += 1
            log.error("ledger: cannot seal entry %s: %s", entry.entry_id, exc)
            return
        self._enqueue(sealed)

    def record_packed(
        self,
        session: Ref,
        text: Ref,
        outcome: PackedOutcome,
    ) -> str:
        """Seal an ordinary statement in the packed form and enqueue it, like `record`; its
        entry id.

        ``session`` and ``text`` come from `packed.session_record` / `packed.text_record`
        (callers cache them); ``outcome`` is (received_us, completed_us, command_tag, rows,
        sqlstate, error_message). The cheapest way into the ledger: no entry object, no JSON
        object, one short array and one sha256.
        """
        sealed = self._chain.seal_packed(session, text, outcome)
        self._enqueue(sealed)
        return sealed.entry_id

    def record_packed_many(self, items: Iterable[tuple[Ref, Ref, PackedOutcome]]) -> None:
        """`record_packed` for each (session, text, outcome), in order (what feeders call)."""
        sealed = self._chain.seal_packed_many(items)
        queue = self._queue
        if not self._spooling and len(queue) + len(sealed) <= self._max_queue:
            self._recorded += len(sealed)
            queue.extend(sealed)
            if len(queue) >= self._batch_size:
                self._wake.set()
            return
        for entry in sealed:  # at the bound: entry by entry, so the overflow is spooled
            self._enqueue(entry)

    def _enqueue(self, sealed: Sealed) -> None:
        self._recorded += 1
        if not self._spooling and len(self._queue) < self._max_queue:
            self._queue.append(sealed)
            if len(self._queue) >= self._batch_size:
                self._wake.set()
            return
        if self._move_queue_to_spool(sealed):
            return
        if len(self._queue) < 2 * self._max_queue:  # spool broken: some slack before dropping
            self._queue.append(sealed)
            return
        self._lost += 1
        log.error(
            "ledger: entry %s #%d lost (queue full, spool unavailable)", sealed.chain_id, sealed.seq
        )

    async def record_durable(self, entry: LedgerEntry) -> None:
        """Return only once ``entry`` (and everything recorded before it) is in the database or
        fsync'd in the spool; raise `LedgerUnavailable` when neither is possible."""
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        self._feed()
        try:
            sealed = self._chain.seal(entry)
        except (ValueError, TypeError) as exc:
            raise LedgerUnavailable(f"cannot seal ledger entry: {exc}") from exc
        self._recorded += 1
        if self._spooling:
            if self._move_queue_to_spool(sealed):
                if self._fsync_spool():
                    return
            else:
                self._queue.append(sealed)  # kept in order, so the chain has no gap
            raise _unavailable()
        self._queue.append(sealed)
        try:
            async with asyncio.timeout(self._timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise LedgerUnavailable("the ledger is busy; the entry is kept in memory") from None
        try:
            if self._durable_seq >= sealed.seq:
                return  # the shipper made it durable while we waited for the lock
            if not self._spooling and self._database_due():
                batch = list(self._queue)
                try:
                    await self._store.insert(batch)
                except LedgerStoreUnavailable as exc:
                    log.warning("ledger: %s; spooling", exc.message)
                    self._database_failed()
                else:
                    self._shipped_from_queue(batch)
            if self._durable_seq >= sealed.seq:
                return
            spooled = (not self._queue or self._move_queue_to_spool()) and self._fsync_spool()
            if spooled and self._durable_seq >= sealed.seq:
                return
            raise _unavailable()
        finally:
            self._lock.release()

    async def flush(self) -> None:
        """Ship (or spool and fsync) everything recorded so far; drain the spool if possible.

        Tries the database now, whatever the retry backoff says.
        """
        self._db_retry_at = 0.0
        await self._ship_once(everything=True)
        async with self._lock:
            if self._queue and self._move_queue_to_spool():
                self._fsync_spool()
        await self._anchor_durable()

    async def close(self) -> None:
        """Stop the shipper and leave nothing in memory: ship it, or spool it and fsync."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self._timeout * 3)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        try:
            await self.flush()
            self._feed()
            self._checkpoint(final=True)  # after everything recorded so far
            await self.flush()
        finally:
            if self._queue:
                self._lost += len(self._queue)
                log.error("ledger: %d entries lost at shutdown", len(self._queue))
            if self._spool is not None:
                with contextlib.suppress(SpoolError):
                    self._spool.close()
            await self._store.close()
            if self._checkpoints is not None:
                await self._checkpoints.close(self._timeout)
            if self._expander is not None:
                await self._expander.close()

    # --- shipping -------------------------------------------------------------------------------

    async def _ship_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            if self._closed:
                return
            try:
                await self._ship_once()
            except Exception:  # the shipper must survive anything; entries stay queued/spooled
                log.exception("ledger shipper failed; retrying")

    async def _ship_once(self, *, everything: bool = False) -> None:
        # One partial batch per wake-up at most: entries keep arriving while a batch is on its
        # way, and chasing them with a stream of small batches costs the state database (and
        # this process) a transaction per few entries. So after the first batch, only full ones.
        self._feed()
        self._checkpoint()
        try:
            await self._ship_rounds(everything)
        finally:
            await self._anchor_durable()

    async def _ship_rounds(self, everything: bool) -> None:
        first = True
        while self._queue and not self._spooling:
            if not (first or everything or len(self._queue) >= self._batch_size):
                break
            first = False
            async with self._lock:
                if not await self._ship_queue_batch():
                    break
        if not self._spooling:
            return
        if self._queue:
            self._move_queue_to_spool()
        self._fsync_spool()
        while self._spooling and self._database_due():
            async with self._lock:
                if not await self._ship_spool_batch():
                    break

    async def _ship_queue_batch(self) -> bool:
        """Ship the oldest queued batch; on failure spool the whole queue. True if shipped."""
        if not self._queue or self._spooling:
            return False
        batch = list(itertools.islice(self._queue, self._batch_size))  # deque[i] is O(i)
        if self._database_due():
            try:
                await self._store.insert(batch)
            except LedgerStoreUnavailable as exc:
                log.warning("ledger: %s; spooling", exc.message)
                self._database_failed()
            else:
                self._shipped_from_queue(batch)
                return True
        if self._move_queue_to_spool():
            self._fsync_spool()
        return False

    async def _ship_spool_batch(self) -> bool:
        """Ship one batch from the spool; leave spool mode when drained. True if more may wait."""
        spool = self._spool
        if spool is None or not self._spooling:
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
        for sealed in batch:
            if sealed.chain_id == self._chain.chain_id:
                self._durable_seq = max(self._durable_seq, sealed.seq)
        if batch:
            return True
        if spool.drained():
            with contextlib.suppress(SpoolError):
                spool.reset()
            self._spooling = False  # the queue (if any) holds only newer entries
            log.info("ledger: spool drained")
        return False

    # --- helpers --------------------------------------------------------------------------------

    def _move_queue_to_spool(self, extra: Sealed | None = None) -> bool:
        """Append the queue (oldest first) and ``extra`` to the spool, unsynced; spool mode on.

        The spool always holds entries older than the queue's, so this keeps them in order.
        """
        if self._spool is None:
            return False
        batch = list(self._queue)
        if extra is not None:
            batch.append(extra)
        try:
            self._spool.append(batch)
        except SpoolError as exc:
            log.error("ledger: %s", exc.message)
            return False
        self._queue.clear()
        self._spooling = True
        self._spooled += len(batch)
        if batch:
            self._spooled_seq = max(self._spooled_seq, batch[-1].seq)
        return True

    def _fsync_spool(self) -> bool:
        if self._spool is None:
            return False
        try:
            self._spool.flush()
        except SpoolError as exc:
            log.error("ledger: %s", exc.message)
            return False
        self._durable_seq = max(self._durable_seq, self._spooled_seq)
        return True

    def _shipped_from_queue(self, batch: list[Sealed]) -> None:
        """``batch`` (the oldest queued entries, maybe spooled meanwhile) is in the database."""
        self._database_ok()
        self._shipped += len(batch)
        self._durable_seq = max(self._durable_seq, batch[-1].seq)
        # By identity, not seq: a checkpoint shares its seq with the entry it signs. The queue
        # only grows at its end while a batch is on its way, or is moved to the spool whole (and
        # then holds only newer entries), so either it still starts with the batch or it holds
        # none of it.
        queue = self._queue
        if not queue or queue[0] is not batch[0]:
            return
        if len(queue) == len(batch):
            queue.clear()  # the usual case: the batch was the whole queue
            return
        for _ in range(len(batch)):
            queue.popleft()

    # --- checkpoints ----------------------------------------------------------------------------

    def _checkpoint(self, *, final: bool = False) -> None:
        """Queue a checkpoint of the chain's head behind it, when one is due."""
        if self._checkpoints is None:
            return
        signed = self._checkpoints.sign_if_due(self._chain, final=final)
        if signed is None:
            return
        if not self._spooling and len(self._queue) < 2 * self._max_queue:
            self._queue.append(signed)  # shipped with the next batch, no round of its own
        elif not self._move_queue_to_spool(signed):
            self._queue.append(signed)  # spool broken: keep it in order with the entries

    async def _anchor_durable(self) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.anchor(self._queue, self._sync_spool)

    def _sync_spool(self) -> bool:
        return self._spool is None or self._fsync_spool()

    def _database_due(self) -> bool:
        return time.monotonic() >= self._db_retry_at

    def _database_failed(self) -> None:
        self._backoff = min(_MAX_BACKOFF, max(0.25, self._backoff * 2))
        self._db_retry_at = time.monotonic() + self._backoff

    def _database_ok(self) -> None:
        self._backoff = 0.0
        self._db_retry_at = 0.0


def _unavailable() -> LedgerUnavailable:
    return LedgerUnavailable(
        "the ledger can record this statement neither in the state database nor in its spool",
        hint="check the state database and the [ledger] spool_dir",
    )
