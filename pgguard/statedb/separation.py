"""The start-up check that the upstream role cannot reach pgguard's state.

Agents act as the upstream role, and may connect through pgguard to any database that role may
connect to. So whenever pgguard keeps state (approvals or the ledger), the upstream role must not
be able to connect to the state database, nor become a role that can. pgguard refuses to start
otherwise; no setting turns the refusal into a warning.

Two clusters are the same when their system identifiers (``pg_control_system()``, executable by
every role by default) are equal; a physical replica shares its primary's identifier, which is the
cautious answer. In another cluster the upstream role cannot reach the state at all. In the same
cluster it must not be, or be able to become (``pg_has_role(..., 'MEMBER')``, the widest sense):

- a superuser, or a member of a predefined role that reads/writes the server's files, runs
  programs on it, or signals other roles' backends;
- the state role or a member of it; a ``CREATEROLE`` role before PostgreSQL 16 (it could grant
  itself the state role; from 16 on that needs ``ADMIN`` on it, which implies membership);
- the owner of the state database, or a holder of ``CONNECT`` on it (through ``PUBLIC`` too).
  The state database may not be the upstream database: any role connected to a database can
  ``LISTEN``/``NOTIFY`` on every channel there, pgguard's included, and no GRANT prevents it;
- the owner of, or a holder of any privilege on, the state schema and its tables and sequences
  (reported so the fix is complete; without ``CONNECT`` they are unusable, but a later GRANT
  of ``CONNECT`` would open them).

This module is pure apart from ``gather`` and ``check``, which run the queries (asyncpg).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from pgguard.dsn import Dsn, parse_dsn
from pgguard.errors import ConfigError
from pgguard.settings import Settings, UpstreamSettings

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


class SeparationError(ConfigError):
    """The upstream role can reach pgguard's state, or pgguard cannot tell that it cannot."""


@dataclass(frozen=True, slots=True)
class Side:
    """Who a connection is and where it lands."""

    role: str
    database: str
    system_identifier: int
    server_version_num: int


@dataclass(frozen=True, slots=True)
class Reach:
    """What the upstream role can do to the state, seen from the state database (same cluster)."""

    superuser_roles: tuple[str, ...] = ()  # roles it is or can become that are superusers
    createrole_roles: tuple[str, ...] = ()
    predefined: tuple[str, ...] = ()  # DANGEROUS_PREDEFINED roles it is a member of
    member_of_state_role: bool = False
    owns_database: bool = False
    connect_roles: tuple[str, ...] = ()  # roles it can become holding CONNECT on the state db
    public_connect: bool = False  # CONNECT on the state database is granted to PUBLIC
    schema_exists: bool = False
    owns_schema: bool = False
    schema_privileged_roles: tuple[str, ...] = ()
    owned_relations: tuple[str, ...] = ()
    privileged_relations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Facts:
    upstream: Side
    state: Side
    schema: str
    reach: Reach = field(default_factory=Reach)

    @property
    def same_cluster(self) -> bool:
        return self.upstream.system_identifier == self.state.system_identifier


@dataclass(frozen=True, slots=True)
class Problem:
    what: str  # what is wrong, in words
    fix: tuple[str, ...]  # SQL statements or steps that remove it


def uses_state(settings: Settings) -> bool:
    """Whether pgguard keeps state (and so must be separated from its upstream role)."""
    return settings.approvals_enabled() or settings.ledger.enabled


# --- judgement (pure) -------------------------------------------------------------------------


def problems(facts: Facts) -> list[Problem]:
    """Every way the upstream role can reach the state; empty when it cannot."""
    if not facts.same_cluster:
        return []
    up, st, reach = facts.upstream.role, facts.state, facts.reach
    q_up, q_state, q_db = quote_ident(up), quote_ident(st.role), quote_ident(st.database)
    found: list[Problem] = []
    if up == st.role:
        found.append(
            Problem(
                f"the upstream role {up!r} is also the state role: agents act as the role that "
                "owns pgguard's state",
                ("give pgguard its own state role and database: `pgguard state init`",),
            )
        )
    if reach.superuser_roles:
        # Nothing short of leaving the cluster or dropping superuser helps; the finer fixes
        # below would only bury the one that matters.
        return [
            *found,
            Problem(
                f"the upstream role {up!r} is or can become a superuser "
                f"({', '.join(reach.superuser_roles)}), and a superuser reaches every database "
                "of its cluster",
                (
                    "put the state in another PostgreSQL cluster (`pgguard state init "
                    "--admin-dsn <that cluster> --apply`), or connect upstream as a role "
                    f"without superuser: ALTER ROLE {q_up} NOSUPERUSER;",
                ),
            ),
        ]
    if reach.predefined:
        found.append(
            Problem(
                f"the upstream role {up!r} is a member of {', '.join(reach.predefined)}, which "
                "act on the server's files, programs or other roles' sessions",
                tuple(f"REVOKE {quote_ident(r)} FROM {q_up};" for r in reach.predefined),
            )
        )
    if reach.createrole_roles and facts.state.server_version_num < 160000:
        found.append(
            Problem(
                f"the upstream role {up!r} has CREATEROLE (through "
                f"{', '.join(reach.createrole_roles)}); before PostgreSQL 16 that lets it "
                f"grant itself the state role {st.role!r}",
                (f"ALTER ROLE {quote_ident(reach.createrole_roles[0])} NOCREATEROLE;",),
            )
        )
    if up != st.role and reach.member_of_state_role:
        found.append(
            Problem(
                f"the upstream role {up!r} is a member of the state role {st.role!r}",
                (f"REVOKE {q_state} FROM {q_up};",),
            )
        )
    found.extend(_database_problems(facts, q_up, q_db))
    found.extend(_schema_problems(facts, q_up))
    return found


def _database_problems(facts: Facts, q_up: str, q_db: str) -> list[Problem]:
    up, st, reach = facts.upstream.role, facts.state, facts.reach
    found: list[Problem] = []
    if facts.upstream.database == st.database:
        found.append(
            Problem(
                f"the state lives in the upstream database {st.database!r}: agents connect to "
                "it, and anyone connected can LISTEN/NOTIFY on pgguard's channels",
                ("keep the state in a database of its own: `pgguard state init`",),
            )
        )
    if up != st.role and reach.owns_database:
        found.append(
            Problem(
                f"the upstream role {up!r} owns the state database {st.database!r}",
                (f"ALTER DATABASE {q_db} OWNER TO {quote_ident(st.role)};",),
            )
        )
    if reach.connect_roles and facts.upstream.database != st.database:
        fixes = []
        if reach.public_connect:
            fixes.append(f"REVOKE CONNECT, TEMPORARY ON DATABASE {q_db} FROM PUBLIC;")
        fixes += [
            f"REVOKE ALL ON DATABASE {q_db} FROM {quote_ident(r)};"
            for r in reach.connect_roles
            if r != st.role
        ]
        fixes.append(f"GRANT CONNECT ON DATABASE {q_db} TO {quote_ident(st.role)};")
        via = " (granted to PUBLIC)" if reach.public_connect else ""
        found.append(
            Problem(
                f"the upstream role {up!r} may CONNECT to the state database {st.database!r}{via}",
                tuple(fixes),
            )
        )
    return found


def _schema_problems(facts: Facts, q_up: str) -> list[Problem]:
    up, reach = facts.upstream.role, facts.reach
    if up == facts.state.role or not reach.schema_exists:
        return []
    q_schema, q_state = quote_ident(facts.schema), quote_ident(facts.state.role)
    found: list[Problem] = []
    if reach.owns_schema:
        found.append(
            Problem(
                f"the upstream role {up!r} owns the state schema {facts.schema!r}",
                (f"ALTER SCHEMA {q_schema} OWNER TO {q_state};",),
            )
        )
    if reach.schema_privileged_roles:
        found.append(
            Problem(
                f"the upstream role {up!r} has privileges on the state schema {facts.schema!r}",
                tuple(
                    f"REVOKE ALL ON SCHEMA {q_schema} FROM {quote_ident(r)};"
                    for r in reach.schema_privileged_roles
                ),
            )
        )
    if reach.owned_relations:
        found.append(
            Problem(
                f"the upstream role {up!r} owns {', '.join(reach.owned_relations)}",
                tuple(
                    f"ALTER TABLE {_qualified(r)} OWNER TO {q_state};"
                    for r in reach.owned_relations
                ),
            )
        )
    if reach.privileged_relations:
        found.append(
            Problem(
                f"the upstream role {up!r} has privileges on "
                f"{', '.join(reach.privileged_relations)}",
                (
                    f"REVOKE ALL ON ALL TABLES IN SCHEMA {q_schema} FROM PUBLIC, {q_up};",
                    f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {q_schema} FROM PUBLIC, {q_up};",
                ),
            )
        )
    return found


def refusal(facts: Facts, found: Sequence[Problem]) -> str:
    """The message ``pgguard serve`` exits with: what is wrong, and exactly how to fix it."""
    lines = [
        f"refusing to start: the upstream role {facts.upstream.role!r} (what agents act as) can "
        f"reach pgguard's state (database {facts.state.database!r}, schema {facts.schema!r}, "
        f"role {facts.state.role!r}); an agent could approve its own statements or rewrite the "
        "ledger.",
    ]
    for number, problem in enumerate(found, 1):
        lines.append(f"  {number}. {problem.what}.")
        lines.extend(f"     fix: {step}" for step in problem.fix)
    lines.append(
        "Recommended set-up: a state role and a state database of their own, which the "
        "upstream role cannot connect to (in another cluster when the upstream role is a "
        "superuser). `pgguard state init --upstream-role ROLE` prints the SQL; with "
        "`--admin-dsn DSN --apply` it runs it and prints the [state] dsn to configure. "
        'See the README, "State database separation".'
    )
    return "\n".join(lines)


def verdict(facts: Facts) -> None:
    """Raise SeparationError when the upstream role can reach the state."""
    found = problems(facts)
    if found:
        raise SeparationError(refusal(facts, found))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qualified(relation: str) -> str:
    schema, _, name = relation.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}"


# --- the queries ------------------------------------------------------------------------------

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
        upstream = await asyncio.wait_for(_connect_upstream(settings.upstream), timeout * 2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SeparationError(
            "cannot check that agents cannot reach pgguard's state: connecting to the upstream "
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


async def check(settings: Settings) -> None:
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


async def _connect_upstream(upstream: UpstreamSettings) -> asyncpg.Connection:
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
