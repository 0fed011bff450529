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

from pgguard.approvals.identity import identity_collisions
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
    # Upstream sessions this agent may hold at once (53300 above it); unset: half the total
    # when several agents are configured, so no one agent can take every slot.
    max_sessions: int | None = Field(None, ge=1)
    # What a held statement does when its rule does not say (`hold_mode` in rules): "wait"
    # keeps the session waiting; "return" refuses at once with 55000 (re-send once approved).
    hold_mode: Literal["wait", "return"] = "wait"

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
    # Freed memory the C allocator keeps for reuse (pgguard.allocator); 0: glibc's defaults.
    allocator_retain_mib: int = Field(64, ge=0, le=65536)
    # Upstream sessions of all agents together; unset: the upstream's max_connections minus its
    # reserved slots and pgguard's own state connections, read at start-up (pgguard.proxy.capacity).
    max_upstream_sessions: int | None = Field(None, ge=1)
    # Statements longer than this are refused with 54000 before anything reads them.
    max_statement_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=(1 << 30) - 1)
    # Statements longer than this are classified in a worker process (pglast holds the GIL, so
    # a thread would still stall every session), with parse_budget seconds each; 54000 beyond.
    # (A dense 16 KiB text takes pglast ~0.1 s; 4 KiB ~25 ms.)
    parse_offload_bytes: int = Field(4096, ge=256)
    parse_workers: int = Field(2, ge=1, le=64)
    parse_budget: float = Field(2.0, gt=0, le=600)
    # `pgguard serve` waits this long (seconds, retrying with backoff) for the upstream and the
    # state database to answer before it gives up; /readyz says "waiting" meanwhile. 0: no wait.
    startup_wait: float = Field(60.0, ge=0, le=86_400)


class HoldsSettings(_Section):
    # While a statement waits for approval, its session gets a reminder NOTICE this often.
    notice_interval: float = Field(30.0, gt=0, le=3600)


class PolicySettings(_Section):
    rules_dir: Path | None = None
    mode: Literal["enforce", "observe"] = "enforce"


class StateSettings(_Section):
    dsn: SecretStr | None = None  # default: the upstream DSN
    schema_name: str = Field("pgguard", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    timeout: float = Field(5.0, gt=0)
    # The server-side limits of every state-database session (approvals, ledger): a lock held
    # by someone else, or a slow statement, fails the call (fail closed) instead of hanging it.
    lock_timeout: float = Field(2.0, gt=0, le=3600)
    statement_timeout: float = Field(5.0, gt=0, le=3600)
    # The approval MAC key (pgguard.approvals.signing); never stored in the state database.
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None  # default: <data_dir>/state-signing.key, made if absent

    def server_settings(self) -> dict[str, str]:
        """The GUCs every state-database connection starts with (milliseconds)."""
        return {
            "lock_timeout": str(round(self.lock_timeout * 1000)),
            "statement_timeout": str(round(self.statement_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(round(self.statement_timeout * 4000)),
        }

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str = ""  # default: http://{host}:{port}
    session_secret: SecretStr | None = None  # signs page sessions; set it when N instances share
    session_seconds: int = Field(1800, ge=60, le=86_400)  # approval-page sign-in lifetime
    # Largest request body accepted (413 above it, checked before and while it is read): the
    # HTTP server shares the proxy's process, so an upload's size is every agent's memory.
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=1 << 30)

    def base_url(self, port: int | None = None) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{port if port is not None else self.port}"


class TeamsBotSettings(_Section):
    """A Teams bot (Azure Bot, single tenant) that posts cards with Approve/Deny buttons.

    The Microsoft endpoints are base URLs so a test, a sovereign cloud or a proxy can replace them.
    """

    app_id: str = Field(min_length=1)
    app_password: SecretStr | None = None  # client secret of the bot's Entra app
    certificate: Path | None = None  # or a PEM file with the app's certificate and private key
    tenant_id: str = Field(min_length=1)
    service_url: str = Field(min_length=1)  # Bot Connector service URL of the conversation
    conversation_id: str = Field(min_length=1)  # the channel or chat the cards are posted to
    login_url: str = "https://login.microsoftonline.com"
    openid_metadata_url: str = "https://login.botframework.com/v1/.well-known/openidconfiguration"
    token_issuer: str = "https://api.botframework.com"
    token_scope: str = "https://api.botframework.com/.default"
    clock_skew: float = Field(300.0, ge=0, le=900)  # Bot Framework allows 5 minutes
    timeout: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_credential(self) -> TeamsBotSettings:
        if (self.app_password is None) == (self.certificate is None):
            raise ValueError("set exactly one of app_password and certificate")
        return self


class TeamsSettings(_Section):
    webhook_url: SecretStr | None = None
    timeout: float = Field(10.0, gt=0)
    bot: TeamsBotSettings | None = None


class OidcSettings(_Section):
    """Approval-page sign-in with an OpenID Connect provider (Microsoft Entra ID documented).

    Identity is the immutable ``tenant_claim`` + ``subject_claim`` pair (Entra: ``tid`` +
    ``oid``), never an e-mail address. An identity is an approver when a ``[[approvers]]`` entry
    names its subject, or when its ``groups``/``roles`` claims hold an allowed group or role.
    """

    issuer: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None  # confidential client; PKCE is always used as well
    allowed_groups: list[str] = Field(default_factory=list)
    allowed_roles: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"])
    tenant_id: str | None = None  # when set, the tenant claim must equal it
    subject_claim: str = Field("oid", min_length=1)
    tenant_claim: str = "tid"  # "" for providers without tenants
    discovery_url: str | None = None  # default: {issuer}/.well-known/openid-configuration
    leeway: float = Field(60.0, ge=0, le=600)  # clock skew allowed on exp/iat/nbf
    timeout: float = Field(10.0, gt=0)

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("must include 'openid'")
        return scopes

    def metadata_url(self) -> str:
        return self.discovery_url or (self.issuer.rstrip("/") + "/.well-known/openid-configuration")


class ApproverSettings(_Section):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # API, CLI, page sign-in
    subject: str | None = Field(None, min_length=1)  # identity-provider subject (Entra oid)

    @model_validator(mode="after")
    def _verifiable(self) -> ApproverSettings:
        if self.token_sha256 is None and self.subject is None:
            raise ValueError("an approver needs token_sha256 or subject (or both)")
        return self


class LedgerSettings(_Section):
    enabled: bool = True
    spool_dir: Path = Path("pgguard-spool")  # local fallback while the state database is down
    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval: float = Field(0.2, gt=0)
    max_queue: int = Field(10_000, ge=100)
    # Signed checkpoints of each chain's head (see pgguard.ledger.checkpoint): every N entries or
    # S seconds, whichever first. The key and the anchor file default to files in data_dir.
    # Each checkpoint costs a signature, an fsync'd anchor line and a transaction: at 1000, a
    # chain busy with ~15k statements/s paid 1-2.5 µs per statement in situ (pgbench_compare).
    checkpoint_entries: int = Field(10_000, ge=1)
    checkpoint_seconds: float = Field(5.0, gt=0)
    signing_key_file: Path | None = None  # default: <data_dir>/ledger-signing.pem
    anchor_file: Path | None = None  # default: <data_dir>/ledger-anchors.jsonl
    anchor_url: SecretStr | None = None  # each checkpoint is also POSTed here (may carry a token)
    # Retention: `pgguard ledger prune` without --before removes entries older than this many
    # days (cut at signed checkpoints, see pgguard.ledger.prune). None: keep everything.
    retention_days: int | None = Field(None, ge=1)
    # /readyz answers 503 while the spool holds more than this (the state database is behind).
    spool_limit_bytes: int = Field(256 * 1024 * 1024, ge=0)


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None  # default: log_level


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
    holds: HoldsSettings = HoldsSettings()
    state: StateSettings = StateSettings()
    http: HttpSettings = HttpSettings()
    teams: TeamsSettings = TeamsSettings()
    oidc: OidcSettings | None = None
    approvers: list[ApproverSettings] = Field(default_factory=list)
    ledger: LedgerSettings = LedgerSettings()
    # pgguard's own files: the keys it creates at first start (state MAC key, ledger signing key)
    # and the ledger's anchor file. Created with mode 0700 when missing; keep it off the database
    # host and out of every agent's reach.
    data_dir: Path = Path("pgguard-data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log: LogSettings = LogSettings()

    @field_validator("agents")
    @classmethod
    def _unique_agents(cls, agents: list[AgentSettings]) -> list[AgentSettings]:
        names = [a.name for a in agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate agent names: {', '.join(duplicates)}")
        return agents

    @field_validator("agents")
    @classmethod
    def _owners_are_unambiguous(cls, agents: list[AgentSettings]) -> list[AgentSettings]:
        clashes = identity_collisions({a.owner for a in agents})
        if clashes:
            raise ValueError(
                "agent owners that are one identity spelled differently (owners are compared "
                f"case-folded, without +tags): {_clash_list(clashes)}; spell each owner one way"
            )
        return agents

    @field_validator("approvers")
    @classmethod
    def _unique_approvers(cls, approvers: list[ApproverSettings]) -> list[ApproverSettings]:
        ids = [a.id for a in approvers]
        if len(set(ids)) != len(ids):
            raise ValueError("approver ids must be unique")
        clashes = identity_collisions(ids)
        if clashes:
            raise ValueError(
                "approver ids that are one identity spelled differently (compared case-folded, "
                f"without +tags): {_clash_list(clashes)}"
            )
        tokens = [a.token_sha256 for a in approvers if a.token_sha256 is not None]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two approvers share a token")
        subjects = [a.subject for a in approvers if a.subject is not None]
        if len(set(subjects)) != len(subjects):
            raise ValueError("two approvers share a subject")
        return approvers

    @model_validator(mode="after")
    def _approvals_can_be_verified(self) -> Settings:
        """Approvals on with no way to verify who decides is a configuration error, not a mode."""
        announced = self.teams.webhook_url is not None or self.teams.bot is not None
        if (announced or self.oidc is not None) and not self.approvals_enabled():
            raise ValueError(
                "approvals are configured (teams or oidc) but no approver can be verified: add "
                "[[approvers]] with token_sha256 or subject, or oidc.allowed_groups/allowed_roles"
            )
        by_subject = [a.id for a in self.approvers if a.subject and not a.token_sha256]
        if by_subject and self.oidc is None and self.teams.bot is None:
            raise ValueError(
                f"approvers {', '.join(by_subject)} have only a subject, which needs [oidc] or "
                "[teams.bot] to be verified"
            )
        needs_http = [
            name for name, on in (("oidc", self.oidc), ("teams.bot", self.teams.bot)) if on
        ]
        if needs_http and not self.http.enabled:
            raise ValueError(f"{', '.join(needs_http)} needs the HTTP service (http.enabled)")
        if self.oidc is not None and not self._oidc_redirect_is_safe():
            raise ValueError(
                "oidc needs http.public_url to be https:// (http is allowed on loopback only): "
                "the sign-in redirect and the session cookie must not travel in clear text"
            )
        return self

    def approvals_enabled(self) -> bool:
        """Whether statements can be held: someone can be verified to decide them."""
        group_admission = self.oidc is not None and bool(
            self.oidc.allowed_groups or self.oidc.allowed_roles
        )
        return bool(self.approvers) or group_admission

    def _oidc_redirect_is_safe(self) -> bool:
        url = self.http.base_url()
        if url.startswith("https://"):
            return True
        host = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def state_dsn(self) -> str:
        chosen = self.state.dsn or self.upstream.dsn
        return chosen.get_secret_value()

    def ledger_signing_key_file(self) -> Path:
        return self.ledger.signing_key_file or self.data_dir / "ledger-signing.pem"

    def ledger_anchor_file(self) -> Path:
        return self.ledger.anchor_file or self.data_dir / "ledger-anchors.jsonl"

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

    def effective_log_level(self) -> str:
        return self.log.level or self.log_level

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


def _clash_list(clashes: list[tuple[str, ...]]) -> str:
    return "; ".join(" / ".join(group) for group in clashes)


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
