"""``pgguard state init``: a state role and database that the upstream role cannot reach.

Prints the SQL (a psql script) by default; ``--apply --admin-dsn DSN`` runs it and prints the
``[state] dsn`` to configure. With ``--config``, the upstream role and the state schema come from
the configuration, and after ``--apply`` the start-up separation check runs against the new state
database, so the operator learns at once whether ``pgguard serve`` will start.
Exit codes: 0 done, 1 the separation check still refuses, 2 usage or connection problem.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import SecretStr

from pgguard.dsn import Dsn, parse_dsn
from pgguard.errors import ConfigError
from pgguard.settings import Settings
from pgguard.statedb import setup


def register(app: typer.Typer) -> None:
    state = typer.Typer(
        help="Set up pgguard's state database.\n\nExample: pgguard state init --upstream-role app",
        no_args_is_help=True,
    )
    app.add_typer(state, name="state")

    @state.command()
    def init(
        config: Annotated[
            Path | None,
            typer.Option("--config", "-c", help="pgguard TOML file (upstream role, schema)."),
        ] = None,
        admin_dsn: Annotated[
            str | None,
            typer.Option(
                "--admin-dsn",
                envvar="PGGUARD_ADMIN_DSN",
                help="A superuser's DSN on the cluster that will hold the state.",
            ),
        ] = None,
        apply: Annotated[
            bool, typer.Option("--apply", help="Run the SQL (needs --admin-dsn).")
        ] = False,
        role: Annotated[
            str, typer.Option("--role", help="State role to create.")
        ] = setup.DEFAULT_ROLE,
        database: Annotated[
            str, typer.Option("--database", help="State database to create.")
        ] = setup.DEFAULT_DATABASE,
        schema: Annotated[
            str | None, typer.Option("--schema", help="State schema (default: [state] schema).")
        ] = None,
        password: Annotated[
            str | None,
            typer.Option(
                "--password",
                envvar="PGGUARD_STATE_PASSWORD",
                help="State role's password (default: a random one).",
            ),
        ] = None,
        upstream_role: Annotated[
            list[str] | None,
            typer.Option(
                "--upstream-role",
                help="A role agents act as, to cut off (default: the configured upstream user).",
            ),
        ] = None,
    ) -> None:
        """Print (or --apply) the SQL creating pgguard's own state role, database and schema.

        Example: pgguard state init --apply --upstream-role app
        """
        settings = _settings(config)
        upstream_roles = tuple(upstream_role or ())
        if not upstream_roles and settings is not None:
            upstream_roles = (settings.upstream.parsed().user,)
        try:
            plan = setup.StatePlan(
                role=role,
                database=database,
                schema=schema or (settings.state.schema_name if settings else "pgguard"),
                password=password or setup.new_password(),
                upstream_roles=upstream_roles,
            )
        except ValueError as exc:
            _fail(str(exc))
        server = _server(admin_dsn)
        if not apply:
            typer.echo(setup.script(plan), nl=False)
            typer.echo(f'-- then configure:  [state] dsn = "{setup.state_dsn(plan, server)}"')
            return
        if admin_dsn is None:
            _fail("--apply needs --admin-dsn (or $PGGUARD_ADMIN_DSN)")
        _apply(plan, admin_dsn, server, settings)


def _apply(plan: setup.StatePlan, admin_dsn: str, server: Dsn, settings: Settings | None) -> None:
    from pgguard.statedb.apply import apply

    try:
        ran = asyncio.run(apply(plan, admin_dsn))
    except ConfigError as exc:
        _fail(exc.message)
    for statement in ran:
        typer.echo(
            statement.split(" PASSWORD ")[0]
            + (" PASSWORD '<verifier>';" if " PASSWORD " in statement else ""),
            err=True,
        )
    dsn = setup.state_dsn(plan, server)
    typer.echo(f'state database ready; configure  [state] dsn = "{dsn}"', err=True)
    typer.echo(dsn)
    if settings is not None:
        _check(settings, dsn, plan.schema)


def _check(settings: Settings, dsn: str, schema: str) -> None:
    from pgguard.statedb.probe import check_separation

    checked = settings.model_copy(
        update={
            "state": settings.state.model_copy(
                update={"dsn": SecretStr(dsn), "schema_name": schema}
            )
        }
    )
    try:
        asyncio.run(check_separation(checked))
    except ConfigError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo("separation check passed: the upstream role cannot reach the state", err=True)


def _settings(config: Path | None) -> Settings | None:
    if config is None:
        return None
    try:
        return Settings.load(config)
    except ConfigError as exc:
        _fail(exc.message)


def _server(admin_dsn: str | None) -> Dsn:
    if admin_dsn is None:
        return Dsn()
    try:
        return parse_dsn(admin_dsn)
    except ValueError as exc:
        _fail(f"--admin-dsn: {exc}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"pgguard: {message}", err=True)
    raise typer.Exit(2)
