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
import contextlib
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, TypeVar

import asyncpg
import orjson
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pgguard.errors import ConfigError
from pgguard.ledger.anchors import read_anchors
from pgguard.ledger.checkpoint import KeyRing, SignedCheckpoint
from pgguard.ledger.expander import Backlog, backlog
from pgguard.ledger.export import Sink, records, write
from pgguard.ledger.keys import load_public_key, public_key_path
from pgguard.ledger.problems import Problem
from pgguard.ledger.prune import prune
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


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    OCSF = "ocsf"


JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]


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


class _OutputError(Exception):
    """Writing the export failed (the reader of a pipe went away, a full disk)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Output:
    """The export's binary output: its errors become `_OutputError`, so they are not taken
    for the state database's."""

    def __init__(self, raw: Sink | BinaryIO) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        try:
            return self._raw.write(data)
        except OSError as exc:
            raise _OutputError(exc) from exc

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as exc:
            raise _OutputError(exc) from exc

    def close(self) -> None:
        close = getattr(self._raw, "close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()


def _stdout_bytes() -> Sink:
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stdout (some test runners)
        return _TextBytes()
    return buffer  # type: ignore[no-any-return]


class _TextBytes:
    def write(self, data: bytes) -> int:
        return sys.stdout.write(data.decode("utf-8"))

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        pass


def _filtered(filters: LedgerFilters) -> bool:
    return any(
        value is not None
        for value in (
            filters.agent,
            filters.since,
            filters.until,
            filters.category,
            filters.action,
            filters.approver,
            filters.request_id,
        )
    )


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

    try:
        return asyncio.run(main())
    except _OutputError as exc:
        if isinstance(exc.error, BrokenPipeError):
            _quiet_stdout()  # `ledger export | head`: the reader has what it wanted
            raise typer.Exit(0) from None
        raise _fail(f"cannot write the export: {exc.error}") from None


def _lag_line(waiting: Backlog) -> str:
    """How far the expansion of packs into indexed rows lags (see pgguard.ledger.expander)."""
    if not waiting.entries or waiting.oldest is None:
        return "index lag: none (every entry is in an indexed table)"
    age = (datetime.now(UTC) - waiting.oldest).total_seconds()
    return (
        f"index lag: {waiting.entries} entries in {waiting.packs} packs not expanded yet "
        f"(oldest stored {age:.1f} s ago); they are shown, read from the packs"
    )


def _outcome(row: LedgerRow) -> str:
    done = row.outcome
    if done is None:
        return str(row.entry.detail.get("reason", "")) if row.entry.kind == "auth_failure" else ""
    if done.sqlstate:
        return f"ERROR {done.sqlstate}"
    rows = f" ({done.rows} rows)" if done.rows is not None else ""
    return f"{done.command_tag or 'OK'}{rows}"


def _progress(label: str, total: int | None) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A rich progress bar on stderr when it is a terminal, else nothing: (update, stop)."""
    if not sys.stderr.isatty():
        return (lambda _done: None), (lambda: None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda done: bar.update(task, completed=done)), bar.stop


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


async def _estimated_entries(conn: asyncpg.Connection, schema: str) -> int | None:
    """The planner's row estimate of the ledger's tables (for a progress bar's total)."""
    quoted = f'"{schema}"'
    total = await conn.fetchval(
        "SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_class c "
        "WHERE c.oid IN (to_regclass($1), to_regclass($2))",
        f"{quoted}.ledger_entries",
        f"{quoted}.ledger_rows",
    )
    packed = await conn.fetchval(
        f"SELECT coalesce(sum(entries), 0)::bigint FROM {quoted}.ledger_packs"
    )
    return int(total or 0) + int(packed or 0) or None


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): stop writing there, without a traceback
    at exit when Python flushes it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def register(app: typer.Typer) -> None:
    ledger = typer.Typer(
        help="Read, export, verify and prune the query ledger.\n\n"
        "Example: pgguard ledger show -c pgguard.toml",
        no_args_is_help=True,
    )
    app.add_typer(ledger, name="ledger")
    _register_prune(ledger)

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
        as_json: JsonOption = False,
    ) -> None:
        """The newest ledger entries, one block each (fits 80 columns; ``--json``: the records
        and the index lag).

        Example: pgguard ledger show -c pgguard.toml --agent reporting --limit 20
        """
        filters = _filters(agent, since, until, category, action, approver, request, limit)

        async def fetch(conn: asyncpg.Connection, schema: str) -> tuple[list[LedgerRow], Backlog]:
            rows = [row async for row in query(conn, filters, schema=schema)]
            return rows, await backlog(conn, schema)

        rows, waiting = _run(config, fetch)
        if as_json:
            typer.echo(
                orjson.dumps(
                    {
                        "entries": [row.to_record() for row in rows],
                        "lag": {
                            "entries": waiting.entries,
                            "packs": waiting.packs,
                            "oldest": waiting.oldest.isoformat() if waiting.oldest else None,
                        },
                    },
                    option=orjson.OPT_SORT_KEYS,
                ).decode("utf-8")
            )
            return
        typer.echo(show_text(rows), nl=False)
        typer.echo(_lag_line(waiting), err=True)

    @ledger.command()
    def export(
        config: ConfigOption = None,
        fmt: Annotated[
            ExportFormat,
            typer.Option("--format", help="jsonl, csv or ocsf (OCSF Datastore Activity events)."),
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
        as_json: Annotated[
            bool, typer.Option("--json", help="The closing summary as JSON (on stderr).")
        ] = False,
    ) -> None:
        """Stream ledger entries, oldest first, as JSON lines, CSV (with a header) or OCSF JSON
        lines; constant memory, a progress bar when stderr is a terminal.

        Example: pgguard ledger export --config pgguard.toml --format csv -o ledger.csv
        """
        filters = _filters(agent, since, until, category, action, approver, request, limit)
        try:
            out = _Output(_stdout_bytes() if output is None else output.open("wb"))
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc}") from None
        began = time.monotonic()

        async def stream(conn: asyncpg.Connection, schema: str) -> int:
            total = limit if limit is not None and not _filtered(filters) else None
            if total is None and not _filtered(filters):
                total = await _estimated_entries(conn, schema)
            update, stop = _progress("export", total)
            try:
                rows = records(conn, filters, schema=schema, raw_json=fmt is ExportFormat.CSV)
                return await write(rows, out, fmt.value, progress=update)
            finally:
                stop()

        try:
            count = _run(config, stream)
        finally:
            if output is not None:
                out.close()
        seconds = time.monotonic() - began
        if as_json:
            summary = {
                "entries": count,
                "format": fmt.value,
                "output": str(output) if output else None,
                "seconds": round(seconds, 3),
            }
            typer.echo(orjson.dumps(summary).decode("utf-8"), err=True)
        elif output is not None:
            typer.echo(f"exported {count} entries to {output} in {seconds:.1f} s", err=True)

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
        as_json: JsonOption = False,
    ) -> None:
        """Recompute every hash chain and check it against the signed checkpoints; exit 1 and
        list the problems if anything was altered, inserted, deleted or cut off.

        Example: pgguard ledger verify --config pgguard.toml
        """
        settings = _settings(config)
        keys: KeyRing | None = None
        anchored: list[SignedCheckpoint] | None = None
        if hash_only:
            typer.echo(
                "warning: --hash-only: checkpoints are not checked, so a rewrite with recomputed "
                "hashes, a cut tail or a deleted chain goes unseen",
                err=True,
            )
        else:
            keys = KeyRing(_public_keys(settings, public_key or []))
            anchored = _anchors(settings, anchors or [])
        grace = 2 * settings.ledger.checkpoint_seconds
        began = time.monotonic()

        async def check(conn: asyncpg.Connection, schema: str) -> VerifyReport:
            update, stop = _progress("verify", await _estimated_entries(conn, schema))
            try:
                return await verify(
                    conn,
                    schema=schema,
                    keys=keys,
                    anchors=anchored,
                    open_grace=grace,
                    progress=update,
                )
            finally:
                stop()

        report = _run(settings, check)
        if as_json:
            typer.echo(_report_json(report, time.monotonic() - began))
        else:
            _print_report(report)
        if not report.ok:
            raise typer.Exit(1)


def _register_prune(ledger: typer.Typer) -> None:
    @ledger.command("prune")
    def prune_command(
        config: ConfigOption = None,
        before: Annotated[
            str | None,
            typer.Option(
                "--before",
                help="Remove entries received before this time (ISO 8601; UTC if no zone). "
                "Default: now minus [ledger] retention_days.",
            ),
        ] = None,
        public_key: Annotated[
            list[Path] | None,
            typer.Option(
                "--public-key",
                help="Public key(s) the checkpoints are signed with (a chain is only cut at a "
                "checkpoint that verifies). Default: the public half of signing_key_file.",
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Show the cuts; delete nothing.")
        ] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Remove old entries, chain by chain, up to the newest signed checkpoint before
        --before; the checkpoint stays, so `verify` still proves every entry after the cut.

        Example: pgguard ledger prune -c pgguard.toml --before 2026-01-01 --dry-run
        """
        settings = _settings(config)
        cutoff = _time(before, "--before")
        if cutoff is None:
            days = settings.ledger.retention_days
            if days is None:
                raise _fail("--before DATE is required ([ledger] retention_days is not set)")
            cutoff = datetime.now(UTC) - timedelta(days=days)
        keys = KeyRing(_public_keys(settings, public_key or []))
        cuts = _run(
            settings,
            lambda conn, schema: prune(
                conn, schema=schema, before=cutoff, keys=keys, dry_run=dry_run
            ),
        )
        if as_json:
            typer.echo(
                orjson.dumps(
                    {
                        "before": cutoff.isoformat(),
                        "dry_run": dry_run,
                        "cuts": [
                            {
                                "chain_id": c.chain_id,
                                "seq": c.seq,
                                "head_entry_id": c.head_entry_id,
                                "removed": c.removed,
                            }
                            for c in cuts
                        ],
                    }
                ).decode("utf-8")
            )
            return
        verb = "would cut" if dry_run else "cut"
        for c in cuts:
            removed = "" if dry_run else f", {c.removed} entries removed"
            typer.echo(f"{verb} {c.chain_id} at signed checkpoint #{c.seq}{removed}")
        total = sum(c.removed for c in cuts)
        typer.echo(
            f"{len(cuts)} chain(s) {verb} before {cutoff.isoformat()}"
            + ("" if dry_run else f"; {total} entries removed")
        )


def _report_json(report: VerifyReport, seconds: float) -> str:
    def problem(p: Problem) -> dict[str, object]:
        return {
            "kind": p.kind,
            "entry_id": p.entry_id,
            "chain_id": p.chain_id,
            "seq": p.seq,
            "detail": p.detail,
            "last_entry_id": p.last_entry_id,
            "last_seq": p.last_seq,
            "count": p.count,
        }

    return orjson.dumps(
        {
            "ok": report.ok,
            "entries": report.entries,
            "seconds": round(seconds, 3),
            "signed": report.signed,
            "checkpoints": report.checkpoints,
            "other_ledgers": report.other_ledgers,
            "chains": {
                chain_id: {
                    "entries": head.entries,
                    "last_seq": head.last_seq,
                    "head_hash": head.head_hash,
                }
                for chain_id, head in sorted(report.chains.items())
            },
            "pruned": {
                chain_id: {"seq": cut.seq, "removed": cut.removed}
                for chain_id, cut in sorted(report.pruned.items())
            },
            "problems": [problem(p) for p in report.problems],
            "warnings": [problem(p) for p in report.warnings],
        }
    ).decode("utf-8")


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
    for chain_id, cut in sorted(report.pruned.items()):
        when = cut.pruned_at.isoformat() if cut.pruned_at else "?"
        asked = cut.before.isoformat() if cut.before else "?"
        typer.echo(
            f"pruned: {chain_id} #1..#{cut.seq} ({cut.removed} entries, before {asked}, at "
            f"{when}){'' if report.signed else ' - the cut is taken on trust without keys'}",
            err=True,
        )
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
