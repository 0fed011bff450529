"""The agent session's own ``statement_timeout``, so a hold ends when the server's would.

Owns: `StatementTimeout` (what pgguard knows of one session's setting: from its start-up
options, the ``SET``/``SET LOCAL``/``RESET``/``DISCARD ALL`` statements pgguard judged and let
through, and - when none of those said - the default the server gives pgguard's upstream role
in that database, read once on pgguard's own connection), `parse_duration` and
`server_default_ms`.

Invariants: nothing here touches the agent's upstream session (a query of pgguard's own there
would shift the session model's count of server answers). What pgguard cannot know exactly
errs towards ending a hold early, never late: a ``SET`` inside a transaction that is later
rolled back is still assumed, and a ``SET LOCAL`` lasts until the next statement that ends a
transaction or subtransaction. A ``set_config('statement_timeout', ...)`` call or a
function's ``SET`` clause is not followed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import asyncpg
import pglast
from pglast import ast, enums

from pgguard.settings import UpstreamSettings

log = logging.getLogger(__name__)

NAME = "statement_timeout"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*$", re.IGNORECASE)
_UNIT_MS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
LOOKUP_TIMEOUT_S = 2.0


def parse_duration(value: str | int | float) -> int | None:
    """Milliseconds of a statement_timeout value as PostgreSQL reads it (no unit: ms)."""
    if isinstance(value, int | float):
        return max(0, int(value))
    match = _DURATION.match(value)
    if match is None:
        return None
    unit = (match.group(2) or "ms").lower()
    return max(0, int(float(match.group(1)) * _UNIT_MS[unit]))


@dataclass(slots=True)
class StatementTimeout:
    """One session's statement_timeout as far as pgguard knows it (milliseconds; 0 = none)."""

    startup_ms: int | None = None  # start-up options; None: the server's default applies
    session_ms: int | None = None  # a plain SET
    local_ms: int | None = None  # a SET LOCAL, until the transaction ends
    server_default_ms: int | None = None  # read from the server when nothing else says

    @property
    def current_ms(self) -> int | None:
        for value in (self.local_ms, self.session_ms, self.startup_ms, self.server_default_ms):
            if value is not None:
                return value
        return None

    @property
    def needs_server_default(self) -> bool:
        return self.current_ms is None

    def start_up(self, settings: list[tuple[str, str]]) -> None:
        for name, value in settings:
            if name.lower() == NAME:
                self.startup_ms = parse_duration(value)

    def transaction_ended(self) -> None:
        self.local_ms = None

    def observe(self, sql: bytes) -> None:
        """Follow the SET/RESET/DISCARD statements in ``sql`` (already let through)."""
        try:
            statements = pglast.parse_sql(sql.decode("utf-8", "replace"))
        except Exception:  # unreadable: the classifier refused or judged it; nothing to follow
            return
        for raw in statements:
            node = raw.stmt
            if isinstance(node, ast.DiscardStmt) and node.target == enums.DiscardMode.DISCARD_ALL:
                self.session_ms = self.local_ms = None
            elif isinstance(node, ast.VariableSetStmt):
                self._set(node)

    def _set(self, node: ast.VariableSetStmt) -> None:
        kind = node.kind
        if kind == enums.VariableSetKind.VAR_RESET_ALL:
            self.session_ms = self.local_ms = None
            return
        if (node.name or "").lower() != NAME:
            return
        value: int | None = None
        if kind == enums.VariableSetKind.VAR_SET_VALUE and node.args:
            value = _constant_ms(node.args[0])
        elif kind not in (enums.VariableSetKind.VAR_SET_DEFAULT, enums.VariableSetKind.VAR_RESET):
            return
        if node.is_local:
            self.local_ms = value if value is not None else self.session_ms
        else:
            self.session_ms = value
            self.local_ms = None


def _constant_ms(node: object) -> int | None:
    if not isinstance(node, ast.A_Const) or node.isnull:
        return None
    val = node.val
    if isinstance(val, ast.Integer) and val.ival is not None:
        return parse_duration(val.ival)
    if isinstance(val, ast.Float) and val.fval is not None:
        return parse_duration(float(val.fval))
    if isinstance(val, ast.String) and val.sval is not None:
        return parse_duration(val.sval)
    return None


async def server_default_ms(settings: UpstreamSettings, database: str) -> int | None:
    """The statement_timeout a new session of pgguard's upstream role gets in ``database``
    (server, database and role defaults), on a connection of pgguard's own; None if unknown."""
    dsn = settings.parsed()
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            conn = await asyncpg.connect(
                host=dsn.host,
                port=dsn.port,
                user=dsn.user,
                password=dsn.password,
                database=database,
                ssl=None if dsn.is_unix_socket else settings.effective_sslmode(),
                server_settings={"application_name": "pgguard-catalog"},
            )
            try:
                value = await conn.fetchval("SELECT current_setting('statement_timeout')")
            finally:
                await conn.close(timeout=1)
    except Exception as exc:  # unknown: the hold ends by its own expiry only
        log.warning("could not read statement_timeout of %s: %s", database, type(exc).__name__)
        return None
    return parse_duration(str(value))
