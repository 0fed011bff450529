"""The SQL that gives pgguard a state role and a state database of their own.

``pgguard state init`` prints it (a psql script) or applies it; the demo and the test fixtures run
the same statements, so what the README recommends is what is tested. The result: a LOGIN role
that owns a database of its own and the state schema in it, ``PUBLIC`` cut off from that database
(``CONNECT``, ``TEMPORARY``) and schema, and the upstream roles named cut off from both (and from
membership in the state role). The password goes to the server only as a SCRAM-SHA-256 verifier,
so neither the script nor the server's statement log holds it. Pure: no I/O.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from pgguard.dsn import Dsn
from pgguard.wire.scram import Verifier

NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEFAULT_ROLE = "pgguard_state"
DEFAULT_DATABASE = "pgguard_state"


@dataclass(frozen=True, slots=True)
class StatePlan:
    role: str = DEFAULT_ROLE
    database: str = DEFAULT_DATABASE
    schema: str = "pgguard"
    password: str = ""
    upstream_roles: tuple[str, ...] = ()  # to cut off when they live in the same cluster

    def __post_init__(self) -> None:
        for what, name in (("role", self.role), ("database", self.database)):
            if not NAME.match(name):
                raise ValueError(f"invalid {what} name {name!r}: use [a-z_][a-z0-9_]*")
        if not NAME.match(self.schema):
            raise ValueError(f"invalid schema name {self.schema!r}: use [a-z_][a-z0-9_]*")
        if not self.password:
            raise ValueError("the state role needs a password")
        if self.role in self.upstream_roles:
            raise ValueError(f"the state role {self.role!r} must not be an upstream role")


def new_password() -> str:
    return secrets.token_urlsafe(24)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def role_statement(plan: StatePlan, *, exists: bool = False) -> str:
    verb = "ALTER" if exists else "CREATE"
    verifier = Verifier.from_password(plan.password).serialize()
    return (
        f"{verb} ROLE {ident(plan.role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
        f"NOREPLICATION NOBYPASSRLS PASSWORD '{verifier}';"
    )


def database_statement(plan: StatePlan) -> str:
    return f"CREATE DATABASE {ident(plan.database)} OWNER {ident(plan.role)};"


def cluster_statements(plan: StatePlan, upstream_roles: tuple[str, ...] | None = None) -> list[str]:
    """After the role and database exist: who may connect (run in any database of the cluster)."""
    db, role = ident(plan.database), ident(plan.role)
    statements = [
        f"REVOKE ALL ON DATABASE {db} FROM PUBLIC;",
        f"GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role};",
    ]
    roles = plan.upstream_roles if upstream_roles is None else upstream_roles
    return statements + cutoff_statements(plan, roles)


def cutoff_statements(plan: StatePlan, upstream_roles: tuple[str, ...]) -> list[str]:
    """Upstream roles of this cluster lose any grant on the state database and the state role."""
    db, role = ident(plan.database), ident(plan.role)
    statements: list[str] = []
    for upstream in upstream_roles:
        statements += [
            f"REVOKE ALL ON DATABASE {db} FROM {ident(upstream)};",
            f"REVOKE {role} FROM {ident(upstream)};",
        ]
    return statements


def schema_statements(plan: StatePlan) -> list[str]:
    """Run connected to the state database, as an administrator."""
    schema, role = ident(plan.schema), ident(plan.role)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role};",
        f"ALTER SCHEMA {schema} OWNER TO {role};",
        f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;",
        # Before PostgreSQL 15 every role may create objects in "public"; nobody but pgguard
        # should own anything in its database.
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
    ]


def script(plan: StatePlan) -> str:
    """A psql script (``pgguard state init | psql ADMIN_DSN``) with the whole set-up."""
    lines = [
        "-- pgguard state database: run as a superuser of the cluster that will hold it,",
        "-- e.g.  pgguard state init | psql -v ON_ERROR_STOP=1 'postgresql://postgres@host/postgres'",
        "-- The password is set as a SCRAM-SHA-256 verifier; the plain one is in the DSN below.",
        role_statement(plan),
        database_statement(plan),
    ]
    lines += cluster_statements(plan, ())
    if plan.upstream_roles:
        lines += [
            "-- The upstream roles, when they live in this cluster (else drop these lines). A",
            "-- superuser upstream role cannot be cut off: give the state a cluster of its own.",
            *cutoff_statements(plan, plan.upstream_roles),
        ]
    lines.append(f"\\connect {plan.database}")
    lines += schema_statements(plan)
    return "\n".join(lines) + "\n"


def state_dsn(plan: StatePlan, server: Dsn) -> str:
    """The ``[state] dsn`` for ``plan`` on the server ``server`` points to."""
    query: dict[str, str] = {}
    if server.is_unix_socket:
        netloc, query["host"], query["port"] = "", server.host, str(server.port)
    else:
        host = f"[{server.host}]" if ":" in server.host else server.host
        netloc = f"{host}:{server.port}"
    if server.sslmode:
        query["sslmode"] = server.sslmode
    user = f"{quote(plan.role, safe='')}:{quote(plan.password, safe='')}"
    suffix = f"?{urlencode(query, safe='/')}" if query else ""
    return f"postgresql://{user}@{netloc}/{quote(plan.database, safe='')}{suffix}"
