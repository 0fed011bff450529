"""A long pipeline before one Sync (psycopg's executemany) costs O(1) per message.

Before the session model and the outcome tracker kept per-name indexes and a finished-slot
cursor, every Execute walked every unanswered operation of the pipeline and every
CommandComplete every finished statement: 1,000 rows took 9.4 s through pgguard (0.01 s
direct), 2,000 took 82 s, and meanwhile the proxy's one loop served no one else - no other
session, no new connection, not even SIGTERM. And a pipeline of unnamed Parses (psycopg with
``prepare_threshold=None``, as used behind pgbouncer) was cut off at the 64th row.

pgguard runs whole, with the ledger on; a well-behaved second session measures its ``SELECT 1``
latency while the pipeline goes through, and the ledger must record every row.
"""

from __future__ import annotations

import contextlib
import secrets
import struct
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from pgguard.wire import messages as m
from tests.support import PgguardThread, RawClient, error_fields, ledgered_pgguard

ROWS = 5000
SYNC = m.message(ord("S"))


@pytest.fixture(scope="module")
def guarded(upstream_dsn: str, state_dsn: str) -> Iterator[PgguardThread]:
    with ledgered_pgguard(upstream_dsn, state_dsn, "pipe") as thread:
        yield thread


@pytest.fixture
def table(direct_dsn: str) -> Iterator[str]:
    name = f"pipeline_rows_{secrets.token_hex(4)}"
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int, note text)")
    try:
        yield name
    finally:
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {name}")


def probe_latencies(dsn: str, stop: threading.Event, out: list[float]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            out.append(time.perf_counter() - started)
            time.sleep(0.005)


def ledger_rows(guarded: PgguardThread, application_name: str) -> list[tuple[str, str | None]]:
    guarded.call(guarded.running.ledger.flush())
    schema = guarded.settings.state.schema_name
    with psycopg.connect(guarded.settings.state_dsn()) as conn:
        return conn.execute(  # type: ignore[return-value]
            f"SELECT statement, command_tag FROM {schema}.ledger WHERE kind = 'statement' "
            "AND application_name = %s AND statement LIKE 'INSERT%%' ORDER BY seq",
            (application_name,),
        ).fetchall()


@pytest.mark.parametrize("prepare_threshold", [5, None], ids=["named", "unnamed"])
def test_executemany_of_thousands_of_rows_keeps_everyone_served(
    guarded: PgguardThread, table: str, prepare_threshold: int | None
) -> None:
    application_name = f"pipe-{secrets.token_hex(4)}"
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe_latencies, args=(guarded.dsn(), stop, latencies))
    prober.start()
    try:
        time.sleep(0.2)
        dsn = guarded.dsn(application_name=application_name)
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=prepare_threshold) as conn:
            started = time.perf_counter()
            conn.cursor().executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"row {i}") for i in range(ROWS)]
            )
            elapsed = time.perf_counter() - started
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (ROWS,)
    finally:
        stop.set()
        prober.join(30)
    # Generous bounds for a shared 2-core machine: the quadratic walk took minutes here.
    assert elapsed < 30, elapsed
    assert latencies
    assert max(latencies) < 2.0, max(latencies)
    recorded = ledger_rows(guarded, application_name)
    assert len(recorded) == ROWS
    assert {tag for _, tag in recorded} == {"INSERT 0 1"}


HELD_NAMES = 4000


def test_simple_queries_while_thousands_of_statements_are_held_keep_everyone_served(
    guarded: PgguardThread,
) -> None:
    """Every simple Query's answer used to touch every named statement the session held (it
    may have DEALLOCATEd them): 4,000 names and 4,000 pipelined Queries took the loop 17 s of
    CPU, and another session's SELECT 1 waited 11.8 s."""
    raw = RawClient.connect(guarded.port, timeout=120)
    raw.login()
    raw.send(b"".join(m.parse(f"held_{i}", "SELECT 1") for i in range(HELD_NAMES)) + SYNC)
    replies = raw.recv_until("Z")
    assert [t for t, _ in replies].count("1") == HELD_NAMES
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe_latencies, args=(guarded.dsn(), stop, latencies))
    prober.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        raw.send(m.query("SELECT 1") * HELD_NAMES)
        for _ in range(HELD_NAMES):
            assert raw.recv_until("Z")[-1] == ("Z", b"I")
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        prober.join(30)
    assert elapsed < 30, elapsed
    assert latencies
    assert max(latencies) < 2.0, max(latencies)


REBINDS = 4000


def test_a_named_portal_rebound_in_thousands_of_pipelined_groups_is_served(
    guarded: PgguardThread,
) -> None:
    """[Bind p; Sync; Execute p; Close p; Sync] x 4,000, sent at once behind a pg_sleep: every
    Execute's lookup used to walk every unanswered Bind and Close of p again (0.77 s of the
    loop's CPU for 1,000, another session's SELECT 1 waited 2.3 s), and past 1,024 of them
    the session was cut off (08P01). A lookup now walks only what was filed since the last."""
    bind = m.message(ord("B"), b"p\0s\0" + struct.pack("!hhh", 0, 0, 0))
    execute = m.message(ord("E"), b"p\0" + struct.pack("!i", 0))
    close = m.message(ord("C"), b"Pp\0")
    raw = RawClient.connect(guarded.port, timeout=120)
    raw.login()
    raw.send(m.query("BEGIN") + m.parse("s", "SELECT 1") + SYNC)
    raw.recv_until("Z")
    raw.recv_until("Z")
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe_latencies, args=(guarded.dsn(), stop, latencies))
    prober.start()
    sender = threading.Thread(
        target=raw.send,
        args=(m.query("SELECT pg_sleep(0.5)") + (bind + SYNC + execute + close + SYNC) * REBINDS,),
    )
    try:
        time.sleep(0.2)
        sender.start()
        replies = [raw.recv_until("Z") for _ in range(1 + 2 * REBINDS)]
    finally:
        stop.set()
        prober.join(30)
        sender.join(30)
    assert all(kind != "E" for group in replies for kind, _ in group)
    assert sum(("C", b"SELECT 1\0") in group for group in replies[1:]) == REBINDS
    assert latencies
    assert max(latencies) < 2.0, max(latencies)


def test_thousands_of_parses_of_one_name_before_a_sync_are_cut_off(
    guarded: PgguardThread,
) -> None:
    """Parse s x 8,000 before one Sync, each naming another relation. The server refuses every
    one after the first (42P05), but pgguard judges each text and the gate remembers it under s
    (the union grows with each): 16,000 took the loop 9.3 s of CPU and another session waited
    19.8 s. Named Parses of its own group count towards the 64-text limit again (08P01)."""
    raw = RawClient.connect(guarded.port, timeout=120)
    raw.login()
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe_latencies, args=(guarded.dsn(), stop, latencies))
    prober.start()
    payload = b"".join(m.parse("s", f"SELECT * FROM pg_class_r{i}") for i in range(8000))
    sender = threading.Thread(target=lambda: _send_quietly(raw, payload + SYNC))
    try:
        time.sleep(0.2)
        sender.start()
        errors = []
        with contextlib.suppress(ConnectionError, OSError):  # closed by the cut-off
            while (message := raw.recv_message())[0] != "Z":
                if message[0] == "E":
                    errors.append(error_fields(message[1]))
    finally:
        stop.set()
        prober.join(30)
        sender.join(30)
    assert any(e.sqlstate == "08P01" and "may stand for 64 texts" in e.message for e in errors)
    assert latencies
    assert max(latencies) < 2.0, max(latencies)


def _send_quietly(raw: RawClient, data: bytes) -> None:
    with contextlib.suppress(OSError):  # cut off mid-send
        raw.send(data)


BIG_ROW = 128 * 1024 * 1024


def replies_until_ready(raw: RawClient, count: int) -> list[tuple[str, bytes]]:
    """Messages up to ``count`` ReadyForQuery, read into one growing buffer (RawClient's
    bytes += would itself take quadratic time over a 128 MiB row)."""
    buffer = bytearray(raw.buffer)
    pos = 0
    out: list[tuple[str, bytes]] = []
    chunk = bytearray(1 << 20)
    while count:
        while (
            len(buffer) - pos < 5
            or len(buffer) - pos < 1 + struct.unpack_from("!I", buffer, pos + 1)[0]
        ):
            got = raw.sock.recv_into(chunk)
            assert got, "closed"
            buffer += chunk[:got]
        end = pos + 1 + struct.unpack_from("!I", buffer, pos + 1)[0]
        kind = chr(buffer[pos])
        out.append((kind, bytes(buffer[pos + 5 : end]) if kind != "D" else b""))
        count -= kind == "Z"
        pos = end
    return out


def test_a_large_reply_ahead_of_a_refused_statement_is_relayed_in_linear_time(
    guarded: PgguardThread, direct_dsn: str
) -> None:
    """A refused statement pipelined behind a SELECT of one 128 MiB row: pgguard rewrites the
    refusal's ErrorResponse, and while that rewrite was pending every chunk of the row was
    joined to all the bytes before it (the whole message was held until complete): 64 MiB took
    the loop 5.8 s of CPU (0.06 s with nothing refused behind it)."""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS pipeline_victim (id int)")
    raw = RawClient.connect(guarded.port, timeout=120)
    raw.login()
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe_latencies, args=(guarded.dsn(), stop, latencies))
    prober.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        raw.send(m.query(f"SELECT repeat('x', {BIG_ROW})") + m.query("DROP TABLE pipeline_victim"))
        replies = replies_until_ready(raw, 2)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        prober.join(30)
    assert [kind for kind, _ in replies] == ["T", "D", "C", "Z", "E", "Z"]
    assert error_fields(replies[4][1]).sqlstate == "42501"
    assert elapsed < 10, elapsed
    assert max(latencies) < 2.0, max(latencies)
    with psycopg.connect(direct_dsn) as conn:
        exists = conn.execute("SELECT to_regclass('pipeline_victim') IS NOT NULL").fetchone()
    assert exists == (True,)
