"""Operations endpoints: ``/healthz``, ``/readyz``, ``/metrics`` and ``POST /api/reload``.

* ``GET /healthz``: 200 ``{"status": "ok"}`` while the process serves HTTP (liveness only).
* ``GET /readyz``: 200 ``{"status": "ready", "checks": {...}}`` only when the upstream and the state
  database (when pgguard keeps state) each answer ``SELECT 1`` within `READY_TIMEOUT` seconds and
  the ledger's spool is within ``[ledger] spool_limit_bytes``; otherwise 503 with
  ``{"status": "unready" | "waiting", "failed": [names], "checks": {name: why}}``. While
  ``pgguard serve`` is still waiting for its databases at start-up, the answer is 503 ``waiting``.
* ``GET /metrics``: Prometheus text format (`pgguard.metrics`). Unauthenticated, like /readyz:
  labels carry configured names and codes only, never statement text or values.
* ``POST /api/reload``: an approver (``Authorization: Bearer``) asks for the configuration to be
  re-read (`pgguard reload`); 200 ``{"reloaded": true, ...}`` or 409 with why it was kept.

Probes never run on the statement path; each opens its own connection and closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

import asyncpg
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry

from pgguard.metrics import CONTENT_TYPE, exposition, spool_bytes
from pgguard.settings import Settings
from pgguard.statedb.probe import connect_upstream, uses_state
from pgguard.web.auth import ApproverDirectory

READY_TIMEOUT = 2.0  # seconds each probe may take: a readiness check must answer quickly
# /readyz needs no credentials, and each probe opens a connection to the upstream and the state
# database: callers share one probe in flight and its answer for this long, so a flood of
# requests costs the databases at most one connection each per interval.
READY_CACHE_SECONDS = 1.0


@dataclass
class ReloadResult:
    reloaded: bool
    message: str
    restart_needed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "reloaded": self.reloaded,
            "message": self.message,
            "restart_needed": self.restart_needed,
        }


@dataclass
class Ops:
    """What the operations endpoints read; `settings` follows reloads."""

    settings: Settings
    registry: CollectorRegistry | None = None
    waiting: str | None = None  # set while start-up waits for a database: why
    reload: Callable[[], Awaitable[ReloadResult]] | None = None
    approvers: Callable[[], ApproverDirectory] | None = None
    probes: int = 0  # probe rounds run (not answered from the shared result)
    _probing: asyncio.Future[tuple[bool, dict[str, str]]] | None = field(default=None, repr=False)
    _answered: tuple[float, tuple[bool, dict[str, str]]] | None = field(default=None, repr=False)


async def readiness(ops: Ops) -> tuple[bool, dict[str, str]]:
    """Every check by name: "ok" or why it failed. Concurrent callers share one probe round,
    and its answer for `READY_CACHE_SECONDS`."""
    if ops.waiting is not None:
        return False, {"startup": ops.waiting}
    loop = asyncio.get_running_loop()
    if ops._answered is not None and loop.time() - ops._answered[0] < READY_CACHE_SECONDS:
        return ops._answered[1]
    if ops._probing is None:
        ops._probing = loop.create_task(_probe_round(ops))
    probing = ops._probing
    try:
        # shield: one caller going away must not cancel the round the others wait on
        answer = await asyncio.shield(probing)
    finally:
        if probing.done() and ops._probing is probing:
            ops._probing = None
    ops._answered = (loop.time(), answer)
    return answer


async def _probe_round(ops: Ops) -> tuple[bool, dict[str, str]]:
    ops.probes += 1
    settings = ops.settings
    probes: dict[str, Awaitable[str]] = {"upstream": _probe_upstream(settings)}
    if uses_state(settings):
        probes["state"] = _probe_state(settings)
    names = list(probes)
    results = await asyncio.gather(*probes.values())
    checks = dict(zip(names, results, strict=True))
    if settings.ledger.enabled:
        used = spool_bytes(settings.ledger.spool_dir)
        limit = settings.ledger.spool_limit_bytes
        checks["ledger_spool"] = (
            "ok" if used <= limit else f"{used} bytes spooled, over the limit of {limit}"
        )
    return all(v == "ok" for v in checks.values()), checks


async def _probe_upstream(settings: Settings) -> str:
    async def probe() -> None:
        conn = await connect_upstream(settings.upstream)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()

    return await _timed(probe())


async def _probe_state(settings: Settings) -> str:
    async def probe() -> None:
        conn = await asyncpg.connect(
            settings.state_dsn(),
            timeout=READY_TIMEOUT,
            server_settings={"application_name": "pgguard-readiness"},
        )
        try:
            await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()

    return await _timed(probe())


async def _timed(probe: Awaitable[None]) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await probe
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT:g} s"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        return f"SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__
    return "ok"


def not_up_yet(reason: str) -> bool:
    """Whether a failed probe looks like a server that is not up yet (worth waiting for): no
    connection, no answer, or SQLSTATE class 08 (connection) or 57 (e.g. 57P03, starting up).
    A refused login or a missing database will not fix itself: no waiting for those."""
    if not reason.startswith("SQLSTATE "):
        return True
    return reason.removeprefix("SQLSTATE ")[:2] in ("08", "57")


def register_ops(app: FastAPI, ops: Ops) -> None:
    """Add the operations endpoints to ``app`` (the approval API's app, or one of its own)."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, checks = await readiness(ops)
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        status = "waiting" if ops.waiting is not None else "unready"
        failed = [name for name, why in checks.items() if why != "ok"]
        return JSONResponse({"status": status, "failed": failed, "checks": checks}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if ops.registry is None:
            raise HTTPException(503, "metrics are not available yet")
        return Response(exposition(ops.registry), media_type=CONTENT_TYPE)

    @app.post("/api/reload")
    async def reload(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        if ops.reload is None or ops.approvers is None:
            raise HTTPException(503, "reload is not available yet")
        scheme, _, token = (authorization or "").partition(" ")
        directory = ops.approvers()
        if scheme.lower() != "bearer" or directory.by_token(token.strip()) is None:
            raise HTTPException(
                401, "unknown or missing approver token", headers={"WWW-Authenticate": "Bearer"}
            )
        result = await ops.reload()
        return JSONResponse(result.to_json(), status_code=200 if result.reloaded else 409)


def ops_app(ops: Ops) -> FastAPI:
    """The operations endpoints alone: before start-up completes, or without approvals."""
    app = FastAPI(title="pgguard", docs_url=None, redoc_url=None, openapi_url=None)
    register_ops(app, ops)
    return app
