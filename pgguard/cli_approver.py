"""Approver commands: ``pgguard pending``, ``pgguard approve ID``, ``pgguard deny ID``, and
``pgguard reload`` (an approver asks a running pgguard to re-read its configuration).

They talk to a running pgguard's HTTP API (``--url``, ``$PGGUARD_URL``, or the ``[http]`` section
of ``--config``) as the approver whose token is given by ``--token`` or
``$PGGUARD_APPROVER_TOKEN``. Exit codes: 0 done, 1 refused by the server (the message says why),
2 usage or connection problem.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Annotated

import httpx
import typer

TOKEN_ENV = "PGGUARD_APPROVER_TOKEN"
URL_ENV = "PGGUARD_URL"

UrlOption = Annotated[
    str | None, typer.Option("--url", help=f"pgguard HTTP address (default: ${URL_ENV} or config).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help=f"Approver token (default: ${TOKEN_ENV}).")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="pgguard TOML file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _base_url(url: str | None, config: Path | None) -> str:
    if url or os.environ.get(URL_ENV):
        return (url or os.environ[URL_ENV]).rstrip("/")
    from pgguard.errors import ConfigError
    from pgguard.settings import Settings

    try:
        return Settings.load(config).http.base_url()
    except ConfigError as exc:
        typer.echo(f"pgguard: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _token(token: str | None) -> str:
    chosen = token or os.environ.get(TOKEN_ENV)
    if not chosen:
        typer.echo(f"pgguard: give an approver token with --token or ${TOKEN_ENV}", err=True)
        raise typer.Exit(2)
    return chosen


def _call(method: str, url: str, token: str, body: dict[str, str] | None = None) -> object:
    try:
        response = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=15
        )
    except httpx.HTTPError as exc:
        typer.echo(f"pgguard: cannot reach {url.split('/api/')[0]}: {exc}", err=True)
        raise typer.Exit(2) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"pgguard: refused ({response.status_code}): {detail}", err=True)
        raise typer.Exit(1)
    return response.json()


def _decide(
    verb: str,
    request_id: str,
    reason: str,
    url: str | None,
    token: str | None,
    config: Path | None,
) -> None:
    base = _base_url(url, config)
    path = f"{base}/api/requests/{request_id}/{verb}"
    result = _call("POST", path, _token(token), {"reason": reason})
    assert isinstance(result, dict)
    typer.echo(f"{request_id}: {result['state']}")


def pending_text(requests: list[dict[str, object]], width: int = 80) -> str:
    """One block per request: its full id (never cut: it is copied into ``approve``), then
    what it is, then the masked statement wrapped to ``width`` columns."""
    if not requests:
        return "no pending requests\n"
    lines: list[str] = []
    for item in requests:
        categories = ", ".join(str(c) for c in item.get("categories", []))  # type: ignore[attr-defined]
        lines.append(
            f"{item['id']}  agent {item['agent']}  database {item['database']}  [{categories}]"
        )
        lines.append(f"    owner {item['owner']}  expires {item['expires_at']}")
        statement = " ".join(str(item["statement"]).split())
        lines.extend(
            textwrap.wrap(statement, width, initial_indent="    ", subsequent_indent="    ")
        )
        lines.append("")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def pending(
        url: UrlOption = None,
        token: TokenOption = None,
        config: ConfigOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """List requests waiting for a decision, with their full ids.

        Example: pgguard pending --url http://pgguard:8080 --json
        """
        base = _base_url(url, config)
        requests = _call("GET", f"{base}/api/requests?state=pending", _token(token))
        assert isinstance(requests, list)
        if as_json:
            typer.echo(json.dumps(requests, indent=2))
            return
        typer.echo(pending_text(requests), nl=False)

    @app.command()
    def reload(
        url: UrlOption = None, token: TokenOption = None, config: ConfigOption = None
    ) -> None:
        """Ask a running pgguard to re-read its configuration, rules, agents and approvers (as
        SIGHUP does). Exit 1 when it kept the old configuration (the message says why).

        Example: pgguard reload --url http://pgguard:8080
        """
        base = _base_url(url, config)
        result = _call("POST", f"{base}/api/reload", _token(token))
        assert isinstance(result, dict)
        typer.echo(str(result["message"]))

    @app.command()
    def approve(
        request_id: str,
        reason: Annotated[str, typer.Option("--reason", help="Comment recorded with it.")] = "",
        url: UrlOption = None,
        token: TokenOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Approve a held statement.

        Example: pgguard approve nk7p7mdq2wfxa3be --reason "migration ticket 42"
        """
        _decide("approve", request_id, reason, url, token, config)

    @app.command()
    def deny(
        request_id: str,
        reason: Annotated[str, typer.Option("--reason", help="Why (shown to the agent).")],
        url: UrlOption = None,
        token: TokenOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Deny a held statement.

        Example: pgguard deny nk7p7mdq2wfxa3be --reason "use the read replica"
        """
        _decide("deny", request_id, reason, url, token, config)
