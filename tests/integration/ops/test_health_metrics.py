"""/healthz, /readyz and /metrics of a running pgguard, against real databases that stop.

The upstream and the state database are reached through relays (`Forwarder`) switched off to
stop them; the statements are real (asyncpg through the proxy), the approvals real HTTP calls.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgguard.logs import JsonFormatter
from tests.integration.holds.helpers import auth, wait_for_request
from tests.integration.ops.forwarder import Forwarder
from tests.support import PgguardThread

METRIC_NAMES = (
    "pgguard_statements_total",
    "pgguard_sessions",
    "pgguard_holds_pending",
    "pgguard_hold_wait_seconds",
    "pgguard_approval_decisions_total",
    "pgguard_ledger_queue_entries",
    "pgguard_ledger_spool_bytes",
    "pgguard_errors_total",
    "pgguard_classify_seconds",
    "pgguard_upstream_connect_seconds",
)


async def scrape(api: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_ready(api: httpx.AsyncClient, code: int) -> httpx.Response:
    async with asyncio.timeout(20):
        while True:
            response = await api.get("/readyz")
            if response.status_code == code:
                return response
            await asyncio.sleep(0.2)


async def test_ready_when_everything_answers(ops_api: httpx.AsyncClient) -> None:
    assert (await ops_api.get("/healthz")).json() == {"status": "ok"}
    response = await wait_ready(ops_api, 200)
    assert response.json() == {
        "status": "ready",
        "checks": {"upstream": "ok", "state": "ok", "ledger_spool": "ok"},
    }


async def test_readyz_503_while_the_upstream_is_stopped(
    ops_api: httpx.AsyncClient, upstream_relay: Forwarder
) -> None:
    upstream_relay.off()
    try:
        response = await wait_ready(ops_api, 503)
        body = response.json()
        assert body["status"] == "unready"
        assert body["failed"] == ["upstream"]
        assert body["checks"]["state"] == "ok"
        assert (await ops_api.get("/healthz")).status_code == 200  # the process still serves
    finally:
        upstream_relay.on()
    await wait_ready(ops_api, 200)


async def test_readyz_503_while_the_state_database_is_stopped(
    ops_api: httpx.AsyncClient, state_relay: Forwarder
) -> None:
    state_relay.off()
    try:
        body = (await wait_ready(ops_api, 503)).json()
        assert body["failed"] == ["state"]
        assert body["checks"]["upstream"] == "ok"
    finally:
        state_relay.on()
    await wait_ready(ops_api, 200)


async def test_every_metric_is_exposed(ops_api: httpx.AsyncClient) -> None:
    text = (await ops_api.get("/metrics")).text
    for name in METRIC_NAMES:
        assert f"# HELP {name} " in text, name


async def test_metrics_move_as_statements_pass_and_holds_are_decided(
    ops_pgguard: PgguardThread, ops_api: httpx.AsyncClient
) -> None:
    before = await scrape(ops_api)
    conn = await asyncpg.connect(ops_pgguard.dsn())
    # A text no cache can answer yet (pgguard_classify_seconds observes only those).
    unseen = f'SELECT count(*) AS "n_{uuid.uuid4().hex}" FROM reload_t'
    try:
        assert await conn.fetchval(unseen) == 1
        during = await scrape(ops_api)
        assert value(during, "pgguard_sessions", agent="agent") >= 1
        assert value(during, "pgguard_statements_total", action="allow", category="none") > value(
            before, "pgguard_statements_total", action="allow", category="none"
        )
        assert value(during, "pgguard_classify_seconds_count") > value(
            before, "pgguard_classify_seconds_count"
        )
        assert value(during, "pgguard_upstream_connect_seconds_count") > value(
            before, "pgguard_upstream_connect_seconds_count"
        )
        # The same text again is answered by the cache: counted, not timed.
        assert await conn.fetchval(unseen) == 1
        again = await scrape(ops_api)
        assert value(again, "pgguard_statements_total", action="allow", category="none") > value(
            during, "pgguard_statements_total", action="allow", category="none"
        )
        assert value(again, "pgguard_classify_seconds_count") == value(
            during, "pgguard_classify_seconds_count"
        )
        # A hold: pending while it waits, then approved through the API.
        held = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(ops_api, "hold_t")
        waiting = await scrape(ops_api)
        assert value(waiting, "pgguard_holds_pending") == 1
        assert value(waiting, "pgguard_statements_total", action="hold", category="ddl") > value(
            before, "pgguard_statements_total", action="hold", category="ddl"
        )
        answer = await ops_api.post(
            f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
        )
        assert answer.status_code == 200
        assert await asyncio.wait_for(held, 10) == "DROP TABLE"
        after = await scrape(ops_api)
        assert value(after, "pgguard_holds_pending") == 0
        assert (
            value(after, "pgguard_approval_decisions_total", verdict="approve", channel="api")
            == value(before, "pgguard_approval_decisions_total", verdict="approve", channel="api")
            + 1
        )
        assert (
            value(after, "pgguard_hold_wait_seconds_count", outcome="approved")
            == value(before, "pgguard_hold_wait_seconds_count", outcome="approved") + 1
        )
        # A refusal is an ErrorResponse: counted by its SQLSTATE.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELEKT 1")  # unparseable: denied
        refused = await scrape(ops_api)
        assert value(refused, "pgguard_errors_total", sqlstate="42501") > value(
            before, "pgguard_errors_total", sqlstate="42501"
        )
    finally:
        await conn.close()


MARKER = "zq-secret-marker-4711"


async def test_decision_log_lines_name_the_request_and_never_a_value(
    ops_pgguard: PgguardThread, ops_api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = await asyncpg.connect(ops_pgguard.dsn())
    try:
        held = asyncio.create_task(
            conn.execute(f"COPY (SELECT * FROM hold_t WHERE email = '{MARKER}') TO STDOUT")
        )
        request = await wait_for_request(ops_api, "hold_t")
        answer = await ops_api.post(
            f"/api/requests/{request['id']}/deny", json={"reason": "no"}, headers=auth("dba1")
        )
        assert answer.status_code == 200
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(held, 10)
    finally:
        await conn.close()
    decisions = [r for r in caplog.records if getattr(r, "event", None) == "decision"]
    mine = [r for r in decisions if getattr(r, "request_id", None) == request["id"]]
    assert [getattr(r, "decision", None) for r in mine] == ["hold", "denied"]
    for record in mine:
        assert getattr(record, "agent", None) == "agent"
        assert getattr(record, "rule_ids", None) == ["default.hold-export"]
        assert getattr(record, "fingerprint", "")  # libpg_query's, literals removed
    formatter = JsonFormatter()
    for record in caplog.records:  # every line pgguard logged meanwhile, in both formats
        assert MARKER not in record.getMessage()
        assert MARKER not in formatter.format(record)


async def test_reload_needs_an_approver_token(ops_api: httpx.AsyncClient) -> None:
    assert (await ops_api.post("/api/reload")).status_code == 401
    wrong = {"Authorization": "Bearer not-a-token"}
    assert (await ops_api.post("/api/reload", headers=wrong)).status_code == 401
    response = await ops_api.post("/api/reload", headers=auth("dba1"))
    assert response.status_code == 200
    assert response.json()["reloaded"] is True


async def test_a_readyz_flood_shares_one_probe(
    ops_pgguard: PgguardThread, ops_api: httpx.AsyncClient
) -> None:
    """/readyz needs no token and each probe opens database connections: 50 anonymous calls at
    once must not open 50 upstream connections (agents' slots) - they share one probe round."""
    ops = ops_pgguard.running.ops
    await asyncio.sleep(1.1)  # past the shared answer's lifetime
    before = ops.probes
    responses = await asyncio.gather(*(ops_api.get("/readyz") for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert ops.probes - before <= 2
