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

This module is pure: ``pgguard.statedb.probe`` asks the servers and hands it ``Facts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pgguard.errors import ConfigError
from pgguard.statedb.setup import ident as quote_ident


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


def _qualified(relation: str) -> str:
    schema, _, name = relation.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}"
