"""The classifier's shortcuts are sound: a cached decision equals a fresh classification.

Generated statements are built from a template whose *value slots* are filled twice, with
different values: plain strings, numbers, ``E''`` strings, dollar quotes, ``U&`` strings - and
the escape character of ``UESCAPE``, which an attacker varies exactly as they would a value (that
is how the review poisoned the literal-blind cache). Around them: identifiers (plain, quoted,
``U&"..."`` spelling privileged function names), comments (nested ones too) and unicode. A warmed
engine classifies the first text, then the second; each answer must equal a fresh engine's, in
every lexing state, whether or not pgguard's protected-name screen happens to be on (the
screen would hide a cache flaw; the key must be sound without it).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgguard.policy import Context, LexState, PolicyEngine
from pgguard.policy.loader import load_policy
from pgguard.sql.fastkey import literal_blind_key
from pgguard.sql.lexstate import PENDING_LEX_STATE
from pgguard.sql.statenames import NO_PROTECTED_NAMES, ProtectedNames

POLICY = load_policy()
LEX_STATES = [
    LexState(),
    LexState(standard_conforming_strings=False),
    LexState(client_encoding="LATIN1"),
    LexState(client_encoding="SJIS"),
    PENDING_LEX_STATE,
]

Slot = Callable[[str, str], str]  # (value, escape char) -> text


def _escaped(name: str, escape: str) -> str:
    """`name` with its first letter written as a U& escape using `escape`."""
    return f"{escape}{ord(name[0]):04X}{name[1:]}"


# Names the U& identifiers spell with escape '!': any other UESCAPE char makes them harmless.
U_NAMES = ["pg_read_file", "lo_export", "pg_terminate_backend", "abs", "set_config"]
VALUE_CHARS = st.sampled_from([*list("ab '\\\"$;-*/é!#%x0"), "''", "\n", "ü", "😀"])
VALUES = st.lists(VALUE_CHARS, max_size=6).map("".join)
PLAIN_VALUES = st.lists(st.sampled_from([*list("ab x0"), "''"]), max_size=4).map("".join)
ESCAPES = st.sampled_from(["!", "#", "!", "*", "%"])  # "!" spells the U& names below


def _fixed(text: str) -> Slot:
    return lambda value, escape: text


def _string(value: str, escape: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _number(value: str, escape: str) -> str:
    return str(sum(map(ord, value)))


def _e_string(value: str, escape: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _dollar(value: str, escape: str) -> str:
    return "$q$" + value.replace("$", "") + "$q$"


def _u_string(value: str, escape: str) -> str:
    return f"U&'{value.replace(chr(39), '')}{escape}0041' UESCAPE '{escape}'"


def _u_ident(name: str) -> Slot:
    return lambda value, escape: f"U&\"{_escaped(name, '!')}\" UESCAPE '{escape}'"


FUNCTIONS: list[Slot] = [
    *(_fixed(n) for n in ["pg_read_file", "lo_export", "abs", "lower", "set_config"]),
    *(_fixed(f'"{n}"') for n in ["pg_read_file", "lower", "é"]),
    *(_u_ident(n) for n in U_NAMES),
]
VALUES_SLOTS: list[Slot] = [_string, _number, _e_string, _dollar, _u_string]
NOISE: list[Slot] = [
    _fixed(" "),
    _fixed("\n"),
    _fixed(" /* c /* nested */ c */ "),
    _fixed(" -- c\n"),
    _fixed(" 'é' "),
    _fixed(' "ü" '),
]


@st.composite
def templates(draw: st.DrawFn) -> list[Slot]:
    """SELECT f(v, ...), v, col ... [FROM notes WHERE id = v] as a list of slots."""
    # Half the templates stay inside the literal-blind key's subset (plain strings and numbers,
    # no comments), where a cache flaw can show; the rest exercise the refusals.
    plain = draw(st.booleans())
    values = VALUES_SLOTS[:2] if plain else VALUES_SLOTS
    noise = NOISE[:2] if plain else NOISE
    parts: list[Slot] = [_fixed("SELECT ")]
    for index in range(draw(st.integers(1, 3))):
        if index:
            parts.append(_fixed(", "))
        parts.extend(draw(st.lists(st.sampled_from(noise), max_size=1)))
        kind = draw(st.sampled_from(["call", "value", "column"]))
        if kind == "call":
            parts.append(draw(st.sampled_from(FUNCTIONS)))
            parts.append(_fixed("("))
            for arg in range(draw(st.integers(0, 2))):
                if arg:
                    parts.append(_fixed(", "))
                parts.append(draw(st.sampled_from(values)))
            parts.append(_fixed(")"))
        elif kind == "value":
            parts.append(draw(st.sampled_from(values)))
        else:
            parts.append(_fixed("id"))
    if draw(st.booleans()):
        parts.append(_fixed(" FROM notes WHERE id = "))
        parts.append(draw(st.sampled_from(values)))
    return parts


def _render(parts: list[Slot], values: list[str], escapes: list[str]) -> str:
    return "".join(part(v, e) for part, v, e in zip(parts, values, escapes, strict=True))


def _fill(draw: st.DrawFn, parts: list[Slot], chars: st.SearchStrategy[str]) -> str:
    values = draw(st.lists(chars, min_size=len(parts), max_size=len(parts)))
    escapes = draw(st.lists(ESCAPES, min_size=len(parts), max_size=len(parts)))
    return _render(parts, values, escapes)


@st.composite
def twin_texts(draw: st.DrawFn) -> tuple[str, str]:
    parts = draw(templates())
    chars = draw(st.sampled_from([PLAIN_VALUES, VALUES]))
    return _fill(draw, parts, chars), _fill(draw, parts, chars)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(twins=twin_texts(), as_bytes=st.booleans())
def test_a_cached_decision_equals_a_fresh_one(twins: tuple[str, str], as_bytes: bool) -> None:
    for protected in (NO_PROTECTED_NAMES, ProtectedNames()):
        warmed = PolicyEngine(POLICY, protected=protected)
        fresh = PolicyEngine(POLICY, protected=protected, cache_size=0)
        for lex in LEX_STATES:
            ctx = Context(agent="a", database="d", lex=lex)
            for text in (*twins, *twins):  # the populating text too, once the cache holds it
                sql: str | bytes = text.encode() if as_bytes else text
                assert warmed.classify(sql, ctx) == fresh.classify(sql, ctx), (text, lex)


def test_the_review_twins_are_told_apart_without_the_screen() -> None:
    """The review's pair, with the protected-name screen off: only the key can tell them."""
    warmed = PolicyEngine(POLICY, protected=NO_PROTECTED_NAMES)
    ctx = Context(agent="a", database="d")
    twin = b"""SELECT U&"!0070g_read_file" UESCAPE '#' ('/etc/hostname')"""
    real = b"""SELECT U&"!0070g_read_file" UESCAPE '!' ('/etc/hostname')"""
    assert warmed.classify(twin, ctx).action == "allow"
    assert warmed.classify(real, ctx).action == "hold"
    assert literal_blind_key(real) is None
