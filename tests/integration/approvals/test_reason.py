"""extract_reason: sqlcommenter reason comments found by the scanner, no fallback, the cap."""

from __future__ import annotations

import pytest

from pgguard.approvals import extract_reason


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "COPY t TO STDOUT /* reason='nightly export for finance' */",
            "nightly export for finance",
        ),
        (
            "SELECT 1 /*action='run',reason='monthly%20close%2C%20Q3',route='x'*/",
            "monthly close, Q3",
        ),
        ("/* reason='it\\'s urgent' */ DROP TABLE t", "it's urgent"),
        ("/* Reason = 'spaced out' */ SELECT 1", "spaced out"),
        ("/* first */ SELECT 1 /* reason='second' */", "second"),
        ("DROP TABLE t /* reason='' */", None),
        ("DROP TABLE t /* treason='x' */", None),
        ("DROP TABLE t", None),
        ("DROP TABLE t /* reason='a%0Ab\tc' */", "a b c"),
        ("DROP TABLE t /* reason='unterminated", None),
        # Not comments: inside a string literal, a dollar quote, a quoted identifier.
        ("SELECT $$/* reason='Sup3rS3cret!pw' */$$", None),
        ("SELECT '/* reason=''Sup3rS3cret!pw'' */'", None),
        ("SELECT $q$ x /* reason='Sup3rS3cret!pw' */ $q$ /* reason='real' */", "real"),
        ("SELECT 1 AS \"/* reason='Sup3rS3cret!pw' */\"", None),
        ("SELECT 1 -- reason='line comments are not sqlcommenter'", None),
    ],
)
def test_extract_reason(sql: str, expected: str | None) -> None:
    assert extract_reason(sql) == expected


def test_reason_is_capped_at_500_characters() -> None:
    long = "x" * 2000
    assert extract_reason(f"SELECT 1 /* reason='{long}' */") == "x" * 500
