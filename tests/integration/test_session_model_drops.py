"""What runs is what was judged when the server drops a name the session model did not see go.

The session model (`pgguard.wire.session`) learns of a Close it forwarded, but PostgreSQL drops
prepared statements and portals in other ways too: a transaction's end drops every portal (a
``COMMIT; BEGIN`` Query leaves ReadyForQuery 'T'; an Execute of COMMIT mid-pipeline), ``ROLLBACK
TO SAVEPOINT`` drops the portals made since, SQL ``CLOSE`` closes a protocol portal (they share
one namespace), and an Execute of ``DEALLOCATE`` drops a prepared statement. The model then
believes the name is still in use and that a Parse or Bind of it fails - while the server takes
the new text and runs it. Each test sends such a sequence through a live proxy to a real
PostgreSQL and asks the server whether the privileged statement ran (no approvers: privileged
means refused).
"""

from __future__ import annotations

import psycopg
import pytest

from pgguard.wire import messages as m
from tests.integration.test_session_model import (
    SYNC,
    bind,
    close,
    execute,
    first_error,
    types,
    victim_exists,
)
from tests.support import ProxyThread, RawClient

DROP = "DROP TABLE model_victim"


@pytest.fixture(autouse=True)
def victim(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS model_victim")
        conn.execute("CREATE TABLE model_victim (id int)")


def session(guarded: ProxyThread) -> RawClient:
    raw = RawClient.connect(guarded.port)
    raw.login()
    return raw


def query(raw: RawClient, sql: str) -> list[tuple[str, bytes]]:
    raw.send(m.query(sql))
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
    return replies


def refused(replies: list[tuple[str, bytes]]) -> bool:
    return any(t == "E" for t, _ in replies) and first_error(replies)[0] in ("42501", "55000")


# --- portals dropped behind the model's back -------------------------------------------------


def bound_portal(raw: RawClient) -> None:
    """In a transaction block: portal p bound to a harmless text, confirmed by the server."""
    query(raw, "BEGIN")
    raw.send(m.parse("a", "SELECT 1") + bind("p", "a") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "2", "Z"]


@pytest.mark.parametrize(
    "dropper",
    ["COMMIT; BEGIN", "ROLLBACK; BEGIN", "CLOSE p", "CLOSE ALL"],
    ids=["commit-begin", "rollback-begin", "sql-close", "sql-close-all"],
)
def test_a_query_that_drops_a_named_portal(
    guarded: ProxyThread, direct_dsn: str, dropper: str
) -> None:
    raw = session(guarded)
    bound_portal(raw)
    query(raw, dropper)
    raw.send(m.parse("b", DROP) + bind("p", "b") + execute("p") + SYNC)
    replies = raw.recv_until("Z")
    assert refused(replies), replies
    query(raw, "COMMIT")
    assert victim_exists(direct_dsn)


def test_rollback_to_savepoint_drops_the_portals_made_since(
    guarded: ProxyThread, direct_dsn: str
) -> None:
    raw = session(guarded)
    query(raw, "BEGIN")
    query(raw, "SAVEPOINT sp")
    raw.send(m.parse("a", "SELECT 1") + bind("p", "a") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "2", "Z"]
    query(raw, "ROLLBACK TO SAVEPOINT sp")
    raw.send(m.parse("b", DROP) + bind("p", "b") + execute("p") + SYNC)
    replies = raw.recv_until("Z")
    assert refused(replies), replies
    query(raw, "COMMIT")
    assert victim_exists(direct_dsn)


@pytest.mark.parametrize("ender", ["COMMIT", "ROLLBACK", "CLOSE p"])
def test_an_execute_that_drops_a_named_portal_mid_pipeline(
    guarded: ProxyThread, direct_dsn: str, ender: str
) -> None:
    """One pipeline, one Sync: Bind p (harmless); Execute of COMMIT (drops p); Bind p (DROP)."""
    raw = session(guarded)
    raw.send(
        m.parse("a", "SELECT 1")
        + bind("p", "a")
        + m.parse("", ender)
        + bind("", "")
        + execute("")
        + m.parse("b", DROP)
        + bind("p", "b")
        + execute("p")
        + SYNC
    )
    replies = raw.recv_until("Z")
    assert refused(replies), replies
    assert victim_exists(direct_dsn)


# --- prepared statements dropped behind the model's back -------------------------------------


def test_an_execute_of_deallocate_then_a_reparse(guarded: ProxyThread, direct_dsn: str) -> None:
    raw = session(guarded)
    raw.send(m.parse("s", "SELECT 1") + SYNC)
    assert types(raw.recv_until("Z")) == ["1", "Z"]
    raw.send(m.parse("", "DEALLOCATE s") + bind("", "") + execute("") + SYNC)
    assert "E" not in types(raw.recv_until("Z"))
    raw.send(m.parse("s", DROP) + bind("", "s") + execute("") + SYNC)
    replies = raw.recv_until("Z")
    assert refused(replies), replies
    assert victim_exists(direct_dsn)


def test_an_execute_of_deallocate_mid_pipeline(guarded: ProxyThread, direct_dsn: str) -> None:
    raw = session(guarded)
    raw.send(
        m.parse("s", "SELECT 1")
        + m.parse("", "DEALLOCATE ALL")
        + bind("", "")
        + execute("")
        + m.parse("s", DROP)
        + bind("", "s")
        + execute("")
        + SYNC
    )
    replies = raw.recv_until("Z")
    assert refused(replies), replies
    assert victim_exists(direct_dsn)


def test_a_name_really_in_use_still_runs_its_old_text(guarded: ProxyThread) -> None:
    """No false refusal where the model was right: a re-Parse of a name in use fails, the
    server skips the rest, and the next group runs the old (harmless) text."""
    raw = session(guarded)
    raw.send(m.parse("s", "SELECT 1") + SYNC)
    raw.recv_until("Z")
    raw.send(m.parse("s", "SELECT 2") + SYNC)
    assert first_error(raw.recv_until("Z"))[0] == "42P05"
    raw.send(bind("", "s") + execute("") + SYNC)
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
    raw.send(close("S", "s") + m.parse("s", "SELECT 3") + bind("", "s") + execute("") + SYNC)
    replies = raw.recv_until("Z")
    assert "E" not in types(replies), replies
