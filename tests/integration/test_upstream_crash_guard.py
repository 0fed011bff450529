"""One agent cannot crash the server under everyone else's sessions through a portal pgguard
knows does not exist (invariant 5).

PostgreSQL 16.2 (the embedded server pgserver ships) dies with a segmentation fault on an
Execute of the unnamed portal after a failed ``ROLLBACK TO SAVEPOINT`` and one more simple Query
in the aborted transaction: the failed Query's unnamed portal outlives its memory. The
postmaster then ends every session of the cluster - every other agent's too - and recovers.
(Found by the differential test's Hypothesis search; PostgreSQL 15.18 answers the same sequence
with 34000.) A simple Query destroys the unnamed portal (protocol docs, "Extended Query"), so
pgguard's session model knows none exists there and answers the Execute itself with the error
PostgreSQL gives for it, 34000, without forwarding it; the ledger records what the server would
have said. Each test runs against a cluster of its own, so a crash cannot reach other tests.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgguard.embedded import EmbeddedPostgres
from pgguard.wire import messages as m
from tests.integration.test_session_model import SYNC, bind, execute, first_error, types
from tests.support import PgguardThread, RawClient, ledgered_pgguard


@pytest.fixture
def own_cluster() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-crash-")) / "data")
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def guarded(own_cluster: EmbeddedPostgres, state_dsn: str) -> Iterator[PgguardThread]:
    with ledgered_pgguard(own_cluster.unix_dsn(), state_dsn, "crash") as thread:
        yield thread


def _session(guarded: PgguardThread) -> RawClient:
    raw = RawClient.connect(guarded.port)
    raw.login()
    return raw


def _run(raw: RawClient, sql: str) -> list[tuple[str, bytes]]:
    raw.send(m.query(sql))
    return raw.recv_until("Z")


@pytest.mark.parametrize("bound_before", [False, True])
@pytest.mark.parametrize("then", ["SELECT 2 AS m2", "SELECT m2 FROM no_such_table"])
@pytest.mark.parametrize("pipelined", [True, False])
def test_execute_of_a_destroyed_unnamed_portal_is_answered_by_pgguard(
    guarded: PgguardThread,
    own_cluster: EmbeddedPostgres,
    then: str,
    pipelined: bool,
    bound_before: bool,
) -> None:
    bystander = psycopg.connect(own_cluster.unix_dsn(), autocommit=True)
    raw = _session(guarded)
    try:
        begin = m.query("BEGIN")
        if bound_before:  # an unnamed portal the server confirmed, which the failed Query drops
            begin += m.parse("", "SELECT 1") + bind("", "") + SYNC
        sequence = [begin, m.query("ROLLBACK TO sp"), m.query(then), execute("") + SYNC]
        if pipelined:  # as the differential test sent it when the server crashed
            raw.send(b"".join(sequence))
        answers = []
        for message in sequence:
            if not pipelined:
                raw.send(message)
            answers.append(raw.recv_until("Z"))
            if bound_before and message is begin:
                answers[-1] += raw.recv_until("Z")
        assert types(answers[0]) == ["C", "Z"] + (["1", "2", "Z"] if bound_before else [])
        assert first_error(answers[1])[0] == "3B001"
        assert first_error(answers[2])[0] == "25P02"
        assert types(answers[3]) == ["E", "Z"]
        assert first_error(answers[3])[0] == "34000"
        assert answers[3][-1][1] == b"E"  # still in the failed transaction, as the server says
        # The session and the server under everyone else are alive.
        assert types(_run(raw, "ROLLBACK")) == ["C", "Z"]
        assert types(_run(raw, "SELECT 1")) == ["T", "D", "C", "Z"]
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    finally:
        raw.close()
        bystander.close()


def test_execute_of_the_unnamed_portal_when_none_was_bound(guarded: PgguardThread) -> None:
    """Outside any transaction, too: the same answer PostgreSQL gives."""
    raw = _session(guarded)
    try:
        raw.send(execute("") + SYNC)
        replies = raw.recv_until("Z")
        assert types(replies) == ["E", "Z"]
        assert first_error(replies)[0] == "34000"
        assert replies[-1][1] == b"I"
    finally:
        raw.close()
