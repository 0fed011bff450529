"""The ``pgguard`` command line. Thin: it parses options and calls into the rest of pgguard.

Exit codes (every verb): 0 done; 1 the answer is "no" (a refused approval, failed rule examples, a
ledger that does not verify); 2 a usage, configuration or connection problem (nothing was done).

``serve`` owns the signals: SIGINT/SIGTERM stop (logged, held statements recorded as "pgguard
shut down"), SIGHUP reloads the configuration (`pgguard.proxy.assembly.Running.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from pgguard import __version__, logs
from pgguard.allocator import retain_freed_memory
from pgguard.errors import ConfigError
from pgguard.settings import Settings

log = logging.getLogger("pgguard.cli")

app = typer.Typer(
    name="pgguard",
    help="A PostgreSQL proxy that holds AI agents' privileged statements for human approval.\n\n"
    "Example: pgguard serve --config /etc/pgguard/pgguard.toml",
    epilog="Exit codes: 0 done; 1 refused or found problems; 2 usage, configuration or "
    "connection problem.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pgguard {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """A PostgreSQL proxy that holds AI agents' privileged statements for human approval."""


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
    """Run the proxy until SIGINT/SIGTERM; SIGHUP reloads the configuration.

    Example: pgguard serve --config /etc/pgguard/pgguard.toml
    """
    settings = _load(config)
    logs.setup(settings.effective_log_level(), settings.log.format)
    if not settings.agents:
        typer.echo("pgguard: no [[agents]] configured: nobody could connect", err=True)
        raise typer.Exit(2)
    retain_freed_memory(settings.limits.allocator_retain_mib)
    run_event_loop(_serve(settings))


async def _serve(settings: Settings) -> None:
    from pgguard.errors import PgGuardError
    from pgguard.proxy import assembly

    try:
        await assembly.wait_until_reachable(settings)
        running = await assembly.start(settings)
    except PgGuardError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if settings.policy.mode == "observe":
        typer.echo("pgguard: OBSERVE MODE - nothing is held or denied, only logged", err=True)
    assembly.log_summary(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[object]] = set()

    def stopping(sig: signal.Signals) -> None:
        log.info("received %s: shutting down", sig.name, extra={"event": "signal"})
        stop.set()

    def reload() -> None:
        log.info("received SIGHUP: reloading the configuration", extra={"event": "signal"})
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    await running.stop()
    log.info("pgguard shut down", extra={"event": "stopped"})


@app.command()
def demo(
    keep_running: Annotated[
        bool,
        typer.Option("--keep-running", help="Keep the proxy up after the script, until Ctrl-C."),
    ] = False,
) -> None:
    """Embedded PostgreSQL + pgguard + a scripted agent session, end to end.

    Needs the demo extra: pip install 'pgguard\\[demo]'.

    Example: pgguard demo --keep-running
    """
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
