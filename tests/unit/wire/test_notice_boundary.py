"""A NoticeResponse of pgguard's own is written only between two server messages (issue 21)."""

from __future__ import annotations

from pgguard.wire import messages as m
from pgguard.wire.backend import BackendTracker


def test_boundary_is_known_byte_by_byte() -> None:
    stream = m.message(ord("C"), b"SELECT 1\0") + m.ready_for_query(b"I")
    ends = {len(m.message(ord("C"), b"SELECT 1\0")), len(stream)}
    tracker = BackendTracker()
    for i in range(len(stream)):
        tracker.feed(stream[i : i + 1])
        assert tracker.at_message_boundary == (i + 1 in ends), i


def test_notice_response_fields() -> None:
    raw = m.notice_response("pgguard: held for approval as request x", detail="d", hint="h")
    assert raw[:1] == b"N"
    fields = m.decode_error_fields(raw[5:])
    assert fields.severity == "NOTICE"
    assert fields.sqlstate == "00000"
    assert fields.get("D") == "d"
    assert fields.get("H") == "h"
