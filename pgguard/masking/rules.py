"""Masking rules: the schema of the masking rule file, and how one value is described.

Owns: `MaskingRules` (validated from `rules/masking/masking.yaml`), `describe_value` (value →
placeholder label such as `email`, `card:...1111`, `text:12 chars`) and `SHIPPED_MASKING_RULES`.

Invariants:
- Every value is masked; rules only decide how much of its *shape* the placeholder shows.
- A rule may reveal at most the last 4 characters, only when the whole value is what the rule
  detected, and only when the value is long enough that the rest stays hidden.
- Labels are validated so that no placeholder can ever close a string literal or a comment.
- Rule-file errors name `file:line`, like the policy rule files.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pgguard.policy.yamlsrc import RulesError, load_yaml_with_lines

# rules/masking.yaml would be read by the policy loader as a policy file (it reads every *.yaml
# of rules/), so the masking rules live one level down.
# pgguard/rules is package data (a symlink to the top-level rules/ in a source tree).
SHIPPED_MASKING_RULES = (
    Path(__file__).resolve().parents[1] / "rules" / "masking" / "masking.yaml"
).resolve()
MAX_KEEP_LAST = 4

Detector = Literal[
    "email",
    "card",
    "iban",
    "ssn",
    "jwt",
    "aws_access_key",
    "private_key",
    "connection_string",
    "regex",
]
Label = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_ -]{0,39}$")]
RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=100)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return pattern


class ColumnRule(_Strict):
    """Values compared with or assigned to a column whose name matches `columns` (regex search,
    case-insensitive) are described with `label`."""

    id: RuleId
    columns: Annotated[str, Field(min_length=1)]
    label: Label
    keep_last: Annotated[int, Field(ge=0, le=MAX_KEEP_LAST)] = 0

    @field_validator("columns")
    @classmethod
    def _regex(cls, value: str) -> str:
        return _compiles(value)


class ValueRule(_Strict):
    """Values in which `detector` finds something are described with `label`."""

    id: RuleId
    detector: Detector
    pattern: str | None = None
    label: Label
    keep_last: Annotated[int, Field(ge=0, le=MAX_KEEP_LAST)] = 0

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return None if value is None else _compiles(value)

    @model_validator(mode="after")
    def _pattern_with_regex(self) -> ValueRule:
        if (self.detector == "regex") != (self.pattern is not None):
            raise ValueError("'pattern' is required with detector 'regex' and only then")
        return self


class MaskingFile(_Strict):
    """The masking rule file."""

    version: Literal[1] = 1
    columns: list[ColumnRule] = Field(default_factory=list)
    values: list[ValueRule] = Field(default_factory=list)


# --- value detectors ---------------------------------------------------------------------------

# The lookbehind starts a match only where a run of local-part characters starts: without it
# the search retried from every position of a long run with no '@' (100 KB of digits: 7 s).
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+'-])[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_AWS = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_CONNECTION = re.compile(
    r"(?i)(?:\b(?:password|passwd|user|host|hostaddr|dbname|port|sslkey)\s*=|"
    r"\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|https?|ftp)://)"
)


# Every detector is written as the list of what it finds in a value, in one pass from left to
# right (linear: `pgguard.masking.freetext` masks every one of them); finding the first is
# taking the first of those.


# A run of 13 or more digits (single spaces or dashes between them). The run holds a card when
# it is one (13-19 digits, Luhn), or when one starts or ends it at a separator: a card number
# followed or preceded by other digits ("4111 1111 1111 1111 12/27") used to fail the check as a
# whole and pass unmasked. Only windows at separators, so that a 16-digit reference number is not
# taken for a card by a 13-digit piece of it. The whole run is masked (no digit of the card left
# beside its placeholder), and a run too long to be a card with a few digits around it is masked
# whole as well.
_CARD_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,}(?!\d)")
_MAX_CARD_RUN = 64


def _holds_card(run: str) -> bool:
    """Whether the digit run is a Luhn-valid card number of 13-19 digits, or one starts or ends
    it at a separator."""
    digits: list[int] = []
    cuts = [0]  # digit counts at which a separator falls, and the end
    for char in run:
        if char.isdigit():
            digits.append(int(char))
        elif digits and cuts[-1] != len(digits):
            cuts.append(len(digits))
    n = len(digits)
    if n > _MAX_CARD_RUN:
        return True
    cuts.append(n)
    windows = {(0, cut) for cut in cuts if 13 <= cut <= 19}
    windows |= {(cut, n) for cut in cuts if 13 <= n - cut <= 19}
    return any(_luhn_valid(digits[start:end]) for start, end in windows)


def _luhn_valid(digits: list[int]) -> bool:
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _all_cards(value: str) -> Iterator[str]:
    for found in _CARD_RUN.finditer(value):
        if _holds_card(found.group()):
            yield found.group()


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return 15 <= len(compact) <= 34 and int(number) % 97 == 1


def _all_ibans(value: str) -> Iterator[str]:
    for found in _IBAN.finditer(value):
        if _iban_ok(found.group()):
            yield found.group()


# The e-mail pattern without its lookbehind, tried only where the previous address ended: what
# follows one address may start the next ("a@b.example+c@d.example": masking the first used to
# leave "<email>+c@d.example", where the plain search found the second).
_EMAIL_HERE = re.compile(_EMAIL.pattern.removeprefix(r"(?<![A-Za-z0-9._%+'-])"))


def _all_emails(value: str) -> Iterator[str]:
    pos = 0
    while True:
        found = _EMAIL_HERE.match(value, pos) if pos else None
        if found is None:
            found = _EMAIL.search(value, pos)
        if found is None:
            return
        yield found.group()
        pos = found.end()


_TOKEN_RUN = re.compile(r"[A-Za-z0-9_-]*")


def _all_jwts(value: str) -> Iterator[str]:
    # Tried only at the first "eyJ" of each run of token characters: a later one in the same run
    # fails exactly where the first did, and searching from every "eyJ" of a long run made the
    # search quadratic (90 KB of "eyJeyJ..." took 2 s).
    start = value.find("eyJ")
    while start != -1:
        found = _JWT.match(value, start)
        if found:
            yield found.group()
            start = value.find("eyJ", found.end())
            continue
        run = _TOKEN_RUN.match(value, start)
        start = value.find("eyJ", run.end() if run else start + 3)


def _all_matches(pattern: re.Pattern[str]) -> Callable[[str], Iterator[str]]:
    def find_all(value: str) -> Iterator[str]:
        return (found.group() for found in pattern.finditer(value))

    return find_all


def _first(find_all: Callable[[str], Iterator[str]]) -> Callable[[str], str | None]:
    def find(value: str) -> str | None:
        return next(find_all(value), None)

    return find


def _finder(pattern: re.Pattern[str]) -> Callable[[str], str | None]:
    def find(value: str) -> str | None:
        found = pattern.search(value)
        return found.group() if found else None

    return find


# What each built-in detector finds: all of it, and the first.
_BUILTIN_ALL: dict[str, Callable[[str], Iterator[str]]] = {
    "email": _all_emails,
    "card": _all_cards,
    "iban": _all_ibans,
    "ssn": _all_matches(_SSN),
    "jwt": _all_jwts,
    "aws_access_key": _all_matches(_AWS),
    "private_key": _all_matches(_PRIVATE_KEY),
    "connection_string": _all_matches(_CONNECTION),
}
_BUILTIN: dict[str, Callable[[str], str | None]] = {
    name: _first(find_all) for name, find_all in _BUILTIN_ALL.items()
}


def finds_connection_strings(rule: _CompiledValueRule) -> bool:
    """Whether `rule` is the built-in connection-string detector (code that is a connection
    string is shown with its password masked instead)."""
    return rule.find is _BUILTIN["connection_string"]


@dataclass(frozen=True, slots=True)
class _CompiledValueRule:
    rule_id: str
    find: Callable[[str], str | None]
    label: str
    keep_last: int
    # Everything it finds, in one pass (the built-in detectors; None for a rule's own regex,
    # whose lookarounds may see what masking an earlier find changed).
    find_all: Callable[[str], Iterator[str]] | None = None


@dataclass(frozen=True, slots=True)
class _CompiledColumnRule:
    rule_id: str
    columns: re.Pattern[str]
    label: str
    keep_last: int


@dataclass(frozen=True, slots=True)
class MaskingRules:
    """Compiled masking rules: value detectors first, then column-name patterns."""

    value_rules: tuple[_CompiledValueRule, ...]
    column_rules: tuple[_CompiledColumnRule, ...]
    source: str = "(built in)"

    @classmethod
    def load(cls, path: Path | None = None) -> MaskingRules:
        """Load and validate a masking rule file (None: the shipped one); raises RulesError."""
        if path is None:
            return _shipped()
        return _load(path)

    @classmethod
    def from_file_model(cls, parsed: MaskingFile, source: str = "(built in)") -> MaskingRules:
        values = tuple(
            _CompiledValueRule(
                rule.id, _finder(re.compile(rule.pattern)), rule.label, rule.keep_last
            )
            if rule.detector == "regex" and rule.pattern is not None
            else _CompiledValueRule(
                rule.id,
                _BUILTIN[rule.detector],
                rule.label,
                rule.keep_last,
                _BUILTIN_ALL[rule.detector],
            )
            for rule in parsed.values
        )
        columns = tuple(
            _CompiledColumnRule(rule.id, re.compile(rule.columns, re.I), rule.label, rule.keep_last)
            for rule in parsed.columns
        )
        return cls(values, columns, source)

    def describe(self, value: str, column: str | None = None) -> str:
        """The placeholder label for a string `value` (never contains the value beyond the
        last characters a rule allows)."""
        return describe_value(value, self, column)


@functools.cache
def _shipped() -> MaskingRules:
    return _load(SHIPPED_MASKING_RULES)


def _load(path: Path) -> MaskingRules:
    value, source = load_yaml_with_lines(path)
    if not isinstance(value, dict):
        raise RulesError([f"{path}:1: a masking rule file must be a mapping"])
    try:
        parsed = MaskingFile.model_validate(value)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            dotted = ".".join(str(part) for part in loc) or "(file)"
            problems.append(f"{source.where(loc)}: {dotted}: {error['msg']}")
        raise RulesError(problems) from None
    return MaskingRules.from_file_model(parsed, str(path))


def _tail(value: str, keep_last: int) -> str:
    """The last `keep_last` alphanumerics, when enough of the value stays hidden ("" if not)."""
    alnum = re.sub(r"[^0-9A-Za-z]", "", value)
    if keep_last <= 0 or len(alnum) < 2 * keep_last + 1:
        return ""
    return alnum[-min(keep_last, MAX_KEEP_LAST) :]


def _labelled(label: str, keep_last: int, value: str, found: str | None) -> str:
    whole = found is None or found.strip() == value.strip()
    tail = _tail(value, keep_last) if whole else ""
    return f"{label}:...{tail}" if tail else label


def describe_value(value: str, rules: MaskingRules, column: str | None = None) -> str:
    """A label saying what `value` is without revealing it: detectors, then column rules, then
    the value's general shape (`json`, `array`, `text`) with its length."""
    for rule in rules.value_rules:
        try:
            found = rule.find(value)
        except (ValueError, RecursionError):  # a detector must never let a value through
            found = None
        if found is not None:
            return _labelled(rule.label, rule.keep_last, value, found)
    if column is not None:
        for column_rule in rules.column_rules:
            if column_rule.columns.search(column):
                return _labelled(column_rule.label, column_rule.keep_last, value, None)
    return f"{_shape(value)}:{len(value)} chars"


def _shape(value: str) -> str:
    stripped = value.strip()
    if stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        try:
            json.loads(stripped)
        except ValueError:
            return "array" if stripped[0] == "{" else "text"
        return "json"
    return "text"
