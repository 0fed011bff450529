"""Golden bytes through the decoders: whole, one byte at a time, and followed by junk."""

from __future__ import annotations

import struct

import pytest

from pgguard.errors import ProtocolViolation
from pgguard.wire import messages as m
from pgguard.wire.backend import BackendTracker
from pgguard.wire.framing import (
    Frame,
    FrontendScanner,
    MessageDecoder,
    StartupDecoder,
)

# A pipeline as libpq sends it: Parse, Bind, Describe, Execute, Sync, then a simple Query.
PARSE = b"P\x00\x00\x00\x16\x00SELECT $1::int\x00\x00\x00"
BIND = b"B\x00\x00\x00\x12\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00"
DESCRIBE = b"D\x00\x00\x00\x06P\x00"
EXECUTE = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
SYNC = b"S\x00\x00\x00\x04"
QUERY = b"Q\x00\x00\x00\x0dSELECT 1\x00"
PIPELINE = PARSE + BIND + DESCRIBE + EXECUTE + SYNC + QUERY


def drain(scanner: FrontendScanner) -> list[bytes | Frame]:
    out: list[bytes | Frame] = []
    while (event := scanner.next_event()) is not None:
        out.append(event)
    return out


def feed_in_chunks(data: bytes, size: int) -> tuple[list[str], bytes]:
    """Feed ``data`` in chunks; returns the frame types seen and the bytes reproduced."""
    scanner = FrontendScanner(1 << 20)
    kinds: list[str] = []
    reproduced = b""
    for start in range(0, len(data), size):
        scanner.receive_data(data[start : start + size])
        for event in drain(scanner):
            if isinstance(event, Frame):
                kinds.append(chr(event.type))
                reproduced += event.raw
            else:
                reproduced += event
    return kinds, reproduced


def test_golden_messages_are_what_libpq_would_send() -> None:
    assert m.parse("", "SELECT $1::int")[:-2] + b"\x00\x00" == PARSE[:-2] + b"\x00\x00"
    assert m.query("SELECT 1") == QUERY


@pytest.mark.parametrize("chunk", [len(PIPELINE), 1, 2, 3, 7])
def test_scanner_reproduces_the_stream_and_cuts_out_sql_messages(chunk: int) -> None:
    kinds, reproduced = feed_in_chunks(PIPELINE, chunk)
    assert kinds == ["P", "B", "E", "Q"]
    assert reproduced == PIPELINE


def test_scanner_counts_syncs() -> None:
    scanner = FrontendScanner(1 << 20)
    scanner.receive_data(SYNC * 3 + QUERY)
    drain(scanner)
    assert scanner.syncs == 3


def test_scanner_leaves_an_incomplete_trailing_message() -> None:
    scanner = FrontendScanner(1 << 20)
    scanner.receive_data(QUERY + QUERY[:4])
    events = drain(scanner)
    assert len(events) == 1
    assert isinstance(events[0], Frame)
    assert events[0].raw == QUERY
    assert scanner.buffered == 4
    scanner.receive_data(QUERY[4:])
    (frame,) = drain(scanner)
    assert isinstance(frame, Frame)
    assert frame.body == b"SELECT 1\x00"


def test_large_copy_data_streams_without_buffering() -> None:
    payload = b"x" * 100_000
    copy = b"d" + struct.pack("!I", len(payload) + 4) + payload
    scanner = FrontendScanner(1 << 10)  # far smaller than the CopyData message
    forwarded = b""
    for start in range(0, len(copy), 4096):
        scanner.receive_data(copy[start : start + 4096])
        for event in drain(scanner):
            assert isinstance(event, bytes)
            forwarded += event
    assert forwarded == copy


def test_a_large_statement_in_many_chunks_is_joined_once() -> None:
    """Issue 18: the chunks of one big Query wait aside until it is whole, so the buffer is not
    copied again with every chunk (megabytes of copying per statement on the shared loop)."""
    sql = b"SELECT " + b"1," * 150_000 + b"1\x00"
    query = b"Q" + struct.pack("!I", len(sql) + 4) + sql
    data = query + SYNC
    scanner = FrontendScanner(1 << 20)
    first = data[:4096]
    scanner.receive_data(first)
    events = drain(scanner)
    for start in range(4096, len(data), 4096):
        assert events == []
        assert scanner._buf is first  # the first chunk, not a growing copy of every chunk
        scanner.receive_data(data[start : start + 4096])
        assert scanner.buffered == min(start + 4096, len(data))
        events = drain(scanner)
    assert len(events) == 2
    assert isinstance(events[0], Frame)
    assert events[0].raw == query
    assert events[1] == SYNC
    assert scanner.idle


@pytest.mark.parametrize(
    "junk",
    [
        b"Z\x00\x00\x00\x05I",  # a backend message type from a client
        b"p\x00\x00\x00\x08abcd",  # a password message after start-up
        b"Q\x00\x00\x00\x02",  # a length shorter than the length word
        b"S\x00\x00\x00\x05x",  # Sync with a body
        b"E" + struct.pack("!I", 20_000) + b"\x00" * 8,  # Execute beyond the small-message cap
    ],
)
def test_scanner_rejects_illegal_messages_after_the_good_ones(junk: bytes) -> None:
    scanner = FrontendScanner(1 << 20)
    scanner.receive_data(SYNC + junk)
    assert scanner.next_event() == SYNC
    with pytest.raises(ProtocolViolation):
        scanner.next_event()


def test_oversized_query_is_refused_before_it_is_buffered() -> None:
    scanner = FrontendScanner(1024)
    scanner.receive_data(b"Q" + struct.pack("!I", 4096))
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        scanner.next_event()


# --- server side --------------------------------------------------------------------------------

SERVER = (
    m.message(m.B_PARAMETER_STATUS, b"client_encoding\x00SJIS\x00")
    + b"T"
    + struct.pack("!I", 6)
    + b"\x00\x00"
    + m.message(ord("D"), b"\x00\x01\x00\x00\x00\x011")
    + m.message(m.B_COMMAND_COMPLETE, b"SELECT 1\x00")
    + m.ready_for_query(b"T")
)


@pytest.mark.parametrize("chunk", [len(SERVER), 1, 2, 5, 6])
def test_tracker_follows_status_and_parameters(chunk: int) -> None:
    tracker = BackendTracker({"client_encoding": "UTF8"})
    out = b""
    for start in range(0, len(SERVER), chunk):
        out += tracker.feed(SERVER[start : start + chunk])
    assert out == SERVER
    assert tracker.txn_status == b"T"
    assert tracker.parameters["client_encoding"] == "SJIS"
    assert tracker.ready_count == 1


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_tracker_replaces_only_the_marked_error(chunk: int) -> None:
    ours = m.error_response("ERROR", "42501", "refused by pgguard")
    other = m.error_response("ERROR", "22012", "division by zero")
    marked = m.error_response("ERROR", "42601", 'syntax error at or near "pgguard_refused_ab12"')
    stream = other + m.ready_for_query(b"I") + marked + m.ready_for_query(b"E")
    tracker = BackendTracker()
    tracker.replace_error(b"pgguard_refused_ab12", ours, group=1)
    out = b""
    for start in range(0, len(stream), chunk):
        out += tracker.feed(stream[start : start + chunk])
    assert out == other + m.ready_for_query(b"I") + ours + m.ready_for_query(b"E")
    assert not tracker.rewriting
    assert tracker.txn_status == b"E"


def test_tracker_switches_to_rewriting_mid_message() -> None:
    row = m.message(ord("D"), b"\x00\x01\x00\x00\x00\x05hello")
    tracker = BackendTracker()
    out = tracker.feed(row[:3])
    tracker.replace_error(b"marker", b"X", group=0)
    out += tracker.feed(row[3:] + m.ready_for_query(b"I"))
    assert out == row + m.ready_for_query(b"I")
    assert not tracker.rewriting


@pytest.mark.parametrize("chunk", [1, 4, 5, 6, 4096])
def test_while_rewriting_only_an_error_is_held_until_whole(chunk: int) -> None:
    """A reply streams through as it arrives while a refusal's error waits to be replaced
    (holding a 64 MiB DataRow whole joined every chunk to the bytes before it); acks,
    ReadyForQuery and the replacement still come out right at any chunking."""
    row = m.message(ord("D"), b"\x00\x01" + struct.pack("!I", 50_000) + b"x" * 50_000)
    ours = m.error_response("ERROR", "42501", "refused by pgguard")
    marked = m.error_response("ERROR", "42601", 'syntax error at or near "pgguard_refused_cd34"')
    first = row + m.message(m.B_COMMAND_COMPLETE, b"SELECT 1\x00") + m.ready_for_query(b"I")
    stream = first + marked + m.ready_for_query(b"I")
    tracker = BackendTracker()
    tracker.replace_error(b"pgguard_refused_cd34", ours, group=1)
    out = b""
    held_most = 0
    for start in range(0, len(stream), chunk):
        piece = stream[start : start + chunk]
        out += tracker.feed(piece)
        held_most = max(held_most, start + len(piece) - len(out))
    assert out == first + ours + m.ready_for_query(b"I")
    assert held_most < len(marked) + 5  # never more than an error (and a header) held back
    assert tracker.ready_count == 2
    assert not tracker.rewriting


def test_tracker_rejects_a_lying_length() -> None:
    with pytest.raises(ProtocolViolation):
        BackendTracker().feed(b"Z\x00\x00\x00\x01")


# --- start-up and typed decoders ----------------------------------------------------------------

STARTUP = m.startup_message(
    m.PROTOCOL_3_0, [("user", "agent"), ("database", "db"), ("options", "-c x=1")]
)


@pytest.mark.parametrize("chunk", [len(STARTUP), 1])
def test_startup_decoder_whole_and_bytewise_with_trailing_bytes(chunk: int) -> None:
    decoder = StartupDecoder()
    data = STARTUP + b"trailing"
    result = None
    for start in range(0, len(data), chunk):
        decoder.receive_data(data[start : start + chunk])
        result = result or decoder.next_message()
    assert result == m.StartupMessage(
        m.PROTOCOL_3_0, (("user", "agent"), ("database", "db"), ("options", "-c x=1"))
    )
    assert decoder.trailing_data == b"trailing"


def test_startup_decoder_reads_cancel_requests_with_long_keys() -> None:
    decoder = StartupDecoder(m.cancel_request(1234, b"k" * 32))
    assert decoder.next_message() == m.CancelRequest(1234, b"k" * 32)


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!II", 8, m.PROTOCOL_3_0),  # no terminator
        struct.pack("!II", 13, m.PROTOCOL_3_0) + b"user\0",  # key without value
        struct.pack("!I", 4),  # shorter than the minimum
        struct.pack("!I", 1 << 20),  # larger than the server's cap
        struct.pack("!II", 9, m.SSL_REQUEST_CODE) + b"x",  # SSLRequest with a body
    ],
)
def test_startup_decoder_rejects_malformed_packets(packet: bytes) -> None:
    decoder = StartupDecoder(packet)
    with pytest.raises(ProtocolViolation):
        decoder.next_message()


def test_message_decoder_bytewise_and_remaining() -> None:
    decoder = MessageDecoder(1024)
    data = m.password_message(b"abc") + b"rest"
    got = None
    for byte in data:
        decoder.receive_data(bytes([byte]))
        got = got or decoder.next_message()
    assert got == (m.F_PASSWORD, b"abc")
    assert decoder.take_remaining() == b"rest"


def test_error_response_round_trip() -> None:
    raw = m.error_response("FATAL", "08P01", "bad\0message", detail="d", hint="h")
    fields = m.decode_error_fields(raw[5:])
    assert (fields.severity, fields.sqlstate, fields.message) == ("FATAL", "08P01", "bad\\0message")
    assert fields.get("D") == "d"
    assert fields.get("H") == "h"


# --- the fast path: decide in place ----------------------------------------------------------

ALLOW = object()
REFUSE = object()


def test_scan_chunk_forwards_whole_chunk_when_all_allowed() -> None:
    seen: list[tuple[str, bytes]] = []

    def decide(kind: int, data: bytes, start: int, end: int) -> object:
        seen.append((chr(kind), data[start:end]))
        return ALLOW

    scanner = FrontendScanner(1 << 20)
    pos, verdict = scanner.scan_chunk(PIPELINE, decide, ALLOW)
    assert (pos, verdict) == (len(PIPELINE), None)
    assert seen == [("P", PARSE), ("B", BIND), ("E", EXECUTE), ("Q", QUERY)]
    assert scanner.idle
    assert scanner.syncs == 1


def test_scan_chunk_stops_at_the_first_refusal_and_hands_over_the_frame() -> None:
    def decide(kind: int, data: bytes, start: int, end: int) -> object:
        return REFUSE if kind == ord("E") else ALLOW

    scanner = FrontendScanner(1 << 20)
    pos, verdict = scanner.scan_chunk(PIPELINE, decide, ALLOW)
    assert verdict is REFUSE
    assert PIPELINE[:pos] == PARSE + BIND + DESCRIBE
    frame = scanner.take_frame()
    assert frame.raw == EXECUTE
    # The rest is left for the slow path, exactly once.
    rest = drain(scanner)
    assert rest[0] == SYNC
    assert isinstance(rest[1], Frame)
    assert rest[1].raw == QUERY


def test_scan_chunk_leaves_an_incomplete_message_buffered() -> None:
    calls: list[int] = []

    def decide(kind: int, data: bytes, start: int, end: int) -> object:
        calls.append(kind)
        return ALLOW

    scanner = FrontendScanner(1 << 20)
    pos, verdict = scanner.scan_chunk(QUERY + QUERY[:7], decide, ALLOW)
    assert (pos, verdict) == (len(QUERY), None)
    assert calls == [ord("Q")]
    assert not scanner.idle
    scanner.receive_data(QUERY[7:])
    (frame,) = drain(scanner)
    assert isinstance(frame, Frame)
    assert frame.raw == QUERY


def test_scan_chunk_streams_a_partial_copy_message() -> None:
    copy = b"d" + struct.pack("!I", 1004) + b"x" * 1000
    scanner = FrontendScanner(1 << 20)
    pos, verdict = scanner.scan_chunk(copy[:300], lambda *a: ALLOW, ALLOW)
    assert (pos, verdict) == (300, None)
    scanner.receive_data(copy[300:])
    assert drain(scanner) == [copy[300:]]
    assert scanner.idle


def test_scan_chunk_leaves_an_invalid_message_for_the_slow_path_to_reject() -> None:
    scanner = FrontendScanner(1 << 20)
    pos, verdict = scanner.scan_chunk(SYNC + b"Z\x00\x00\x00\x05I", lambda *a: ALLOW, ALLOW)
    assert (pos, verdict) == (len(SYNC), None)
    with pytest.raises(ProtocolViolation):
        scanner.next_event()


def test_tracker_reports_outcomes_whole_and_bytewise() -> None:
    from pgguard.wire.outcomes import Outcome, OutcomeTracker

    stream = (
        m.message(m.B_COMMAND_COMPLETE, b"INSERT 0 2\x00")
        + m.error_response("ERROR", "23505", "duplicate key")
        + m.ready_for_query(b"E")
        + m.message(m.B_COMMAND_COMPLETE, b"SELECT 7\x00")
        + m.ready_for_query(b"I")
    )
    for chunk in (len(stream), 1, 4):
        finished: list[Outcome] = []
        outcomes = OutcomeTracker()
        outcomes.execute("insert", 1)
        outcomes.execute("dup", 1)
        outcomes.execute("never", 1)  # then Sync
        outcomes.query("select", 2)
        tracker = BackendTracker()
        tracker.track_outcomes(outcomes, finished.extend)
        out = b""
        for start in range(0, len(stream), chunk):
            out += tracker.feed(stream[start : start + chunk])
        assert out == stream
        assert [o.token for o in finished] == ["insert", "dup", "never", "select"]
        assert finished[0].rows == 2
        assert finished[1].sqlstate == "23505"
        assert finished[2].skipped
        assert finished[3].tags == ["SELECT 7"]
