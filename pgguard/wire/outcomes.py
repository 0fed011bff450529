"""Which reply belongs to which statement: outcomes for the ledger (sans-IO).

The server answers in order (protocol docs 53.2.2 and 53.2.3): a simple Query yields a
CommandComplete (or EmptyQueryResponse) per statement, or an ErrorResponse that ends it, then
ReadyForQuery. In the extended protocol each Execute yields CommandComplete, EmptyQueryResponse,
PortalSuspended or ErrorResponse; after an error the server skips everything up to Sync, whose
ReadyForQuery ends the group. So statements are grouped by the ReadyForQuery that will end them,
and within a group each completion goes to the first statement still waiting.

The caller announces what it forwards (``query``, ``execute``) with an opaque token per
statement (None for messages that must be counted but not recorded, such as a refused
statement's substitute) and the ordinal of the ReadyForQuery that will end it: the caller counts
the Query and Sync messages it forwards anyway, so no call is needed per Sync. It feeds what the
server says; ``ready`` returns the finished group's outcomes, each carrying its token.
"""

from __future__ import annotations

from collections import deque


class Outcome:
    """How one statement ended (and, while it runs, where its replies go)."""

    __slots__ = (
        "acks_before",
        "done",
        "group",
        "message",
        "multi",
        "skipped",
        "sqlstate",
        "suspended",
        "tags",
        "token",
    )

    def __init__(
        self, token: object = None, group: int = 0, multi: bool = False, acks_before: int = 0
    ) -> None:
        self.token = token  # the caller's, for the statement this outcome belongs to
        self.group = group  # the ordinal of the ReadyForQuery that ends it
        # Answered messages of its group forwarded before it (Parse, Bind, Close, Describe,
        # Execute): until all have their answer, an error is theirs and this one never ran.
        self.acks_before = acks_before
        self.multi = multi  # a simple Query: several completions, until ReadyForQuery
        self.done = False
        self.tags: list[str] = []  # CommandComplete tags, in order
        self.sqlstate: str | None = None
        self.message: str | None = None
        self.skipped = False  # never ran: an earlier statement of its pipeline failed
        self.suspended = False  # Execute stopped at its row limit (PortalSuspended)

    @property
    def rows(self) -> int | None:
        """Rows affected or returned, from the last tag that carries a count."""
        for tag in reversed(self.tags):
            rows = tag_rows(tag)
            if rows is not None:
                return rows
        return None


def tag_rows(tag: str) -> int | None:
    """The row count a CommandComplete tag ends with ("SELECT 5", "INSERT 0 5"), or None."""
    head, _, last = tag.rpartition(" ")
    return int(last) if head and last.isascii() and last.isdigit() else None


class OutcomeTracker:
    """Cost: O(1) per message. Finished statements wait at the front of ``_slots`` for their
    ReadyForQuery; ``_finished`` counts them so that a reply never walks past them again (one
    Sync after thousands of Executes, as psycopg's executemany sends, would otherwise make each
    CommandComplete walk every earlier one, on the proxy's shared loop)."""

    __slots__ = ("_finished", "_ready", "_slots")

    def __init__(self) -> None:
        self._slots: deque[Outcome] = deque()  # forwarded and not finished, in order
        self._ready = 0  # ReadyForQuery messages seen: the group being answered is the next
        self._finished = 0  # slots at the front of _slots that are done (never undone)

    # --- what the client sent (in forwarding order) ---------------------------------------

    def query(self, token: object, group: int) -> None:
        """A simple Query (or FunctionCall), which ends ``group``: unsynced extended messages
        before it share its group (the server treats the Query as their Sync too)."""
        self._slots.append(Outcome(token, group, True))

    def execute(self, token: object, group: int, acks_before: int = 0) -> None:
        """An Execute, ended by the Sync whose ReadyForQuery is number ``group``, after
        ``acks_before`` answered messages (Parse, Bind, Close, Describe, Execute) of its group."""
        self._slots.append(Outcome(token, group, False, acks_before))

    # --- what the server said ---------------------------------------------------------------

    def command_complete(self, tag: str) -> None:
        slot = self._current()
        if slot is not None:
            slot.tags.append(tag)
            slot.done = not slot.multi

    def empty_query(self) -> None:
        slot = self._current()
        if slot is not None and not slot.multi:
            slot.done = True

    def portal_suspended(self) -> None:
        slot = self._current()
        if slot is not None:
            slot.suspended = True
            slot.done = True

    def error(self, sqlstate: str, message: str, acked: int = 0) -> None:
        """The first waiting statement of the group being answered failed - unless a message
        before it in its group has not been acknowledged yet, which is then what failed - and
        the server skips the rest of that group. ``acked``: the group's messages answered before
        the error. An error outside any statement (a FATAL at shutdown,
        a failed Parse) has no statement waiting and is not attributed."""
        answering = self._ready + 1
        first = True
        slots = self._slots
        for index in range(self._skip_finished(), len(slots)):
            slot = slots[index]
            if slot.group != answering:
                break
            if slot.done:
                continue
            if first and slot.acks_before <= acked:
                slot.sqlstate, slot.message = sqlstate, message
            else:
                slot.skipped = True
            first = False
            slot.done = True

    def ready(self) -> list[Outcome]:
        """ReadyForQuery: the group being answered is finished; the outcomes of its recorded
        statements (those with a token), in order."""
        self._ready += 1
        slots = self._slots
        finished = []
        popped = 0
        while slots and slots[0].group <= self._ready:
            slot = slots.popleft()
            popped += 1
            if slot.token is not None:
                finished.append(slot)
        self._finished = max(0, self._finished - popped)
        return finished

    @property
    def pending(self) -> int:
        """Statements forwarded whose group has not finished."""
        return len(self._slots)

    def _current(self) -> Outcome | None:
        # Replies to unsynced extended messages arrive before their Sync when the client sent
        # a Flush (53.2.3): they belong to the group being answered all the same.
        slots = self._slots
        index = self._skip_finished()
        if index < len(slots) and slots[index].group == self._ready + 1:
            return slots[index]
        return None

    def _skip_finished(self) -> int:
        """The index of the first slot not done (every slot before it is done)."""
        slots = self._slots
        index = self._finished
        while index < len(slots) and slots[index].done:
            index += 1
        self._finished = index
        return index
