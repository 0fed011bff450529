"""How many upstream sessions pgguard may open, in total and per agent, and who holds them.

Owns: the start-up probe of the upstream (`read_capacity`: it also turns an unreachable upstream
or a wrong upstream password into one line naming ``upstream.dsn``) and `SessionSlots`, the
counter every agent session takes a slot from before it connects upstream.

Invariants:
* The total (``[limits] max_upstream_sessions``) never exceeds the upstream's
  ``max_connections`` minus what pgguard must keep: the server's reserved slots and pgguard's own
  state and ledger connections. Agents can therefore never starve pgguard of the connections it
  needs to record and decide what they do.
* An agent holds at most ``[[agents]] max_sessions`` slots. When unset and more than one agent is
  configured, an agent may hold half of the total: no single agent can take every slot.
* A refusal is FATAL ``53300`` naming the limit to change; the slot is returned when the session
  ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from pgguard.errors import ConfigError, TooManyConnections
from pgguard.settings import Settings
from pgguard.statedb.probe import connect_upstream, uses_state

log = logging.getLogger(__name__)

# pgguard's own state connections when approvals or the ledger are on: the approval store's pool
# (5), the decision listener (1), the ledger writer (1), and one spare for a checkpoint or a
# reconnect racing the old connection's close.
STATE_CONNECTIONS = 8

CAPACITY_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       coalesce(current_setting('reserved_connections', true), '0')::int AS reserved
"""


@dataclass(frozen=True)
class Capacity:
    max_connections: int
    reserve: int  # what agents must leave free: server reserves + pgguard's own connections

    @property
    def available(self) -> int:
        return max(1, self.max_connections - self.reserve)


async def read_capacity(settings: Settings) -> Capacity:
    """Ask the upstream how many connections it takes; ConfigError (one line) if it cannot."""
    where = settings.upstream.parsed().describe()
    try:
        conn = await asyncio.wait_for(
            connect_upstream(settings.upstream), settings.upstream.connect_timeout * 2
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ConfigError(
            f"upstream.dsn: cannot connect to the upstream server at {where}: {_reason(exc)}"
        ) from None
    try:
        row = await conn.fetchrow(CAPACITY_SQL)
    finally:
        await conn.close(timeout=settings.upstream.connect_timeout)
    assert row is not None
    own = STATE_CONNECTIONS if uses_state(settings) else 0
    reserve = row["superuser_reserved"] + row["reserved"] + own
    return Capacity(max_connections=row["max_connections"], reserve=reserve)


def _reason(exc: BaseException) -> str:
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"authentication failed ({exc.sqlstate}: {exc.args[0] if exc.args else ''})"
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.sqlstate}: {exc.args[0] if exc.args else ''}"
    if isinstance(exc, TimeoutError):
        return "timed out (upstream.connect_timeout)"
    return str(exc) or type(exc).__name__


@dataclass
class SessionSlots:
    """Upstream session slots: a total and a cap per agent."""

    total: int
    per_agent: dict[str, int]
    held: dict[str, int] = field(default_factory=dict)
    in_use: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, capacity: Capacity | None) -> SessionSlots:
        total = settings.limits.max_upstream_sessions
        if capacity is not None:
            if total is None:
                total = capacity.available
            elif total > capacity.available:
                log.warning(
                    "limits.max_upstream_sessions = %d leaves pgguard too few of the upstream's "
                    "%d connections; using %d",
                    total,
                    capacity.max_connections,
                    capacity.available,
                )
                total = capacity.available
        if total is None:
            total = settings.listen.max_connections
        share = total if len(settings.agents) <= 1 else max(1, total // 2)
        per_agent = {a.name: min(a.max_sessions or share, total) for a in settings.agents}
        return cls(total=total, per_agent=per_agent)

    def take(self, agent: str) -> None:
        """Take one slot for ``agent``, or raise TooManyConnections naming the limit."""
        cap = self.per_agent.get(agent, self.total)
        if self.held.get(agent, 0) >= cap:
            raise TooManyConnections(
                f"too many sessions for agent {agent}: its limit is {cap} ([[agents]] max_sessions)"
            )
        if self.in_use >= self.total:
            raise TooManyConnections(
                f"pgguard's upstream sessions are all in use: the limit is {self.total} "
                "([limits] max_upstream_sessions)"
            )
        self.held[agent] = self.held.get(agent, 0) + 1
        self.in_use += 1

    def give_back(self, agent: str) -> None:
        self.held[agent] -= 1
        self.in_use -= 1
