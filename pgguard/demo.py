"""``pgguard demo``: embedded PostgreSQL, pgguard, an agent, an approver and a stand-in Teams.

The set-up is the one the README recommends: agents act as a non-superuser upstream role
(``shop_app``, owner of the ``shop`` database), and pgguard keeps its state in a database of its
own, owned by its own role, that ``shop_app`` cannot connect to - created with the statements
``pgguard state init --apply`` runs.

Everything runs in this process and a temporary directory, and is torn down on exit or Ctrl-C:
the agent's ordinary statements pass, two privileged ones are held - the agent is told so at
once by a NOTICE naming the request; the stand-in webhook prints the card pgguard posts; a demo
approver approves one (through the real HTTP API) and denies the other; the agent sees each
outcome, with its DETAIL and HINT. Then a second agent, whose holds are in return mode, is
refused at once (55000), re-sends, and after the approval its statement runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.proxy import assembly
from pgguard.settings import Settings
from pgguard.statedb import setup
from pgguard.statedb.apply import apply

DEMO_AGENT = "demo-agent"
DEMO_PASSWORD = "demo-agent-password"
DEMO_DATABASE = "shop"
DEMO_OWNER = "alice@example.com"
DEMO_APPROVER_TOKEN = "demo-approver-token"
DEMO_UPSTREAM_ROLE = "shop_app"  # what agents act as upstream: not a superuser
DEMO_RETURN_AGENT = "demo-batch-agent"  # its holds are in return mode (hold_mode = "return")
DEMO_RETURN_PASSWORD = "demo-batch-agent-password"

SAMPLE_SCHEMA = """
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL, ssn text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (id serial PRIMARY KEY, title text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE orders (
    id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
    product_id int NOT NULL REFERENCES products, quantity int NOT NULL,
    ordered_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email, ssn) VALUES
    ('Ada Lovelace', 'ada@example.com', '123-45-6789'),
    ('Alan Turing', 'alan@example.org', '987-65-4321'),
    ('Grace Hopper', 'grace@example.net', '555-12-3456');
INSERT INTO products (title, price)
    VALUES ('keyboard', 49.90), ('monitor', 219.00), ('mouse', 19.50);
INSERT INTO orders (customer_id, product_id, quantity) VALUES (1, 2, 1), (2, 1, 2), (3, 3, 4);
"""


class StandInWebhook:
    """A local HTTP endpoint playing a Teams Workflows webhook: prints each card, answers 202."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.cards: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/workflows/demo"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            await self.cards.put(body["attachments"][0]["content"])
        writer.close()


async def run_demo(*, keep_running: bool = False) -> None:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-demo-"))
    pg = EmbeddedPostgres(workdir / "data")
    webhook = StandInWebhook(console)
    running: assembly.Running | None = None
    try:
        console.rule("[bold]pgguard demo")
        console.print("Starting an embedded PostgreSQL server ...")
        await asyncio.to_thread(pg.start)
        upstream_dsn = await asyncio.to_thread(_upstream, pg)
        state_dsn = await _state(console, pg)
        webhook_url = await webhook.start()
        settings = _settings(upstream_dsn, state_dsn, webhook_url, workdir)
        running = await assembly.start(settings)
        dsn = (
            f"postgresql://{DEMO_AGENT}:{DEMO_PASSWORD}@127.0.0.1:{running.proxy.port}"
            f"/{DEMO_DATABASE}"
        )
        console.print(f"pgguard is listening. The agent's DSN:\n  [bold cyan]{dsn}[/]")
        console.print(
            f"Approval API: {running.http_url}   (the agent never sees upstream credentials)\n"
        )
        await _agent_session(console, dsn, running.http_url, webhook)
        batch_dsn = dsn.replace(
            f"{DEMO_AGENT}:{DEMO_PASSWORD}", f"{DEMO_RETURN_AGENT}:{DEMO_RETURN_PASSWORD}"
        )
        await _return_mode(console, batch_dsn, running.http_url, webhook)
        await _show_ledger(console, running, state_dsn)
        if keep_running:
            console.print("\nThe proxy keeps running; connect with the DSN above. Ctrl-C stops it.")
            await asyncio.Event().wait()
        # A clean stop signs each chain's final checkpoint; then verify as an auditor would.
        stopping, running = running, None
        await stopping.stop(grace=1.0)
        await _verify_ledger(console, settings, state_dsn)
    finally:
        if running is not None:
            await running.stop(grace=1.0)
        await webhook.stop()
        await asyncio.to_thread(pg.destroy)
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("Demo finished; everything was shut down.")


def _upstream(pg: EmbeddedPostgres) -> str:
    """The shop database, owned by the non-superuser role agents act as; its DSN."""
    pg.psql(f"CREATE ROLE {DEMO_UPSTREAM_ROLE} LOGIN PASSWORD '{DEMO_UPSTREAM_ROLE}-password'")
    pg.psql(f"CREATE DATABASE {DEMO_DATABASE} OWNER {DEMO_UPSTREAM_ROLE}")
    pg.psql(f"SET ROLE {DEMO_UPSTREAM_ROLE};\n{SAMPLE_SCHEMA}", DEMO_DATABASE)
    return (
        f"postgresql://{DEMO_UPSTREAM_ROLE}:{DEMO_UPSTREAM_ROLE}-password@/{DEMO_DATABASE}"
        f"?host={pg.socket_dir}&port={pg.port}"
    )


async def _state(console: Console, pg: EmbeddedPostgres) -> str:
    """pgguard's own role and database, as ``pgguard state init --apply`` makes them."""
    plan = setup.StatePlan(password=setup.new_password(), upstream_roles=(DEMO_UPSTREAM_ROLE,))
    await apply(plan, pg.superuser_dsn())
    console.print(
        f"pgguard state init: role [bold]{plan.role}[/] owns database [bold]{plan.database}[/]; "
        f"the agents' upstream role {DEMO_UPSTREAM_ROLE} cannot connect to it"
    )
    return setup.state_dsn(plan, parse_dsn(pg.superuser_dsn()))


def _settings(upstream_dsn: str, state_dsn: str, webhook_url: str, workdir: Path) -> Settings:
    return Settings.load(
        listen={"host": "127.0.0.1", "port": 0},
        upstream={"dsn": upstream_dsn},
        state={"dsn": state_dsn},
        agents=[
            {
                "name": DEMO_AGENT,
                "password": DEMO_PASSWORD,
                "owner": DEMO_OWNER,
                "databases": [DEMO_DATABASE],
            },
            {
                "name": DEMO_RETURN_AGENT,
                "password": DEMO_RETURN_PASSWORD,
                "owner": DEMO_OWNER,
                "databases": [DEMO_DATABASE],
                "hold_mode": "return",
            },
        ],
        approvers=[
            {
                "id": "bob@example.com",
                "name": "Bob the DBA",
                "groups": ["dba"],
                "token_sha256": hashlib.sha256(DEMO_APPROVER_TOKEN.encode()).hexdigest(),
            }
        ],
        http={"host": "127.0.0.1", "port": 0, "public_url": "https://pgguard.example.com"},
        teams={"webhook_url": webhook_url},
        ledger={"spool_dir": str(workdir / "spool")},
        data_dir=str(workdir / "pgguard-data"),
        log_level="WARNING",
    )


async def _agent_session(console: Console, dsn: str, api_url: str, webhook: StandInWebhook) -> None:
    console.rule("scripted agent session")
    conn = await asyncpg.connect(dsn)
    conn.add_log_listener(lambda _conn, notice: _show_notice(console, notice))
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        console.print(f"agent connected through pgguard (upstream backend pid {pid})")
        rows = await conn.fetch(
            "SELECT c.name, p.title, o.quantity FROM orders o "
            "JOIN customers c ON c.id = o.customer_id JOIN products p ON p.id = o.product_id "
            "ORDER BY o.id"
        )
        table = Table("customer", "product", "quantity", title="agent: SELECT ... FROM orders")
        for row in rows:
            table.add_row(row["name"], row["title"], str(row["quantity"]))
        console.print(table)
        await conn.execute(
            "INSERT INTO orders (customer_id, product_id, quantity) VALUES ($1, $2, $3)", 1, 3, 2
        )
        console.print("agent: INSERT INTO orders ... -> allowed, ran at full speed\n")
        async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
            await _held(
                console,
                conn,
                api,
                webhook,
                approve=True,
                sql="COPY (SELECT name, email FROM customers WHERE email LIKE '%@example.com') "
                "TO STDOUT /* reason='monthly newsletter export' */",
            )
            await _held(console, conn, api, webhook, approve=False, sql="DROP TABLE orders")
        count = await conn.fetchval("SELECT count(*) FROM orders")
        console.print(f"\nthe orders table is intact ({count} rows)")
        console.print(
            "every decision is in the approval records: "
            f"GET {api_url}/api/requests (Bearer token of an approver)"
        )
    finally:
        await conn.close()


async def _held(
    console: Console,
    conn: asyncpg.Connection,
    api: httpx.AsyncClient,
    webhook: StandInWebhook,
    *,
    approve: bool,
    sql: str,
) -> None:
    console.rule(f"agent: {sql.split(' /*')[0][:70]}")
    statement = asyncio.create_task(conn.execute(sql))
    card = await asyncio.wait_for(webhook.cards.get(), 15)
    console.print(
        Panel(_card_text(card), title="card posted to the (stand-in) Teams webhook", expand=False)
    )
    headers = {"Authorization": f"Bearer {DEMO_APPROVER_TOKEN}"}
    pending = (await api.get("/api/requests", params={"state": "pending"}, headers=headers)).json()
    request_id = pending[0]["id"]
    console.print(f"the agent's session waits; request [bold]{request_id}[/] is pending")
    verb, body = (
        ("approve", {"reason": "newsletter is approved"})
        if approve
        else ("deny", {"reason": "dropping orders is never OK"})
    )
    response = await api.post(f"/api/requests/{request_id}/{verb}", json=body, headers=headers)
    console.print(
        f"Bob the DBA: POST /api/requests/{request_id}/{verb} -> "
        f"{response.status_code} {response.json()['state']}"
    )
    try:
        result = await asyncio.wait_for(statement, 15)
        console.print(f"agent: statement ran after approval -> [green]{result}[/]")
    except asyncpg.PostgresError as exc:
        _show_error(console, exc)
    with contextlib.suppress(asyncio.TimeoutError):
        follow_up = await asyncio.wait_for(webhook.cards.get(), 5)
        console.print(f"follow-up card: {_card_title(follow_up)}")


def _show_notice(console: Console, notice: asyncpg.PostgresLogMessage) -> None:
    """What the agent's driver hands it while it waits (asyncpg's log listener)."""
    console.print(
        f"agent's driver got [bold]NOTICE[/]: {notice.message}\n"
        f"  DETAIL: {notice.detail}\n  HINT: {notice.hint}"
    )


def _show_error(console: Console, exc: asyncpg.PostgresError) -> None:
    message = getattr(exc, "message", str(exc))
    console.print(
        f"agent: [yellow]refused[/] SQLSTATE {exc.sqlstate}: {message}\n"
        f"  DETAIL: {getattr(exc, 'detail', None)}\n  HINT: {getattr(exc, 'hint', None)}"
    )


async def _return_mode(console: Console, dsn: str, api_url: str, webhook: StandInWebhook) -> None:
    """An agent whose holds return at once: refused, re-sent, approved, run once."""
    sql = "CREATE INDEX orders_by_customer ON orders (customer_id)"
    console.rule(f"{DEMO_RETURN_AGENT} (hold_mode = return): {sql}")
    headers = {"Authorization": f"Bearer {DEMO_APPROVER_TOKEN}"}
    conn = await asyncpg.connect(dsn)
    try:
        request_id = ""
        for attempt in ("first send", "re-sent while pending"):
            try:
                await conn.execute(sql)
            except asyncpg.ObjectNotInPrerequisiteStateError as exc:
                console.print(f"{attempt}:")
                _show_error(console, exc)
                request_id = exc.message.split("request ")[1].split(" ")[0]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(webhook.cards.get(), 5)  # the request's card
        async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
            response = await api.post(
                f"/api/requests/{request_id}/approve",
                json={"reason": "index is fine"},
                headers=headers,
            )
        console.print(
            f"Bob the DBA: POST /api/requests/{request_id}/approve -> "
            f"{response.status_code} {response.json()['state']}"
        )
        result = await conn.execute(sql)
        console.print(f"re-sent after the approval -> [green]{result}[/] (it runs once)")
    finally:
        await conn.close()


def _card_text(card: dict[str, Any]) -> str:
    lines: list[str] = []
    for element in card.get("body", []):
        if element.get("type") == "TextBlock":
            lines.append(str(element.get("text", "")))
        elif element.get("type") == "FactSet":
            lines.extend(f"{f['title']}: {f['value']}" for f in element.get("facts", []))
        elif element.get("type") == "Container":
            lines.append(_card_text({"body": element.get("items", [])}))
    for action in card.get("actions", []):
        lines.append(f"[button] {action.get('title')} -> {action.get('url')}")
    return "\n".join(line for line in lines if line)


def _card_title(card: dict[str, Any]) -> str:
    for element in card.get("body", []):
        if element.get("type") == "TextBlock":
            return str(element.get("text", ""))
    return "(card)"


async def _show_ledger(console: Console, running: assembly.Running, state_dsn: str) -> None:
    """What an auditor finds afterwards: the ledger's entries."""
    if running.ledger is None:
        return
    await running.ledger.flush()
    console.rule("the ledger (what an auditor sees)")
    conn = await asyncpg.connect(state_dsn)
    try:
        rows = await conn.fetch(
            "SELECT kind, agent, action, statement, request_id, approvers, command_tag, sqlstate "
            "FROM pgguard.ledger WHERE kind IN ('statement', 'outcome') ORDER BY chain_id, seq"
        )
        table = Table("kind", "action", "statement (masked)", "request", "approver", "outcome")
        for row in rows:
            approvers = json.loads(row["approvers"]) if row["approvers"] else []
            who = ", ".join(str(a["name"]) for a in approvers)
            table.add_row(
                row["kind"],
                row["action"],
                (row["statement"] or "")[:48],
                row["request_id"] or "",
                who,
                row["sqlstate"] or row["command_tag"] or "",
            )
        console.print(table)
    finally:
        await conn.close()


async def _verify_ledger(console: Console, settings: Settings, state_dsn: str) -> None:
    """As `pgguard ledger verify --config` does: every chain against its signed checkpoints
    (the signing key's public half) and against the anchor file kept outside the database."""
    from pgguard.ledger import verify
    from pgguard.ledger.anchors import read_anchors
    from pgguard.ledger.checkpoint import KeyRing
    from pgguard.ledger.keys import load_public_key

    conn = await asyncpg.connect(state_dsn)
    try:
        keys = KeyRing([load_public_key(settings.ledger_signing_key_file())])
        anchors_file = settings.ledger_anchor_file()
        anchors = read_anchors(anchors_file)[0] if anchors_file.exists() else []
        report = await verify(
            conn,
            schema="pgguard",
            keys=keys,
            anchors=anchors,
            open_grace=2 * settings.ledger.checkpoint_seconds,
        )
        state = "[green]intact[/]" if report.ok else "[red]ALTERED[/]"
        console.print(
            f"pgguard ledger verify: {report.entries} entries, signed checkpoints: "
            f"{report.checkpoints}, hash chains {state}"
        )
    finally:
        await conn.close()
