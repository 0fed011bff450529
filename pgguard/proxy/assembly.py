"""Putting pgguard together from Settings: policy, approvals, Teams, proxy, HTTP API.

``serve``, ``demo`` and the tests all start pgguard through ``start`` and stop it through
``Running.stop``, so what is tested is what runs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import SecretStr

from pgguard.approvals.fanout import FanOutNotifier
from pgguard.approvals.schema import NOTIFY_CHANNEL
from pgguard.approvals.service import ApprovalService, Notifier
from pgguard.approvals.signing import load_state_key
from pgguard.approvals.store import ApprovalStore
from pgguard.approvals.teams import TeamsWebhookNotifier
from pgguard.errors import ConfigError
from pgguard.ledger import LedgerWriter
from pgguard.masking import MaskingRules
from pgguard.policy import PolicyEngine, RulesError
from pgguard.proxy.capacity import SessionSlots, read_capacity
from pgguard.proxy.ledger_hooks import LedgerHooks
from pgguard.proxy.offload import ParseOffload
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.proxy.server import ProxyServer
from pgguard.settings import Settings

if TYPE_CHECKING:
    from pgguard.mcp_server import McpHttp
from pgguard.sql.statenames import ProtectedNames
from pgguard.statedb.probe import check_separation
from pgguard.teams_bot import TeamsBot
from pgguard.web.api import create_app
from pgguard.web.auth import ApproverDirectory
from pgguard.web.oidc import OIDC_CALLBACK_PATH, OidcSignIn
from pgguard.web.server import HttpServer

log = logging.getLogger(__name__)


@dataclass
class Running:
    settings: Settings
    proxy: ProxyServer
    gate: PolicyGate
    approvals: ApprovalService | None = None
    notifier: TeamsWebhookNotifier | None = None
    http: HttpServer | None = None
    ledger: LedgerWriter | None = None
    bot: TeamsBot | None = None
    oidc: OidcSignIn | None = None
    mcp: McpHttp | None = None  # the agents' MCP endpoint at /mcp (pgguard.mcp_server)

    @property
    def http_url(self) -> str:
        assert self.http is not None
        return f"http://{self.settings.http.host}:{self.http.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.proxy.shutdown(grace)
        if self.http is not None:
            await self.http.stop()
        if self.mcp is not None:
            await self.mcp.stop()
        if self.approvals is not None:
            await self.approvals.stop()
            await self.approvals.store.close()
        if self.notifier is not None:
            await self.notifier.aclose()
        if self.bot is not None:
            await self.bot.aclose()
        if self.oidc is not None:
            await self.oidc.aclose()
        if self.ledger is not None:
            await self.ledger.close()
        if self.gate.offload is not None:
            await self.gate.offload.close()


def protected_names(settings: Settings) -> ProtectedNames:
    """pgguard's own names no agent statement may use: the state schema and channels."""
    return ProtectedNames(schema=settings.state.schema_name, channels=(NOTIFY_CHANNEL,))


def load_engine(settings: Settings) -> PolicyEngine:
    try:
        return PolicyEngine.load(
            settings.policy.rules_dir,
            mode=settings.policy.mode,
            protected=protected_names(settings),
        )
    except RulesError as exc:
        raise ConfigError(f"policy.rules_dir: invalid rules: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"policy.rules_dir: cannot read rules: {exc}") from None


async def start(settings: Settings) -> Running:
    """Start every part the configuration asks for; approvals need at least one approver."""
    instance_id = uuid.uuid4().hex[:8]
    engine = load_engine(settings)
    # Before anything touches the state: refuse to start when agents could reach it.
    await check_separation(settings)
    # One line naming upstream.dsn when the upstream cannot be reached; sizes the session limits.
    capacity = await read_capacity(settings)
    approvals: ApprovalService | None = None
    notifier: TeamsWebhookNotifier | None = None
    bot: TeamsBot | None = None
    if settings.approvals_enabled():
        state_key = load_state_key(
            _secret(settings.state.signing_key),
            settings.state.signing_key_file,
            settings.data_dir,
        )
        log.info("approval decisions are authenticated with state key %s", state_key.key_id)
        store = await ApprovalStore.open(
            settings.state_dsn(),
            key=state_key,
            schema=settings.state.schema_name,
            timeout=settings.state.timeout,
            server_settings=settings.state.server_settings(),
        )
        public_url = settings.http.base_url()
        notifiers: list[Notifier] = []
        if settings.teams.webhook_url is not None:
            notifier = TeamsWebhookNotifier(
                settings.teams.webhook_url.get_secret_value(),
                public_url,
                timeout=settings.teams.timeout,
            )
            notifiers.append(notifier)
        if settings.teams.bot is not None:
            bot = TeamsBot(settings.teams.bot, public_url)
            notifiers.append(bot)
        approvals = ApprovalService(
            store,
            settings.state_dsn(),
            key=state_key,
            notifier=_one_notifier(notifiers),
            instance_id=instance_id,
            timeout=settings.state.timeout,
            server_settings=settings.state.server_settings(),
        )
        await approvals.start()
    else:
        log.warning("no approvers configured: held statements are refused, not held")
    masking = MaskingRules.load()
    ledger: LedgerWriter | None = None
    hooks: LedgerHooks | None = None
    if settings.ledger.enabled:
        ledger = await LedgerWriter.open(
            settings.state_dsn(),
            schema=settings.state.schema_name,
            spool_dir=settings.ledger.spool_dir,
            instance_id=instance_id,
            timeout=settings.state.timeout,
            batch_size=settings.ledger.batch_size,
            flush_interval=settings.ledger.flush_interval,
            max_queue=settings.ledger.max_queue,
            signing_key_file=settings.ledger_signing_key_file(),
            checkpoint_entries=settings.ledger.checkpoint_entries,
            checkpoint_seconds=settings.ledger.checkpoint_seconds,
            anchor_file=settings.ledger_anchor_file(),
            anchor_url=(
                settings.ledger.anchor_url.get_secret_value()
                if settings.ledger.anchor_url
                else None
            ),
            server_settings=settings.state.server_settings(),
        )
        hooks = LedgerHooks(ledger, masking, instance_id, settings.upstream.parsed().user)
        if approvals is not None:
            approvals.on_forgery = hooks.integrity_alert
    gate = PolicyGate(
        engine,
        approvals=approvals,
        masking=masking,
        instance_id=instance_id,
        upstream=settings.upstream,
        ledger=hooks,
        offload=await _start_offload(settings),
        max_statement_bytes=settings.limits.max_statement_bytes,
        public_url=settings.http.base_url(),
        notice_interval=settings.holds.notice_interval,
        hold_modes={agent.name: agent.hold_mode for agent in settings.agents},
    )
    proxy = ProxyServer(settings, gate)
    proxy.ctx.slots = SessionSlots.from_settings(settings, capacity)
    proxy.ctx.instance_id = instance_id
    await proxy.start()
    running = Running(settings, proxy, gate, approvals, notifier, ledger=ledger, bot=bot)
    if approvals is not None and settings.http.enabled:
        await _start_http(running, approvals)
    return running


async def _start_http(running: Running, approvals: ApprovalService) -> None:
    """The REST API, the approval pages (token or OIDC sign-in) and the Teams bot endpoint."""
    settings = running.settings
    public_url = settings.http.base_url()
    oidc_settings = settings.oidc
    directory = ApproverDirectory(
        settings.approvers,
        allowed_groups=oidc_settings.allowed_groups if oidc_settings else (),
        allowed_roles=oidc_settings.allowed_roles if oidc_settings else (),
    )
    if oidc_settings is not None:
        running.oidc = OidcSignIn(oidc_settings, f"{public_url}{OIDC_CALLBACK_PATH}")
    secret = settings.http.session_secret
    app = create_app(
        approvals,
        directory,
        session_secret=secret.get_secret_value().encode() if secret else None,
        public_url=public_url,
        session_seconds=settings.http.session_seconds,
        oidc=running.oidc,
        max_body_bytes=settings.http.max_body_bytes,
    )
    if running.bot is not None:
        running.bot.register(app, approvals, directory)
    if settings.agents:  # the agents' MCP door, behind their own pgguard credentials
        from pgguard.mcp_server import McpHttp  # the SDK loads only where HTTP is served
        from pgguard.mcp_tools import agent_tools

        gate = running.gate
        tools = agent_tools(settings, gate.engine, gate.masking, approvals)
        running.mcp = McpHttp(tools, public_url, settings.http.host)
        running.mcp.mount(app.router.routes)
        await running.mcp.start()
    running.http = HttpServer(app, settings.http.host, settings.http.port)
    await running.http.start()
    log.info("pgguard HTTP API on %s", running.http_url)


async def _start_offload(settings: Settings) -> ParseOffload:
    limits = settings.limits
    offload = ParseOffload(
        rules_dir=settings.policy.rules_dir,
        mode=settings.policy.mode,
        protected=protected_names(settings),
        workers=limits.parse_workers,
        threshold=limits.parse_offload_bytes,
        budget=limits.parse_budget,
    )
    await offload.start()
    return offload


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _one_notifier(notifiers: list[Notifier]) -> Notifier | None:
    if not notifiers:
        return None
    return notifiers[0] if len(notifiers) == 1 else FanOutNotifier(notifiers)
