"""Masking of free text an agent controls: its stated reason, application_name, server messages.

Owns: `mask_text` (any text: every span a value detector finds becomes `<label>`) and
`mask_server_message` (a PostgreSQL error message or detail: the values it quotes are replaced
and its shape is kept, then `mask_text`).

Invariants: pure; never raises (a detector that fails, or finds more different values than it
may replace, hides the whole text); linear in the text for the built-in detectors; the same
detectors as statements (`MaskingRules`), so a value masked in a statement is masked in its
reason too.
"""

from __future__ import annotations

import re

from pgguard.masking.rules import MaskingRules

_MAX_FINDS = 64
_MAX_PASSES = 4  # one detector's passes over a text; one still finding values in its last hides it
# Where PostgreSQL quotes a value (not an identifier) in a message or detail:
#   invalid input syntax for type integer: "hunter2"   (and every `...: "value"` ending)
#   Key (email)=(a@b.example) already exists.          Failing row contains (1, a@b, ...).
#   Token "secret" is invalid.     value "123" is out of range     at or near "'a literal'"
_TRAILING_VALUE = re.compile(r'(: )"(.*)"(\.?)$', re.DOTALL)
_KEY_VALUE = re.compile(
    r"(Key \((?:[^()]|\([^()]*\))*\)=)\((.*)\)((?: already exists| is not present| conflicts).*)",
    re.DOTALL,
)
_FAILING_ROW = re.compile(r"(Failing row contains )\((.*)\)", re.DOTALL)
_TOKEN = re.compile(r'(Token )"(.*?)"( is invalid)', re.DOTALL)
_OUT_OF_RANGE = re.compile(r'(value )"(.*?)"( is out of range)', re.DOTALL)
_NEAR_LITERAL = re.compile(r'(at or near )"(\'.*)"()', re.DOTALL)  # a string token quoted whole


def mask_text(text: str, rules: MaskingRules) -> str:
    """`text` with every span a value detector finds replaced by `<label>` (every occurrence of
    it), or the whole text hidden when a detector finds more than `_MAX_FINDS` different values.

    A built-in detector lists what it finds in one pass; searching the text again from its start
    after each value replaced cost 1 s on 100 KB, and past 64 values the rest were shown."""
    try:
        for rule in rules.value_rules:
            label = f"<{rule.label}>"
            if rule.find_all is not None:
                for _ in range(_MAX_PASSES):
                    found: dict[str, None] = {}
                    for value in rule.find_all(text):
                        found[value] = None
                        if len(found) > _MAX_FINDS:
                            return _hidden(text)
                    if not found:
                        break
                    # Leftmost first, every occurrence; one may overlap another's, so what
                    # is left is searched again.
                    for value in found:
                        text = text.replace(value, label)
                else:
                    return _hidden(text)
                continue
            for _ in range(_MAX_FINDS):  # a rule's own regex: searched again after each
                first = rule.find(text)
                if not first or first not in text:
                    break
                text = text.replace(first, label)
            else:
                if rule.find(text):
                    return _hidden(text)
    except (ValueError, RecursionError):
        return _hidden(text)
    return text


def _hidden(text: str) -> str:
    return f"<text hidden: {len(text)} chars>"


def mask_server_message(message: str, rules: MaskingRules) -> str:
    """A server error message or detail with the values it quotes hidden (shape kept)."""
    message = _KEY_VALUE.sub(lambda m: f"{m.group(1)}(<{_size(m.group(2))}>){m.group(3)}", message)
    message = _FAILING_ROW.sub(lambda m: f"{m.group(1)}(<{_size(m.group(2))}>)", message)
    for quoted in (_TOKEN, _OUT_OF_RANGE, _NEAR_LITERAL):
        message = quoted.sub(lambda m: f'{m.group(1)}"<{_size(m.group(2))}>"{m.group(3)}', message)
    message = _TRAILING_VALUE.sub(
        lambda m: f'{m.group(1)}"<{_size(m.group(2))}>"{m.group(3)}', message
    )
    return mask_text(message, rules)


def _size(value: str) -> str:
    return f"value: {len(value)} chars"
