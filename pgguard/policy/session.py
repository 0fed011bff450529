"""Per-connection memory of prepared statements, so that `EXECUTE name` is judged by its body.

Owns: `SessionTracker`. SQL-level PREPARE and protocol-level named Parse messages share one
namespace in PostgreSQL, so both are remembered here.

Invariant (monotone on purpose): what a name stands for only ever grows. The tracker learns of a
PREPARE when it is classified, before the server has run (or rejected) it, so it cannot know
whether a later PREPARE or DEALLOCATE of the same name took effect. Keeping the union of every
body ever prepared under a name means `EXECUTE name` is never judged by a harmless body while the
server holds a privileged one. An unknown name is treated as opaque code.

Bounded (invariant 5): at most `MAX_NAMES` names and about `MAX_SESSION_ENTRIES` parts per
session, however many PREPAREs (even ones the server rejects) and Parses a client sends. What does
not fit fails closed: the oldest protocol-only names are forgotten first (a SQL ``EXECUTE`` of a
driver's protocol name is then judged as a name never seen: opaque code); a SQL-prepared name is
never forgotten (a protocol Bind of it is judged by it), so its union is judged as text pgguard
cannot read once the parts run out, and a SQL PREPARE of a new name past `MAX_NAMES` is refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from pgguard.sql.classify import StatementFacts
from pgguard.sql.kinds import EXECUTE, UNPARSEABLE

_UNKNOWN_REASON = "EXECUTE of a prepared statement pgguard has not seen"


@dataclass(frozen=True, slots=True)
class PreparedSummary:
    """The union of everything ever prepared under one name in this session."""

    categories: tuple[str, ...]
    reasons: tuple[str, ...]
    kinds: tuple[str, ...]
    functions: tuple[str, ...]
    flagged_functions: tuple[str, ...]
    relations: tuple[str, ...]
    state_refs: tuple[str, ...] = ()


# How many distinct entries (reasons, kinds, functions, relations...) one name's union keeps, so
# that each PREPARE costs the same however many came before and a session's memory stays bounded
# (invariant 5). Past it pgguard can no longer say what the name may run, so EXECUTE of it is
# judged as text pgguard cannot read (category ``unparseable``: denied by the shipped rules),
# keeping the categories it had and whether a body named pgguard's state (denied whatever the
# rules say).
MAX_UNION_ENTRIES = 4096
# The same for one session, over all its names: 300 PREPAREs of 4,000 (missing) relations each
# under new names kept 100 MB, ten times their text, for the session's life. Past
# MAX_SESSION_ENTRIES, protocol-only names are forgotten (oldest first), then a SQL-prepared
# name's union overflows as above; past MAX_NAMES, a SQL PREPARE of a new name is refused.
MAX_SESSION_ENTRIES = 65_536
MAX_NAMES = 4096
TOO_MANY_NAMES_REASON = (
    f"this session has used {MAX_NAMES} SQL prepared statement names, the most pgguard keeps "
    "(DEALLOCATE does not free them: pgguard cannot know it took effect); reuse a name or "
    "reconnect"
)
_OVERFLOW_REASON = (
    f"more than {MAX_UNION_ENTRIES} distinct parts were prepared under this name in this "
    "session, so pgguard can no longer tell what it runs; prepare it under a new name"
)
_OVERFLOW_STATE_REF = "one of the statements prepared under this name names pgguard's state"


def too_many_names(facts: StatementFacts) -> StatementFacts:
    """A SQL PREPARE of a new name the tracker has no room for (`MAX_NAMES`), judged as text
    pgguard cannot read: denied by the shipped rules, so the server never holds a name whose
    body pgguard does not know."""
    return replace(
        facts,
        categories=_union(facts.categories, (UNPARSEABLE,)),
        reasons=_union(facts.reasons, (TOO_MANY_NAMES_REASON,)),
    )


def _union(*parts: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for part in parts for item in part))


class _Union:
    """Everything prepared under one name so far, kept in insertion-ordered dicts so that one
    more body costs its own size, not the size of the union (a tuple rebuilt per PREPARE made
    16,000 PREPAREs under one name cost 7.7 s)."""

    __slots__ = ("_summary", "fields", "overflowed", "size")

    FIELDS = (
        "categories",
        "reasons",
        "kinds",
        "functions",
        "flagged_functions",
        "relations",
        "state_refs",
    )

    def __init__(self) -> None:
        self.fields: tuple[dict[str, None], ...] = tuple({} for _ in self.FIELDS)
        self.size = 0
        self.overflowed = False
        self._summary: PreparedSummary | None = None

    def add(self, body: StatementFacts) -> None:
        self._summary = None
        if self.overflowed:
            # The categories stay exact (a fixed, small set) and a body naming pgguard's state
            # still leaves its mark; the rest no longer matters (see MAX_UNION_ENTRIES).
            self.fields[0].update(dict.fromkeys(body.categories))
            if body.state_refs:
                self.fields[6][_OVERFLOW_STATE_REF] = None
            self.size = sum(map(len, self.fields))
            return
        for store, field in zip(self.fields, self.FIELDS, strict=True):
            before = len(store)
            store.update(dict.fromkeys(getattr(body, field)))
            self.size += len(store) - before
        if self.size > MAX_UNION_ENTRIES:
            self.overflow()

    def overflow(self) -> None:
        """Forget the parts, keep the verdict (see MAX_UNION_ENTRIES)."""
        self._summary = None
        self.overflowed = True
        categories = self.fields[0]
        categories[UNPARSEABLE] = None
        state = {_OVERFLOW_STATE_REF: None} if self.fields[6] else {}
        self.fields = (categories, {_OVERFLOW_REASON: None}, {}, {}, {}, {}, state)
        self.size = sum(map(len, self.fields))

    def summary(self) -> PreparedSummary:
        if self._summary is None:
            self._summary = PreparedSummary(*(tuple(store) for store in self.fields))
        return self._summary


class SessionTracker:
    """Prepared-statement names of one client connection and what each may run."""

    def __init__(self) -> None:
        self._prepared: dict[str, _Union] = {}
        self._sql_prepared: set[str] = set()  # names a SQL PREPARE may have taken
        self._protocol_only: dict[str, None] = {}  # the other names, oldest first
        self._entries = 0  # the sizes of every union in _prepared
        self._lock = threading.Lock()

    def remember(self, name: str, body: StatementFacts, *, sql_prepare: bool = True) -> bool:
        """Record that `name` was (or may have been) prepared with this body.

        ``sql_prepare`` is False for a protocol-level Parse, whose texts the connection's
        server-confirmed model (`pgguard.wire.session`) knows exactly. False when a SQL
        PREPARE of a new name does not fit (`MAX_NAMES`): the caller must refuse it.
        """
        with self._lock:
            union = self._prepared.get(name)
            if union is None:
                if len(self._prepared) >= MAX_NAMES:
                    self._forget_protocol_names(keep="")
                if len(self._prepared) >= MAX_NAMES:
                    return not sql_prepare  # a protocol name is simply not kept
                union = self._prepared[name] = _Union()
            elif not sql_prepare and name in self._protocol_only:
                del self._protocol_only[name]  # re-filed below as the most recent
            if not sql_prepare and name not in self._sql_prepared:
                self._protocol_only[name] = None
            if sql_prepare:
                self._sql_prepared.add(name)
                self._protocol_only.pop(name, None)
            before = union.size
            union.add(body)
            self._entries += union.size - before
            if self._entries > MAX_SESSION_ENTRIES:
                self._forget_protocol_names(keep=name)
                if self._entries > MAX_SESSION_ENTRIES and name in self._prepared:
                    if sql_prepare or name in self._sql_prepared:
                        before = union.size
                        union.overflow()
                        self._entries += union.size - before
                    else:
                        self._forget(name)
            return True

    def _forget_protocol_names(self, keep: str) -> None:
        """Forget protocol-only names, least recently parsed first (not ``keep``), until there
        is room."""
        protocol_only = self._protocol_only
        while protocol_only and (
            self._entries > MAX_SESSION_ENTRIES or len(self._prepared) >= MAX_NAMES
        ):
            oldest = next(iter(protocol_only))
            if oldest == keep:
                if len(protocol_only) == 1:
                    return
                del protocol_only[keep]
                protocol_only[keep] = None  # the newest: it is being parsed now
                continue
            self._forget(oldest)

    def _forget(self, name: str) -> None:
        union = self._prepared.pop(name)
        self._protocol_only.pop(name, None)
        self._entries -= union.size

    @property
    def entries(self) -> int:
        """The parts kept over every name (bounded by about `MAX_SESSION_ENTRIES`)."""
        with self._lock:
            return self._entries

    def summary(self, name: str) -> PreparedSummary | None:
        """The union of what ``name`` may run, or None for a name never prepared."""
        with self._lock:
            union = self._prepared.get(name)
            return None if union is None else union.summary()

    def knows(self, name: str) -> bool:
        with self._lock:
            return name in self._prepared

    def sql_prepared(self, name: str) -> bool:
        """Whether a SQL PREPARE (not only protocol Parses) may have used ``name``."""
        with self._lock:
            return name in self._sql_prepared

    def names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._prepared)

    def resolve(self, facts: StatementFacts) -> StatementFacts:
        """Facts of a statement that EXECUTEs prepared names, widened by what those names run."""
        if not facts.executes:
            return facts
        categories = list(facts.categories)
        reasons = list(facts.reasons)
        kinds, functions, flagged, relations = [facts.kinds], [facts.functions], [], []
        flagged.append(facts.flagged_functions)
        relations.append(facts.relations)
        state_refs = [facts.state_refs]
        summaries = [self.summary(name) for name in facts.executes]
        for name, summary in zip(facts.executes, summaries, strict=True):
            if summary is None:
                categories.append(EXECUTE)
                reasons.append(_UNKNOWN_REASON)
                continue
            categories.extend(summary.categories)
            reasons.extend(f"prepared statement {name}: {r}" for r in summary.reasons)
            kinds.append(summary.kinds)
            functions.append(summary.functions)
            flagged.append(summary.flagged_functions)
            relations.append(summary.relations)
            state_refs.append(tuple(f"prepared statement {name}: {r}" for r in summary.state_refs))
        return replace(
            facts,
            categories=_union(tuple(categories)),
            reasons=_union(tuple(reasons)),
            kinds=_union(*kinds),
            functions=_union(*functions),
            flagged_functions=_union(*flagged),
            relations=_union(*relations),
            state_refs=_union(*state_refs),
        )

    def remember_all(self, name: str, bodies: tuple[StatementFacts, ...]) -> None:
        """Record a protocol-level named Parse (its Decision.facts) under `name`."""
        for body in bodies:
            self.remember(name, body, sql_prepare=False)
