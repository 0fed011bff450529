"""Checking chains against signed checkpoints while `reader.verify` walks them (pure, no I/O).

Owns: `StoredCheckpoint` (a row of ``ledger_checkpoints``), `CheckpointAudit`.

The hash chain alone proves nothing against someone who can write the table: they can rewrite
an entry and recompute every later hash, or cut entries off the end. A checkpoint signed with a
key the database never sees pins a chain's head: if the entry stored at the checkpoint's seq
has the signed hash (and id), then, since every entry links to its predecessor's hash, all
entries up to it are what pgguard recorded (the walk's own hash checks cover the links).

Fed with the checkpoint rows and the anchor files' lines (each checked against the `KeyRing`;
anchored checkpoints of another ledger - another state schema - are set aside), then with every
entry in (chain, seq) order, `CheckpointAudit` reports:
- ``bad_signature``: a row or anchor line that does not verify (unknown key included); the
  checkpoint is then ignored. ``modified``: a row whose columns differ from its signed payload.
- ``checkpoint_deleted``: an anchored checkpoint missing from the table (it is still used).
- ``modified``: the entry at a checkpoint's seq is not the signed one, or it is but the walk
  found a broken link before it - every entry since the last checkpoint that held is reported
  as one run (which of them changed cannot be told).
- ``deleted``: a checkpoint's seq has no entry. ``truncated``: a checkpoint lies past the chain's
  end. ``chain_missing``: checkpoints name a chain that has no entry at all.
- ``inserted``: entries after the chain's final checkpoint.
- for a chain cut by `pgguard ledger prune` (``pruned``): ``deleted`` when no signed checkpoint
  has the cut's head; checkpoints at or below the cut are set aside (their entries are gone on
  purpose), anchored ones included. ``unanchored``: entries covered by
  no checkpoint - a *warning* instead when the chain is still open (no final checkpoint) and the
  run's first entry is younger than ``open_grace`` seconds (the newest entries of a running
  pgguard are not signed yet).

Memory: the checkpoints (one per ``checkpoint_entries`` entries) and one run at a time, never
the entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pgguard.ledger.checkpoint import Checkpoint, KeyRing, SignedCheckpoint, from_stored
from pgguard.ledger.problems import Problem, ProblemKind

Reporter = Callable[[Problem], None]
_NO_SEQ = 2**63  # above every seq (a bigint)


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """One row of ``ledger_checkpoints``, as read (columns untrusted)."""

    chain_id: str
    seq: int
    final: bool
    head_hash: str
    head_entry_id: str
    signed_at: datetime
    instance_id: str
    key_id: str
    payload: str
    signature: str


@dataclass(slots=True)
class _Known:
    checkpoint: Checkpoint
    in_table: bool
    anchored: bool = False


@dataclass(slots=True)
class _Run:
    """The entries of the current chain since the last checkpoint that held."""

    first_seq: int
    first_id: str
    first_received: float | None
    last_seq: int
    last_id: str
    count: int = 1
    broken: bool = False  # the walk found a broken link inside it


@dataclass(slots=True)
class _ChainState:
    chain_id: str
    checkpoints: list[Checkpoint]
    next: int = 0
    run: _Run | None = None
    last: tuple[int, str] = (0, "")
    final: Checkpoint | None = None


class CheckpointAudit:
    """See the module docstring. Call `entry` for every entry in (chain, seq) order, then
    `finish`."""

    def __init__(
        self,
        keys: KeyRing,
        stored: Iterable[StoredCheckpoint],
        anchors: Iterable[SignedCheckpoint],
        *,
        ledger: str,
        anchored: bool,
        open_grace: float,
        now: float,
        report: Reporter,
        warn: Reporter,
        pruned: Mapping[str, tuple[int, str, str]] | None = None,
    ) -> None:
        self._keys = keys
        # Chains cut by `pgguard ledger prune`: (seq, head hash, head entry id) of the cut.
        self._pruned = dict(pruned or {})
        self._ledger = ledger
        self.other_ledgers = 0  # anchored checkpoints of chains recorded in another schema
        self._anchored = anchored  # anchor files were given: their absence is no excuse
        self._grace = open_grace
        self._now = now
        self._report = report
        self._warn = warn
        known: dict[bytes, _Known] = {}
        for row in stored:
            self._add_stored(row, known)
        for signed in anchors:
            self._add_anchored(signed, known)
        self.checkpoints = len(known)
        self._by_chain: dict[str, list[Checkpoint]] = {}
        for item in known.values():
            self._by_chain.setdefault(item.checkpoint.chain_id, []).append(item.checkpoint)
        for checkpoints in self._by_chain.values():
            checkpoints.sort(key=lambda c: (c.seq, c.final))
        for chain_id, cut in self._pruned.items():
            self._check_cut(chain_id, cut)
        self._walked: set[str] = set()
        self._chain: _ChainState | None = None
        self._break: str | None = None  # a broken link before the next entry of this chain

    # --- the checkpoints ------------------------------------------------------------------------

    def _add_stored(self, row: StoredCheckpoint, known: dict[bytes, _Known]) -> None:
        where = f"checkpoint row {row.chain_id} #{row.seq}{' (final)' if row.final else ''}"
        try:
            signed = from_stored(row.payload, row.signature)
        except ValueError as exc:
            self._problem(
                row.head_entry_id, row.chain_id, row.seq, "bad_signature", f"{where}: {exc}"
            )
            return
        wrong = self._keys.check(signed)
        if wrong is not None:
            self._problem(
                row.head_entry_id, row.chain_id, row.seq, "bad_signature", f"{where}: {wrong}"
            )
            return
        c = signed.checkpoint
        if c.ledger != self._ledger:
            self._problem(
                c.head_entry_id,
                c.chain_id,
                c.seq,
                "bad_signature",
                f"{where}: signed for the ledger in schema {c.ledger!r}, not this one",
            )
            return
        differing = [
            name
            for name, got, signed_value in (
                ("chain_id", row.chain_id, c.chain_id),
                ("seq", row.seq, c.seq),
                ("final", row.final, c.final),
                ("head_hash", row.head_hash, c.head_hash),
                ("head_entry_id", row.head_entry_id, c.head_entry_id),
                ("signed_at", row.signed_at, _time(c.signed_at)),
                ("instance_id", row.instance_id, c.instance_id),
                ("key_id", row.key_id, c.key_id),
            )
            if got != signed_value
        ]
        if differing:
            self._problem(
                c.head_entry_id,
                c.chain_id,
                c.seq,
                "modified",
                f"{where}: columns differ from the signed checkpoint: {', '.join(differing)}",
            )
        known.setdefault(signed.payload, _Known(c, in_table=True))

    def _add_anchored(self, signed: SignedCheckpoint, known: dict[bytes, _Known]) -> None:
        c = signed.checkpoint
        wrong = self._keys.check(signed)
        if wrong is not None:
            self._problem(
                c.head_entry_id, c.chain_id, c.seq, "bad_signature", f"anchored checkpoint: {wrong}"
            )
            return
        if c.ledger != self._ledger:
            self.other_ledgers += 1  # an anchor file can serve several ledgers
            return
        item = known.get(signed.payload)
        cut = self._pruned.get(c.chain_id)
        if item is None and cut is not None and c.seq <= cut[0]:
            # pruned away with its entries; it still counts as known (it may prove the cut)
            known[signed.payload] = _Known(c, in_table=False, anchored=True)
            return
        if item is None:
            known[signed.payload] = item = _Known(c, in_table=False)
            self._problem(
                c.head_entry_id,
                c.chain_id,
                c.seq,
                "checkpoint_deleted",
                f"{'final ' if c.final else ''}checkpoint #{c.seq} (signed {c.signed_at}) is in "
                "the anchor file but not in ledger_checkpoints",
            )
        item.anchored = True

    def _check_cut(self, chain_id: str, cut: tuple[int, str, str]) -> None:
        """A pruned chain: the cut must be a signed checkpoint's head; the checkpoints up to it
        name entries that are gone on purpose, so they are set aside."""
        seq, head_hash, head_entry_id = cut
        checkpoints = self._by_chain.get(chain_id, [])
        if not any(
            c.seq == seq and c.head_hash == head_hash and c.head_entry_id == head_entry_id
            for c in checkpoints
        ):
            self._problem(
                head_entry_id,
                chain_id,
                seq,
                "deleted",
                f"#1..#{seq} were removed as pruned, but no signed checkpoint proves the chain's "
                "head at the cut: what was removed, and what now links to it, cannot be proven",
            )
        self._by_chain[chain_id] = [c for c in checkpoints if c.seq > seq]

    # --- the walk -------------------------------------------------------------------------------

    def link_broken(self, chain_id: str) -> None:
        """The walk found that the next entry of ``chain_id`` does not link to the one before
        (told before that entry's `entry`): a checkpoint after it then proves nothing about the
        entries before it."""
        self._break = chain_id

    def entry(
        self, chain_id: str, seq: int, entry_id: str, hash: str, received: float | None
    ) -> None:
        """The next entry of the walk (its stored id and hash; received: epoch seconds)."""
        state = self._chain
        if state is None or state.chain_id != chain_id:
            self._end_chain()
            state = self._chain = _ChainState(chain_id, self._by_chain.get(chain_id, []))
            self._walked.add(chain_id)
        checkpoints = state.checkpoints
        while state.next < len(checkpoints) and checkpoints[state.next].seq < seq:
            c = checkpoints[state.next]
            state.next += 1
            self._problem(
                c.head_entry_id,
                chain_id,
                c.seq,
                "deleted",
                f"entry #{c.seq}, signed by a checkpoint, is missing",
            )
        run = state.run
        if run is None:
            state.run = run = _Run(seq, entry_id, received, seq, entry_id, 0)
        run.last_seq, run.last_id, run.count = seq, entry_id, run.count + 1
        if self._break == chain_id:
            run.broken, self._break = True, None
        state.last = (seq, entry_id)
        held = failed = None
        while state.next < len(checkpoints) and checkpoints[state.next].seq == seq:
            c = checkpoints[state.next]
            state.next += 1
            if c.head_hash == hash and c.head_entry_id == entry_id:
                held = c
                if c.final:
                    state.final = c
            else:
                failed = c
        if failed is not None:
            self._run_problem(
                state,
                "modified",
                f"not the entries signed by checkpoint #{failed.seq} (signed head: entry "
                f"{failed.head_entry_id}, hash {failed.head_hash[:16]}…): rewritten and rehashed, "
                "inserted or deleted somewhere in this run",
            )
        elif held is not None and run.broken:
            self._run_problem(
                state,
                "modified",
                f"the head signed by checkpoint #{held.seq} is intact but these entries do not "
                "link up to it: rewritten and rehashed somewhere in this run",
            )
        elif held is not None:
            state.run = None

    def quiet_until(self, chain_id: str) -> int:
        """The walk's entries of ``chain_id`` below this seq may be told in bulk with `passed`
        instead of one `entry` each: a run is open and no checkpoint is due before it. 0 when
        the next entry must go through `entry` (another chain, no open run, a broken link)."""
        state = self._chain
        if state is None or state.chain_id != chain_id or state.run is None or self._break:
            return 0
        checkpoints = state.checkpoints
        return checkpoints[state.next].seq if state.next < len(checkpoints) else _NO_SEQ

    def passed(self, count: int, last_seq: int, last_id: str) -> None:
        """``count`` more entries of the current chain, each the next seq and linked to the one
        before, the last ``last_seq`` (below `quiet_until`): what `entry` would do for each."""
        state = self._chain
        assert state is not None
        run = state.run
        assert run is not None
        run.last_seq, run.last_id, run.count = last_seq, last_id, run.count + count
        state.last = (last_seq, last_id)

    def finish(self) -> None:
        """End the walk: the last chain's tail, and chains that checkpoints name but the
        ledger lacks."""
        self._end_chain()
        self._chain = None
        for chain_id, checkpoints in self._by_chain.items():
            if chain_id in self._walked:
                continue
            last = checkpoints[-1]
            self._problem(
                last.head_entry_id,
                chain_id,
                last.seq,
                "chain_missing",
                f"{len(checkpoints)} signed checkpoint(s), up to #{last.seq}, name this chain; "
                "none of its entries is in the ledger",
            )

    def _end_chain(self) -> None:
        state = self._chain
        if state is None:
            return
        remaining = state.checkpoints[state.next :]
        last_seq, last_id = state.last
        for c in remaining:
            self._problem(
                c.head_entry_id,
                state.chain_id,
                c.seq,
                "truncated",
                f"the chain ends at #{last_seq} (entry {last_id}) but checkpoint #{c.seq} signed "
                f"entry {c.head_entry_id}: #{last_seq + 1}..#{c.seq} were deleted",
            )
        if state.run is not None:
            self._judge_tail(state, cut=bool(remaining))
        elif state.final is None and not self._anchored:
            self._warn(
                Problem(
                    last_id,
                    state.chain_id,
                    last_seq,
                    "unanchored",
                    "the chain has no final checkpoint (still open, or pgguard stopped without "
                    "closing it): without the anchor file a cut tail would go unseen",
                )
            )

    def _judge_tail(self, state: _ChainState, *, cut: bool) -> None:
        run = state.run
        assert run is not None
        if cut:
            self._run_problem(
                state, "unanchored", "the chain was cut before the checkpoint that covered these"
            )
        elif state.final is not None:
            self._run_problem(
                state, "inserted", f"after the chain's final checkpoint #{state.final.seq}"
            )
        elif run.first_received is not None and self._now - run.first_received <= self._grace:
            self._warn(
                self._run(
                    state,
                    "unanchored",
                    "the newest entries of a chain still open, not signed yet",
                )
            )
        else:
            self._run_problem(
                state,
                "unanchored",
                "covered by no signed checkpoint"
                + ("" if state.checkpoints else " (the chain has none)"),
            )

    # --- reporting ------------------------------------------------------------------------------

    def _run(self, state: _ChainState, kind: ProblemKind, detail: str) -> Problem:
        run = state.run
        assert run is not None
        state.run = None
        return Problem(
            run.first_id,
            state.chain_id,
            run.first_seq,
            kind,
            f"#{run.first_seq}..#{run.last_seq} ({run.count} entries): {detail}",
            last_entry_id=run.last_id,
            last_seq=run.last_seq,
            count=run.count,
        )

    def _run_problem(self, state: _ChainState, kind: ProblemKind, detail: str) -> None:
        self._report(self._run(state, kind, detail))

    def _problem(
        self, entry_id: str, chain_id: str, seq: int, kind: ProblemKind, detail: str
    ) -> None:
        self._report(Problem(entry_id, chain_id, seq, kind, detail))


def _time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
