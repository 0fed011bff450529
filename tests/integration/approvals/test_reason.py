"""extract_reason: sqlcommenter reason comments, the application_name fallback, the cap."""

from __future__ import annotations

import pytest

from pgguard.approvals import extract_reason


@pytest.mark.parametrize(
    ("sql", "application_name", "expected"),
    [
        (
            "COPY t TO STDOUT /* reason='nightly export for finance' */",
            "",
            "nightly export for finance",
        ),
        (
            "SELECT 1 /*action='run',reason='monthly%20close%2C%20Q3',route='x'*/",
            "app",
            "monthly close, Q3",
        ),
        ("/* reason='it\\'s urgent' */ DROP TABLE t", "", "it's urgent"),
        ("/* Reason = 'spaced out' */ SELECT 1", "", "spaced out"),
        ("/* first */ SELECT 1 /* reason='second' */", "", "second"),
        ("DROP TABLE t /* reason='' */", "etl-nightly", "etl-nightly"),
        ("DROP TABLE t /* treason='x' */", "etl-nightly", "etl-nightly"),
        ("DROP TABLE t", "psql", "psql"),
        ("DROP TABLE t", "", None),
        ("DROP TABLE t /* reason='a%0Ab\tc' */", "", "a b c"),
        ("DROP TABLE t /* reason='unterminated", "", None),
    ],
)
def test_extract_reason(sql: str, application_name: str, expected: str | None) -> None:
    assert extract_reason(sql, application_name) == expected


def test_reason_is_capped_at_500_characters() -> None:
    long = "x" * 2000
    assert extract_reason(f"SELECT 1 /* reason='{long}' */", "") == "x" * 500
    assert extract_reason("SELECT 1", long) == "x" * 500
