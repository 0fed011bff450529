"""Configuration: one TOML file plus ``PGGUARD_<SECTION>__<KEY>`` environment overrides.

``Settings.load(path)`` is the only entry point the rest of pgguard uses. Precedence, highest
first: keyword arguments, environment variables, the TOML file, defaults. Every problem becomes a
``ConfigError`` whose message names the offending key (``listen.port: ...``), so a typo fails at
start-up. Secrets are ``SecretStr`` and never appear in reprs or logs.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pgguard.dsn import SSLMODES, Dsn, parse_dsn
from pgguard.errors import ConfigError
from pgguard.wire.scram import Verifier

CONFIG_ENV = "PGGUARD_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(6432, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"file not found: {path}")
        return self


class UpstreamSettings(_Section):
    dsn: SecretStr = SecretStr("postgresql://postgres@localhost:5432/postgres")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    sslrootcert: Path | None = None
    connect_timeout: float = Field(10.0, gt=0)

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, value: SecretStr) -> SecretStr:
        try:
            parse_dsn(value.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"invalid upstream DSN: {exc}") from None
        return value

    def parsed(self) -> Dsn:
        return parse_dsn(self.dsn.get_secret_value())

    def effective_sslmode(self) -> str:
        mode = self.sslmode or self.parsed().sslmode or "prefer"
        assert mode in SSLMODES
        return mode


class AgentSettings(_Section):
    name: str = Field(min_length=1, max_length=63)
    password: SecretStr | None = None
    scram_verifier: SecretStr | None = None
    owner: str = Field(min_length=1)
    databases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_secret(self) -> AgentSettings:
        if (self.password is None) == (self.scram_verifier is None):
            raise ValueError("set exactly one of password or scram_verifier")
        if self.scram_verifier is not None:
            Verifier.parse(self.scram_verifier.get_secret_value())
        return self

    def verifier(self) -> Verifier:
        if self.scram_verifier is not None:
            return Verifier.parse(self.scram_verifier.get_secret_value())
        assert self.password is not None
        return Verifier.from_password(self.password.get_secret_value())

    def may_use(self, database: str) -> bool:
        return not self.databases or "*" in self.databases or database in self.databases


class LimitsSettings(_Section):
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=(1 << 30) - 1)
    startup_timeout: float = Field(30.0, gt=0)
    shutdown_grace: float = Field(10.0, ge=0)


class PolicySettings(_Section):
    rules_dir: Path | None = None
    mode: Literal["enforce", "observe"] = "enforce"


class StateSettings(_Section):
    dsn: SecretStr | None = None  # default: the upstream DSN
    schema_name: str = Field("pgguard", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    timeout: float = Field(5.0, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str = ""  # default: http://{host}:{port}
    session_secret: SecretStr | None = None  # signs page sessions; set it when N instances share

    def base_url(self, port: int | None = None) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{port if port is not None else self.port}"


class TeamsSettings(_Section):
    webhook_url: SecretStr | None = None
    timeout: float = Field(10.0, gt=0)


class ApproverSettings(_Section):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class LedgerSettings(_Section):
    enabled: bool = True
    spool_dir: Path = Path("pgguard-spool")  # local fallback while the state database is down
    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval: float = Field(0.2, gt=0)
    max_queue: int = Field(10_000, ge=100)


class Settings(BaseSettings):
    """All of pgguard's configuration. Sections mirror the TOML tables."""

    model_config = SettingsConfigDict(
        env_prefix="PGGUARD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    agents: list[AgentSettings] = Field(default_factory=list)
    limits: LimitsSettings = LimitsSettings()
    policy: PolicySettings = PolicySettings()
    state: StateSettings = StateSettings()
    http: HttpSettings = HttpSettings()
    teams: TeamsSettings = TeamsSettings()
    approvers: list[ApproverSettings] = Field(default_factory=list)
    ledger: LedgerSettings = LedgerSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("agents")
    @classmethod
    def _unique_agents(cls, agents: list[AgentSettings]) -> list[AgentSettings]:
        names = [a.name for a in agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate agent names: {', '.join(duplicates)}")
        return agents

    @field_validator("approvers")
    @classmethod
    def _unique_approvers(cls, approvers: list[ApproverSettings]) -> list[ApproverSettings]:
        ids = [a.id for a in approvers]
        if len(set(ids)) != len(ids):
            raise ValueError("approver ids must be unique")
        tokens = [a.token_sha256 for a in approvers]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two approvers share a token")
        return approvers

    @model_validator(mode="after")
    def _approvals_can_be_verified(self) -> Settings:
        if self.teams.webhook_url is not None and not self.approvers:
            raise ValueError(
                "teams.webhook_url is set but no [[approvers]] are configured: held statements "
                "would be announced and nobody could be verified to decide them"
            )
        return self

    def state_dsn(self) -> str:
        chosen = self.state.dsn or self.upstream.dsn
        return chosen.get_secret_value()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> Settings:
        """Load from ``path`` (or ``$PGGUARD_CONFIG``) and the environment; ConfigError if bad."""
        if path is None and os.environ.get(CONFIG_ENV):
            path = os.environ[CONFIG_ENV]
        settings_cls: type[Settings] = cls
        if path is not None:
            path = Path(path)
            _check_toml(path)
            settings_cls = type(
                "FileSettings", (cls,), {"model_config": {**cls.model_config, "toml_file": path}}
            )
        try:
            return settings_cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, path)) from None

    def agent(self, name: str) -> AgentSettings | None:
        for agent in self.agents:
            if agent.name == name:
                return agent
        return None

    def listen_is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.listen.host).is_loopback
        except ValueError:
            return self.listen.host == "localhost"


def _check_toml(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{key}: {message}")
    return where + "invalid configuration: " + "; ".join(problems)
