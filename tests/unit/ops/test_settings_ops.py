"""The operations settings: [log], [limits] startup_wait, [ledger] spool_limit_bytes."""

from __future__ import annotations

import pytest

from pgguard.errors import ConfigError
from pgguard.settings import Settings
from pgguard.web.ops import not_up_yet


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.log.format == "text"
    assert settings.effective_log_level() == "INFO"
    assert settings.limits.startup_wait == 60
    assert settings.ledger.spool_limit_bytes == 256 * 1024 * 1024


def test_log_section_and_level_precedence() -> None:
    settings = Settings.load(log={"format": "json", "level": "WARNING"}, log_level="DEBUG")
    assert settings.log.format == "json"
    assert settings.effective_log_level() == "WARNING"  # [log] level wins over log_level


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"log": {"format": "xml"}}, "log.format"),
        ({"log": {"level": "LOUD"}}, "log.level"),
        ({"limits": {"startup_wait": -1}}, "limits.startup_wait"),
        ({"ledger": {"spool_limit_bytes": -1}}, "ledger.spool_limit_bytes"),
    ],
)
def test_bad_values_name_their_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Settings.load(**overrides)


@pytest.mark.parametrize(
    ("reason", "wait"),
    [
        ("ConnectionRefusedError", True),
        ("no answer within 2 s", True),
        ("SQLSTATE 57P03", True),  # the server is starting up
        ("SQLSTATE 08006", True),
        ("SQLSTATE 28P01", False),  # a wrong password does not fix itself
        ("SQLSTATE 3D000", False),
    ],
)
def test_start_up_waits_only_for_servers_not_up_yet(reason: str, wait: bool) -> None:
    assert not_up_yet(reason) is wait
