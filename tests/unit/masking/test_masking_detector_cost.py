"""The built-in value detectors cost time in proportion to the value (invariant 5) and find what
the plain pattern search finds.

A detector that retried its pattern from every position of a long run stalled the parse worker
past its budget: 100 KB of digits took the e-mail detector 7 s (found by asyncpg's own test
suite through pgguard), 90 KB of "eyJeyJ..." took the JWT detector 2 s.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.masking import MaskingRules, mask_text, rules

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


def _luhn(digits: str) -> bool:
    """The Luhn check, digit by digit: the reference for the detector's prefix sums."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(i: int) -> str:
    base = f"4{i:014d}"
    return next(base + d for d in "0123456789" if _luhn(base + d))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.integers(1, 9).map(lambda n: "7" * n), min_size=1, max_size=8), st.data())
def test_card_detector_checks_the_run_and_its_windows_at_separators(
    groups: list[str], data: st.DataObject
) -> None:
    """Whether a run holds a card is the digit-by-digit Luhn check of the whole run and of its
    windows of 13-19 digits that start or end it at a separator (a run of more than 64 digits
    always counts)."""
    groups = ["".join(data.draw(st.sampled_from("0123456789")) for _ in group) for group in groups]
    separators = [data.draw(st.sampled_from(" -")) for _ in groups[1:]]
    run = groups[0] + "".join(s + g for s, g in zip(separators, groups[1:], strict=True))
    digits = "".join(groups)
    cuts = [0, *itertools.accumulate(len(g) for g in groups)]
    windows = [digits[:c] for c in cuts if 13 <= c <= 19]
    windows += [digits[c:] for c in cuts if 13 <= len(digits) - c <= 19]
    expected = len(digits) > 64 or any(_luhn(w) for w in windows)
    assert rules._holds_card(run) == expected


@pytest.mark.parametrize(
    "text",
    [
        "paid with 4111 1111 1111 1111 12/27",
        "card 4111-1111-1111-1111-7 on file",
        "ref 7 4111 1111 1111 1111 ok",
        "4111111111111111",
    ],
)
def test_a_card_with_digits_beside_it_is_masked(text: str) -> None:
    masked = mask_text(text, MaskingRules.load())
    assert "4111" not in masked, masked
    assert "1111" not in masked, masked


def test_masking_free_text_costs_one_pass_per_detector() -> None:
    """`mask_text` searched the whole text again from its start after each value it replaced:
    64 cards and 64 e-mails after 100 KB that the card pattern must scan (an error message, a
    stated reason) took 1.05 s of CPU on the loop (found by the third attack pass)."""
    values = (
        " ".join(_card(i) for i in range(64)) + " " + " ".join(f"u{i}@x.example" for i in range(64))
    )
    text = "1-" * 50_000 + " " + values
    started = time.process_time()
    masked = mask_text(text, MaskingRules.load())
    spent = time.process_time() - started
    assert "@x.example" not in masked
    assert not any(_card(i) in masked for i in range(64))
    assert spent < 0.25, spent


def test_free_text_with_more_values_than_a_bound_hides_none_of_them() -> None:
    """Past 64 values of one kind, the rest were shown as they were: 70 e-mails in a stated
    reason left six in clear for the reviewer (found by the third attack pass)."""
    rules_ = MaskingRules.load()
    for count in (70, 1000):
        text = "reason: " + ", ".join(f"user{i}@corp.example" for i in range(count))
        masked = mask_text(text, rules_)
        assert "@corp.example" not in masked, masked[-200:]
        assert "user" not in masked.replace("<email>", "")


_TEXTISH = st.lists(
    st.one_of(_EMAILISH, _JWTISH, st.sampled_from(["+", "@x.y", " ", "."])), max_size=8
).map("".join)


@settings(max_examples=3000, deadline=None)
@given(_TEXTISH)
def test_nothing_the_plain_searches_find_survives_masking_free_text(text: str) -> None:
    """One pass per detector hides at least what searching again after each value hid: the
    plain patterns find nothing left (e.g. "a@b.example+c@d.example": the second address
    starts where the first ended)."""
    masked = mask_text(text, MaskingRules.load())
    assert _PLAIN_EMAIL.search(masked) is None, masked
    assert _PLAIN_JWT.search(masked) is None, masked
