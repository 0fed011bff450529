"""Which reply belongs to which statement: outcomes for the ledger (sans-IO).

The server answers in order (protocol docs 53.2.2 and 53.2.3): a simple Query yields a
CommandComplete (or EmptyQueryResponse) per statement, or an ErrorResponse that ends it, then
ReadyForQuery. In the extended protocol each Execute yields CommandComplete, EmptyQueryResponse,
PortalSuspended or ErrorResponse; after an error the server skips everything up to Sync, whose
ReadyForQuery ends the group. So statements are grouped by the ReadyForQuery that will end them,
and within a group each completion goes to the first statement still waiting.

The caller announces what it forwards (``query``, ``execute``, ``sync``) with an opaque token per
statement (None for messages that must be counted but not recorded, such as a refused
statement's substitute) and feeds what the server says; ``ready`` returns the finished group's
outcomes, each carrying its token.
"""

from __future__ import annotations

from collections import deque


class Outcome:
    """How one statement ended (and, while it runs, where its replies go)."""

    __slots__ = ("done", "message", "multi", "skipped", "sqlstate", "suspended", "tags", "token")

    def __init__(self, token: object = None, multi: bool = False) -> None:
        self.token = token  # the caller's, for the statement this outcome belongs to
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
    __slots__ = ("_groups", "_open")

    def __init__(self) -> None:
        self._groups: deque[list[Outcome]] = deque()  # each ends with one ReadyForQuery
        self._open: list[Outcome] | None = None  # extended-protocol messages since the last Sync

    # --- what the client sent (in forwarding order) ---------------------------------------

    def query(self, token: object) -> None:
        """A simple Query (or FunctionCall): it ends its group, with any unsynced extended
        messages before it (the server treats the Query as their end too)."""
        group = self._open if self._open is not None else []
        group.append(Outcome(token, multi=True))
        self._groups.append(group)
        self._open = None

    def execute(self, token: object) -> None:
        if self._open is None:
            self._open = []
        self._open.append(Outcome(token))

    def sync(self) -> None:
        self._groups.append(self._open if self._open is not None else [])
        self._open = None

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

    def error(self, sqlstate: str, message: str) -> None:
        head = self._head()
        if head is None:
            return  # an error outside any statement (FATAL at shutdown): nothing to attribute
        waiting = [s for s in head if not s.done]
        if not waiting:
            return
        first, rest = waiting[0], waiting[1:]
        first.sqlstate, first.message = sqlstate, message
        first.done = True
        for slot in rest:
            slot.skipped = True
            slot.done = True

    def ready(self) -> list[Outcome]:
        """ReadyForQuery: the head group is finished; the outcomes of its recorded statements
        (those with a token), in order."""
        if not self._groups:
            return []
        group = self._groups.popleft()
        return [slot for slot in group if slot.token is not None]

    @property
    def pending(self) -> int:
        return len(self._groups) + (1 if self._open else 0)

    def _head(self) -> list[Outcome] | None:
        # Replies to unsynced extended messages arrive before their Sync when the client sent
        # a Flush (53.2.3), so the open group is the head when nothing else is waiting.
        if self._groups:
            return self._groups[0]
        return self._open

    def _current(self) -> Outcome | None:
        head = self._head()
        if head is None:
            return None
        for slot in head:
            if not slot.done:
                return slot
        return None
