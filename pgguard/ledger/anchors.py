"""Checkpoints kept outside the state database: the local anchor file and an optional URL.

Owns: `AnchorFile` (append-only JSON lines, fsync'd), `read_anchors`, `AnchorPoster` (POST each
checkpoint to ``[ledger] anchor_url``, in the background).

Why: signatures stop a database writer from forging checkpoints, not from deleting them with the
entries they cover. A chain's tail, or a whole chain, deleted together with its checkpoints is
only visible against a copy the database writer cannot reach: ``pgguard ledger verify --anchors``
compares the table with these lines.

Invariants: a line is one `SignedCheckpoint.line`; the file is only ever appended to, by one
write per batch of lines, and fsync'd before `AnchorFile.append` returns. A line is appended
only once the checkpoint is durable in the database or the spool (see the writer), so the file
never names a checkpoint that a crash kept from the table. Posting never blocks the caller and
never raises: failures are logged (without the URL, which may carry a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson

from pgguard.ledger.checkpoint import SignedCheckpoint, parse_signed

log = logging.getLogger(__name__)

_MAX_POSTS_IN_FLIGHT = 32


class AnchorFile:
    """The append-only file of signed checkpoints (opened on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, checkpoints: Sequence[SignedCheckpoint]) -> None:
        """Append one line per checkpoint and fsync; OSError when that fails."""
        if not checkpoints:
            return
        if self._fd is None:
            self._fd = self._open()
        data = b"".join(c.line() for c in checkpoints)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            self.close()  # never append after a possibly partial line: reopen next time
            raise

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size:
            # A line torn by a crash must not run into the next one: end it first.
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        return fd


def read_anchors(path: Path) -> tuple[list[SignedCheckpoint], list[str]]:
    """The checkpoints in an anchor file, and a description of each line that is not one
    (OSError when the file cannot be read). Signatures are not checked here."""
    checkpoints: list[SignedCheckpoint] = []
    damaged: list[str] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                checkpoints.append(parse_signed(record))
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                damaged.append(f"{path} line {number}: {exc}")
    return checkpoints, damaged


class AnchorPoster:
    """POSTs each checkpoint's line (``application/json``) to a URL, in background tasks."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = url
        parts = urlsplit(url)
        self._where = f"{parts.scheme}://{parts.hostname}"  # for logs: no path, no token
        self._client = httpx.AsyncClient(timeout=timeout)
        self._tasks: set[asyncio.Task[None]] = set()

    def post(self, checkpoints: Sequence[SignedCheckpoint]) -> None:
        for checkpoint in checkpoints:
            if len(self._tasks) >= _MAX_POSTS_IN_FLIGHT:
                log.warning(
                    "ledger: anchor URL %s is not keeping up; checkpoint %s #%d not posted",
                    self._where,
                    checkpoint.chain_id,
                    checkpoint.seq,
                )
                continue
            task = asyncio.create_task(self._post(checkpoint), name="pgguard-ledger-anchor-post")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, checkpoint: SignedCheckpoint) -> None:
        try:
            response = await self._client.post(
                self._url,
                content=checkpoint.line(),
                headers={"content-type": "application/json"},
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(
                "ledger: posting checkpoint %s #%d to %s failed: %s",
                checkpoint.chain_id,
                checkpoint.seq,
                self._where,
                type(exc).__name__,
            )

    async def aclose(self, grace: float) -> None:
        """Give posts in flight ``grace`` seconds, then cancel them and close the client."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._client.aclose()
