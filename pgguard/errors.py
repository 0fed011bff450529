"""One error tree for pgguard.

Every error that can reach a client carries its SQLSTATE and severity, so the proxy turns any of
them into a well-formed ErrorResponse without a lookup table. Foreign exceptions (OSError, ssl,
asyncpg, httpx) are translated into these at the boundary where they occur (``raise X from exc``).
Messages say what happened in words an operator can act on; they never contain secrets or raw SQL.
"""

from __future__ import annotations


class PgGuardError(Exception):
    """Base of every pgguard error. ``sqlstate``/``severity`` describe it as Postgres would."""

    sqlstate: str = "XX000"
    severity: str = "ERROR"

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class ConfigError(PgGuardError):
    """Configuration is invalid; raised at start-up, names the offending key."""

    sqlstate = "F0000"


class ProtocolViolation(PgGuardError):
    """The peer broke the PostgreSQL protocol (malformed frame, illegal message, lying length)."""

    sqlstate = "08P01"
    severity = "FATAL"


class UnsupportedProtocol(PgGuardError):
    """The client asked for a protocol version pgguard does not speak."""

    sqlstate = "0A000"
    severity = "FATAL"


class AuthenticationFailed(PgGuardError):
    """Wrong password or unknown agent. Deliberately does not say which."""

    sqlstate = "28P01"
    severity = "FATAL"


class AuthorizationRejected(PgGuardError):
    """The agent authenticated but may not connect this way (database, replication)."""

    sqlstate = "28000"
    severity = "FATAL"


class UpstreamUnavailable(PgGuardError):
    """pgguard could not reach or authenticate to the upstream server."""

    sqlstate = "08006"
    severity = "FATAL"


class UpstreamRejected(PgGuardError):
    """The upstream server refused the connection with an error of its own (relayed as is)."""

    sqlstate = "08001"
    severity = "FATAL"


class PolicyDenied(PgGuardError):
    """A statement was refused by policy or by an approver."""

    sqlstate = "42501"


class AmbiguousStatement(PgGuardError):
    """A privileged Execute whose portal may run more than one text (pgguard.wire.session)."""

    sqlstate = "55000"  # object_not_in_prerequisite_state: the client must settle it first


class ApprovalPending(PgGuardError):
    """A statement in return mode: refused now, runs once when re-sent after its approval."""

    sqlstate = "55000"  # object_not_in_prerequisite_state: come back once it is approved


class QueryCanceled(PgGuardError):
    """The statement was cancelled (by the client, while it was held)."""

    sqlstate = "57014"


class StatementTooComplex(PgGuardError):
    """A statement above ``[limits] max_statement_bytes``, or whose analysis ran over its budget:
    refused (fail closed); the session goes on."""

    sqlstate = "54000"  # program_limit_exceeded


class StartupRefused(PolicyDenied):
    """A connection refused by policy because of its start-up parameters."""

    severity = "FATAL"


class FeatureNotSupported(PgGuardError):
    """A protocol feature that pgguard refuses on purpose (function call, replication)."""

    sqlstate = "0A000"


class TooManyConnections(PgGuardError):
    """The proxy's connection limit is reached."""

    sqlstate = "53300"
    severity = "FATAL"


class PortalDoesNotExist(PgGuardError):
    """An Execute of a portal the server does not hold, answered by pgguard as PostgreSQL does."""

    sqlstate = "34000"  # invalid_cursor_name


class InternalError(PgGuardError):
    """A bug in pgguard met a session: that session ends (nothing of it is forwarded)."""

    sqlstate = "XX000"
    severity = "FATAL"


class AdminShutdown(PgGuardError):
    """pgguard is shutting down."""

    sqlstate = "57P01"
    severity = "FATAL"
