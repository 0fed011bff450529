"""What an agent may ask pgguard about its statements and requests, transport aside (issue 21).

Owns: `AgentTools` - ``check_statement`` (what pgguard would do with a text: allow, hold or
deny, its categories and rule ids, the text masked; nothing runs), ``request_approval`` (open a
request ahead of time: its approval lets that exact text run once, `pgguard.proxy.returned`),
``request_status`` and ``my_requests``; and `agent_password_ok` (an agent's own pgguard
password against its configured SCRAM verifier). `pgguard.mcp_server` puts these behind MCP.

Invariants: every call acts as one agent that proved its own pgguard password (never an
approver's token). An agent only ever sees its own requests: another agent's request id answers
exactly as an unknown one does. Statement text leaves here masked only; no SQL is ever run.
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass, field
from typing import Literal

from pgguard.approvals.model import ApprovalRequest, RequestState
from pgguard.approvals.service import ApprovalService
from pgguard.masking import MaskingRules, mask_sql, mask_text
from pgguard.policy import Context, Decision, PolicyEngine
from pgguard.proxy.gate import SqlEvent
from pgguard.proxy.hold_notices import page_url
from pgguard.proxy.holds import new_request
from pgguard.proxy.returned import returned_request
from pgguard.settings import AgentSettings, Settings
from pgguard.wire.scram import Verifier

MCP_SESSION = "mcp"  # the session id of requests asked over MCP (there is no wire session)
_UNKNOWN_AGENT = Verifier.from_password("pgguard: no such agent")  # equal work for unknown names


def agent_password_ok(agent: AgentSettings | None, password: str) -> bool:
    """True when ``password`` is ``agent``'s own pgguard password (constant work either way)."""
    verifier = agent.verifier() if agent is not None else _UNKNOWN_AGENT
    candidate = Verifier.from_password(password, salt=verifier.salt, iterations=verifier.iterations)
    return hmac.compare_digest(candidate.stored_key, verifier.stored_key) and agent is not None


@dataclass(slots=True)
class _RequestSession:
    """The `SessionView` of a request asked over MCP: default lexing, no wire session."""

    agent: str
    owner: str
    database: str
    client_address: str = "mcp"
    application_name: str = "pgguard mcp"
    session_id: str = MCP_SESSION
    txn_status: bytes = b"I"
    server_parameters: dict[str, str] = field(
        default_factory=lambda: {"standard_conforming_strings": "on", "client_encoding": "UTF8"}
    )
    startup_parameters: list[tuple[str, str]] = field(default_factory=list)
    parameters_version: int = 0
    ready_count: int = 0
    replies_owed: int = 0
    gate_state: object = None

    def portal_texts(self, name: str) -> tuple[bytes, ...]:
        return ()

    def send_notice(self, text: str, detail: str | None = None, hint: str | None = None) -> None:
        """Nobody to tell: the tool's answer says it all."""


@dataclass
class AgentTools:
    """The four tools, for any authenticated agent (its name is the first argument)."""

    engine: PolicyEngine
    masking: MaskingRules
    approvals: ApprovalService | None
    agents: dict[str, AgentSettings]
    public_url: str
    default_database: str

    def database_for(self, agent: str, database: str | None) -> str:
        settings = self.agents[agent]
        chosen = database or (
            settings.databases[0]
            if settings.databases and settings.databases[0] != "*"
            else self.default_database
        )
        if not settings.may_use(chosen):
            raise ToolRefusal(f"agent {agent} may not use database {chosen}")
        return chosen

    def check_statement(
        self, agent: str, sql: str, database: str | None = None
    ) -> dict[str, object]:
        """What pgguard would do with ``sql`` from ``agent``, without running it."""
        db = self.database_for(agent, database)
        decision = self.engine.classify(sql, Context(agent, db))
        mode = decision.hold_mode or self.agents[agent].hold_mode
        return {
            "action": decision.action,
            "observe_only": decision.observe,
            "categories": list(decision.categories),
            "rule_ids": list(decision.rule_ids),
            "reasons": list(decision.reasons),
            "hold_mode": mode if decision.action == "hold" else None,
            "hold_timeout_s": decision.hold_timeout_s if decision.action == "hold" else None,
            "database": db,
            "masked_statement": mask_sql(sql, self.masking).text,
        }

    async def request_approval(
        self, agent: str, sql: str, reason: str, database: str | None = None
    ) -> dict[str, object]:
        """Open (or find) the request whose approval lets exactly ``sql`` run once."""
        db = self.database_for(agent, database)
        decision = self.engine.classify(sql, Context(agent, db))
        if decision.action != "hold" or decision.observe:
            return {
                "request": None,
                "action": "allow" if decision.observe else decision.action,
                "message": "no approval needed: pgguard allows this statement"
                if decision.action == "allow" or decision.observe
                else "pgguard's policy denies this statement; no approval can allow it",
                "rule_ids": list(decision.rule_ids),
            }
        if self.approvals is None:
            raise ToolRefusal("approvals are not enabled on this pgguard")
        request = await self._open(agent, db, sql, reason, decision)
        return {"request": self._summary(request), "action": "hold"}

    async def _open(
        self, agent: str, database: str, sql: str, reason: str, decision: Decision
    ) -> ApprovalRequest:
        assert self.approvals is not None
        session = _RequestSession(agent, self.agents[agent].owner, database)
        event = SqlEvent("query", sql.encode("utf-8"))
        new = new_request(session, decision, event, self.masking, "")
        if reason.strip():
            new = dataclasses.replace(new, reason=mask_text(reason.strip()[:500], self.masking))
        new = returned_request(new)
        existing = await self.approvals.open_for(new, event.sql, None)
        if existing is not None:
            return existing
        return await self.approvals.open_request(new, event.sql, None)

    async def request_status(self, agent: str, request_id: str) -> dict[str, object]:
        if self.approvals is None:
            raise ToolRefusal("approvals are not enabled on this pgguard")
        request = await self.approvals.store.get(request_id)
        if request is None or request.agent != agent:
            raise ToolRefusal(f"no request {request_id} of agent {agent}")
        return self._summary(request)

    async def my_requests(
        self, agent: str, state: RequestStateName | None = None
    ) -> list[dict[str, object]]:
        if self.approvals is None:
            raise ToolRefusal("approvals are not enabled on this pgguard")
        wanted = RequestState(state) if state else None
        found = await self.approvals.store.list_for_agent(agent, wanted)
        return [self._summary(r) for r in found if r.agent == agent]

    def _summary(self, request: ApprovalRequest) -> dict[str, object]:
        """What the agent may see of its own request (masked, as reviewers see it)."""
        return {
            "id": request.id,
            "state": request.state.value,
            "database": request.database,
            "statement": request.statement,
            "parameters": list(request.parameters),
            "categories": list(request.categories),
            "rule_ids": list(request.rule_ids),
            "reason": request.reason,
            "created_at": request.created_at.isoformat(),
            "expires_at": request.expires_at.isoformat(),
            "seconds_left": request.seconds_left(),
            "decided_at": request.decided_at.isoformat() if request.decided_at else None,
            "decisions": [
                {"approver": d.approver_name, "verdict": d.verdict, "comment": d.comment}
                for d in request.decisions
            ],
            "state_reason": request.state_reason,
            "page": page_url(self.public_url, request.id),
        }


RequestStateName = Literal["pending", "approved", "denied", "expired", "cancelled"]


class ToolRefusal(Exception):
    """A tool call pgguard refuses; its text is what the agent reads."""


def agent_tools(
    settings: Settings,
    engine: PolicyEngine,
    masking: MaskingRules,
    approvals: ApprovalService | None,
) -> AgentTools:
    """The tools for pgguard's configuration (agents, public URL, default database)."""
    return AgentTools(
        engine=engine,
        masking=masking,
        approvals=approvals,
        agents={agent.name: agent for agent in settings.agents},
        public_url=settings.http.base_url(),
        default_database=settings.upstream.parsed().dbname or "postgres",
    )
