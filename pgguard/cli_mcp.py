"""``pgguard mcp --agent NAME``: the MCP tools over stdio for one agent (`pgguard.mcp_server`).

The agent proves itself with its own pgguard password in ``PGGUARD_AGENT_PASSWORD``; logs go to
stderr (stdout carries the protocol). Approval requests it opens are announced to approvers as
the proxy's are (the Teams webhook, when configured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pgguard.errors import PgGuardError
from pgguard.settings import Settings


def register(app: typer.Typer) -> None:
    @app.command("mcp")
    def mcp_command(
        agent: Annotated[str, typer.Option("--agent", help="The agent this server acts as.")],
        config: Annotated[
            Path | None,
            typer.Option(
                "--config", "-c", help="TOML configuration file (default: $PGGUARD_CONFIG)."
            ),
        ] = None,
    ) -> None:
        """Serve the agent MCP tools (check_statement, request_approval, ...) over stdio.

        Example: PGGUARD_AGENT_PASSWORD=... pgguard mcp --agent reporting -c pgguard.toml
        """
        from pgguard import logs
        from pgguard.cli import _load, run_event_loop

        settings = _load(config)
        level = settings.effective_log_level()
        # stdout is the MCP stream; logs go to stderr, quieter than a server's by default
        logs.setup("WARNING" if level == "INFO" else level, settings.log.format)
        run_event_loop(_serve(settings, agent))


async def _serve(settings: Settings, agent: str) -> None:
    from pgguard.approvals.service import ApprovalService
    from pgguard.approvals.signing import load_state_key
    from pgguard.approvals.store import ApprovalStore
    from pgguard.approvals.teams import TeamsWebhookNotifier
    from pgguard.masking import MaskingRules
    from pgguard.mcp_server import run_stdio, stdio_agent
    from pgguard.mcp_tools import agent_tools
    from pgguard.proxy.assembly import load_engine

    approvals: ApprovalService | None = None
    notifier: TeamsWebhookNotifier | None = None
    try:
        tools = agent_tools(settings, load_engine(settings), MaskingRules.load(), None)
        stdio_agent(tools, agent)  # refuse before touching the state database
        if settings.approvals_enabled():
            secret = settings.state.signing_key
            key = load_state_key(
                secret.get_secret_value() if secret else None,
                settings.state.signing_key_file,
                settings.data_dir,
            )
            store = await ApprovalStore.open(
                settings.state_dsn(),
                key=key,
                schema=settings.state.schema_name,
                timeout=settings.state.timeout,
                server_settings=settings.state.server_settings(),
            )
            if settings.teams.webhook_url is not None:
                notifier = TeamsWebhookNotifier(
                    settings.teams.webhook_url.get_secret_value(),
                    settings.http.base_url(),
                    timeout=settings.teams.timeout,
                )
            approvals = ApprovalService(
                store,
                settings.state_dsn(),
                key=key,
                notifier=notifier,
                timeout=settings.state.timeout,
                server_settings=settings.state.server_settings(),
            )
            tools.approvals = approvals
    except PgGuardError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(2) from None
    try:
        await run_stdio(tools, agent)
    finally:
        if approvals is not None:
            await approvals.stop()
            await approvals.store.close()
        if notifier is not None:
            await notifier.aclose()
