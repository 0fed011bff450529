"""Fixtures for policy tests: the shipped engine and a helper to build rule directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pgguard.policy import PolicyEngine

WriteRules = Callable[..., Path]


@pytest.fixture(scope="session")
def engine() -> PolicyEngine:
    return PolicyEngine.load()


@pytest.fixture
def write_rules(tmp_path: Path) -> WriteRules:
    """write_rules(**{"10-x.yaml": text, ...}) -> directory containing those files."""

    def write(**files: str) -> Path:
        directory = tmp_path / "rules"
        directory.mkdir(exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
        return directory

    return write
