"""Properties: masking never raises and never passes a string literal through; shortening bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from pgguard.masking import MaskingRules, mask_sql, shorten_middle

RULES = MaskingRules.load()
_VALUE = st.text(
    alphabet=st.characters(codec="utf-8", blacklist_characters="\x00'"),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_never_raises(text: str) -> None:
    masked = mask_sql(text, RULES)
    assert isinstance(masked.text, str)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), _VALUE)
def test_string_literals_never_pass_through(prefix: str, value: str) -> None:
    sql = f"SELECT {prefix} '{value}'" if "'" not in prefix else f"SELECT '{value}'"
    masked = mask_sql(sql, RULES)
    assert masked.text != sql
    assert f"'{value}'" not in masked.text or value.startswith("<")


@settings(max_examples=200, deadline=None)
@given(st.lists(_VALUE, min_size=1, max_size=5))
def test_masked_select_parses(values: list[str]) -> None:
    sql = "SELECT " + ", ".join(f"'{v}'" for v in values)
    masked = mask_sql(sql, RULES)
    pg.parse_sql_json(masked.text)
    assert masked.masked_values == len(values)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.integers(min_value=0, max_value=500))
def test_shorten_middle_bounds(text: str, max_bytes: int) -> None:
    short = shorten_middle(text, max_bytes)
    size = len(short.encode("utf-8"))
    assert size <= max_bytes or short == text == ""
    if len(text.encode("utf-8")) <= max_bytes:
        assert short == text


def test_shorten_middle_keeps_head_and_tail() -> None:
    text = "SELECT " + ", ".join(f"c{i}" for i in range(5000)) + " FROM t"
    short = shorten_middle(text, 1000)
    assert len(short.encode()) <= 1000
    assert short.startswith("SELECT c0, c1")
    assert short.endswith("c4999 FROM t")
    cut = int(short.split("/* ... ")[1].split(" bytes cut")[0])
    assert len(short.encode()) - len(short.split("\n")[1]) - 2 + cut == len(text.encode())
    assert shorten_middle("é" * 100, 60).encode("utf-8").decode("utf-8")
    assert pg.parse_sql_json(shorten_middle(text, 28 * 1024))
