"""The ``pgguard`` command line. Thin: it parses options and calls into the rest of pgguard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from pgguard.allocator import retain_freed_memory
from pgguard.errors import ConfigError
from pgguard.settings import Settings

app = typer.Typer(
    name="pgguard",
    help="A PostgreSQL proxy that holds AI agents' privileged statements for human approval.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $PGGUARD_CONFIG)."),
]


def _load(config: Path | None) -> Settings:
    try:
        return Settings.load(config)
    except ConfigError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_event_loop(coro: object) -> None:
    """Run ``coro`` on uvloop when available (it is markedly faster for the relay)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    settings = _load(config)
    _setup_logging(settings.log_level)
    if not settings.agents:
        typer.echo("pgguard: no [[agents]] configured: nobody could connect", err=True)
        raise typer.Exit(2)
    retain_freed_memory(settings.limits.allocator_retain_mib)
    run_event_loop(_serve(settings))


async def _serve(settings: Settings) -> None:
    from pgguard.errors import PgGuardError
    from pgguard.proxy import assembly

    try:
        running = await assembly.start(settings)
    except PgGuardError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if settings.policy.mode == "observe":
        typer.echo("pgguard: OBSERVE MODE - nothing is held or denied, only logged", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


@app.command()
def demo(
    keep_running: Annotated[
        bool,
        typer.Option("--keep-running", help="Keep the proxy up after the script, until Ctrl-C."),
    ] = False,
) -> None:
    """Embedded PostgreSQL + pgguard + a scripted agent session, end to end."""
    from pgguard.demo import run_demo

    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(run_demo(keep_running=keep_running))


def _register_commands() -> None:
    from pgguard import cli_approver, cli_ledger, cli_mcp, cli_policy, cli_state

    cli_mcp.register(app)
    cli_policy.register(app)
    cli_approver.register(app)
    cli_ledger.register(app)
    cli_state.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
