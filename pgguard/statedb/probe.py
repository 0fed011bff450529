"""Asking the upstream and the state servers what the separation check needs (asyncpg).

``check_separation`` is what ``assembly.start`` runs before anything touches the state: it
connects as the upstream role (the upstream DSN, its address and TLS mode, as agents' sessions
use it) and as the state role (``[state] dsn``, as the stores do), reads both sides' identity
and cluster, and - in the same cluster - what the upstream role can do to the state, asked on
the state connection because schema and relation privileges are per database. Anything it cannot
find out refuses to start (fail closed): ``SeparationError``. The judgement is in
``pgguard.statedb.separation``.
"""

from __future__ import annotations

import asyncio
import ssl

import asyncpg

from pgguard.dsn import Dsn, parse_dsn
from pgguard.settings import Settings, UpstreamSettings
from pgguard.statedb.separation import Facts, Reach, SeparationError, Side, verdict

# Predefined roles that let a role touch the server beyond SQL privileges (PostgreSQL docs,
# "Predefined Roles"): its files, its programs, other roles' backends.
DANGEROUS_PREDEFINED = (
    "pg_execute_server_program",
    "pg_write_server_files",
    "pg_read_server_files",
    "pg_signal_backend",
)
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"
SEQUENCE_PRIVILEGES = "USAGE, SELECT, UPDATE"


def uses_state(settings: Settings) -> bool:
    """Whether pgguard keeps state (and so must be separated from its upstream role)."""
    return settings.approvals_enabled() or settings.ledger.enabled


SIDE_SQL = """
SELECT session_user AS role, current_database() AS database,
       (SELECT system_identifier FROM pg_control_system()) AS system_identifier,
       current_setting('server_version_num')::int AS server_version_num
"""

# Run on the state connection with $1 = the upstream role; roles are cluster-wide, schema and
# relation privileges are per database, so every question is asked where the state lives.
REACH_SQL = f"""
WITH up AS (SELECT oid FROM pg_roles WHERE rolname = $1),
     can_become AS (
       SELECT r.oid, r.rolname, r.rolsuper, r.rolcreaterole FROM pg_roles r, up
       WHERE pg_has_role(up.oid, r.oid, 'MEMBER')),
     -- Ownership and privileges it holds through the state role follow from that membership,
     -- reported once, by itself.
     others AS (SELECT * FROM can_become WHERE rolname <> session_user),
     db AS (SELECT oid, datdba, datacl FROM pg_database WHERE datname = current_database()),
     sch AS (SELECT oid, nspowner FROM pg_namespace WHERE nspname = $2),
     rel AS (
       SELECT c.oid, c.relkind, c.relowner, $2 || '.' || c.relname AS name
       FROM pg_class c JOIN sch ON c.relnamespace = sch.oid
       WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f'))
SELECT
  ARRAY(SELECT rolname FROM can_become WHERE rolsuper ORDER BY rolname) AS superuser_roles,
  ARRAY(SELECT rolname FROM can_become WHERE rolcreaterole ORDER BY rolname) AS createrole_roles,
  ARRAY(SELECT rolname FROM can_become
        WHERE rolname = ANY($3::text[]) ORDER BY rolname) AS predefined,
  EXISTS(SELECT 1 FROM can_become WHERE rolname = session_user) AS member_of_state_role,
  EXISTS(SELECT 1 FROM db JOIN others b ON b.oid = db.datdba) AS owns_database,
  ARRAY(SELECT b.rolname FROM others b, db
        WHERE has_database_privilege(b.oid, db.oid, 'CONNECT') ORDER BY b.rolname)
    AS connect_roles,
  EXISTS(SELECT 1 FROM db, aclexplode(coalesce(db.datacl, acldefault('d', db.datdba))) a
         WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT') AS public_connect,
  EXISTS(SELECT 1 FROM sch) AS schema_exists,
  EXISTS(SELECT 1 FROM sch JOIN others b ON b.oid = sch.nspowner) AS owns_schema,
  ARRAY(SELECT b.rolname FROM others b, sch
        WHERE has_schema_privilege(b.oid, sch.oid, 'USAGE, CREATE') ORDER BY b.rolname)
    AS schema_privileged_roles,
  ARRAY(SELECT DISTINCT rel.name FROM rel JOIN others b ON b.oid = rel.relowner
        ORDER BY rel.name) AS owned_relations,
  ARRAY(SELECT DISTINCT rel.name FROM rel, others b
        WHERE CASE WHEN rel.relkind = 'S'
                   THEN has_sequence_privilege(b.oid, rel.oid, '{SEQUENCE_PRIVILEGES}')
                   ELSE has_table_privilege(b.oid, rel.oid, '{TABLE_PRIVILEGES}') END
        ORDER BY rel.name) AS privileged_relations
"""


async def gather(settings: Settings) -> Facts:
    """Connect as the upstream role and as the state role, and ask both what they are."""
    timeout = settings.upstream.connect_timeout
    try:
        upstream = await asyncio.wait_for(connect_upstream(settings.upstream), timeout * 2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SeparationError(
            "upstream.dsn: cannot check that agents cannot reach pgguard's state: connecting to "
            "the upstream "
            f"server at {settings.upstream.parsed().describe()} failed ({_reason(exc)})"
        ) from exc
    try:
        state = await _connect_state(settings)
        try:
            return await _ask(upstream, state, settings)
        finally:
            await state.close(timeout=timeout)
    finally:
        await upstream.close(timeout=timeout)


async def check_separation(settings: Settings) -> None:
    """The start-up check: SeparationError (a ConfigError) when agents could reach the state."""
    if uses_state(settings):
        verdict(await gather(settings))


async def _ask(
    upstream: asyncpg.Connection, state: asyncpg.Connection, settings: Settings
) -> Facts:
    schema = settings.state.schema_name
    try:
        up_side = _side(await upstream.fetchrow(SIDE_SQL))
    except asyncpg.PostgresError as exc:
        raise _unknowable("upstream", exc) from exc
    try:
        state_side = _side(await state.fetchrow(SIDE_SQL))
        facts = Facts(up_side, state_side, schema)
        if not facts.same_cluster:
            return facts
        row = await state.fetchrow(REACH_SQL, up_side.role, schema, list(DANGEROUS_PREDEFINED))
    except asyncpg.PostgresError as exc:
        raise _unknowable("state", exc) from exc
    assert row is not None
    return Facts(up_side, state_side, schema, _reach(row))


def _side(row: asyncpg.Record | None) -> Side:
    assert row is not None
    return Side(
        role=row["role"],
        database=row["database"],
        system_identifier=int(row["system_identifier"]),
        server_version_num=int(row["server_version_num"]),
    )


def _reach(row: asyncpg.Record) -> Reach:
    return Reach(
        superuser_roles=tuple(row["superuser_roles"]),
        createrole_roles=tuple(row["createrole_roles"]),
        predefined=tuple(row["predefined"]),
        member_of_state_role=bool(row["member_of_state_role"]),
        owns_database=bool(row["owns_database"]),
        connect_roles=tuple(row["connect_roles"]),
        public_connect=bool(row["public_connect"]),
        schema_exists=bool(row["schema_exists"]),
        owns_schema=bool(row["owns_schema"]),
        schema_privileged_roles=tuple(row["schema_privileged_roles"]),
        owned_relations=tuple(row["owned_relations"]),
        privileged_relations=tuple(row["privileged_relations"]),
    )


def _unknowable(where: str, exc: asyncpg.PostgresError) -> SeparationError:
    hint = ""
    if exc.sqlstate == "42501":
        hint = (
            "; pgguard needs EXECUTE on pg_control_system() on both servers (granted to PUBLIC "
            "by default) to tell whether they are one cluster"
        )
    return SeparationError(
        "cannot check that agents cannot reach pgguard's state: a query on the "
        f"{where} server failed ({_reason(exc)}){hint}"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return f"SQLSTATE {exc.sqlstate}: {exc.args[0] if exc.args else ''}"
    return str(exc) or type(exc).__name__


async def _connect_state(settings: Settings) -> asyncpg.Connection:
    timeout = settings.state.timeout
    try:
        conn: asyncpg.Connection = await asyncio.wait_for(
            asyncpg.connect(
                settings.state_dsn(),
                timeout=timeout,
                command_timeout=timeout,
                server_settings={"application_name": "pgguard-separation-check"},
            ),
            timeout * 2,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SeparationError(
            "cannot check that agents cannot reach pgguard's state: connecting to the state "
            f"database failed ({_reason(exc)})"
        ) from exc
    return conn


async def connect_upstream(upstream: UpstreamSettings) -> asyncpg.Connection:
    """A connection as the role agents act as, with the upstream DSN's address and TLS mode."""
    dsn: Dsn = parse_dsn(upstream.dsn.get_secret_value())
    conn: asyncpg.Connection = await asyncpg.connect(
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        password=dsn.password,
        database=dsn.dbname or dsn.user,
        ssl=_ssl(upstream, dsn),
        timeout=upstream.connect_timeout,
        command_timeout=upstream.connect_timeout,
        server_settings={"application_name": "pgguard-separation-check"},
    )
    return conn


def _ssl(upstream: UpstreamSettings, dsn: Dsn) -> ssl.SSLContext | str:
    mode = upstream.effective_sslmode()
    if dsn.is_unix_socket or mode in ("disable", "allow", "prefer"):
        return "disable" if dsn.is_unix_socket else mode
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if upstream.sslrootcert is not None:
        context.load_verify_locations(cafile=str(upstream.sslrootcert))
    if mode == "require":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        context.check_hostname = False
    return context
