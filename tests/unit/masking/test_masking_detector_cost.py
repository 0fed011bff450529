"""The built-in value detectors cost time in proportion to the value (invariant 5) and find what
the plain pattern search finds.

A detector that retried its pattern from every position of a long run stalled the parse worker
past its budget: 100 KB of digits took the e-mail detector 7 s (found by asyncpg's own test
suite through pgguard), 90 KB of "eyJeyJ..." took the JWT detector 2 s.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.masking import rules

# The patterns as they were before the detectors were made linear: the reference for what a
# detector must find.
_PLAIN_EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_PLAIN_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_HOSTILE = {
    "digits": "0" * 100_000,
    "letters then space": "a" * 50_000 + " " + "b" * 50_000,
    "jwt prefixes": "eyJ" * 30_000,
    "jwt prefix and dots": "eyJa." * 20_000,
    "at signs": "a@" * 50_000,
    "dotted local part": "a." * 50_000,
    "card-like": "1 " * 50_000,
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_every_builtin_detector_is_fast_on_hostile_values(name: str) -> None:
    value = _HOSTILE[name]
    for label, find in rules._BUILTIN.items():
        started = time.process_time()
        find(value)
        spent = time.process_time() - started
        # Linear work on 100 KB is a few milliseconds; the quadratic searches took seconds.
        assert spent < 0.25, (label, spent)


_EMAILISH = st.text(alphabet=st.sampled_from(list("a.@-' x%é9")), max_size=24)
_JWTISH = st.lists(
    st.sampled_from(["eyJ", "a", ".", "-", " ", "e", "y", "J", "_"]), max_size=16
).map("".join)


@settings(max_examples=2000, deadline=None)
@given(_EMAILISH)
def test_email_detector_finds_what_the_plain_search_finds(value: str) -> None:
    assert (rules._EMAIL.search(value) is None) == (_PLAIN_EMAIL.search(value) is None)


@settings(max_examples=2000, deadline=None)
@given(_JWTISH)
def test_jwt_detector_finds_what_the_plain_search_finds(value: str) -> None:
    plain = _PLAIN_JWT.search(value)
    assert rules._BUILTIN["jwt"](value) == (plain.group() if plain else None)
