"""Auditor commands: ``pgguard ledger show``, ``pgguard ledger export``, ``pgguard ledger verify``.

They read the ledger straight from the state database named by ``--config`` (the same file as
``serve``): ``settings.state_dsn()`` and ``[state] schema``. ``verify`` checks the signed
checkpoints with the public keys given (``--public-key``, repeatable; default: the public half of
``[ledger] signing_key_file``) and compares them with the anchor files (``--anchors``, repeatable;
default: ``[ledger] anchor_file`` when it exists); ``--hash-only`` checks the hash chain alone.
Exit codes: 0 done (verify: intact; warnings are printed), 1 verify found problems, 2 usage,
configuration or connection problem (a key or anchor file that cannot be read included).
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO, TypeVar

import asyncpg
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pgguard.errors import ConfigError
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.checkpoint import KeyRing, SignedCheckpoint
from pgguard.ledger.keys import load_public_key, public_key_path
from pgguard.ledger.problems import Problem
from pgguard.ledger.reader import LedgerFilters, LedgerRow, VerifyReport, query, verify

if TYPE_CHECKING:
    from pgguard.settings import Settings

T = TypeVar("T")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="pgguard TOML file.")]
AgentOption = Annotated[str | None, typer.Option("--agent", help="Only this agent.")]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="Received at or after (ISO 8601; UTC if no zone).")
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Received before (ISO 8601; UTC if no zone).")
]
CategoryOption = Annotated[str | None, typer.Option("--category", help="Has this category.")]
ActionOption = Annotated[str | None, typer.Option("--action", help="allow, hold or deny.")]
ApproverOption = Annotated[
    str | None, typer.Option("--approver", help="Decided by this approver (id or name).")
]
RequestOption = Annotated[str | None, typer.Option("--request", help="This approval request id.")]

CSV_FIELDS = (
    "entry_id",
    "kind",
    "chain_id",
    "seq",
    "hash",
    "instance_id",
    "session_id",
    "received_at",
    "decided_at",
    "completed_at",
    "agent",
    "owner",
    "client_address",
    "application_name",
    "database",
    "upstream_role",
    "statement",
    "fingerprint",
    "categories",
    "rule_ids",
    "action",
    "request_id",
    "approvers",
    "reason",
    "statement_entry_id",
    "outcome_entry_id",
    "command_tag",
    "rows",
    "sqlstate",
    "error_message",
    "duration_ms",
    "detail",
)


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"pgguard: {message}", err=True)
    return typer.Exit(2)


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(f"{option}: not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.utcoffset() is not None else parsed.replace(tzinfo=UTC)


def _filters(
    agent: str | None,
    since: str | None,
    until: str | None,
    category: str | None,
    action: str | None,
    approver: str | None,
    request: str | None,
    limit: int | None,
) -> LedgerFilters:
    return LedgerFilters(
        agent=agent,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        category=category,
        action=action,
        approver=approver,
        request_id=request,
        limit=limit,
    )


def _settings(config: Path | None) -> Settings:
    from pgguard.settings import Settings

    try:
        return Settings.load(config)
    except ConfigError as exc:
        raise _fail(exc.message) from None


@asynccontextmanager
async def _connect(dsn: str, timeout: float) -> AsyncIterator[asyncpg.Connection]:  # noqa: ASYNC109
    try:
        conn = await asyncio.wait_for(
            asyncpg.connect(
                dsn,
                timeout=timeout,
                server_settings={"application_name": "pgguard-ledger-cli"},
            ),
            timeout * 2,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _fail(f"cannot reach the state database: {type(exc).__name__}: {exc}") from None
    try:
        yield conn
    finally:
        try:
            await asyncio.wait_for(conn.close(), timeout)
        except (OSError, TimeoutError, asyncpg.InterfaceError):
            conn.terminate()


def _run(
    config: Path | Settings | None, work: Callable[[asyncpg.Connection, str], Awaitable[T]]
) -> T:
    settings = config if not isinstance(config, Path | None) else _settings(config)
    dsn, schema, timeout = settings.state_dsn(), settings.state.schema_name, settings.state.timeout

    async def main() -> T:
        async with _connect(dsn, timeout) as conn:
            try:
                return await work(conn, schema)
            except asyncpg.UndefinedTableError:
                raise _fail(f"no ledger in schema {schema!r} (has pgguard run yet?)") from None
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise _fail(f"the state database failed: {type(exc).__name__}: {exc}") from None

    return asyncio.run(main())


def _outcome(row: LedgerRow) -> str:
    done = row.outcome
    if done is None:
        return str(row.entry.detail.get("reason", "")) if row.entry.kind == "auth_failure" else ""
    if done.sqlstate:
        return f"ERROR {done.sqlstate}"
    rows = f" ({done.rows} rows)" if done.rows is not None else ""
    return f"{done.command_tag or 'OK'}{rows}"


def show_text(rows: list[LedgerRow], width: int = 80) -> str:
    """``ledger show``'s output: a block per entry that fits ``width`` columns - a line of what it
    was (the request id whole, so it can be copied), then the statement wrapped, never the id."""
    lines = [f"pgguard ledger: {len(rows)} entries, newest first (times UTC)", ""]
    for row in rows:
        e = row.entry
        what = e.action if e.kind == "statement" else e.kind
        head = [e.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), e.agent, what]
        if e.categories:
            head.append("[" + ", ".join(e.categories) + "]")
        outcome = _outcome(row)
        if outcome:
            head.append(outcome)
        lines.extend(textwrap.wrap("  ".join(head), width, subsequent_indent="    "))
        if e.request_id:
            approvers = ", ".join(
                f"{a.get('name') or a.get('id')} ({a.get('channel')})" for a in e.approvers
            )
            lines.append(f"    request {e.request_id}" + (f"  by {approvers}" if approvers else ""))
        statement = " ".join(e.statement.split())
        lines.extend(
            textwrap.wrap(statement, width, initial_indent="    ", subsequent_indent="    ")
        )
        lines.append("")
    return "\n".join(lines)


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _write_rows(out: TextIO, fmt: ExportFormat, rows: AsyncIterator[LedgerRow]) -> Awaitable[int]:
    async def write() -> int:
        count = 0
        writer = csv.writer(out) if fmt is ExportFormat.CSV else None
        if writer is not None:
            writer.writerow(CSV_FIELDS)
        async for row in rows:
            record = row.to_record()
            if writer is not None:
                writer.writerow([_csv_value(record.get(name)) for name in CSV_FIELDS])
            else:
                out.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
        return count

    return write()


def register(app: typer.Typer) -> None:
    ledger = typer.Typer(
        help="Read, export and verify the query ledger.\n\n"
        "Example: pgguard ledger show -c pgguard.toml",
        no_args_is_help=True,
    )
    app.add_typer(ledger, name="ledger")

    @ledger.command()
    def show(
        config: ConfigOption = None,
        agent: AgentOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        category: CategoryOption = None,
        action: ActionOption = None,
        approver: ApproverOption = None,
        request: RequestOption = None,
        limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    ) -> None:
        """The newest ledger entries, one block each (fits 80 columns).

        Example: pgguard ledger show -c pgguard.toml --agent reporting --limit 20
        """
        filters = _filters(agent, since, until, category, action, approver, request, limit)

        async def fetch(conn: asyncpg.Connection, schema: str) -> list[LedgerRow]:
            return [row async for row in query(conn, filters, schema=schema)]

        rows = _run(config, fetch)
        typer.echo(show_text(rows), nl=False)

    @ledger.command()
    def export(
        config: ConfigOption = None,
        fmt: Annotated[
            ExportFormat, typer.Option("--format", help="jsonl or csv.")
        ] = ExportFormat.JSONL,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="File (default: stdout).")
        ] = None,
        agent: AgentOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        category: CategoryOption = None,
        action: ActionOption = None,
        approver: ApproverOption = None,
        request: RequestOption = None,
        limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    ) -> None:
        """Stream ledger entries, oldest first, as JSON lines or CSV (with a header).

        Example: pgguard ledger export --config pgguard.toml --format csv -o ledger.csv
        """
        filters = _filters(agent, since, until, category, action, approver, request, limit)

        try:
            out = sys.stdout if output is None else output.open("w", encoding="utf-8", newline="")
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc}") from None

        async def stream(conn: asyncpg.Connection, schema: str) -> int:
            return await _write_rows(
                out, fmt, query(conn, filters, schema=schema, newest_first=False)
            )

        try:
            count = _run(config, stream)
        finally:
            if output is not None:
                out.close()
        if output is not None:
            typer.echo(f"exported {count} entries to {output}", err=True)

    @ledger.command("verify")
    def verify_command(
        config: ConfigOption = None,
        public_key: Annotated[
            list[Path] | None,
            typer.Option(
                "--public-key",
                help="Ed25519 public key (PEM) the checkpoints are signed with; repeatable. "
                "Default: the public half of [ledger] signing_key_file.",
            ),
        ] = None,
        anchors: Annotated[
            list[Path] | None,
            typer.Option(
                "--anchors",
                help="Anchor file (JSON lines of signed checkpoints); repeatable. "
                "Default: [ledger] anchor_file, when it exists.",
            ),
        ] = None,
        hash_only: Annotated[
            bool,
            typer.Option(
                "--hash-only",
                help="Check the hash chain alone (which a database writer can recompute).",
            ),
        ] = False,
    ) -> None:
        """Recompute every hash chain and check it against the signed checkpoints; exit 1 and
        list the problems if anything was altered, inserted, deleted or cut off.

        Example: pgguard ledger verify --config pgguard.toml
        """
        settings = _settings(config)
        if hash_only:
            typer.echo(
                "warning: --hash-only: checkpoints are not checked, so a rewrite with recomputed "
                "hashes, a cut tail or a deleted chain goes unseen",
                err=True,
            )
            report = _run(settings, lambda conn, schema: verify(conn, schema=schema))
        else:
            keys = KeyRing(_public_keys(settings, public_key or []))
            anchored = _anchors(settings, anchors or [])
            grace = 2 * settings.ledger.checkpoint_seconds
            report = _run(
                settings,
                lambda conn, schema: verify(
                    conn, schema=schema, keys=keys, anchors=anchored, open_grace=grace
                ),
            )
        _print_report(report)
        if not report.ok:
            raise typer.Exit(1)


def _public_keys(settings: Settings, given: list[Path]) -> list[Ed25519PublicKey]:
    """The keys named on the command line, else the configured signing key's public half."""
    try:
        if given:
            return [load_public_key(path) for path in given]
        private = settings.ledger_signing_key_file()
        public = public_key_path(private)
        for candidate in (public, private):
            if candidate.exists():
                return [load_public_key(candidate)]
    except ConfigError as exc:
        raise _fail(exc.message) from None
    raise _fail(
        f"no public key to check the ledger's checkpoints with: neither {public} nor {private} "
        "exists; pass --public-key FILE (or --hash-only to check the hash chain alone)"
    )


def _anchors(settings: Settings, given: list[Path]) -> list[SignedCheckpoint] | None:
    """The checkpoints of the anchor files named, else of the configured one (None: none)."""
    paths = given
    if not given:
        configured = settings.ledger_anchor_file()
        if not configured.exists():
            typer.echo(
                f"warning: no anchor file ({configured} does not exist): a deleted chain, or a "
                "chain's tail deleted with its checkpoints, cannot be detected; pass --anchors",
                err=True,
            )
            return None
        paths = [configured]
    checkpoints: list[SignedCheckpoint] = []
    for path in paths:
        try:
            found, damaged = read_anchors(path)
        except OSError as exc:
            raise _fail(f"cannot read the anchor file {path}: {exc}") from None
        for line in damaged:
            typer.echo(f"warning: damaged anchor line, ignored: {line}", err=True)
        checkpoints += found
    return checkpoints


def _print_report(report: VerifyReport) -> None:
    for warning in report.warnings:
        typer.echo(f"warning: {_describe(warning)}", err=True)
    signed = f", {report.checkpoints} signed checkpoints" if report.signed else ""
    if report.other_ledgers:
        signed += f" ({report.other_ledgers} anchored ones of other ledgers set aside)"
    if report.ok:
        typer.echo(
            f"ledger verified: {report.entries} entries in {len(report.chains)} chains{signed}"
        )
        for chain_id, head in sorted(report.chains.items()):
            typer.echo(f"  {chain_id}: #{head.last_seq} head {head.head_hash}")
        return
    typer.echo(
        f"ledger NOT verified: {len(report.problems)} problem(s) in {report.entries} "
        f"entries{signed}",
        err=True,
    )
    for problem in report.problems:
        typer.echo(f"  {_describe(problem)}", err=True)


def _describe(problem: Problem) -> str:
    where = f"entry {problem.entry_id}"
    if problem.last_entry_id is not None and problem.last_entry_id != problem.entry_id:
        where = f"entries {problem.entry_id} .. {problem.last_entry_id}"
    return f"{problem.kind}: {where} ({problem.chain_id} #{problem.seq}): {problem.detail}"
