"""The gate: the one place where the proxy decides what happens to a statement.

Every message that carries SQL - a simple Query, a Parse, and the Execute of a bound portal (with
its Bind parameters) - reaches ``Gate.check`` as a ``SqlEvent``; a FunctionCall reaches
``Gate.check_function_call``. The answer is a ``Verdict``:

* ``ALLOW`` - forward the original bytes unchanged;
* ``Deny(error)`` - never forward; the connection substitutes a statement the server rejects, so
  the client and the server agree on the transaction state, and the client sees ``error``;
* ``Hold(future)`` - only this client's session waits for the future's Allow/Deny.

``check`` is synchronous on purpose: the common case (allow) costs no task switch. This base gate
allows all SQL and refuses the function-call message, which names a function by OID and carries
no SQL a policy could read (the policy gate resolves the OID and judges the call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pgguard.errors import PgGuardError, PolicyDenied
from pgguard.wire.outcomes import Outcome


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Deny:
    error: PgGuardError


@dataclass(frozen=True, slots=True)
class Hold:
    decision: asyncio.Future[Allow | Deny]
    request_id: str = ""


Verdict = Allow | Deny | Hold
ALLOW = Allow()


@dataclass(slots=True)
class SqlEvent:
    """A statement on its way upstream.

    ``sql`` is the raw statement text from the wire. For an Execute, ``candidates`` holds every
    text the portal may run (`pgguard.wire.session`), ``sql`` being the last of them (so a
    single candidate *is* ``sql``), and ``bind`` the Bind message body with its parameters.
    """

    kind: Literal["query", "parse", "execute"]
    sql: bytes
    statement: str = ""
    portal: str = ""
    candidates: tuple[bytes, ...] = ()
    bind: bytes | None = None
    # The portal may hold more than one binding (an unanswered pipeline may not have run
    # as sent): never shown to a reviewer as one text (pgguard.wire.session).
    ambiguous: bool = False
    # Every statement name those bindings come from, when more than ``statement``: each may
    # also hold what a SQL PREPARE put there.
    statements: tuple[str, ...] = ()


class SessionView(Protocol):
    """What the gate may know about the session a statement comes from."""

    @property
    def session_id(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def client_address(self) -> str: ...
    @property
    def application_name(self) -> str: ...
    @property
    def txn_status(self) -> bytes: ...
    @property
    def server_parameters(self) -> dict[str, str]: ...
    @property
    def startup_parameters(self) -> list[tuple[str, str]]:
        """The client's start-up parameters (user, database, options, ...), as it sent them."""

    @property
    def parameters_version(self) -> int:
        """Changes whenever ``server_parameters`` may have changed."""

    @property
    def ready_count(self) -> int:
        """ReadyForQuery messages the server has sent in this session."""

    @property
    def replies_owed(self) -> int:
        """ReadyForQuery messages the server still owes for what was forwarded."""

    def portal_texts(self, name: str) -> tuple[bytes, ...]:
        """Every text protocol portal ``name`` may run for a statement forwarded now."""

    def send_notice(self, text: str, detail: str | None = None, hint: str | None = None) -> None:
        """Send the client a NOTICE now (between two server messages), e.g. while it waits."""

    gate_state: object  # whatever the gate keeps per session


def function_call_refused(why: str = "") -> Deny:
    """The refusal of a FunctionCall message that nobody could judge."""
    return Deny(
        PolicyDenied(
            "pgguard refuses the function-call protocol message" + (f": {why}" if why else ""),
            detail="A FunctionCall ('F') message calls a function by OID without SQL text; "
            "pgguard judges it only when it can tell which function the OID names.",
            hint="Call the function with a SQL statement (SELECT fn(...)) instead.",
        )
    )


@dataclass
class Gate:
    """Allows every statement; refuses the function-call message. Policies subclass this."""

    allow_function_call: bool = False

    def check(self, session: SessionView, event: SqlEvent) -> Verdict:
        return ALLOW

    def check_function_call(self, session: SessionView, oid: int, body: bytes) -> Verdict:
        """A FunctionCall message (``oid`` names the function; ``body`` is the whole message)."""
        if self.allow_function_call:
            return ALLOW
        return function_call_refused()

    def check_startup(
        self, agent: str, database: str, parameters: list[tuple[str, str]]
    ) -> PgGuardError | None:
        """An error refusing the connection because of its start-up parameters, or None."""
        return None

    def session_notices(self, session: SessionView) -> list[str]:
        """NOTICE texts sent to each agent right after it connects."""
        return []

    def cancel_hold(self, session: SessionView) -> bool:
        """Cancel the session's held statement, if any; True when there was one."""
        return False

    # --- ledger hooks (no-ops here; see PolicyGate) ----------------------------------------

    @property
    def tracks_outcomes(self) -> bool:
        """True when statements' outcomes must be followed (the ledger records them)."""
        return False

    def statement_token(self, session: SessionView, kind: str, sql: bytes) -> object | None:
        """What to remember about a statement being forwarded, until its outcome is known."""
        return None

    def outcome_sink(self, session: SessionView) -> Callable[[list[Outcome]], None]:
        """Where the session's finished statements go (one ReadyForQuery's worth at a time, in
        order; each outcome carries the token ``statement_token`` gave). Called once per
        session; the callable it returns must never raise."""
        return _ignore_outcomes

    def session_started(self, session: SessionView) -> None:
        """A session was established (after authentication and the upstream login)."""

    def session_ended(self, session: SessionView) -> None:
        """A session ended, for whatever reason."""

    def auth_failed(self, agent: str, database: str, client_address: str, reason: str) -> None:
        """An agent failed to authenticate."""


def _ignore_outcomes(outcomes: list[Outcome]) -> None:
    """The sink of a gate that records nothing."""
