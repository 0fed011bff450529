"""The session model as it was before it kept per-name indexes (at 54959e3): a walk over every
unanswered operation per lookup, quadratic on a long pipeline, kept only as the oracle the
indexed `pgguard.wire.session.SessionModel` is checked against (test_session_index.py).

What one operation does to a name (`_statement_after`, `_portal_after`, `_bindable`...) is
imported from the model itself, so a change to those semantics is made once; what stays here is
the old way of finding the operations a lookup must apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from pgguard.errors import ProtocolViolation

# What each operation does to a name is the model's own (one definition, not a copy that could
# drift): this oracle checks how the indexed model finds the operations a lookup must apply.
from pgguard.wire.session import (
    _NO_PORTAL,
    _NOTHING,
    MAX_POSSIBILITIES,
    Bound,
    Possible,
    PossiblePortal,
    _apply_failed_at,
    _apply_succeeded,
    _apply_uncertain,
    _bindable,
    _key,
    _portal_after,
    _statement_after,
    _texts,
)


class _Op(NamedTuple):  # a tuple: made for every extended message, so it must be cheap
    group: int
    kind: str  # "parse", "bind", "close_s", "close_p", "query"
    name: str  # statement (parse, close_s) or portal (bind, close_p) name
    ack: int = 0  # messages of its group the server answers one for one, forwarded before it
    sql: bytes = b""  # parse
    statement: str = ""  # bind
    bind: bytes = b""  # bind


# Built without the NamedTuple's Python-level __new__ (one fewer frame per extended message);
# every field is given, in order.
_new_op: Callable[[type[_Op], tuple[int, str, str, int, bytes, str, bytes]], _Op] = tuple.__new__


class TooManyPossibilities(ProtocolViolation):
    """A name would stand for more texts than `MAX_POSSIBILITIES` (re-Parsed in a loop)."""


class ReferenceSessionModel:
    """Statement and portal names of one session, driven by the server's answers."""

    __slots__ = ("_acked", "_answered", "_errored", "_ops", "_portals", "_statements")

    def __init__(self) -> None:
        self._statements: dict[str, Possible] = {}
        self._portals: dict[str, PossiblePortal] = {}
        self._ops: list[_Op] = []  # forwarded, their group not answered yet, in order
        self._answered = 0  # ReadyForQuery messages seen
        self._errored = False  # the group being answered had an ErrorResponse
        self._acked = 0  # ... after this many of its messages were answered

    # --- what the client sent (in forwarding order) --------------------------------------------

    def parse(self, group: int, name: str, sql: bytes, ack: int = 0) -> None:
        """A Parse; refused when ``name`` may already stand for too many texts.

        Legitimate clients Close a name before they Parse it again; re-Parses that may not
        have taken effect only grow what every Execute of the name must be judged against.
        """
        possible = len(self._statements.get(name, _NOTHING))
        pending = 0
        if possible + len(self._ops) >= MAX_POSSIBILITIES:  # rare: only then count exactly
            pending = sum(1 for op in self._ops if op.kind == "parse" and op.name == name)
        if possible + pending >= MAX_POSSIBILITIES:
            raise TooManyPossibilities(
                f"prepared statement {name!r} may stand for {possible + pending} texts; Close "
                "it and wait for the server's answer before parsing it again"
            )
        self._ops.append(_new_op(_Op, (group, "parse", name, ack, sql, "", b"")))

    def bind(self, group: int, portal: str, statement: str, bind: bytes, ack: int = 0) -> None:
        self._ops.append(_new_op(_Op, (group, "bind", portal, ack, b"", statement, bind)))

    def close(self, group: int, kind: bytes, name: str, ack: int = 0) -> None:
        self._ops.append(_Op(group, "close_s" if kind == b"S" else "close_p", name, ack))

    def query(self, group: int) -> None:
        """A simple Query (its own group): drops the unnamed statement, may deallocate others.

        A Query only ever takes names away, so when the server holds nothing and nothing is in
        flight (every simple-protocol client, all the time) it changes nothing: not filed."""
        if self._ops or self._statements or self._portals:
            self._ops.append(_Op(group, "query", ""))

    # --- what the server said -------------------------------------------------------------------

    def error(self, acked: int | None = None) -> None:
        """An ErrorResponse after ``acked`` of the group's messages were answered: those ran,
        the next one failed (or an Execute or Describe did) and the rest were skipped. Without
        ``acked``, any prefix of the group may have run."""
        if not self._errored:
            self._errored = True
            self._acked = -1 if acked is None else acked

    def ready(self, txn_status: bytes) -> None:
        """ReadyForQuery: the group being answered is over; its operations become confirmed."""
        self._answered += 1
        ops = self._ops
        if ops:
            answered = self._answered
            if ops[-1].group <= answered:  # the usual case: nothing else is in flight
                done, self._ops = ops, []
            else:
                done = [op for op in ops if op.group <= answered]
                self._ops = [op for op in ops if op.group > answered]
            if self._errored and self._acked >= 0:
                _apply_failed_at(self._statements, self._portals, done, self._acked)
            elif self._errored:
                _apply_uncertain(self._statements, self._portals, done)
            else:
                _apply_succeeded(self._statements, self._portals, done, txn_status)
            for op in done:  # forget closed names, so the state stays bounded
                if op.kind != "bind" and self._statements.get(op.name) == _NOTHING:
                    del self._statements[op.name]
        self._errored = False
        if txn_status == b"I" and self._portals:
            self._portals.clear()  # portals live until the end of their transaction

    @property
    def pending(self) -> int:
        """Operations forwarded whose group the server has not answered."""
        return len(self._ops)

    def unanswered_before(self, group: int) -> bool:
        """Whether an operation of a group before ``group`` still waits for its answer."""
        return bool(self._ops) and self._ops[0].group < group

    # --- what a message being judged now may meet -----------------------------------------------

    def statement_texts(self, name: str, group: int) -> tuple[bytes, ...]:
        """Every text the server may hold under statement ``name`` for a message in ``group``."""
        return _texts(self._statement_at(name, group, len(self._ops)))

    def portal(self, name: str, group: int) -> tuple[Bound, ...]:
        """Every binding the server may hold under portal ``name`` for a message in ``group``."""
        quick = self._portal_bound_in_group(name, group)
        if quick is not None:
            return quick
        possible = self._portals.get(name, _NO_PORTAL)
        for index, op in enumerate(self._ops):
            if op.group > group:
                break
            touches = op.name == name if op.kind in ("bind", "close_p") else op.kind == "query"
            if not touches or (op.kind == "query" and name != ""):
                continue
            succeeded = True if op.group == group else None
            texts = (
                _bindable(self._statement_at(op.statement, op.group, index), op.statement)
                if op.kind == "bind"
                else ()
            )
            possible = _portal_after(possible, op, texts, succeeded)
        return tuple(sorted((b for b in possible if b is not None), key=_key))

    def _portal_bound_in_group(self, name: str, group: int) -> tuple[Bound, ...] | None:
        """The usual case, without the general walk: the unnamed portal was bound earlier in this
        very group (if the judged message runs, that Bind succeeded and replaced it), from a
        statement this group parsed unnamed, or that no unanswered message touches. None: take
        the general walk."""
        if name != "":
            return None  # a named portal's Bind fails while the name is in use: the long way
        ops = self._ops
        index = len(ops) - 1
        while index >= 0 and ops[index].group == group:
            op = ops[index]
            if op.name == name and (op.kind == "bind" or op.kind == "close_p"):
                break
            index -= 1
        else:
            return None
        if op.kind != "bind":
            return None
        statement = op.statement
        for earlier in reversed(ops[:index]):
            if earlier.kind == "query" or earlier.group != group:
                return None
            if earlier.name == statement and earlier.kind in ("parse", "close_s"):
                if earlier.kind == "parse" and statement == "":
                    return (Bound(statement, earlier.sql, op.bind),)  # it ran, so it replaced
                return None
        if ops[0].group != group:
            return None  # an unanswered group may have touched the statement
        texts = _texts(self._statements.get(statement, _NOTHING))
        if not texts:
            # Changed from 54959e3: a Bind of nothing fails, so the general walk (which keeps
            # what the portal held) decides; the quick path said "nothing" here, the walk did
            # not, and the message is skipped by the server either way.
            return None
        return tuple(Bound(statement, text, op.bind) for text in texts)

    def _statement_at(self, name: str, group: int, upto: int) -> Possible:
        """What ``name`` may hold for a message in ``group`` placed after ``self._ops[:upto]``."""
        possible = self._statements.get(name, _NOTHING)
        for op in self._ops[:upto]:
            if op.group > group:
                break
            if op.kind == "query" or (op.name == name and op.kind in ("parse", "close_s")):
                possible = _statement_after(possible, name, op, True if op.group == group else None)
        return possible
