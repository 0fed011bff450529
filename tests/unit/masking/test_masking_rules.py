"""The masking rule file: validation errors name file:line; detectors and partial masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgguard.masking import SHIPPED_MASKING_RULES, MaskingRules, describe_value, mask_parameters
from pgguard.policy.yamlsrc import RulesError

RULES = MaskingRules.load()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "masking.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_rules_load() -> None:
    assert MaskingRules.load(SHIPPED_MASKING_RULES).value_rules
    assert MaskingRules.load() is MaskingRules.load()


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "version: 1\nvalues:\n  - id: a\n    detector: email\n    label: x\n    colour: red\n",
            6,
            "colour",
        ),
        (
            "version: 1\ncolumns:\n  - id: a\n    columns: '(['\n    label: x\n",
            4,
            "bad regular expression",
        ),
        ("values:\n  - {id: a, detector: regex, label: x}\n", 2, "pattern"),
        (
            "values:\n  - {id: a, detector: regex, pattern: 'a(', label: x}\n",
            2,
            "bad regular expression",
        ),
        ("values:\n  - {id: a, detector: card, label: x, keep_last: 5}\n", 2, "keep_last"),
        ('columns:\n  - {id: a, columns: x, label: "x\' */"}\n', 2, "label"),
        ("values:\n  - {id: a, detector: telepathy, label: x}\n", 2, "detector"),
        ("surprise: 1\n", 1, "surprise"),
        ("values: [\n", 2, ""),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RulesError) as caught:
        MaskingRules.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert fragment in message


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=":1: a masking rule file must be a mapping"):
        MaskingRules.load(_write(tmp_path, "- 1\n"))


def test_custom_rules(tmp_path: Path) -> None:
    rules = MaskingRules.load(
        _write(
            tmp_path,
            "values:\n  - {id: emp, detector: regex, pattern: 'EMP-\\d{6}', label: employee id,"
            " keep_last: 2}\ncolumns:\n  - {id: salary, columns: salary, label: salary}\n",
        )
    )
    assert describe_value("EMP-123456", rules) == "employee id:...56"
    assert describe_value("x EMP-123456", rules) == "employee id"
    assert describe_value("90000", rules, "base_salary") == "salary"
    assert describe_value("a@b.example", rules) == "text:11 chars"


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("4111111111111111", "card:...1111"),
        ("4111111111111112", "text:16 chars"),  # fails the Luhn check
        ("GB82 WEST 1234 5698 7654 32", "iban:...5432"),
        ("GB82WEST12345698765433", "text:22 chars"),  # bad IBAN checksum
        ("123-45-6789", "ssn"),
        ("AKIAIOSFODNN7EXAMPLE", "aws access key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc", "private key"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "jwt"),
        ("host=db password=x", "connection string"),
        ("Bearer abcdefghijklmnopqrstuvwxyz", "token"),
        ("[1, 2]", "json:6 chars"),
        ("{a,b}", "array:5 chars"),
    ],
)
def test_detectors(value: str, label: str) -> None:
    assert describe_value(value, RULES) == label


def test_partial_masking_never_shows_more_than_four() -> None:
    assert all(rule.keep_last <= 4 for rule in RULES.value_rules)
    assert all(rule.keep_last <= 4 for rule in RULES.column_rules)


def test_mask_parameters() -> None:
    values: list[bytes | None] = [b"a@b.example.com", None, b"1234", b"\xff\xfe", b"hunter2", b"7"]
    columns: list[str | None] = [None, None, None, None, "password"]
    assert mask_parameters(values, RULES, columns) == [
        "<email>",
        "NULL",
        "<int>",
        "<binary:2 bytes>",
        "<password>",
        "<int>",
    ]
    captured = repr(mask_parameters(values, RULES))
    assert "hunter2" not in captured
    assert "a@b" not in captured
