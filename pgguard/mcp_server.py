"""pgguard's MCP door for agents (issue 21): the `pgguard.mcp_tools` tools over MCP.

Owns: `build_server` (an ``mcp`` SDK server with ``check_statement``, ``request_approval``,
``request_status`` and ``my_requests``), `run_stdio` (``pgguard mcp --agent NAME``, the agent
proved by ``PGGUARD_AGENT_PASSWORD``) and `McpHttp` (streamable HTTP at ``{public_url}/mcp``
in pgguard's web app, each request authenticated by HTTP Basic with the agent's own name and
pgguard password).

Invariants: a tool call acts as the agent its transport authenticated - the stdio process's
``--agent``, or the Basic credentials of that very HTTP request - never as an argument the
caller chose; an approver's credentials (bearer tokens, page sessions) open nothing here; a
wrong or missing password is a 401 before any MCP message is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pgguard.errors import ConfigError, PgGuardError
from pgguard.mcp_tools import AgentTools, RequestStateName, ToolRefusal, agent_password_ok

log = logging.getLogger(__name__)

PASSWORD_ENV = "PGGUARD_AGENT_PASSWORD"
AGENT_SCOPE_KEY = "pgguard.agent"  # set by the Basic-auth wrapper on each HTTP request
INSTRUCTIONS = (
    "pgguard guards this agent's PostgreSQL access. check_statement tells what pgguard would do "
    "with a SQL text (allow, hold for human approval, deny) without running it; "
    "request_approval opens a request ahead of time whose approval lets that exact text run "
    "once; request_status and my_requests follow your requests."
)

AgentOf = Callable[[Context[Any, Any]], str]
T = TypeVar("T")


def build_server(tools: AgentTools, agent_of: AgentOf) -> MCPServer[Any]:
    """The MCP server; ``agent_of`` names the authenticated agent of a call."""
    server = _quiet_server()

    @server.tool()
    def check_statement(sql: str, ctx: Context[Any, Any], database: str = "") -> dict[str, Any]:
        """What pgguard would do with this SQL text (allow/hold/deny, categories, rule ids,
        masked text), without running it."""
        return _guarded(lambda: tools.check_statement(agent_of(ctx), sql, database or None))

    @server.tool()
    async def request_approval(
        sql: str, reason: str, ctx: Context[Any, Any], database: str = ""
    ) -> dict[str, Any]:
        """Open an approval request ahead of time; once approved, sending exactly this SQL
        text runs it once. Returns the request (id, state, page)."""
        agent = agent_of(ctx)
        return await _guarded_async(tools.request_approval(agent, sql, reason, database or None))

    @server.tool()
    async def request_status(id: str, ctx: Context[Any, Any]) -> dict[str, Any]:
        """One of your approval requests: state, decisions and comments, expiry."""
        return await _guarded_async(tools.request_status(agent_of(ctx), id))

    @server.tool()
    async def my_requests(
        ctx: Context[Any, Any], state: RequestStateName | None = None
    ) -> dict[str, Any]:
        """Your approval requests, newest first (optionally only those in one state)."""
        found = await _guarded_async(tools.my_requests(agent_of(ctx), state))
        return {"requests": found}

    return server


def _quiet_server() -> MCPServer[Any]:
    """The SDK's server, without the logging set-up its constructor does (a root handler at
    INFO when none is configured): pgguard's own logging configuration stays in charge."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return MCPServer("pgguard", instructions=INSTRUCTIONS)
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _guarded(call: Callable[[], T]) -> T:
    """A refusal the agent reads as the tool's error (and nothing of pgguard's internals)."""
    try:
        return call()
    except (ToolRefusal, PgGuardError) as exc:
        raise ToolError(str(exc)) from None


async def _guarded_async(call: Awaitable[T]) -> T:
    try:
        return await call
    except (ToolRefusal, PgGuardError) as exc:
        raise ToolError(str(exc)) from None


# --- stdio: pgguard mcp --agent NAME -----------------------------------------------------------


def stdio_agent(tools: AgentTools, agent: str, environ: dict[str, str] | None = None) -> str:
    """The agent a stdio server acts as, once its password (from the environment) is proved."""
    password = (environ if environ is not None else dict(os.environ)).get(PASSWORD_ENV, "")
    if not password:
        raise ConfigError(f"set {PASSWORD_ENV} to the password of agent {agent}")
    if not agent_password_ok(tools.agents.get(agent), password):
        raise ConfigError(f"agent {agent}: unknown agent or wrong {PASSWORD_ENV}")
    return agent


async def run_stdio(tools: AgentTools, agent: str) -> None:
    proven = stdio_agent(tools, agent)
    await build_server(tools, lambda _ctx: proven).run_stdio_async()


# --- streamable HTTP in pgguard's web app -------------------------------------------------------


def _agent_of_request(ctx: Context[Any, Any]) -> str:
    request = ctx.request_context.request
    agent = getattr(request, "scope", {}).get(AGENT_SCOPE_KEY)
    if not isinstance(agent, str):  # the Basic-auth wrapper always sets it: fail closed
        raise ToolError("not authenticated")
    return agent


class AgentBasicAuth:
    """ASGI wrapper: HTTP Basic with an agent's own name and pgguard password, or 401.

    Each check costs a PBKDF2 (the SCRAM verifier's iterations) in a worker thread; at most
    ``MAX_CHECKS`` run at once, so a flood of guesses queues instead of taking every core."""

    MAX_CHECKS = 2

    def __init__(self, app: StreamableHTTPASGIApp, tools: AgentTools) -> None:
        self.app = app
        self.tools = tools
        self._checks = asyncio.Semaphore(self.MAX_CHECKS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        agent = await self._agent(scope)
        if agent is None:
            await _unauthorized(send)
            return
        await self.app({**scope, AGENT_SCOPE_KEY: agent}, receive, send)

    async def _agent(self, scope: Scope) -> str | None:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        agent = self.tools.agents.get(name)
        async with self._checks:  # PBKDF2 off the loop: every agent session shares it
            ok = await asyncio.to_thread(agent_password_ok, agent, password)
        return name if ok else None


async def _unauthorized(send: Send) -> None:
    body = b'{"error": "HTTP Basic authentication with an agent\'s pgguard credentials needed"}'
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b'Basic realm="pgguard mcp", charset="UTF-8"'),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class McpHttp:
    """The streamable-HTTP MCP endpoint and its session manager's life."""

    PATH = "/mcp"

    def __init__(self, tools: AgentTools, public_url: str, host: str) -> None:
        self.server = build_server(tools, _agent_of_request)
        self.server.streamable_http_app(
            streamable_http_path=self.PATH,
            stateless_http=True,
            json_response=True,
            transport_security=_transport_security(public_url, host),
        )
        self.route = Route(
            self.PATH,
            endpoint=AgentBasicAuth(StreamableHTTPASGIApp(self.server.session_manager), tools),
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def mount(self, routes: list[Any]) -> None:
        routes.insert(0, self.route)

    async def start(self) -> None:
        started = asyncio.Event()
        self._task = asyncio.create_task(self._run(started), name="mcp-http")
        await started.wait()

    async def _run(self, started: asyncio.Event) -> None:
        async with self.server.session_manager.run():
            started.set()
            await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


def _transport_security(public_url: str, host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection: the public host and the local names only."""
    hosts = {"127.0.0.1:*", "localhost:*", "[::1]:*", f"{host}:*"}
    origins = {"http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"}
    if public_url:
        parts = urlsplit(public_url)
        hosts.update({parts.netloc, f"{parts.hostname}:*"})
        origins.add(f"{parts.scheme}://{parts.netloc}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=sorted(hosts),
        allowed_origins=sorted(origins),
    )
