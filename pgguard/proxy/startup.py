"""The agent's side of start-up: StartupMessage, protocol negotiation, SCRAM authentication.

Runs after any SSL/GSS negotiation (see ``server.py``) and before the upstream connection is
opened: an agent that fails authentication never causes an upstream connection. The state machine
is strict - after the StartupMessage only SASL responses are legal until authentication ends; a
second StartupMessage, a message of another type or an oversized one closes the connection.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pgguard.errors import (
    AuthenticationFailed,
    AuthorizationRejected,
    ProtocolViolation,
    UnsupportedProtocol,
)
from pgguard.proxy.link import Link
from pgguard.settings import AgentSettings
from pgguard.wire import messages as m
from pgguard.wire.framing import MessageDecoder, StartupDecoder
from pgguard.wire.scram import ScramServer, Verifier, mock_verifier

_SASL_MAX_MESSAGE = 8192  # postgres.c caps SASL responses at PG_MAX_AUTH_TOKEN_LENGTH (65535)
_REPLICATION_OFF = ("false", "off", "no", "0")


class AgentDirectory:
    """The configured agents with their SCRAM verifiers, computed once at start-up."""

    def __init__(self, agents: list[AgentSettings]) -> None:
        self._agents = {a.name: (a, a.verifier()) for a in agents}
        self._mock_secret = secrets.token_bytes(32)

    def lookup(self, name: str) -> tuple[AgentSettings | None, Verifier]:
        found = self._agents.get(name)
        if found is None:
            return None, mock_verifier(self._mock_secret, name)
        return found

    def __len__(self) -> int:
        return len(self._agents)


@dataclass(frozen=True, slots=True)
class AgentLogin:
    """A successfully authenticated agent and what its session asked for."""

    agent: AgentSettings
    database: str
    version: int  # the protocol version agreed with the client
    parameters: list[tuple[str, str]]  # every startup parameter, in order, to forward upstream
    sasl_final: bytes  # AuthenticationSASLFinal, sent to the client once upstream is ready
    leftover: bytes  # bytes the client sent after its last authentication message


async def read_first_message(link: Link, decoder: StartupDecoder) -> m.FirstMessage:
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        decoder.receive_data(await link.read())


def negotiate_version(startup: m.StartupMessage) -> tuple[int, bytes]:
    """Agree on a protocol version the way PostgreSQL's ProcessStartupPacket does.

    Major version 3 only. A newer minor version, or ``_pq_.`` protocol options (none of which
    pgguard implements), get a NegotiateProtocolVersion naming our newest minor version and the
    unrecognised options (53.2.2). Returns the agreed version and the bytes to send, if any.
    """
    major, minor = startup.version >> 16, startup.version & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2"
        )
    unrecognized = [k for k, _ in startup.parameters if k.startswith("_pq_.")]
    agreed = min(startup.version, m.PROTOCOL_LATEST)
    if startup.version > m.PROTOCOL_LATEST or unrecognized:
        return agreed, m.negotiate_protocol_version(agreed & 0xFFFF, unrecognized)
    return agreed, b""


async def authenticate(
    link: Link,
    startup: m.StartupMessage,
    agents: AgentDirectory,
    channel_binding: bytes | None,
    pipelined: bytes = b"",
) -> AgentLogin:
    """Authenticate the agent named in ``startup`` with SCRAM-SHA-256(-PLUS)."""
    user = startup.get("user")
    if not user:
        raise AuthorizationRejected("no PostgreSQL user name specified in startup packet")
    replication = (startup.get("replication") or "false").lower()
    if replication not in _REPLICATION_OFF:
        raise AuthorizationRejected(
            "pgguard does not allow replication connections",
            detail="A replication connection streams the whole database past any policy.",
        )
    version, negotiation = negotiate_version(startup)
    if negotiation:
        link.write(negotiation)
    agent, verifier = agents.lookup(user)
    scram = ScramServer(verifier, channel_binding=channel_binding, known=agent is not None)
    decoder = MessageDecoder(_SASL_MAX_MESSAGE)
    decoder.receive_data(pipelined)
    link.write(m.auth_sasl(scram.mechanisms()))
    mechanism, data = m.decode_sasl_initial_response(await _password_message(link, decoder))
    link.write(m.auth_request(m.AUTH_SASL_CONTINUE, scram.first(mechanism, data)))
    try:
        server_final = scram.final(await _password_message(link, decoder))
    except AuthenticationFailed:
        raise AuthenticationFailed(f'password authentication failed for user "{user}"') from None
    assert agent is not None  # ScramServer never succeeds for an unknown agent
    database = startup.get("database") or user
    if not agent.may_use(database):
        raise AuthorizationRejected(
            f'agent "{user}" is not allowed to connect to database "{database}"'
        )
    params = [(k, v) for k, v in startup.parameters if not k.startswith("_pq_.")]
    return AgentLogin(
        agent=agent,
        database=database,
        version=version,
        parameters=params,
        sasl_final=m.auth_request(m.AUTH_SASL_FINAL, server_final),
        leftover=decoder.take_remaining(),
    )


async def _password_message(link: Link, decoder: MessageDecoder) -> bytes:
    while True:
        msg = decoder.next_message()
        if msg is not None:
            type_byte, body = msg
            if type_byte != m.F_PASSWORD:
                raise ProtocolViolation(f"expected SASL response, got message type {type_byte}")
            return body
        decoder.receive_data(await link.read())
