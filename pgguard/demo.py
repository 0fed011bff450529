"""``pgguard demo``: embedded PostgreSQL, the proxy, and a scripted agent session through it.

Everything runs in this process and a temporary directory, and is torn down on exit or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.table import Table

from pgguard.embedded import EmbeddedPostgres
from pgguard.proxy.assembly import load_engine
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.proxy.server import ProxyServer
from pgguard.settings import Settings

DEMO_AGENT = "demo-agent"
DEMO_PASSWORD = "demo-agent-password"
DEMO_DATABASE = "shop"

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


async def run_demo(*, keep_running: bool = False) -> None:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-demo-"))
    pg = EmbeddedPostgres(workdir / "data")
    server: ProxyServer | None = None
    try:
        console.rule("[bold]pgguard demo")
        console.print("Starting an embedded PostgreSQL server ...")
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(pg.psql, f"CREATE DATABASE {DEMO_DATABASE}")
        await asyncio.to_thread(pg.psql, SAMPLE_SCHEMA, DEMO_DATABASE)
        settings = Settings.load(
            listen={"host": "127.0.0.1", "port": 0},
            upstream={"dsn": pg.unix_dsn(dbname=DEMO_DATABASE)},
            agents=[
                {
                    "name": DEMO_AGENT,
                    "password": DEMO_PASSWORD,
                    "owner": "alice@example.com",
                    "databases": [DEMO_DATABASE],
                }
            ],
        )
        server = ProxyServer(settings, PolicyGate(load_engine(settings)))
        await server.start()
        dsn = f"postgresql://{DEMO_AGENT}:{DEMO_PASSWORD}@127.0.0.1:{server.port}/{DEMO_DATABASE}"
        console.print(f"pgguard is listening. The agent's DSN:\n  [bold cyan]{dsn}[/]")
        console.print("(the agent never sees the upstream credentials)\n")
        await _agent_session(console, dsn)
        if keep_running:
            console.print("\nThe proxy keeps running; connect with the DSN above. Ctrl-C stops it.")
            await asyncio.Event().wait()
    finally:
        if server is not None:
            await server.shutdown(grace=1.0)
        await asyncio.to_thread(pg.destroy)
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("Demo finished; everything was shut down.")


async def _agent_session(console: Console, dsn: str) -> None:
    console.rule("scripted agent session")
    conn = await asyncpg.connect(dsn)
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
        count = await conn.fetchval("SELECT count(*) FROM orders")
        console.print(f"agent: INSERT INTO orders ... -> allowed; orders now {count}")
        for statement in (
            "COPY (SELECT name, email, ssn FROM customers) TO STDOUT",
            "DROP TABLE orders",
        ):
            try:
                await conn.execute(statement)
                console.print(f"agent: {statement} -> [red]ran[/] (it should not have)")
            except asyncpg.PostgresError as exc:
                console.print(
                    f"agent: {statement}\n  -> [yellow]stopped by pgguard[/] "
                    f"(SQLSTATE {exc.sqlstate}): {exc}"
                )
        still = await conn.fetchval("SELECT count(*) FROM orders")
        console.print(f"the orders table is intact ({still} rows); the customers' SSNs never left")
    finally:
        await conn.close()
