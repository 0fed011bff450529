"""Hostile bytes at a live proxy: the offending connection dies with 08P01, everyone else lives."""

from __future__ import annotations

import random
import socket
import struct

import psycopg
import pytest

from pgguard.proxy.gate import Gate, SessionView, SqlEvent, Verdict
from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, agent_settings, error_fields


def assert_proxy_still_serves(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)


def test_function_call_message_is_refused_and_session_survives(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    assert raw.login()[-1][0] == "Z"
    raw.send(m.query("BEGIN"))
    assert raw.recv_until("Z")[-1] == ("Z", b"T")
    # FunctionCall: OID 1299 (now()), no arguments, text result.
    raw.send(m.message(m.F_FUNCTION_CALL, struct.pack("!IhhhI", 1299, 0, 0, 0, 0)[:-2]))
    replies = raw.recv_until("Z")
    assert replies[0][0] == "E"
    fields = error_fields(replies[0][1])
    assert fields.sqlstate == "42501"
    assert "function-call" in fields.message
    # The server saw an error at the same point: the transaction block is now failed.
    assert replies[-1] == ("Z", b"E")
    raw.send(m.query("ROLLBACK"))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")


def test_oversized_message_gets_fatal_08P01(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.login()
    limit = proxy.settings.limits.max_message_bytes
    raw.send(b"Q" + struct.pack("!I", limit + 100))
    type_char, body = raw.recv_message()
    assert type_char == "E"
    assert error_fields(body).sqlstate == "08P01"
    assert raw.is_closed()
    assert_proxy_still_serves(proxy)


def test_illegal_message_type_gets_fatal_08P01(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.login()
    raw.send(m.ready_for_query(b"I"))  # a backend message from a client
    type_char, body = raw.recv_message()
    assert type_char == "E"
    fields = error_fields(body)
    assert fields.sqlstate == "08P01"
    assert fields.severity == "FATAL"
    assert raw.is_closed()


def test_client_vanishing_mid_message(proxy: ProxyThread) -> None:
    raw = RawClient.connect(proxy.port)
    raw.login()
    raw.send(b"Q" + struct.pack("!I", 1000) + b"SELECT")
    raw.sock.shutdown(socket.SHUT_RDWR)
    raw.close()
    assert_proxy_still_serves(proxy)


def mutations(rng: random.Random) -> list[bytes]:
    good = [
        m.query("SELECT 1"),
        m.parse("s", "SELECT $1"),
        b"B\x00\x00\x00\x12\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x0142\x00\x00",
        b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00",
        b"S\x00\x00\x00\x04",
        b"d\x00\x00\x00\x08data",
    ]
    out = []
    for _ in range(60):
        frame = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif op == 1:
                frame[1:5] = struct.pack(
                    "!I", rng.choice([0, 3, 4, 5, 9999, 1 << 31, rng.randrange(1 << 32)])
                )
            elif op == 2:
                frame += rng.randbytes(rng.randint(1, 64))
            else:
                frame = frame[: rng.randint(0, len(frame))]
        out.append(bytes(frame))
    for _ in range(20):
        out.append(rng.randbytes(rng.randint(1, 200)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_frames_after_login_and_before_it(proxy: ProxyThread, seed: int) -> None:
    rng = random.Random(seed)
    for payload in mutations(rng):
        raw = RawClient.connect(proxy.port, timeout=5)
        try:
            if rng.random() < 0.7:
                raw.login()
            raw.send(payload)
            raw.send(m.query("SELECT 1"))
            # Whatever happens, the proxy answers with protocol messages or closes; it never hangs
            # the connection past the timeout and never crashes.
            raw.is_closed(timeout=0.2)
        except (ConnectionError, OSError):
            pass
        finally:
            raw.close()
    assert_proxy_still_serves(proxy)


class _BrokenGate(Gate):
    """A gate with a bug: it raises on statements mentioning 'boom'."""

    def check(self, session: SessionView, event: SqlEvent) -> Verdict:
        if b"boom" in event.sql:
            raise RuntimeError("a bug in a gate")
        return super().check(session, event)


def test_a_gate_that_raises_ends_only_that_session(upstream_dsn: str, direct_dsn: str) -> None:
    thread = ProxyThread(agent_settings(upstream_dsn), _BrokenGate()).start()
    try:
        with psycopg.connect(direct_dsn, autocommit=True) as direct:
            direct.execute("DROP TABLE IF EXISTS boom_target")
            direct.execute("CREATE TABLE boom_target (id int)")
        raw = RawClient.connect(thread.port)
        raw.login()
        raw.send(m.query("INSERT INTO boom_target VALUES (1) -- boom"))
        type_char, body = raw.recv_message()
        assert type_char == "E"
        fields = error_fields(body)
        assert (fields.sqlstate, fields.severity) == ("XX000", "FATAL")
        assert raw.is_closed()
        with psycopg.connect(direct_dsn) as direct:  # the statement never ran
            assert direct.execute("SELECT count(*) FROM boom_target").fetchone() == (0,)
        assert_proxy_still_serves(thread)
    finally:
        thread.stop()
