"""The ledger's local spool: append-only JSON-lines files of sealed entries awaiting shipment.

Owns: `Spool` (append, fsync, read unshipped entries in order, mark them shipped) and
`SpoolError`.

Layout of the spool directory: segment files ``<ns-timestamp>-<pid>.jsonl`` (one `spool_line` of
a sealed entry, full or packed, or of a signed checkpoint, per line) and ``shipped.json``, the
watermark (chain id → last seq known to be in the database), replaced atomically (write, fsync,
rename, fsync the directory).

Invariants: a process only ever appends to the segment it created itself, so a line torn by a
crash of an earlier process is never continued; a torn or damaged line is skipped with a warning.
Entries come out of `read_batch` in the order they were appended. An entry is skipped on reading
when the watermark says it is already shipped, and a segment is deleted once everything in it is
shipped, so shipping from the spool is exactly-once together with the database's
``ON CONFLICT DO NOTHING`` (which covers a crash between the insert and the watermark).
Checkpoints are not filtered by the watermark (the database ignores one it has already). OS
errors become `SpoolError`. Not thread-safe: one event loop owns a spool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from pgguard.errors import PgGuardError
from pgguard.ledger.chain import Sealed, parse_spool_line
from pgguard.ledger.checkpoint import SignedCheckpoint

log = logging.getLogger(__name__)

WATERMARK = "shipped.json"
SEGMENT_SUFFIX = ".jsonl"


class SpoolError(PgGuardError):
    """The spool directory could not be written or read."""

    sqlstate = "58030"


class Spool:
    """Segments in ``directory``; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._watermark: dict[str, int] = {}
        self._segments: list[Path] = []  # oldest first; the last may be the active one
        self._active: Path | None = None
        self._fd: int | None = None
        self._dirty = False
        self._cursor: tuple[int, int] = (0, 0)  # (index into _segments, byte offset)
        self._pending: tuple[int, int] | None = None  # cursor after the batch being shipped
        self._pending_marks: dict[str, int] = {}

    @classmethod
    def open(cls, directory: Path) -> Spool:
        """Open (creating) the spool directory and find what earlier processes left unshipped."""
        spool = cls(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            spool._watermark = _read_watermark(directory / WATERMARK)
            spool._segments = sorted(
                p for p in directory.iterdir() if p.name.endswith(SEGMENT_SUFFIX)
            )
        except OSError as exc:
            raise SpoolError(f"cannot open the ledger spool {directory}: {exc}") from exc
        return spool

    # --- writing --------------------------------------------------------------------------------

    def append(self, entries: Sequence[Sealed]) -> None:
        """Append ``entries`` (not yet fsync'd: call `flush`)."""
        if not entries:
            return
        data = b"".join(e.spool_line() for e in entries)
        try:
            fd = self._fd if self._fd is not None else self._new_segment()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            self._abandon_segment()  # never append after a possibly partial line
            raise SpoolError(f"cannot write the ledger spool {self.directory}: {exc}") from exc
        self._dirty = True

    def flush(self) -> None:
        """fsync what was appended since the last flush."""
        if not self._dirty or self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._abandon_segment()
            raise SpoolError(f"cannot fsync the ledger spool {self.directory}: {exc}") from exc
        self._dirty = False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # --- shipping -------------------------------------------------------------------------------

    def read_batch(self, limit: int) -> list[Sealed]:
        """Up to ``limit`` unshipped entries after the cursor, in append order.

        The cursor moves only when `commit` confirms the batch reached the database, so a
        failed shipment reads the same entries again.
        """
        batch: list[Sealed] = []
        marks: dict[str, int] = {}
        index, offset = self._cursor
        try:
            while index < len(self._segments) and len(batch) < limit:
                path = self._segments[index]
                offset = self._read_segment(path, offset, limit, batch, marks)
                if len(batch) >= limit or path == self._active:
                    break
                index, offset = index + 1, 0
        except OSError as exc:
            raise SpoolError(f"cannot read the ledger spool {self.directory}: {exc}") from exc
        self._pending = (index, offset)
        self._pending_marks = marks
        return batch

    def commit(self) -> None:
        """The last `read_batch` reached the database: advance the watermark and the cursor."""
        if self._pending is None:
            return
        if self._pending_marks:
            for chain_id, seq in self._pending_marks.items():
                self._watermark[chain_id] = max(seq, self._watermark.get(chain_id, 0))
            self._write_watermark()
        index, offset = self._pending
        self._pending = None
        self._pending_marks = {}
        shipped, self._segments = self._segments[:index], self._segments[index:]
        self._cursor = (0, offset)
        for path in shipped:
            self._unlink(path)

    def drained(self) -> bool:
        """Everything appended so far is shipped (after a `read_batch` that returned nothing)."""
        index, offset = self._cursor
        if index >= len(self._segments):
            return True
        if index < len(self._segments) - 1:
            return False
        try:
            return self._segments[index].stat().st_size <= offset
        except OSError:
            return False

    def reset(self) -> None:
        """Delete the fully shipped segments and forget the watermark (call when `drained`)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in self._segments:
            self._unlink(path)
        self._segments = []
        self._active = None
        self._cursor = (0, 0)
        self._dirty = False
        if self._watermark:
            self._watermark = {}
            self._write_watermark()

    # --- internals ------------------------------------------------------------------------------

    def _read_segment(
        self,
        path: Path,
        offset: int,
        limit: int,
        batch: list[Sealed],
        marks: dict[str, int],
    ) -> int:
        with path.open("rb") as f:
            f.seek(offset)
            while len(batch) < limit:
                line = f.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    if path != self._active:  # an earlier process died mid-line
                        log.warning("ledger spool %s: ignoring a torn last line", path.name)
                        offset += len(line)
                    break
                offset += len(line)
                try:
                    sealed = parse_spool_line(line)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("ledger spool %s: skipping a damaged line: %s", path.name, exc)
                    continue
                if type(sealed) is SignedCheckpoint:
                    # Not filtered by the watermark: it shares its seq with the entry it signs,
                    # which may have been shipped in the batch before. The database ignores a
                    # checkpoint it already has.
                    batch.append(sealed)
                    continue
                if sealed.seq <= self._watermark.get(sealed.chain_id, 0):
                    continue
                batch.append(sealed)
                marks[sealed.chain_id] = max(sealed.seq, marks.get(sealed.chain_id, 0))
        return offset

    def _new_segment(self) -> int:
        path = self.directory / f"{time.time_ns():020d}-{os.getpid()}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        _fsync_directory(self.directory)
        self._fd = fd
        self._active = path
        self._segments.append(path)
        return fd

    def _abandon_segment(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._active = None  # its tail may be torn: readers treat it like a crashed one's

    def _write_watermark(self) -> None:
        target = self.directory / WATERMARK
        temporary = target.with_suffix(".tmp")
        try:
            with temporary.open("w", encoding="utf-8") as f:
                json.dump(self._watermark, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
            _fsync_directory(self.directory)
        except OSError as exc:
            raise SpoolError(f"cannot write the ledger spool watermark: {exc}") from exc

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("ledger spool: cannot delete shipped segment %s: %s", path.name, exc)


def _read_watermark(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        log.error(
            "ledger spool watermark %s is damaged; re-shipping (duplicates are ignored)", path
        )
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
