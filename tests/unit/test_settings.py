"""Configuration: TOML plus PGGUARD_<SECTION>__<KEY> overrides; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgguard.errors import ConfigError
from pgguard.settings import Settings

AGENT = '[[agents]]\nname = "a"\npassword = "p"\nowner = "o"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgguard.toml"
    path.write_text(text)
    return path


def test_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        '[listen]\nport = 7000\n[upstream]\ndsn = "postgresql://u:p@/db?host=/tmp"\n' + AGENT,
    )
    assert Settings.load(path).listen.port == 7000
    monkeypatch.setenv("PGGUARD_LISTEN__PORT", "7001")
    settings = Settings.load(path)
    assert settings.listen.port == 7001
    assert settings.upstream.parsed().host == "/tmp"
    monkeypatch.setenv("PGGUARD_CONFIG", str(path))
    assert Settings.load().agents[0].name == "a"


OIDC = '[oidc]\nissuer = "https://idp"\nclient_id = "c"\nallowed_groups = ["g"]\n'
BOT = (
    '[teams.bot]\napp_id = "a"\ntenant_id = "t"\nservice_url = "https://smba"\n'
    'conversation_id = "19:x"\n'
)


def test_oidc_and_bot_configuration(tmp_path: Path) -> None:
    text = (
        OIDC
        + BOT
        + 'app_password = "secret"\n'
        + '[[approvers]]\nid = "ada"\nname = "Ada"\nsubject = "oid-1"\n'
        + '[http]\npublic_url = "https://pgguard.example.com"\n'
    )
    settings = Settings.load(write(tmp_path, text))
    assert settings.approvals_enabled()
    assert settings.oidc is not None
    assert settings.oidc.metadata_url() == "https://idp/.well-known/openid-configuration"
    assert settings.teams.bot is not None
    assert "secret" not in repr(settings.teams.bot)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[listen]\nprot = 1\n", "listen.prot: unknown key"),
        ("[listen]\nport = 'x'\n", "listen.port"),
        ('[upstream]\ndsn = "postgresql://h:99999/x"\n', "upstream.dsn"),
        ('[[agents]]\nname = "a"\nowner = "o"\n', "agents.0"),
        ('[[approvers]]\nid = "x"\nname = "y"\ntoken_sha256 = "zz"\n', "approvers.0.token_sha256"),
        ("[listen]\ntls_cert = '/nope.pem'\ntls_key = '/nope.key'\n", "listen"),
        ('[teams]\nwebhook_url = "https://example.com/hook"\n', "no approver can be verified"),
        ('[[approvers]]\nid = "x"\nname = "y"\n', "needs token_sha256 or subject"),
        ('[[approvers]]\nid = "x"\nname = "y"\nsubject = "s"\n', "needs [oidc] or [teams.bot]"),
        (OIDC + '[http]\npublic_url = "http://pgguard.example.com"\n', "https://"),
        (OIDC + "[http]\nenabled = false\n", "needs the HTTP service"),
        (OIDC.replace("allowed_groups", 'scopes = ["profile"]\nallowed_groups'), "'openid'"),
        ('[oidc]\nissuer = "https://idp"\nclient_id = "c"\n', "no approver can be verified"),
        (BOT + 'app_password = "p"\ncertificate = "/c.pem"\n', "exactly one of"),
        (BOT, "exactly one of"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(write(tmp_path, text))
    assert named in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Settings.load(tmp_path / "absent.toml")
