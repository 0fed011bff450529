"""The indexed session model answers exactly as the plain walk did.

(That it costs O(1) per message on a long pipeline is shown through the proxy, with a real
driver, by tests/adversity/test_pipelines.py.)

`ReferenceSessionModel` (tests/unit/wire/reference_session.py) is the model as it was: every
lookup walked every unanswered operation. Hypothesis drives both with the same interleavings of
client messages (Parse, Bind, Close, Query, Sync) and server answers (ErrorResponse after some
answered messages, ReadyForQuery), and every lookup must give the same candidates. The one
intended difference: Parses earlier in the same group no longer count towards the limit on what
a name may stand for (if a later message of the group runs, they ran and succeeded), so a
pipeline of thousands of unnamed Parses before one Sync (psycopg's executemany) is not cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.wire.session import MAX_POSSIBILITIES, SessionModel, TooManyPossibilities
from tests.unit.wire.reference_session import ReferenceSessionModel
from tests.unit.wire.reference_session import TooManyPossibilities as ReferenceTooMany

STATEMENTS = ["", "a", "b"]
PORTALS = ["", "p"]
TEXTS = [b"SELECT 1", b"DROP TABLE t", b"SELECT 2"]

client_message = st.one_of(
    st.tuples(st.just("parse"), st.sampled_from(STATEMENTS), st.sampled_from(TEXTS)),
    st.tuples(st.just("bind"), st.sampled_from(PORTALS), st.sampled_from(STATEMENTS)),
    st.tuples(st.just("close_s"), st.sampled_from(STATEMENTS)),
    st.tuples(st.just("close_p"), st.sampled_from(PORTALS)),
    st.tuples(st.just("query")),
    st.tuples(st.just("sync")),
    st.tuples(st.just("answer"), st.sampled_from([None, 0, 1, 2, 3, "ok"]), st.sampled_from("IT")),
    st.tuples(st.just("look")),
)


@dataclass
class Session:
    """Both models, fed as `pgguard.proxy.connection` feeds one: groups are numbered by the
    ReadyForQuery that ends them, acks count a group's answered messages before each one."""

    new: SessionModel = field(default_factory=SessionModel)
    old: ReferenceSessionModel = field(default_factory=ReferenceSessionModel)
    ended: int = 0  # groups ended by a Sync or a Query so far
    answered: int = 0
    acks: dict[int, int] = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.ended + 1

    def ack(self) -> int:
        before = self.acks.get(self.group, 0)
        self.acks[self.group] = before + 1
        return before

    def send(self, message: tuple[object, ...]) -> bool:
        """Apply one step to both; False when the reference refused it (the run ends)."""
        kind = message[0]
        if kind == "parse":
            _, name, sql = message
            assert isinstance(name, str)
            assert isinstance(sql, bytes)
            group, ack = self.group, self.ack()
            try:
                self.old.parse(group, name, sql, ack)
            except ReferenceTooMany:
                return False
            self.new.parse(group, name, sql, ack)
        elif kind == "bind":
            _, portal, statement = message
            assert isinstance(portal, str)
            assert isinstance(statement, str)
            group, ack = self.group, self.ack()
            body = b"bind %d" % ack
            self.old.bind(group, portal, statement, body, ack)
            self.new.bind(group, portal, statement, body, ack)
        elif kind in ("close_s", "close_p"):
            name = message[1]
            assert isinstance(name, str)
            group, ack = self.group, self.ack()
            close_kind = b"S" if kind == "close_s" else b"P"
            self.old.close(group, close_kind, name, ack)
            self.new.close(group, close_kind, name, ack)
        elif kind == "query":
            self.ended += 1
            self.old.query(self.ended)
            self.new.query(self.ended)
        elif kind == "sync":
            self.ended += 1
        elif kind == "answer" and self.answered < self.ended:
            _, acked, status = message
            if acked != "ok":
                assert acked is None or isinstance(acked, int)
                self.old.error(acked)
                self.new.error(acked)
            assert isinstance(status, str)
            self.old.ready(status.encode())
            self.new.ready(status.encode())
            self.answered += 1
        elif kind == "look":
            self.compare()
        return True

    def compare(self) -> None:
        group = self.group
        assert self.new.pending == self.old.pending
        assert self.new.unanswered_before(group) == self.old.unanswered_before(group)
        for name in STATEMENTS:
            assert self.new.statement_texts(name, group) == self.old.statement_texts(name, group)
        for name in PORTALS:
            assert self.new.portal(name, group) == self.old.portal(name, group)


@settings(max_examples=600, deadline=None)
@given(st.lists(client_message, max_size=60))
def test_the_indexed_model_agrees_with_the_plain_walk(messages: list[tuple[object, ...]]) -> None:
    session = Session()
    for message in messages:
        if not session.send(message):
            return
        if message[0] in ("parse", "bind", "close_s", "close_p", "query"):
            session.compare()  # what the message right after this one would be judged against
    session.compare()


def test_unnamed_parses_of_one_group_are_not_cut_off() -> None:
    model = SessionModel()
    for _ in range(MAX_POSSIBILITIES * 4):
        model.parse(1, "", b"INSERT INTO t VALUES ($1)")
        model.bind(1, "", "", b"row")
    assert model.statement_texts("", 1) == (b"INSERT INTO t VALUES ($1)",)


def test_unnamed_parses_in_unanswered_groups_still_are() -> None:
    model = SessionModel()
    for group in range(1, MAX_POSSIBILITIES):
        model.parse(group, "", b"SELECT %d" % group)
    with pytest.raises(TooManyPossibilities):
        model.parse(MAX_POSSIBILITIES, "", b"SELECT 'one more'")


def test_a_lookup_walks_at_most_max_walk_operations() -> None:
    """Binds of one named portal in unanswered groups: the lookup refuses rather than walk."""
    model = SessionModel()
    model.parse(1, "s", b"SELECT 1")
    for group in range(1, 2000):
        model.bind(group, "p", "s", b"")
    with pytest.raises(TooManyPossibilities, match="unanswered"):
        model.portal("p", 3000)
