"""A writer's checkpoints: when to sign its chain's head, and when to anchor what it signed.

Owns: `Checkpointer` (used by `pgguard.ledger.writer.LedgerWriter`).

The writer queues each checkpoint behind the entry it signs, so it reaches the database or the
spool in the chain's order; `Checkpointer` only decides when one is due (`CheckpointSchedule`),
signs it, and remembers it until it is durable. Invariant: a checkpoint is appended to the
anchor file (fsync'd, in a thread, so the event loop does not wait for the disk) and POSTed only
once it has left the writer's queue and the spool is synced - so the anchor file never names a
checkpoint that a crash kept from the table - and in the order it was signed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path

from pgguard.ledger.anchors import AnchorFile, AnchorPoster
from pgguard.ledger.chain import Chain
from pgguard.ledger.checkpoint import CheckpointSchedule, CheckpointSigner, SignedCheckpoint
from pgguard.ledger.keys import load_or_create_signing_key

log = logging.getLogger(__name__)

_MAX_UNANCHORED = 10_000  # checkpoints kept for an anchor file that keeps failing


class Checkpointer:
    """See the module docstring. One per writer, on its event loop."""

    def __init__(
        self,
        signer: CheckpointSigner,
        schedule: CheckpointSchedule,
        anchor_file: AnchorFile | None = None,
        poster: AnchorPoster | None = None,
    ) -> None:
        self.signer = signer
        self.schedule = schedule
        self._anchor_file = anchor_file
        self._poster = poster
        self._unanchored: list[SignedCheckpoint] = []  # signed, not yet anchored, oldest first
        self._lock = asyncio.Lock()

    @classmethod
    def open(
        cls,
        key_file: Path,
        *,
        instance_id: str,
        ledger: str,
        every_entries: int,
        every_seconds: float,
        anchor_file: Path | None,
        anchor_url: str | None,
        timeout: float,
    ) -> Checkpointer:
        """Load (or create) the key; `ConfigError` when it is unusable."""
        return cls(
            CheckpointSigner(load_or_create_signing_key(key_file), instance_id, ledger),
            CheckpointSchedule(every_entries, every_seconds, time.monotonic()),
            AnchorFile(anchor_file) if anchor_file is not None else None,
            AnchorPoster(anchor_url, timeout=timeout) if anchor_url else None,
        )

    def sign_if_due(self, chain: Chain, *, final: bool = False) -> SignedCheckpoint | None:
        """A checkpoint of ``chain``'s head when one is due (always when ``final``, if the chain
        has an entry); the caller queues it right behind the head."""
        head = chain.next_seq - 1
        now = time.monotonic()
        if head < 1 or not (final or self.schedule.due(head, now)):
            return None
        signed = self.signer.sign(
            chain.chain_id, head, chain.last_hash, chain.last_entry_id, final=final
        )
        self.schedule.signed(head, now)
        self._unanchored.append(signed)
        if len(self._unanchored) > _MAX_UNANCHORED:
            dropped = self._unanchored.pop(0)
            log.error(
                "ledger: checkpoint %s #%d never reached the anchor file",
                dropped.chain_id,
                dropped.seq,
            )
        return signed

    async def anchor(self, queued: Collection[object], sync_spool: Callable[[], bool]) -> None:
        """Anchor the checkpoints, oldest first, that are no longer in ``queued`` (the writer's
        queue), once ``sync_spool`` (which fsyncs the spool) says they are durable."""
        if not self._unanchored:
            return
        async with self._lock:
            waiting = {id(item) for item in queued} if queued else set()
            ready: list[SignedCheckpoint] = []
            for signed in self._unanchored:
                if id(signed) in waiting:
                    break  # keep the file in the chain's order
                ready.append(signed)
            if not ready or not sync_spool():
                return  # not durable yet: one of them may be in the spool, unsynced
            if self._anchor_file is not None:
                try:
                    await asyncio.to_thread(self._anchor_file.append, ready)
                except OSError as exc:
                    log.error(
                        "ledger: cannot append to the anchor file %s: %s",
                        self._anchor_file.path,
                        exc,
                    )
                    return  # retried at the next round
            del self._unanchored[: len(ready)]
            if self._poster is not None:
                self._poster.post(ready)

    async def close(self, grace: float) -> None:
        """Close the anchor file; give posts in flight ``grace`` seconds."""
        if self._anchor_file is not None:
            self._anchor_file.close()
        if self._poster is not None:
            await self._poster.aclose(grace)
