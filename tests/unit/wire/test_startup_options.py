"""Start-up parameters as the settings they make (what PostgreSQL's options parsing accepts)."""

from __future__ import annotations

import pytest

from pgguard.wire.startup_options import StartupOptionError, parse_options, settings_from_startup


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("-c work_mem=8MB", [("work_mem", "8MB")]),
        ("-cwork_mem=8MB", [("work_mem", "8MB")]),
        ("--search-path=a,b", [("search_path", "a,b")]),
        ("-c a=1   -c b=2", [("a", "1"), ("b", "2")]),
        ("-c application_name=with\\ space", [("application_name", "with space")]),
        ("-c x=", [("x", "")]),
        ("", []),
    ],
)
def test_options_are_parsed(options: str, expected: list[tuple[str, str]]) -> None:
    assert parse_options(options) == expected


@pytest.mark.parametrize("options", ["-F", "-B 100", "-c", "-c novalue", "--=x", "trailing\\", "x"])
def test_anything_else_is_refused(options: str) -> None:
    with pytest.raises(StartupOptionError):
        parse_options(options)


def test_settings_skip_protocol_parameters() -> None:
    params = [
        ("user", "a"),
        ("database", "d"),
        ("_pq_.x", "1"),
        ("application_name", "app"),
        ("options", "-c role=admin"),
        ("replication", "false"),
    ]
    assert settings_from_startup(params) == [("application_name", "app"), ("role", "admin")]
