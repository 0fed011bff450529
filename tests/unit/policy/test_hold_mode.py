"""``hold_mode`` in rule files (issue 21): validated when the file loads."""

from __future__ import annotations

import pydantic
import pytest

from pgguard.policy.models import Rule


def test_hold_mode_return_is_read() -> None:
    rule = Rule.model_validate(
        {"id": "r", "description": "d", "action": "hold", "hold_mode": "return"}
    )
    assert rule.hold_mode == "return"


def test_hold_mode_needs_a_hold() -> None:
    with pytest.raises(pydantic.ValidationError, match="only to rules whose action is hold"):
        Rule.model_validate({"id": "r", "description": "d", "action": "deny", "hold_mode": "wait"})


def test_hold_mode_typo_fails_at_load() -> None:
    with pytest.raises(pydantic.ValidationError):
        Rule.model_validate({"id": "r", "description": "d", "action": "hold", "hold_mode": "later"})
