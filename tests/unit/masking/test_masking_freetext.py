"""Free text an agent controls (reason, application_name, server messages) is masked."""

from __future__ import annotations

import pytest

from pgguard.masking import MaskingRules, mask_server_message, mask_text

RULES = MaskingRules.load()


def test_reason_values_are_masked_with_statement_detectors() -> None:
    text = mask_text("Finance asked for SSN 123-45-0042 of bob.marker@example.org, twice", RULES)
    assert text == "Finance asked for SSN <ssn> of <email>, twice"


def test_card_in_text_is_masked() -> None:
    assert "4111111111111111" not in mask_text(
        "card 4111 1111 1111 1111 and 4111111111111111", RULES
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'invalid input syntax for type integer: "hunter2hunter2"',
            'invalid input syntax for type integer: "<value: 14 chars>"',
        ),
        (
            "Key (email)=(carol.marker@example.org) already exists.",
            "Key (email)=(<value: 24 chars>) already exists.",
        ),
        (
            'Key (lower(email))=(x@y.example) is not present in table "users".',
            'Key (lower(email))=(<value: 11 chars>) is not present in table "users".',
        ),
        (
            "Failing row contains (1, secret-marker, null).",
            "Failing row contains (<value: 22 chars>).",
        ),
        ('Token "secret-marker" is invalid.', 'Token "<value: 13 chars>" is invalid.'),
        (
            'value "99999999999" is out of range for type integer',
            'value "<value: 11 chars>" is out of range for type integer',
        ),
        ('relation "payroll" does not exist', 'relation "payroll" does not exist'),
        (
            'duplicate key value violates unique constraint "users_email_key"',
            'duplicate key value violates unique constraint "users_email_key"',
        ),
        ("mail from dave.marker@example.org bounced", "mail from <email> bounced"),
        (
            'unterminated quoted string at or near "\'hunter2 marker"',
            'unterminated quoted string at or near "<value: 15 chars>"',
        ),
        ('syntax error at or near "SELEC"', 'syntax error at or near "SELEC"'),
    ],
)
def test_server_messages_keep_their_shape_and_lose_values(message: str, expected: str) -> None:
    assert mask_server_message(message, RULES) == expected
