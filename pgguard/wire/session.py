"""The server's prepared statements and portals, as the server's answers say they are (sans-IO).

Owns: `SessionModel`. The proxy judges an Execute by the text its portal runs, so it must know
what the *server* holds under each statement and portal name - not what the client asked for.
After an ErrorResponse the server skips every extended-protocol message up to Sync (protocol
docs, "Extended Query"), so a Parse, Bind or Close the proxy forwarded may never have happened.

The model keeps, for every name, the set of everything the server may hold under it (``None``:
nothing). Each forwarded Parse, Bind and Close is an *operation* filed under the Sync group whose
ReadyForQuery ends it (the numbering `pgguard.wire.outcomes` uses). Operations change the
*confirmed* state only when the server has answered their group:

- ReadyForQuery with no error in the group: every operation of the group ran and succeeded, so
  each is applied as a success (and a state in which one would have failed is ruled out);
- an ErrorResponse in the group: some prefix of the group's operations ran, any of them may have
  failed, the rest were skipped: the result is the union over every prefix and outcome.

A message being judged now sees the confirmed state, then every group the server has not
answered yet (each as "some prefix ran"), then the operations of its own open group before it as
successes: if one of those failed, the server skips the message being judged, so it never runs.

What each operation does (PostgreSQL's postgres.c): a named Parse of a name already in use fails
(42P05); the unnamed Parse drops the old unnamed statement first; any Parse may fail on the
server (analysis errors), leaving the name empty. A Bind of a named portal in use fails; Close of
a missing name succeeds. A Bind of a named statement the model holds no text for binds what a SQL
``PREPARE`` may have put there, taken as the text ``EXECUTE "name"`` (`sql_prepared_text`). A
ReadyForQuery that reports no transaction ('I') means every portal is gone. A simple Query drops
the unnamed statement (and may DEALLOCATE or DISCARD named ones: SQL ``PREPARE``d names are the
gate's business, `pgguard.policy.session`).

The server also drops names the model never sees go: a transaction's end drops every portal
(``COMMIT; BEGIN`` answers 'T'; an Execute of COMMIT mid-pipeline), ``ROLLBACK TO SAVEPOINT``
those made since, SQL ``CLOSE`` a protocol portal, an Execute of ``DEALLOCATE`` a statement. So
a name the model holds may be free on the server, and the model never concludes that a Parse or
Bind failed *because* its name was in use: one that succeeded leaves its new text whatever the
name held, one that may have run adds its new text to the old. (What the server holds is still
among the candidates: a stale name only makes a Bind or Execute of it fail on the server.)

Invariant (the proxy's promise): the set of candidates for a name always contains what the
server really holds. Callers judge the strictest candidate, and refuse to show a reviewer one
text while the server may run another.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import NamedTuple

from pgguard.errors import ProtocolViolation

MAX_POSSIBILITIES = 64  # texts one name may stand for before the client is cut off (08P01)
# Unanswered operations one lookup may walk (those of the name asked about, back to the newest
# of the judged group that fixes it); more only comes from a client that re-binds one name in
# hundreds of groups before their answers, and is cut off (08P01) rather than stall the loop.
MAX_WALK = 1024


class Bound(NamedTuple):
    """What a portal runs: the statement name it was bound from, the text, the Bind body."""

    statement: str
    sql: bytes
    bind: bytes


Possible = frozenset[bytes | None]
PossiblePortal = frozenset[Bound | None]

_NOTHING: Possible = frozenset({None})
_NO_PORTAL: PossiblePortal = frozenset({None})


class _Op(NamedTuple):  # a tuple: made for every extended message, so it must be cheap
    group: int
    kind: str  # "parse", "bind", "close_s", "close_p", "query"
    name: str  # statement (parse, close_s) or portal (bind, close_p) name
    ack: int = 0  # messages of its group the server answers one for one, forwarded before it
    sql: bytes = b""  # parse
    statement: str = ""  # bind
    bind: bytes = b""  # bind
    seq: int = 0  # its place among every operation the session ever filed


# Built without the NamedTuple's Python-level __new__ (one fewer frame per extended message);
# every field is given, in order.
_new_op: Callable[[type[_Op], tuple[int, str, str, int, bytes, str, bytes, int]], _Op] = (
    tuple.__new__
)


class TooManyPossibilities(ProtocolViolation):
    """A name would stand for more texts than `MAX_POSSIBILITIES` (re-Parsed in a loop), or
    finding what it stands for would take more than `MAX_WALK` unanswered operations."""


class SessionModel:
    """Statement and portal names of one session, driven by the server's answers.

    Cost: filing an operation and a ReadyForQuery are O(1) per operation. A lookup walks only
    the unanswered operations of the name it asks about, newest first, and stops at the newest
    one of the judged group that fixes the name whatever it held before (a Close, a Parse, a
    Bind of a known statement; a simple Query dropping the unnamed statement): a pipeline of
    thousands of Parse/Bind/Execute before one Sync (psycopg's ``executemany``) costs O(1) per
    message, not a walk over the whole pipeline on the proxy's shared loop. What a walk over
    earlier groups learns is kept until the next answer, so a name touched in every group of a
    long pipeline (a named portal re-bound before each Sync) is not walked again from its
    start at each lookup, and a name's answered operations leave its index in bulk.
    """

    __slots__ = (
        "_acked",
        "_answered",
        "_by_portal",
        "_by_statement",
        "_errored",
        "_memo_portal",
        "_memo_statement",
        "_ops",
        "_parses",
        "_portals",
        "_queries",
        "_queries_head",
        "_seq",
        "_statements",
    )

    def __init__(self) -> None:
        self._statements: dict[str, Possible] = {}
        self._portals: dict[str, PossiblePortal] = {}
        self._ops: deque[_Op] = deque()  # forwarded, their group not answered yet, in order
        self._seq = 0  # operations ever filed
        # The same unanswered operations, by the name they touch (in order), and the Queries
        # (which touch every name) by their place, for bisecting. A name's list may start with
        # answered operations (trimmed when they are half of it: `_forget_pending`); its last
        # one is always unanswered (else the name is not in the index).
        self._by_statement: dict[str, list[_Op]] = {}
        self._by_portal: dict[str, list[_Op]] = {}
        # What a lookup learnt, for the next one while no answer arrives: per name, (answers
        # seen, the judged group, seq, possible) - what the name may hold after every
        # unanswered operation of it up to ``seq``, all of groups before the judged one
        # ("ran or not", whatever later group asks). So a lookup walks only what was filed
        # since the last one, not every unanswered operation of the name again.
        self._memo_statement: dict[str, tuple[int, int, int, Possible]] = {}
        self._memo_portal: dict[str, tuple[int, int, int, PossiblePortal]] = {}
        self._queries: list[_Op] = []
        self._queries_head = 0  # answered Queries at the front of _queries
        # Unanswered Parses per statement name: [all, the newest group's number, its Parses].
        self._parses: dict[str, list[int]] = {}
        self._answered = 0  # ReadyForQuery messages seen
        self._errored = False  # the group being answered had an ErrorResponse
        self._acked = 0  # ... after this many of its messages were answered

    # --- what the client sent (in forwarding order) --------------------------------------------

    def parse(self, group: int, name: str, sql: bytes, ack: int = 0) -> None:
        """A Parse; refused when ``name`` may already stand for too many texts.

        Legitimate clients Close a name before they Parse it again; re-Parses that may not
        have taken effect (in groups the server has not answered) only grow what every Execute
        of the name must be judged against. Unnamed Parses earlier in this same group do not
        count: if a later message of the group runs, they ran and succeeded (psycopg's
        ``executemany`` without prepared statements sends thousands). Named ones do.
        """
        counts = self._parses.get(name)
        if counts is None:
            held = self._statements.get(name)
            if held is not None and len(held) >= MAX_POSSIBILITIES:
                self._refuse_too_many(name, 0)
            self._parses[name] = [1, group, 1]
        else:
            if counts[1] != group:
                counts[1], counts[2] = group, 0
            # Named: every unanswered Parse counts, its own group's too. The server refuses a
            # second Parse of a name in use, so no client sends thousands before a Sync - but
            # each one's text is judged and remembered by the gate (pgguard.policy.session).
            self._refuse_too_many(name, counts[0] - counts[2] if name == "" else counts[0])
            counts[0] += 1
            counts[2] += 1
        # Filed by hand (see _file): one frame fewer on the hot path.
        op = _new_op(_Op, (group, "parse", name, ack, sql, "", b"", self._seq))
        self._seq += 1
        self._ops.append(op)
        same_name = self._by_statement.get(name)
        if same_name is None:
            self._by_statement[name] = [op]
        else:
            same_name.append(op)

    def _refuse_too_many(self, name: str, uncertain: int) -> None:
        """Refuse a Parse of ``name`` when, with the Parses of unanswered earlier groups, it may
        already stand for `MAX_POSSIBILITIES` texts."""
        possible = len(self._statements.get(name, _NOTHING)) + uncertain
        if possible >= MAX_POSSIBILITIES:
            raise TooManyPossibilities(
                f"prepared statement {name!r} may stand for {possible} texts; Close it and "
                "wait for the server's answer before parsing it again"
            )

    def bind(self, group: int, portal: str, statement: str, bind: bytes, ack: int = 0) -> None:
        op = _new_op(_Op, (group, "bind", portal, ack, b"", statement, bind, self._seq))
        self._seq += 1
        self._ops.append(op)
        same_name = self._by_portal.get(portal)
        if same_name is None:
            self._by_portal[portal] = [op]
        else:
            same_name.append(op)

    def close(self, group: int, kind: bytes, name: str, ack: int = 0) -> None:
        op_kind = "close_s" if kind == b"S" else "close_p"
        self._file(_new_op(_Op, (group, op_kind, name, ack, b"", "", b"", self._seq)))

    def query(self, group: int) -> None:
        """A simple Query (its own group): drops the unnamed statement, may deallocate others.

        A Query only ever takes names away, so when the server holds nothing and nothing is in
        flight (every simple-protocol client, all the time) it changes nothing: not filed."""
        if self._ops or self._statements or self._portals:
            self._file(_new_op(_Op, (group, "query", "", 0, b"", "", b"", self._seq)))

    def _file(self, op: _Op) -> None:
        self._seq += 1
        self._ops.append(op)
        kind = op.kind
        if kind == "query":
            self._queries.append(op)
            return
        index = self._by_portal if kind == "bind" or kind == "close_p" else self._by_statement
        same_name = index.get(op.name)
        if same_name is None:
            index[op.name] = [op]
        else:
            same_name.append(op)

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
        if self._memo_statement:
            self._memo_statement.clear()  # made from the confirmed state this answer changes
        if self._memo_portal:
            self._memo_portal.clear()
        ops = self._ops
        if ops:
            answered = self._answered
            if ops[-1].group <= answered:  # the usual case: nothing else is in flight
                done = list(ops)
                ops.clear()
                self._by_statement.clear()
                if self._by_portal:
                    self._by_portal.clear()
                if self._queries:
                    self._queries.clear()
                    self._queries_head = 0
                if self._parses:
                    self._parses.clear()
            else:
                done = []
                while ops[0].group <= answered:
                    done.append(ops.popleft())
                self._forget_pending(done)
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

    def _forget_pending(self, done: list[_Op]) -> None:
        """Take the answered operations ``done`` (the oldest pending ones) out of the indexes.

        A name's list keeps its answered head until it is half of the list (amortised O(1)
        per operation: deleting the first of thousands one by one was a copy of the list each).
        """
        oldest = self._ops[0].seq if self._ops else self._seq  # the oldest still unanswered
        for op in done:
            kind = op.kind
            if kind == "query":
                self._queries_head += 1
                continue
            index = self._by_portal if kind == "bind" or kind == "close_p" else self._by_statement
            same_name = index.get(op.name)
            if same_name is not None:
                if same_name[-1].seq < oldest:
                    del index[op.name]  # all of its name answered
                elif len(same_name) > 64:
                    head = bisect_left(same_name, oldest, key=_seq_of)
                    if head * 2 > len(same_name):
                        del same_name[:head]
            if kind == "parse":
                counts = self._parses[op.name]
                counts[0] -= 1
                if not counts[0]:
                    del self._parses[op.name]
        if self._queries_head > 64 and self._queries_head * 2 > len(self._queries):
            del self._queries[: self._queries_head]  # amortised: each Query is moved once
            self._queries_head = 0

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
        return _texts(self._statement_at(name, group, self._before_group(group)))

    def portal(self, name: str, group: int) -> tuple[Bound, ...]:
        """Every binding the server may hold under portal ``name`` for a message in ``group``."""
        return self.portal_states(name, group)[0]

    def portal_states(self, name: str, group: int) -> tuple[tuple[Bound, ...], bool]:
        """`portal`, and whether the server may also hold no portal of that name (an earlier
        group that may or may not have dropped it). Both together: the server's answers to
        those groups decide which, so an Execute waits for them (see `unanswered_before`)."""
        quick = self._bound_just_now(name, group)
        if quick is not None:
            return quick, False
        possible = self._portal_at(name, group, self._before_group(group))
        if len(possible) == 1:
            (only,) = possible
            return ((), True) if only is None else ((only,), False)
        bindings = sorted((b for b in possible if b is not None), key=_key)
        if len(bindings) > MAX_POSSIBILITIES:
            raise TooManyPossibilities(
                f"portal {name!r} may stand for {len(bindings)} statements; wait for the "
                "server's answers (Sync) before executing it"
            )
        return tuple(bindings), len(bindings) < len(possible)

    def _bound_just_now(self, name: str, group: int) -> tuple[Bound] | None:
        """The usual case, answered without the general walk: the unnamed portal was bound
        in this very group (if the judged message runs, that Bind succeeded and replaced it) from
        one text - parsed unnamed earlier in the group, or the only one the server confirmed -
        and no Query is in flight. None: take the general walk."""
        same_portal = self._by_portal.get(name)
        if name != "" or same_portal is None or self._queries_head != len(self._queries):
            return None
        bind = same_portal[-1]
        if bind.group != group or bind.kind != "bind":
            return None
        same_statement = self._by_statement.get(bind.statement)
        if same_statement is None:
            held = self._statements.get(bind.statement)
            if held is None or len(held) != 1:
                return None
            (sql,) = held
            if sql is None:
                return None
            return (Bound(bind.statement, sql, bind.bind),)
        parse = same_statement[-1]
        if (
            bind.statement == ""
            and parse.kind == "parse"
            and parse.group == group
            and parse.seq < bind.seq
        ):
            return (Bound("", parse.sql, bind.bind),)
        return None

    def _statement_at(self, name: str, group: int, before: int) -> Possible:
        """What ``name`` may hold for a message in ``group`` filed after operation ``before``
        (its ``seq``): the confirmed state, then every unanswered group before ``group`` as
        "ran or not", then the operations of ``group`` itself as successes."""
        walked: list[_Op] = []
        possible = None  # what the newest operation that fixes the name left
        since = -1  # ... and its seq
        memo = None
        same_name = self._by_statement.get(name)
        if same_name is not None:
            memo = self._memo_statement.get(name)
            floor = -1
            if memo is not None and memo[0] == self._answered and memo[1] <= group:
                floor = memo[2] if memo[2] < before else -1
            if floor < 0:
                memo = None
            lo = bisect_left(same_name, self._ops[0].seq, key=_seq_of)
            for at in range(bisect_left(same_name, before, lo=lo, key=_seq_of) - 1, lo - 1, -1):
                op = same_name[at]
                if op.seq <= floor:
                    break  # the memo covers it and everything older
                if op.group == group:
                    # A Close or Parse that succeeded (else the judged message is skipped): the
                    # name held exactly this, whatever it held before (see _parsed).
                    possible = _NOTHING if op.kind == "close_s" else frozenset((op.sql,))
                    since = op.seq
                    break
                walked.append(op)
                if len(walked) > MAX_WALK:
                    raise TooManyPossibilities(
                        f"prepared statement {name!r} was touched by more than {MAX_WALK} "
                        "unanswered messages; wait for the server's answers (Sync) first"
                    )
        if name == "" and self._query_of_group_since(group, since, before):
            return _NOTHING  # a Query of this group ran: it dropped the unnamed statement
        if possible is None:
            if memo is not None:
                since, possible = memo[2], memo[3]
            else:
                possible = self._statements.get(name, _NOTHING)
        # Oldest first (each of a group before ``group``: a Close or Parse of ``group`` itself
        # ended the walk); a Query between two operations (or after the last) did drop the
        # unnamed statement (a named one it may have DEALLOCATEd stays: see _statement_after).
        for op in reversed(walked):
            if name == "" and self._query_between(since, op.seq):
                possible = possible | _NOTHING
            possible = _statement_after(possible, name, op, None)
            since = op.seq
        if walked:
            kept = self._memo_statement.get(name)
            if kept is None or kept[0] != self._answered or kept[2] < since:
                self._memo_statement[name] = (self._answered, group, since, possible)
        if name == "" and self._query_between(since, before):
            possible = possible | _NOTHING
        return possible

    def _portal_at(self, name: str, group: int, before: int) -> PossiblePortal:
        """What portal ``name`` may hold for a message in ``group`` filed after operation
        ``before``, like `_statement_at`."""
        walked: list[_Op] = []
        possible = None
        since = -1
        memo = None
        same_name = self._by_portal.get(name)
        if same_name is not None:
            memo = self._memo_portal.get(name)
            floor = -1
            if memo is not None and memo[0] == self._answered and memo[1] <= group:
                floor = memo[2] if memo[2] < before else -1
            if floor < 0:
                memo = None
            lo = bisect_left(same_name, self._ops[0].seq, key=_seq_of)
            for at in range(bisect_left(same_name, before, lo=lo, key=_seq_of) - 1, lo - 1, -1):
                op = same_name[at]
                if op.seq <= floor:
                    break
                if op.group == group:
                    if op.kind == "close_p":
                        possible, since = _NO_PORTAL, op.seq
                        break
                    texts = _bindable(
                        self._statement_at(op.statement, op.group, op.seq), op.statement
                    )
                    if texts:
                        # The Bind succeeded (else the judged message is skipped), so the
                        # portal holds one of these bindings, whatever it held before.
                        possible = frozenset(Bound(op.statement, t, op.bind) for t in texts)
                        since = op.seq
                        break
                walked.append(op)
                if len(walked) > MAX_WALK:
                    raise TooManyPossibilities(
                        f"portal {name!r} was touched by more than {MAX_WALK} unanswered "
                        "messages; wait for the server's answers (Sync) first"
                    )
        if name == "" and self._query_of_group_since(group, since, before):
            return _NO_PORTAL  # a Query of this group ran in, then dropped, it
        if possible is None:
            if memo is not None:
                since, possible = memo[2], memo[3]
            else:
                possible = self._portals.get(name, _NO_PORTAL)
        learnt = None  # the state after the last operation of a group before ``group``
        for op in reversed(walked):
            if name == "" and self._query_between(since, op.seq):
                possible = possible | _NO_PORTAL
            texts = (
                _bindable(self._statement_at(op.statement, op.group, op.seq), op.statement)
                if op.kind == "bind"
                else ()
            )
            earlier = op.group != group
            possible = _portal_after(possible, op, texts, None if earlier else True)
            since = op.seq
            if earlier:
                learnt = (self._answered, group, since, possible)
        if learnt is not None:
            kept = self._memo_portal.get(name)
            if kept is None or kept[0] != self._answered or kept[2] < learnt[2]:
                self._memo_portal[name] = learnt
        if name == "" and self._query_between(since, before):
            possible = possible | _NO_PORTAL
        return possible

    def _query_of_group_since(self, group: int, since: int, before: int) -> bool:
        """Whether the newest unanswered Query filed before operation ``before`` is newer than
        operation ``since`` and belongs to ``group`` (so it ran if the judged message runs)."""
        queries = self._queries
        head = self._queries_head
        if head == len(queries):
            return False
        at = bisect_left(queries, before, lo=head, key=_seq_of) - 1
        return at >= head and queries[at].seq > since and queries[at].group == group

    def _before_group(self, group: int) -> int:
        """The ``seq`` bound of the operations a message in ``group`` comes after: all of them,
        except (only when asked about the past, as tests do) those of later groups."""
        ops = self._ops
        if not ops or ops[-1].group <= group:
            return self._seq
        return next(op.seq for op in ops if op.group > group)

    def _query_between(self, after: int, before: int) -> bool:
        """Whether an unanswered Query was filed between operations ``after`` and ``before``."""
        queries = self._queries
        head = self._queries_head
        if head == len(queries):
            return False
        at = bisect_left(queries, after + 1, lo=head, key=_seq_of)
        return at < len(queries) and queries[at].seq < before


# --- applying a group the server answered (module functions: tests/unit/wire/reference_session.py
# applies answers the same way) -------------------------------------------------------------------


def _apply_succeeded(
    statements: dict[str, Possible],
    portals: dict[str, PossiblePortal],
    ops: list[_Op],
    txn_status: bytes = b"T",
) -> None:
    if txn_status == b"I":
        # The transaction is over, so every portal is gone: only statements need updating,
        # and an unnamed Parse that ran simply replaced the unnamed statement.
        for op in ops:
            if op.kind == "parse" and op.name == "":
                statements[""] = frozenset((op.sql,))
            elif op.kind != "bind" and op.kind != "close_p":
                _apply(statements, portals, [op], True)
        return
    _apply(statements, portals, ops, True)


def _apply_failed_at(
    statements: dict[str, Possible],
    portals: dict[str, PossiblePortal],
    ops: list[_Op],
    acked: int,
) -> None:
    """The group failed after ``acked`` answered messages: the operations before that ran,
    the one answered by the error failed, the rest never ran."""
    ran = [op for op in ops if op.ack < acked or op.kind == "query"]
    _apply(statements, portals, ran, True)
    for op in ops:
        if op.ack == acked and op.kind != "query":
            _apply_failure(statements, portals, op)


def _apply_uncertain(
    statements: dict[str, Possible],
    portals: dict[str, PossiblePortal],
    ops: list[_Op],
) -> None:
    # Each operation either ran (and succeeded or failed) or was skipped; applying "or
    # unchanged" to each in turn covers every prefix, for every name at once.
    _apply(statements, portals, ops, None)


def _apply(
    statements: dict[str, Possible],
    portals: dict[str, PossiblePortal],
    ops: list[_Op],
    succeeded: bool | None,
) -> None:
    for op in ops:
        kind = op.kind
        if kind == "bind" or kind == "close_p":
            texts = (
                _bindable(statements.get(op.statement, _NOTHING), op.statement)
                if kind == "bind"
                else ()
            )
            portals[op.name] = _portal_after(portals.get(op.name, _NO_PORTAL), op, texts, succeeded)
        elif kind == "query":
            # Only the unnamed statement (_statement_after): O(1), not O(names held) per
            # Query - 4,000 held names and 4,000 Queries took the loop 17 s.
            if "" in statements:
                statements[""] = _statement_after(statements[""], "", op, succeeded)
            portals[""] = _portal_after(portals.get("", _NO_PORTAL), op, (), succeeded)
        else:
            before = statements.get(op.name, _NOTHING)
            statements[op.name] = _statement_after(before, op.name, op, succeeded)


def _apply_failure(
    statements: dict[str, Possible], portals: dict[str, PossiblePortal], op: _Op
) -> None:
    """What a Parse, Bind or Close that the server answered with an error leaves behind."""
    if op.kind == "parse" and op.name == "":
        statements[""] = _NOTHING  # the old unnamed statement is dropped before parsing
    elif op.kind == "bind":
        # Depending on where it failed, the unnamed portal may have been replaced and dropped.
        portals[op.name] = portals.get(op.name, _NO_PORTAL) | _NO_PORTAL


def _statement_after(before: Possible, name: str, op: _Op, succeeded: bool | None) -> Possible:
    """What statement ``name`` may hold after ``op`` (True: it succeeded; None: unknown)."""
    if op.kind == "parse":
        return _parsed(before, name, op.sql, succeeded)
    if op.kind == "close_s":
        return _NOTHING if succeeded else before | _NOTHING
    # A simple Query drops the unnamed statement. It may DEALLOCATE or DISCARD named ones too,
    # but a name the model holds that the server dropped is harmless (see _parsed): unchanged.
    if name == "":
        return _NOTHING if succeeded else before | _NOTHING
    return before


def _portal_after(
    before: PossiblePortal, op: _Op, texts: tuple[bytes, ...], succeeded: bool | None
) -> PossiblePortal:
    """What a portal may hold after ``op`` (a Bind of it, a Close of it, or a simple Query)."""
    if op.kind == "bind":
        # Even a named portal the model takes for still in use: the server may have dropped
        # it unseen (a transaction's end, ROLLBACK TO SAVEPOINT, SQL CLOSE), and then the
        # Bind succeeds. When it really was in use, the Bind fails and its group is skipped.
        made = frozenset(Bound(op.statement, t, op.bind) for t in texts)
        if succeeded:
            return made if made else before
        return before | made
    # Close of the portal, or a simple Query (which runs in, then drops, the unnamed portal).
    return _NO_PORTAL if succeeded else before | _NO_PORTAL


def _parsed(before: Possible, name: str, sql: bytes, succeeded: bool | None) -> Possible:
    """What a Parse of ``name`` leaves, from each thing the name may have held.

    A Parse that succeeded leaves its text, whatever the name held before: a named statement
    the model takes for still in use may have been dropped unseen (an Execute of
    ``DEALLOCATE``), and then the server takes the new text. (When it really was in use, the
    Parse fails with 42P05 and the server skips the rest of its group.)"""
    if succeeded:
        return frozenset((sql,))
    after: set[bytes | None] = {sql}  # ran and succeeded
    for held in before:
        after.add(None if name == "" else held)  # failed (unnamed: dropped first)
        after.add(held)  # or skipped
    return frozenset(after)


def _texts(possible: Possible) -> tuple[bytes, ...]:
    return tuple(sorted(t for t in possible if t is not None))


def sql_prepared_text(name: str) -> bytes:
    """What a Bind of statement ``name`` runs when no Parse the model knows of put a text there.

    SQL ``PREPARE`` and protocol Parse share one namespace on the server, and this model sees
    Parses only: a named statement it holds no text for may hold a body a SQL ``PREPARE`` made
    (or one made where no proxy sees it). Bound with parameters, that is ``EXECUTE "name"(...)``,
    and it is judged as that: by what the gate's session tracker saw prepared under the name
    (`pgguard.policy.session`), an unknown name as opaque code. (Taking such a Bind for one that
    fails let the unnamed portal run a SQL-prepared body unjudged, and a portal in a transaction
    run its previous binding's verdict.)"""
    return b'EXECUTE "' + name.encode("utf-8", "surrogateescape").replace(b'"', b'""') + b'"'


def _bindable(possible: Possible, statement: str) -> tuple[bytes, ...]:
    """The texts a Bind of ``statement`` may bind, given what the name may hold."""
    texts = _texts(possible)
    if texts or statement == "":
        # The unnamed statement only a Parse makes (SQL cannot name it): none, the Bind fails.
        return texts
    return (sql_prepared_text(statement),)


_seq_of = attrgetter("seq")


def _key(bound: Bound) -> tuple[str, bytes, bytes]:
    return (bound.statement, bound.sql, bound.bind)
