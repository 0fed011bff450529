"""psql, asyncpg and psycopg through pgguard behave exactly as direct connections (point 5)."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from tests.support import ProxyThread

pytestmark = pytest.mark.usefixtures("proxy")


@pytest.fixture(scope="module", autouse=True)
def sample_table(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS relay_items")
        conn.execute("CREATE TABLE relay_items (id int PRIMARY KEY, name text, payload bytea)")
        conn.execute(
            "INSERT INTO relay_items SELECT g, 'item ' || g, decode(md5(g::text), 'hex') "
            "FROM generate_series(1, 200) g"
        )


def both(proxy: ProxyThread, direct_dsn: str) -> list[str]:
    return [direct_dsn, proxy.dsn()]


# --- simple query -------------------------------------------------------------------------------


def test_multi_statement_simple_query_psycopg(proxy: ProxyThread, direct_dsn: str) -> None:
    results = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.cursor()
            # No parameters: psycopg sends one simple Query with three statements.
            cur.execute(
                "SELECT 1 AS a; SELECT 'two' AS b, 2.5 AS c; SELECT count(*) FROM relay_items"
            )
            sets = []
            while True:
                sets.append(([d.name for d in cur.description or []], cur.fetchall()))
                if not cur.nextset():
                    break
            results.append(sets)
    assert results[0] == results[1]
    assert len(results[0]) == 3


def test_psql_session_matches_direct(proxy: ProxyThread, direct_dsn: str) -> None:
    script = (
        "SELECT id, name FROM relay_items WHERE id < 5 ORDER BY id;\n"
        "BEGIN;\nSELECT 1/0;\nSELECT 1;\nROLLBACK;\n"
        "DO $$ BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END $$;\n"
        "SHOW standard_conforming_strings;\n"
        "\\copy (SELECT id, name FROM relay_items ORDER BY id LIMIT 3) TO STDOUT\n"
    )
    outputs = []
    for dsn in both(proxy, direct_dsn):
        done = subprocess.run(
            ["psql", "-X", "-At", dsn], input=script, capture_output=True, text=True, timeout=60
        )
        outputs.append((done.returncode, done.stdout, done.stderr))
    assert outputs[0] == outputs[1]
    assert "division by zero" in outputs[0][2]
    assert "current transaction is aborted" in outputs[0][2]
    assert "hello from plpgsql" in outputs[0][2]


# --- extended protocol --------------------------------------------------------------------------


async def test_asyncpg_extended_protocol_matches_direct(
    proxy: ProxyThread, direct_dsn: str
) -> None:
    results = []
    for dsn in both(proxy, direct_dsn):
        conn = await asyncpg.connect(dsn)
        try:
            stmt = await conn.prepare(
                "SELECT id, name, payload FROM relay_items WHERE id = ANY($1::int[]) ORDER BY id"
            )
            first = await stmt.fetch([1, 2, 3])
            again = await stmt.fetch([150, 199])
            async with conn.transaction():
                cursor_rows = [
                    r
                    async for r in conn.cursor("SELECT id FROM relay_items ORDER BY id", prefetch=7)
                ]
            await conn.executemany(
                "INSERT INTO relay_items VALUES ($1, $2, NULL)"
                " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                [(1000 + i, f"n{i}") for i in range(20)],
            )
            count = await conn.fetchval("SELECT count(*) FROM relay_items WHERE id >= 1000")
            await conn.execute("DELETE FROM relay_items WHERE id >= 1000")
            results.append(
                ([tuple(r) for r in first], [tuple(r) for r in again], len(cursor_rows), count)
            )
        finally:
            await conn.close()
    assert results[0] == results[1]
    assert results[0][2] == 200
    assert results[0][3] == 20


def test_psycopg_pipeline_and_named_statements(proxy: ProxyThread, direct_dsn: str) -> None:
    results = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            rows = []
            with conn.pipeline():
                curs = [
                    conn.execute("SELECT name FROM relay_items WHERE id = %s", (i,))
                    for i in range(1, 30)
                ]
            for cur in curs:
                rows.append(cur.fetchone())
            # prepare_threshold=0 makes psycopg use named prepared statements (Parse 'S_n').
            for i in range(3):
                rows.append(
                    conn.execute(
                        "SELECT %s::int + id FROM relay_items WHERE id = 1", (i,)
                    ).fetchone()
                )
            results.append(rows)
    assert results[0] == results[1]
    assert results[0][0] == ("item 1",)


def test_pipeline_error_skips_to_sync(proxy: ProxyThread, direct_dsn: str) -> None:
    outcomes = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn) as conn:
            seen = []
            try:
                with conn.pipeline():
                    conn.execute("SELECT 1")
                    conn.execute("SELECT 1/0")
                    conn.execute("SELECT 2")
            except psycopg.errors.DivisionByZero:
                seen.append("div0")
            seen.append(conn.info.transaction_status.name)
            conn.rollback()
            seen.append(conn.execute("SELECT 3").fetchone())
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "div0"


# --- COPY ---------------------------------------------------------------------------------------


def test_copy_both_ways_with_megabytes(proxy: ProxyThread, direct_dsn: str) -> None:
    line = "x" * 1000
    data = "".join(f"{i}\t{line}\n" for i in range(6000)).encode()  # ~6 MB
    outputs = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE copy_target (id int, body text)")
            with conn.cursor().copy("COPY copy_target FROM STDIN") as copy:
                for start in range(0, len(data), 65536):
                    copy.write(data[start : start + 65536])
            out = io.BytesIO()
            with conn.cursor().copy(
                "COPY (SELECT * FROM copy_target ORDER BY id) TO STDOUT"
            ) as copy:
                for chunk in copy:
                    out.write(chunk)
            outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] == data


def test_copy_from_stdin_failure_is_relayed(proxy: ProxyThread, direct_dsn: str) -> None:
    messages = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE copy_bad (id int)")
            with (
                pytest.raises(psycopg.errors.InvalidTextRepresentation) as info,
                conn.cursor().copy("COPY copy_bad FROM STDIN") as copy,
            ):
                copy.write(b"1\nnot-a-number\n")
            messages.append(str(info.value).splitlines()[0])
            assert conn.execute("SELECT count(*) FROM copy_bad").fetchone() == (0,)
    assert messages[0] == messages[1]


# --- notices, notifications, parameters, errors ---------------------------------------------------


async def test_listen_notify_and_backend_pid(proxy: ProxyThread) -> None:
    listener = await asyncpg.connect(proxy.dsn())
    sender = await asyncpg.connect(proxy.dsn())
    try:
        received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await listener.add_listener(
            "pgguard_chan", lambda _c, pid, ch, payload: received.put_nowait((pid, ch, payload))
        )
        sender_pid = await sender.fetchval("SELECT pg_backend_pid()")
        await sender.execute("NOTIFY pgguard_chan, 'hello'")
        pid, channel, payload = await asyncio.wait_for(received.get(), 10)
        # The real BackendKeyData passes through: the NOTIFY pid is the sender's backend pid.
        assert (pid, channel, payload) == (sender_pid, "pgguard_chan", "hello")
        assert sender.get_server_pid() == sender_pid
    finally:
        await listener.close()
        await sender.close()


def test_notice_and_parameter_status(proxy: ProxyThread, direct_dsn: str) -> None:
    seen = []
    for dsn in both(proxy, direct_dsn):
        notices: list[str] = []

        def on_notice(diag: psycopg.errors.Diagnostic, notices: list[str] = notices) -> None:
            notices.append(diag.message_primary or "")

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.add_notice_handler(on_notice)
            conn.execute("DO $$ BEGIN RAISE NOTICE 'note %', 42; END $$")
            conn.execute("SET application_name = 'relay-test'")
            conn.execute("SET TimeZone = 'Asia/Tokyo'")
            seen.append(
                (
                    notices,
                    conn.info.parameter_status("application_name"),
                    conn.info.parameter_status("TimeZone"),
                    conn.info.server_version,
                )
            )
    assert seen[0] == seen[1]
    assert seen[0][0] == ["note 42"]
    assert seen[0][1] == "relay-test"


def test_startup_parameters_are_forwarded(proxy: ProxyThread, direct_dsn: str) -> None:
    values = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(
            dsn,
            options="-c search_path=pg_catalog,public -c work_mem=7MB",
            application_name="fwd-test",
        ) as conn:
            values.append(
                conn.execute(
                    "SELECT current_setting('search_path'), current_setting('work_mem'),"
                    " current_setting('application_name')"
                ).fetchone()
            )
    assert values[0] == values[1] == ("pg_catalog,public", "7MB", "fwd-test")


def test_errors_inside_and_outside_transactions(proxy: ProxyThread, direct_dsn: str) -> None:
    outcomes = []
    for dsn in both(proxy, direct_dsn):
        with psycopg.connect(dsn) as conn:
            record = []
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT * FROM no_such_table")
            record.append(conn.info.transaction_status.name)  # INERROR
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            conn.autocommit = True
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("INSERT INTO relay_items VALUES (1, 'dup', NULL)")
            record.append(conn.info.transaction_status.name)  # IDLE
            outcomes.append(record)
    assert outcomes[0] == outcomes[1] == ["INERROR", "IDLE"]


# --- concurrency and cancel ---------------------------------------------------------------------


async def test_fifty_concurrent_sessions(proxy: ProxyThread) -> None:
    async def one(i: int) -> int:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            total = 0
            for _ in range(10):
                total += await conn.fetchval(
                    "SELECT count(*) FROM relay_items WHERE id <= $1", i + 1
                )
            await conn.fetchval("SELECT pg_sleep(0.05)")
            return total
        finally:
            await conn.close()

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results == [10 * (i + 1) for i in range(50)]


def test_cancel_reaches_the_right_backend(proxy: ProxyThread) -> None:
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as victim,
        psycopg.connect(proxy.dsn(), autocommit=True) as bystander,
    ):
        # cancel_safe(): the blocking PQcancel of psycopg's binary build holds the GIL, which
        # would freeze the in-process proxy thread that must receive the CancelRequest.
        timer = threading.Timer(0.5, victim.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            victim.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        assert victim.execute("SELECT 2").fetchone() == (2,)


def test_pg_terminate_backend_uses_real_pid(proxy: ProxyThread) -> None:
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as victim,
        psycopg.connect(proxy.dsn(), autocommit=True) as killer,
    ):
        pid = victim.info.backend_pid
        assert victim.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        assert killer.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT 1")
        assert "terminating connection" in str(info.value) or "closed" in str(info.value)


def test_cancel_for_another_instances_session_is_forwarded(
    proxy: ProxyThread, upstream_dsn: str
) -> None:
    """Two instances behind one address: a cancel reaching the other instance still works."""
    from pgguard.wire import messages as m
    from tests.support import RawClient, agent_settings

    other = ProxyThread(agent_settings(upstream_dsn)).start()
    try:
        raw = RawClient.connect(proxy.port)
        welcome = raw.login()
        key = next(body for kind, body in welcome if kind == "K")
        raw.send(m.query("SELECT pg_sleep(20)"))
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", other.port), timeout=10) as cancel:
            cancel.sendall(m.cancel_request(int.from_bytes(key[:4], "big", signed=True), key[4:]))
            assert cancel.recv(10) == b""
        replies = raw.recv_until("Z")
        assert any(kind == "E" and b"57014" in body for kind, body in replies)
    finally:
        other.stop()


def test_the_clients_cancel_connection_closes_after_the_servers(upstream_dsn: str) -> None:
    """libpq waits for its cancel connection to close before the next statement: pgguard must
    not close it before the server has taken the cancel (issue 15). A listener that holds the
    forwarded cancel for a second plays a slow server, so the order is visible."""
    from pgguard.wire import messages as m
    from tests.support import agent_settings

    slow = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def hold_then_close() -> None:
        conn, _ = slow.accept()
        with conn:
            received.append(conn.recv(16))
            time.sleep(1.0)

    server = threading.Thread(target=hold_then_close, daemon=True)
    server.start()
    port = slow.getsockname()[1]
    proxy = ProxyThread(
        agent_settings(f"postgresql://nobody@127.0.0.1:{port}/postgres?sslmode=disable")
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as cancel:
            started = time.monotonic()
            cancel.sendall(m.cancel_request(1234, b"\x00\x00\x00\x07"))
            assert cancel.recv(10) == b""
            waited = time.monotonic() - started
        assert received == [m.cancel_request(1234, b"\x00\x00\x00\x07")]
        assert waited >= 0.9, f"closed {waited:.2f} s after the request, before the server"
    finally:
        proxy.stop()
        server.join(5)
        slow.close()
