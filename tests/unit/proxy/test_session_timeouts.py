"""Following the session's statement_timeout through SET/RESET/DISCARD (issue 21), sans-IO."""

from __future__ import annotations

import pytest

from pgguard.proxy.session_timeouts import StatementTimeout, parse_duration


@pytest.mark.parametrize(
    ("value", "ms"),
    [("3s", 3000), ("500", 500), (" 1.5 min ", 90_000), ("2h", 7_200_000), ("0", 0), (250, 250)],
)
def test_durations_read_as_postgresql_reads_them(value: str | int, ms: int) -> None:
    assert parse_duration(value) == ms


def test_an_unreadable_duration_is_unknown() -> None:
    assert parse_duration("soon") is None


def test_set_reset_and_local() -> None:
    timeouts = StatementTimeout()
    timeouts.start_up([("statement_timeout", "10s")])
    assert timeouts.current_ms == 10_000
    timeouts.observe(b"SET statement_timeout = '3s'")
    assert timeouts.current_ms == 3000
    timeouts.observe(b"BEGIN; SET LOCAL statement_timeout TO 700")
    assert timeouts.current_ms == 700
    timeouts.transaction_ended()
    assert timeouts.current_ms == 3000
    timeouts.observe(b"RESET statement_timeout")
    assert timeouts.current_ms == 10_000  # back to the session's start-up value


def test_reset_all_and_discard_all() -> None:
    timeouts = StatementTimeout(server_default_ms=0)
    timeouts.observe(b"set STATEMENT_TIMEOUT=100")
    timeouts.observe(b"RESET ALL")
    assert timeouts.current_ms == 0
    timeouts.observe(b"SET statement_timeout = 100; DISCARD ALL")
    assert timeouts.current_ms == 0


def test_other_settings_are_ignored() -> None:
    timeouts = StatementTimeout()
    timeouts.observe(b"SET lock_timeout = '1s'; SET search_path = public")
    assert timeouts.needs_server_default
