"""Putting pgguard together from Settings: policy, approvals, Teams, proxy, HTTP API.

``serve``, ``demo`` and the tests all start pgguard through ``start`` and stop it through
``Running.stop``, so what is tested is what runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from pgguard import __version__, metrics
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
from pgguard.proxy.startup import AgentDirectory
from pgguard.settings import Settings

if TYPE_CHECKING:
    from pgguard.mcp_server import McpHttp
from pgguard.sql.statenames import ProtectedNames
from pgguard.statedb.probe import check_separation
from pgguard.teams_bot import TeamsBot
from pgguard.web.api import create_app
from pgguard.web.auth import ApproverDirectory
from pgguard.web.oidc import OIDC_CALLBACK_PATH, OidcSignIn
from pgguard.web.ops import (
    Ops,
    ReloadResult,
    not_up_yet,
    ops_app,
    readiness,
    register_ops,
)
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
    directory: ApproverDirectory | None = None
    ops: Ops | None = None
    # Where a reload reads the configuration from (default: the file it was loaded from).
    source: Callable[[], Settings] | None = None
    _reloading: bool = field(default=False, repr=False)
    mcp: McpHttp | None = None  # the agents' MCP endpoint at /mcp (pgguard.mcp_server)

    @property
    def http_url(self) -> str:
        assert self.http is not None
        return f"http://{self.settings.http.host}:{self.http.port}"

    async def stop(self, grace: float | None = None) -> None:
        log.info("pgguard shutting down", extra={"event": "shutdown"})
        self.gate.shutting_down = True
        await self.proxy.shutdown(grace)
        await self.gate.settle_cancellations()
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

    async def reload(self) -> ReloadResult:
        """Re-read the configuration, rules, agents and approvers; validate everything, then
        swap at once (no await between the swaps), or keep the old configuration and say why.

        Sessions keep running and a held statement keeps its request. Settings that need a
        restart (listen addresses, the HTTP side, the state and ledger, the upstream, ...) are
        kept as they are and named in the result.
        """
        if self._reloading:
            return _kept("a reload is already under way")
        self._reloading = True
        try:
            return self._reload()
        finally:
            self._reloading = False

    def _reload(self) -> ReloadResult:
        old = self.settings
        try:
            new = self.source() if self.source is not None else reload_source(old)()
            fixed = {k: getattr(old, k) for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)}
            if not new.agents:
                raise ConfigError("agents: no [[agents]] configured: nobody could connect")
            if new.approvals_enabled() != old.approvals_enabled():
                raise ConfigError(
                    "approvers: turning approvals on or off needs a restart (keep at least one "
                    "approver, or none, as now)"
                )
            effective = new.model_copy(update=fixed)
            engine = load_engine(effective)
            agents = AgentDirectory(effective.agents)
        except ConfigError as exc:
            return _kept(exc.message)
        except Exception as exc:  # a reload must never take a running pgguard down
            return _kept(f"{type(exc).__name__}: {exc}")
        # Validated: swap everything the sessions read, with no await in between.
        self.settings = effective
        self.proxy.ctx.settings = effective
        self.proxy.ctx.agents = agents
        self.gate.reload(engine)
        if self.directory is not None:
            oidc = effective.oidc
            self.directory.replace(
                effective.approvers,
                allowed_groups=oidc.allowed_groups if oidc else (),
                allowed_roles=oidc.allowed_roles if oidc else (),
            )
        if self.ops is not None:
            self.ops.settings = effective
        if self.gate.offload is not None:
            self.gate.offload.reload(
                rules_dir=effective.policy.rules_dir,
                mode=effective.policy.mode,
                protected=protected_names(effective),
            )
        logging.getLogger("pgguard").setLevel(effective.effective_log_level())
        restart = sorted(fixed)
        message = "configuration reloaded"
        if restart:
            message += f"; these need a restart and were kept: {', '.join(restart)}"
        log.info(message, extra={"event": "reload", "restart_needed": restart})
        log_summary(self)
        return ReloadResult(True, message, restart)


# Top-level settings a reload cannot change (they are bound at start: sockets, connections, keys).
RESTART_ONLY = (
    "listen",
    "upstream",
    "limits",
    "state",
    "http",
    "teams",
    "oidc",
    "ledger",
    "data_dir",
)


def reload_source(settings: Settings) -> Callable[[], Settings]:
    """How to read the configuration again: its file (and the environment) once more."""
    path = settings.model_config.get("toml_file")
    if isinstance(path, str | Path):
        return lambda: Settings.load(Path(path))
    return lambda: settings  # configured in code: only the rules files can change


def _kept(why: str) -> ReloadResult:
    log.error(
        "reload refused, the old configuration stays: %s", why, extra={"event": "reload_refused"}
    )
    return ReloadResult(False, f"reload refused, the old configuration stays: {why}")


def log_summary(running: Running) -> None:
    """One start-up (or reload) line saying what is loaded: never a secret."""
    settings = running.settings
    engine = running.gate.engine
    files = [str(p) for p in engine.policy.files]
    summary = {
        "version": __version__,
        "mode": settings.policy.mode,
        "rules_files": files,
        "rules": len(engine.policy.rules),
        "agents": [a.name for a in settings.agents],
        "approvers": [a.id for a in settings.approvers],
        "channels": _channels(settings),
        "listen": f"{settings.listen.host}:{running.proxy.port}",
        "http": running.http_url if running.http is not None else None,
        "ledger": settings.ledger.enabled,
    }
    log.info(
        "pgguard %s: mode %s, %d rules from %s, agents %s, approvers %s, channels %s, "
        "listening on %s, HTTP %s",
        __version__,
        summary["mode"],
        summary["rules"],
        ", ".join(files),
        ", ".join(summary["agents"]) or "none",  # type: ignore[arg-type]
        ", ".join(summary["approvers"]) or "none",  # type: ignore[arg-type]
        ", ".join(summary["channels"]) or "none",  # type: ignore[arg-type]
        summary["listen"],
        summary["http"] or "off",
        extra={"event": "summary", **summary},
    )


def _channels(settings: Settings) -> list[str]:
    if not settings.approvals_enabled():
        return []
    channels = ["api", "cli"]
    if settings.http.enabled:
        channels.append("page")
    if settings.teams.webhook_url is not None:
        channels.append("teams-webhook")
    if settings.teams.bot is not None:
        channels.append("teams-bot")
    if settings.oidc is not None:
        channels.append("oidc")
    return channels


async def wait_until_reachable(settings: Settings) -> None:
    """Wait up to ``[limits] startup_wait`` seconds, retrying with backoff, until the upstream
    and the state database answer; meanwhile the HTTP port answers /healthz and a 503 "waiting"
    /readyz. Returns when they answer or the time is up (`start` then says what failed)."""
    wait = settings.limits.startup_wait
    if wait <= 0:
        return
    ops, probe = Ops(settings), Ops(settings)  # what /readyz reads; what the probes use
    checks = await _databases(probe)
    if not checks:
        return
    http: HttpServer | None = None
    if settings.http.enabled:
        http = HttpServer(ops_app(ops), settings.http.host, settings.http.port)
        await http.start()
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + wait, 0.5
    try:
        while checks and loop.time() < deadline:
            why = "; ".join(f"{name}: {reason}" for name, reason in checks.items())
            ops.waiting = f"waiting for {', '.join(checks)} ({why})"
            log.warning(
                "start-up: %s; retrying for %.0f s more",
                ops.waiting,
                deadline - loop.time(),
                extra={"event": "startup_wait"},
            )
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 10.0)
            checks = await _databases(probe)
    finally:
        if http is not None:
            await http.stop()


async def _databases(ops: Ops) -> dict[str, str]:
    """The databases that are not up yet, with why (readiness without the spool check). One
    that answers with an error that waiting cannot fix (a refused login) is left to `start`."""
    _ready, checks = await readiness(ops)
    return {
        k: v
        for k, v in checks.items()
        if k in ("upstream", "state") and v != "ok" and not_up_yet(v)
    }


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
            expand=True,  # packs into indexed rows, in the background (issue 19)
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
    running.ops = _ops(running)
    if settings.http.enabled:
        if approvals is not None:
            await _start_http(running, approvals)
        else:
            running.http = HttpServer(ops_app(running.ops), settings.http.host, settings.http.port)
            await running.http.start()
            log.info("pgguard HTTP (health and metrics only) on %s", running.http_url)
    return running


def _ops(running: Running) -> Ops:
    """The operations endpoints' view of a running pgguard (`pgguard.web.ops`)."""
    ledger = running.ledger

    def sessions_by_agent() -> dict[str, int]:
        counts: dict[str, int] = {}
        for conn in running.proxy.ctx.connections:
            agent = conn.session.agent if conn.session is not None else None
            if agent:
                counts[agent] = counts.get(agent, 0) + 1
        return counts

    gauges = metrics.Gauges(
        sessions_by_agent=sessions_by_agent,
        ledger_queue=(lambda: ledger.stats().queued) if ledger is not None else (lambda: 0),
        spool_dir=running.settings.ledger.spool_dir if ledger is not None else None,
    )

    def approvers() -> ApproverDirectory:
        return running.directory or ApproverDirectory([])

    return Ops(
        running.settings, metrics.registry(gauges), reload=running.reload, approvers=approvers
    )


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
    running.directory = directory
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
    assert running.ops is not None
    register_ops(app, running.ops)
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
