"""Start-up and authentication: agents, negotiation, TLS, upstream auth methods, failures."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgguard.embedded import EmbeddedPostgres, make_self_signed_certificate
from pgguard.wire import messages as m
from tests.support import (
    AGENT,
    AGENT_PASSWORD,
    ProxyThread,
    RawClient,
    agent_settings,
    error_fields,
)


def sqlstate_of(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


# --- agent authentication -----------------------------------------------------------------------


class CountingListener:
    """A TCP listener standing in for the upstream: it only counts connection attempts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def counting_proxy() -> Iterator[tuple[ProxyThread, CountingListener]]:
    listener = CountingListener()
    thread = ProxyThread(
        agent_settings(f"postgresql://u:p@127.0.0.1:{listener.port}/db?sslmode=disable")
    ).start()
    try:
        yield thread, listener
    finally:
        thread.stop()
        listener.close()


@pytest.mark.parametrize(
    ("user", "password"),
    [(AGENT, "wrong-password"), ("nobody", AGENT_PASSWORD), ("nobody", "x")],
)
def test_bad_credentials_get_28P01_and_no_upstream_connection(
    counting_proxy: tuple[ProxyThread, CountingListener], user: str, password: str
) -> None:
    proxy, listener = counting_proxy
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(user=user, password=password), connect_timeout=10)
    assert "password authentication failed" in str(info.value)
    raw = RawClient.connect(proxy.port)
    messages = raw.login(user=user, password=password)
    assert messages[-1][0] == "E"
    assert error_fields(messages[-1][1]).sqlstate == "28P01"
    assert listener.accepted == 0


def test_good_credentials_with_unreachable_upstream_get_08_error(
    counting_proxy: tuple[ProxyThread, CountingListener],
) -> None:
    proxy, listener = counting_proxy
    raw = RawClient.connect(proxy.port)
    messages = raw.login()
    kinds = [t for t, _ in messages]
    assert kinds[-1] == "E"
    assert error_fields(messages[-1][1]).sqlstate.startswith("08")
    assert listener.accepted == 1  # it tried, the fake upstream hung up
    assert raw.is_closed()


def test_upstream_down_gives_08001(proxy: ProxyThread) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    thread = ProxyThread(
        agent_settings(f"postgresql://u:p@127.0.0.1:{dead}/db?sslmode=disable")
    ).start()
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(thread.dsn(), connect_timeout=10)
        assert "could not connect to the upstream server" in str(info.value)
        raw = RawClient.connect(thread.port)
        fields = error_fields(raw.login()[-1][1])
        assert fields.sqlstate == "08006"
        assert fields.severity == "FATAL"
    finally:
        thread.stop()


def test_agent_limited_to_databases(proxy: ProxyThread, need_embedded: EmbeddedPostgres) -> None:
    with psycopg.connect(proxy.dsn("limited", "limited-password", dbname="allowed_db")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("allowed_db",)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn("limited", "limited-password", dbname="postgres"))
    assert 'not allowed to connect to database "postgres"' in str(info.value)


def test_missing_database_error_is_relayed(proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(dbname="no_such_db"))
    assert 'database "no_such_db" does not exist' in str(info.value)


def test_agent_never_sees_upstream_user(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        # The session runs as pgguard's upstream role; the agent name is the login user only.
        assert conn.info.user == AGENT
        assert conn.execute("SELECT session_user").fetchone() != (AGENT,)


def test_replication_connections_are_refused(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    messages = raw.login(replication="database")
    fields = error_fields(messages[-1][1])
    assert fields.sqlstate == "28000"
    assert "replication" in fields.message


@pytest.mark.parametrize(
    "pairs",
    [
        [("replication", "false"), ("replication", "database")],  # the review's walsender
        [("search_path", "public"), ("SEARCH_PATH", "pgguard")],  # setting names are case-blind
        [("user", AGENT), ("user", "postgres")],
    ],
    ids=["replication", "setting-case", "user"],
)
def test_repeated_startup_keys_are_refused(
    proxy: ProxyThread, pairs: list[tuple[str, str]]
) -> None:
    """PostgreSQL uses a repeated key's last value; pgguard judged the first (issue 15)."""
    raw = RawClient.connect(proxy.port)
    raw.send(m.startup_message(m.PROTOCOL_3_0, [("database", "postgres"), *pairs]))
    type_char, body = raw.recv_message()
    assert type_char == "E"
    fields = error_fields(body)
    assert fields.sqlstate == "08P01"
    assert "given twice" in fields.message
    assert raw.is_closed()


# --- protocol negotiation -----------------------------------------------------------------------


def test_protocol_3_2_and_pq_options_are_negotiated(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.startup(version=m.protocol_version(3, 5), **{"_pq_.future_option": "on"})
    type_char, body = raw.recv_message()
    assert type_char == "v"
    newest, count = struct.unpack("!II", body[:8])
    assert (newest, count) == (2, 1)
    assert body[8:] == b"_pq_.future_option\0"
    type_char, body = raw.recv_message()
    assert type_char == "R"


def test_protocol_3_2_session_works(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    messages = raw.login(version=m.PROTOCOL_3_2)
    keys = [body for t, body in messages if t == "K"]
    assert len(keys) == 1
    assert 8 <= len(keys[0]) <= 4 + 256
    raw.send(m.query("SELECT 41 + 1"))
    replies = raw.recv_until("Z")
    assert [t for t, _ in replies] == ["T", "D", "C", "Z"]


def test_unsupported_major_version(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.startup(version=m.protocol_version(4, 0))
    type_char, body = raw.recv_message()
    assert type_char == "E"
    assert error_fields(body).sqlstate == "0A000"
    assert raw.is_closed()


def test_gssenc_request_gets_n_then_startup_works(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.send(struct.pack("!II", 8, m.GSSENC_REQUEST_CODE))
    assert raw.recv_byte() == b"N"
    raw.send(struct.pack("!II", 8, m.SSL_REQUEST_CODE))
    assert raw.recv_byte() == b"N"  # no TLS configured on this proxy
    assert raw.login()[-1][0] == "Z"


def test_second_startup_during_authentication_closes(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.startup()
    assert raw.recv_message()[0] == "R"
    raw.startup()
    type_char, body = raw.recv_message()
    assert type_char == "E"
    assert error_fields(body).sqlstate == "08P01"
    assert raw.is_closed()


@pytest.mark.parametrize("length", [0, 3, 7, 10_001, 0x7FFFFFFF])
def test_absurd_startup_lengths_close_the_connection(proxy: ProxyThread, length: int) -> None:
    raw = RawClient.connect(proxy.port)
    raw.send(struct.pack("!II", length, m.PROTOCOL_3_0) + b"user\0x\0\0")
    assert raw.is_closed()


# --- TLS for agents -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(upstream_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    directory: Path = tmp_path_factory.mktemp("tls")
    cert, key = make_self_signed_certificate("localhost")
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    settings = agent_settings(
        upstream_dsn,
        listen={
            "tls_cert": str(directory / "server.crt"),
            "tls_key": str(directory / "server.key"),
        },
    )
    thread = ProxyThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


def test_tls_with_channel_binding(tls_proxy: ProxyThread) -> None:
    dsn = tls_proxy.dsn(sslmode="require", channel_binding="require")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tls_required_by_client_without_tls_on_proxy(proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(sslmode="require"))
    assert "SSL" in str(info.value) or "ssl" in str(info.value)


def test_direct_tls_negotiation(tls_proxy: ProxyThread) -> None:
    dsn = tls_proxy.dsn(sslmode="require", sslnegotiation="direct")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 2").fetchone() == (2,)


async def test_asyncpg_direct_tls(tls_proxy: ProxyThread) -> None:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["postgresql"])  # PostgreSQL 17 requires it for direct TLS
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=tls_proxy.port,
        user=AGENT,
        password=AGENT_PASSWORD,
        database="postgres",
        ssl=context,
        direct_tls=True,
    )
    try:
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


def test_direct_tls_without_alpn_is_refused(tls_proxy: ProxyThread) -> None:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock) as tls:
                tls.sendall(m.startup_message(m.PROTOCOL_3_0, [("user", AGENT)]))
                assert tls.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # refused during or right after the handshake: equally fine


# --- upstream authentication methods and TLS ----------------------------------------------------


@pytest.mark.parametrize("role", ["pgguard_scram", "pgguard_md5", "pgguard_password"])
def test_upstream_auth_methods(need_embedded: EmbeddedPostgres, role: str) -> None:
    thread = ProxyThread(agent_settings(need_embedded.tcp_dsn(role))).start()
    try:
        with psycopg.connect(thread.dsn()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        thread.stop()


def test_upstream_trust_over_unix_socket(need_embedded: EmbeddedPostgres) -> None:
    thread = ProxyThread(agent_settings(need_embedded.superuser_dsn())).start()
    try:
        with psycopg.connect(thread.dsn()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    finally:
        thread.stop()


def test_wrong_upstream_password_is_not_blamed_on_the_agent(
    need_embedded: EmbeddedPostgres,
) -> None:
    dsn = need_embedded.tcp_dsn().replace("scram-secret", "not-the-password")
    thread = ProxyThread(agent_settings(dsn)).start()
    try:
        raw = RawClient.connect(thread.port)
        fields = error_fields(raw.login()[-1][1])
        assert fields.sqlstate == "08001"
        assert "scram-secret" not in fields.message
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    from pgguard.embedded import system_bin_dir

    bin_dir = system_bin_dir()
    if bin_dir is None:
        pytest.skip("needs a PostgreSQL server built with TLS (Debian's postgresql package)")
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("tlspg") / "data", tls=True, bin_dir=bin_dir)
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def test_upstream_tls(tls_upstream: EmbeddedPostgres) -> None:
    thread = ProxyThread(agent_settings(tls_upstream.tcp_dsn(sslmode="require"))).start()
    try:
        with psycopg.connect(thread.dsn()) as conn:
            row = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert row == (True,)
    finally:
        thread.stop()


def test_query_pipelined_with_the_last_authentication_message(proxy: ProxyThread) -> None:
    from pgguard.wire.scram import ScramClient

    raw = RawClient.connect(proxy.port)
    raw.startup()
    _, body = raw.recv_message()
    scram = ScramClient(AGENT_PASSWORD, m.decode_sasl_mechanisms(body), None)
    raw.send(m.sasl_initial_response(scram.mechanism, scram.first()))
    _, body = raw.recv_message()
    # The final SASL message and a Query in one packet: the Query must not be lost or reordered.
    raw.send(m.password_message(scram.final(body[4:])) + m.query("SELECT 'pipelined'"))
    replies = raw.recv_until("Z") + raw.recv_until("Z")
    rows = [body for t, body in replies if t == "D"]
    assert rows == [b"\x00\x01\x00\x00\x00\x09pipelined"]
