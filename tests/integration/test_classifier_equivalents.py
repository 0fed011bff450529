"""Issue 16: the classifier cannot be fooled, through a live proxy to a real PostgreSQL.

(The UESCAPE twins were also refused before the fix, through the proxy: the protected-name
screen of issue 14 keeps every ``U&`` text out of the shared caches. The key's own soundness is
tested without that screen in tests/unit/sql/test_sql_cache_soundness.py.)

Each test runs one bypass the review found (and its nearest variants) through pgguard with the
shipped rules and no approvers, so "judged as privileged" shows as a 42501 refusal; the server
itself then says whether the statement ran (the table still exists, the setting is unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, agent_settings, error_fields


@pytest.fixture(scope="module")
def guarded(upstream_dsn: str) -> Iterator[ProxyThread]:
    settings = agent_settings(upstream_dsn)
    gate = PolicyGate(load_engine(settings), upstream=settings.upstream)
    thread = ProxyThread(settings, gate).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def notes(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id int)")


def notes_exist(direct_dsn: str) -> bool:
    with psycopg.connect(direct_dsn) as conn:
        return conn.execute("SELECT to_regclass('notes') IS NOT NULL").fetchone() == (True,)


# --- 1. cache poisoning through UESCAPE ----------------------------------------------------------

TWINS = [
    # (harmless twin: no such function, the real call) - the same text but for the escape char
    (
        """SELECT U&"!0070g_read_file" UESCAPE '#' ('/etc/hostname')""",
        """SELECT U&"!0070g_read_file" UESCAPE '!' ('/etc/hostname')""",
    ),
    (
        """SELECT U&"!006Co_export" UESCAPE '#' (1, '/tmp/pgguard-x')""",
        """SELECT U&"!006Co_export" UESCAPE '!' (1, '/tmp/pgguard-x')""",
    ),
    (
        """SELECT U&"!0070g_terminate_backend" UESCAPE '#' (0)""",
        """SELECT U&"!0070g_terminate_backend" UESCAPE '!' (0)""",
    ),
]


@pytest.mark.parametrize(("twin", "real"), TWINS)
def test_a_uescape_twin_does_not_poison_the_cache(
    guarded: ProxyThread, twin: str, real: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(twin)  # allowed: judged harmless, and the server has no such function
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(real)
    with (
        psycopg.connect(guarded.dsn(), autocommit=True) as other,  # nor in another session
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        other.execute(real)


def test_a_uescape_twin_sent_as_a_simple_query_does_not_poison_the_cache(
    guarded: ProxyThread,
) -> None:
    twin, real = TWINS[0]
    raw = RawClient.connect(guarded.port)
    raw.login()
    raw.send(m.query(twin))
    assert error_fields(raw.recv_until("Z")[0][1]).sqlstate == "42883"
    raw.send(m.query(real))
    assert error_fields(raw.recv_until("Z")[0][1]).sqlstate == "42501"
