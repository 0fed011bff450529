"""How quickly a hold reaches Teams, and how quickly an approval releases the statement.

Runs an embedded PostgreSQL and pgguard (with a stand-in webhook) in this process, then, N times:
an agent sends a held statement (``CREATE TABLE ... AS SELECT clock_timestamp()``), the stand-in
webhook notes when the card arrives, an approver approves through the HTTP API at once, and the
timestamp PostgreSQL itself recorded tells when the statement reached the server. Runs are spaced
past the webhook's 4 posts/second rate limit. Prints median and p95 of: statement sent -> webhook
POST received, and approval sent -> statement executing.

    python bench/hold_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from pgguard.demo import StandInWebhook
from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.proxy import assembly
from pgguard.settings import Settings
from pgguard.statedb import setup
from pgguard.statedb.apply import apply

TOKEN = "bench-approver-token"


async def measure(runs: int) -> tuple[list[float], list[float]]:
    from rich.console import Console

    workdir = Path(tempfile.mkdtemp(prefix="pgguard-holdbench-"))
    pg = EmbeddedPostgres(workdir / "data")
    await asyncio.to_thread(pg.start)
    # The upstream role is a superuser: pgguard's state must live in another cluster.
    state_pg = EmbeddedPostgres(workdir / "statedata")
    await asyncio.to_thread(state_pg.start)
    plan = setup.StatePlan(password=setup.new_password())
    await apply(plan, state_pg.superuser_dsn())
    webhook = StandInWebhook(Console(quiet=True))
    url = await webhook.start()
    settings = Settings.load(
        listen={"host": "127.0.0.1", "port": 0},
        upstream={"dsn": pg.unix_dsn()},
        state={"dsn": setup.state_dsn(plan, parse_dsn(state_pg.superuser_dsn()))},
        agents=[{"name": "bench", "password": "bench-pw", "owner": "owner@example.com"}],
        approvers=[
            {"id": "dba", "name": "DBA", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
        ],
        http={"host": "127.0.0.1", "port": 0, "public_url": "https://pgguard.example.com"},
        teams={"webhook_url": url},
        ledger={"spool_dir": str(workdir / "spool")},
        log_level="WARNING",
    )
    running = await assembly.start(settings)
    to_webhook: list[float] = []
    to_server: list[float] = []
    try:
        conn = await asyncpg.connect(
            f"postgresql://bench:bench-pw@127.0.0.1:{running.proxy.port}/postgres"
        )
        async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as api:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            for i in range(runs):
                sent = time.time()
                statement = asyncio.create_task(
                    conn.execute(f"CREATE TABLE lat_{i} AS SELECT clock_timestamp() AS t")
                )
                card = await asyncio.wait_for(webhook.cards.get(), 10)
                carded = time.time()
                request_id = next(a["url"].rsplit("/", 1)[1] for a in card["actions"] if "url" in a)
                approving = time.time()
                await api.post(f"/api/requests/{request_id}/approve", json={}, headers=headers)
                await asyncio.wait_for(statement, 10)
                executed = await conn.fetchval(f"SELECT extract(epoch FROM t) FROM lat_{i}")
                with_follow_up = webhook.cards.get()
                await asyncio.wait_for(with_follow_up, 10)
                to_webhook.append(carded - sent)
                to_server.append(float(executed) - approving)
                # Let the webhook rate limit (4 posts/s, a requirement) pass, so the next
                # measurement is of the hold path, not of the limiter's spacing.
                await asyncio.sleep(0.3)
        await conn.close()
    finally:
        await running.stop(grace=1.0)
        await webhook.stop()
        await asyncio.to_thread(pg.destroy)
        await asyncio.to_thread(state_pg.destroy)
    return to_webhook, to_server


def report(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"{name:42s} median {statistics.median(ordered) * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    to_webhook, to_server = asyncio.run(measure(args.runs))
    print(f"{args.runs} held statements, each approved at once through the HTTP API")
    print(report("statement sent -> webhook POST received", to_webhook))
    print(report("approval sent -> statement executing", to_server))


if __name__ == "__main__":
    main()
