"""The start-up separation check, through the real path (issue 14, deliverable 1).

pgguard starts through ``assembly.start`` (and ``pgguard serve``) against real clusters: the
session's upstream, a role and databases made for each test in it, and the separate state
cluster of the fixtures. Each misconfiguration must refuse to start and say how to fix it; the
set-ups the README recommends must start; and with the recommended set-up an agent's attack on
the state through pgguard fails while its held statement stays held.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pgguard.approvals import ApprovalStore
from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres, system_bin_dir
from pgguard.proxy import assembly
from pgguard.settings import Settings
from pgguard.statedb import setup
from pgguard.statedb.apply import apply
from pgguard.statedb.separation import SeparationError
from tests.keys import STATE_KEY
from tests.support import AGENT, AGENT_PASSWORD, OWNER, PgguardThread, agent_settings

TOKEN = "separation-approver-token"
APPROVERS = [
    {
        "id": "dba@example.com",
        "name": "Dana DBA",
        "groups": ["dba"],
        "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }
]


@dataclass
class Cluster:
    """A non-superuser upstream role with a database of its own, in the session's upstream."""

    pg: EmbeddedPostgres
    role: str
    database: str

    @property
    def upstream_dsn(self) -> str:
        return (
            f"postgresql://{self.role}:app-password@127.0.0.1:{self.pg.port}/{self.database}"
            "?sslmode=disable"
        )

    def plan(self, **changes: Any) -> setup.StatePlan:
        suffix = secrets.token_hex(3)
        base: dict[str, Any] = {
            "role": f"st_{suffix}",
            "database": f"st_{suffix}",
            "password": "state-secret",
            "upstream_roles": (self.role,),
        }
        return setup.StatePlan(**{**base, **changes})

    def state_dsn(self, plan: setup.StatePlan) -> str:
        return setup.state_dsn(plan, parse_dsn(self.pg.superuser_dsn()))


def make_cluster(pg: EmbeddedPostgres) -> Cluster:
    role = f"app_{secrets.token_hex(3)}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'app-password'")
    pg.psql(f"CREATE DATABASE {role} OWNER {role}")
    pg.psql(f"SET ROLE {role}; CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname=role)
    return Cluster(pg, role, role)


@pytest.fixture
def cluster(need_embedded: EmbeddedPostgres) -> Cluster:
    return make_cluster(need_embedded)


@pytest.fixture
def pg15() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL 15 cluster (Debian's server, when installed), where CREATEROLE differs."""
    bins = system_bin_dir()
    if bins is None or bins.parent.name != "15":
        pytest.skip("needs Debian's PostgreSQL 15 server")
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-pg15-")) / "data", bin_dir=bins)
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def pgguard_settings(upstream_dsn: str, state_dsn: str | None, **extra: Any) -> Settings:
    spool = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgguard-spool-{secrets.token_hex(4)}"
    return agent_settings(
        upstream_dsn,
        state_dsn,
        approvers=APPROVERS,
        http={"host": "127.0.0.1", "port": 0},
        ledger={"spool_dir": str(spool)},
        **extra,
    )


async def refusal(settings: Settings) -> str:
    try:
        running = await assembly.start(settings)
    except SeparationError as exc:
        return exc.message
    await running.stop()
    raise AssertionError("pgguard started although agents could reach its state")


async def starts(settings: Settings) -> None:
    running = await assembly.start(settings)
    await running.stop()


# --- misconfigurations refuse to start -------------------------------------------------------


def test_the_default_configuration_refuses_to_start(upstream_dsn: str, tmp_path: Path) -> None:
    """State DSN defaults to the upstream DSN (a superuser): ``pgguard serve`` exits 2."""
    config = tmp_path / "pgguard.toml"
    config.write_text(
        f'[listen]\nport = 0\n[upstream]\ndsn = "{upstream_dsn}"\n'
        f'[http]\nport = 0\n[ledger]\nspool_dir = "{tmp_path / "spool"}"\n'
        f'[[agents]]\nname = "{AGENT}"\npassword = "{AGENT_PASSWORD}"\nowner = "{OWNER}"\n'
        f'[[approvers]]\nid = "dba"\nname = "Dana"\ntoken_sha256 = "{"0" * 64}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    served = subprocess.run(
        [sys.executable, "-m", "pgguard.cli", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert served.returncode == 2, served.stderr
    assert "refusing to start" in served.stderr
    assert "is also the state role" in served.stderr
    assert "superuser" in served.stderr
    assert "pgguard state init" in served.stderr


async def test_observe_mode_refuses_as_well(upstream_dsn: str) -> None:
    message = await refusal(pgguard_settings(upstream_dsn, None, policy={"mode": "observe"}))
    assert "refusing to start" in message


async def test_the_ledger_alone_is_state_too(upstream_dsn: str) -> None:
    settings = agent_settings(upstream_dsn, ledger={"spool_dir": "/tmp/pgguard-unused-spool"})
    assert not settings.approvals_enabled()
    assert "refusing to start" in await refusal(settings)


async def test_connect_on_a_state_database_in_the_same_cluster_refuses(cluster: Cluster) -> None:
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"GRANT CONNECT ON DATABASE {plan.database} TO PUBLIC")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert f"the upstream role '{cluster.role}' may CONNECT to the state database" in message
    assert "(granted to PUBLIC)" in message
    assert f'REVOKE CONNECT, TEMPORARY ON DATABASE "{plan.database}" FROM PUBLIC;' in message
    # The fix the message gives is enough.
    cluster.pg.psql(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{plan.database}" FROM PUBLIC;')
    running = await assembly.start(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    await running.stop()


async def test_a_direct_connect_grant_refuses(cluster: Cluster) -> None:
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"GRANT CONNECT ON DATABASE {plan.database} TO {cluster.role}")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert f'REVOKE ALL ON DATABASE "{plan.database}" FROM "{cluster.role}";' in message


async def test_table_privileges_in_the_same_database_refuse(cluster: Cluster) -> None:
    """The state in the upstream's own database, one table granted: both reported."""
    plan = cluster.plan(database=cluster.database)
    cluster.pg.psql(f"CREATE ROLE {plan.role} LOGIN PASSWORD 'state-secret'")
    cluster.pg.psql(f"GRANT CREATE ON DATABASE {cluster.database} TO {plan.role}")
    cluster.pg.psql(f"CREATE SCHEMA pgguard AUTHORIZATION {plan.role}", dbname=cluster.database)
    state_dsn = cluster.state_dsn(plan)
    store = await ApprovalStore.open(
        state_dsn, key=STATE_KEY, schema="pgguard"
    )  # pgguard's own tables
    await store.close()
    cluster.pg.psql(
        f"GRANT USAGE ON SCHEMA pgguard TO {cluster.role}; "
        f"GRANT UPDATE ON pgguard.approval_requests TO {cluster.role}",
        dbname=cluster.database,
    )
    message = await refusal(pgguard_settings(cluster.upstream_dsn, state_dsn))
    assert f"the state lives in the upstream database '{cluster.database}'" in message
    assert "has privileges on the state schema 'pgguard'" in message
    assert "pgguard.approval_requests" in message
    assert f'REVOKE ALL ON ALL TABLES IN SCHEMA "pgguard" FROM PUBLIC, "{cluster.role}";' in message


async def test_the_same_database_refuses_even_without_privileges(cluster: Cluster) -> None:
    """Any role connected to a database may LISTEN/NOTIFY on pgguard's channels there."""
    plan = cluster.plan(database=cluster.database)
    cluster.pg.psql(f"CREATE ROLE {plan.role} LOGIN PASSWORD 'state-secret'")
    cluster.pg.psql(f"CREATE SCHEMA pgguard AUTHORIZATION {plan.role}", dbname=cluster.database)
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert "LISTEN/NOTIFY" in message
    assert "has privileges" not in message


async def test_membership_in_the_state_role_refuses(cluster: Cluster) -> None:
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"GRANT {plan.role} TO {cluster.role}")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert f"is a member of the state role '{plan.role}'" in message
    assert f'REVOKE "{plan.role}" FROM "{cluster.role}";' in message


async def test_membership_without_inherit_still_refuses(cluster: Cluster) -> None:
    """NOINHERIT hides privileges from has_*_privilege, but SET ROLE still reaches them."""
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    middle = f"mid_{secrets.token_hex(3)}"
    cluster.pg.psql(f"CREATE ROLE {middle} NOLOGIN")
    cluster.pg.psql(f"GRANT {plan.role} TO {middle}")
    cluster.pg.psql(f"ALTER ROLE {cluster.role} NOINHERIT")
    cluster.pg.psql(f"GRANT {middle} TO {cluster.role}")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert f"is a member of the state role '{plan.role}'" in message


async def test_a_superuser_it_can_become_refuses(cluster: Cluster) -> None:
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"GRANT postgres TO {cluster.role}")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert "is or can become a superuser (postgres" in message


async def test_createrole_refuses_before_postgresql_16(pg15: EmbeddedPostgres) -> None:
    """Before 16, CREATEROLE may grant itself any non-superuser role, the state role too."""
    cluster = make_cluster(pg15)
    plan = cluster.plan()
    await apply(plan, pg15.superuser_dsn())
    pg15.psql(f"ALTER ROLE {cluster.role} CREATEROLE")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert "before PostgreSQL 16 that lets it grant itself the state role" in message
    assert f'ALTER ROLE "{cluster.role}" NOCREATEROLE;' in message
    pg15.psql(f'ALTER ROLE "{cluster.role}" NOCREATEROLE;')
    await starts(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))


async def test_createrole_alone_cannot_reach_the_state_from_postgresql_16(
    cluster: Cluster,
) -> None:
    """From 16 on, granting the state role needs ADMIN on it (which is membership: refused)."""
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"ALTER ROLE {cluster.role} CREATEROLE")
    with pytest.raises(subprocess.CalledProcessError):
        cluster.pg.psql(f"SET ROLE {cluster.role}; GRANT {plan.role} TO {cluster.role}")
    await starts(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))


async def test_server_file_roles_refuse(cluster: Cluster) -> None:
    plan = cluster.plan()
    await apply(plan, cluster.pg.superuser_dsn())
    cluster.pg.psql(f"GRANT pg_write_server_files TO {cluster.role}")
    message = await refusal(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    assert f'REVOKE "pg_write_server_files" FROM "{cluster.role}";' in message


async def test_an_unreachable_upstream_refuses_rather_than_skips(state_dsn: str) -> None:
    message = await refusal(
        pgguard_settings("postgresql://u:p@127.0.0.1:1/db?sslmode=disable", state_dsn)
    )
    assert "cannot check that agents cannot reach pgguard's state" in message


# --- recommended set-ups start ---------------------------------------------------------------


def test_state_init_apply_creates_a_set_up_that_starts(cluster: Cluster, tmp_path: Path) -> None:
    """``state init --apply`` in the upstream's cluster: its own check passes, pgguard starts."""
    config = tmp_path / "pgguard.toml"
    config.write_text(f'[upstream]\ndsn = "{cluster.upstream_dsn}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    database = f"st_{secrets.token_hex(3)}"
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgguard.cli",
            "state",
            "init",
            "-c",
            str(config),
            "--role",
            database,
            "--database",
            database,
            "--admin-dsn",
            cluster.pg.superuser_dsn(),
            "--apply",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert init.returncode == 0, init.stderr
    assert "separation check passed" in init.stderr
    state_dsn = init.stdout.strip()
    assert state_dsn.startswith(f"postgresql://{database}:")
    asyncio.run(starts(pgguard_settings(cluster.upstream_dsn, state_dsn)))


def test_state_init_prints_a_script_psql_runs(cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    database = f"st_{secrets.token_hex(3)}"
    cli = [sys.executable, "-m", "pgguard.cli", "state", "init"]
    printed = subprocess.run(
        [*cli, "--role", database, "--database", database, "--upstream-role", cluster.role],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout
    assert "PASSWORD 'SCRAM-SHA-256$" in printed  # never the plain password
    assert f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC;' in printed
    psql = [str(cluster.pg.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1"]
    subprocess.run(
        [*psql, "-h", str(cluster.pg.socket_dir), "-p", str(cluster.pg.port), "-U", "postgres"],
        input=printed,
        capture_output=True,
        text=True,
        check=True,
    )
    password = printed.split("[state] dsn = ")[1].split(":", 2)[2].split("@")[0]
    assert password
    state_dsn = setup.state_dsn(
        setup.StatePlan(role=database, database=database, password=password),
        parse_dsn(cluster.pg.superuser_dsn()),
    )
    asyncio.run(starts(pgguard_settings(cluster.upstream_dsn, state_dsn)))


async def test_a_superuser_upstream_with_the_state_in_another_cluster_starts(
    upstream_dsn: str, state_dsn: str
) -> None:
    running = await assembly.start(pgguard_settings(upstream_dsn, state_dsn))
    try:
        assert running.approvals is not None
        assert running.ledger is not None
    finally:
        await running.stop()


@pytest.fixture(scope="module")
def tls_only_upstream() -> Iterator[EmbeddedPostgres]:
    """An upstream that accepts TCP logins over TLS only (``hostssl``)."""
    bins = system_bin_dir()
    if bins is None:
        pytest.skip("needs a PostgreSQL server built with TLS (Debian's postgresql package)")
    datadir = Path(tempfile.mkdtemp(prefix="pgguard-tls-")) / "data"
    pg = EmbeddedPostgres(datadir, tls=True, bin_dir=bins)
    pg.start()
    hba = datadir / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("\nhost ", "\nhostssl "))
    pg.psql("SELECT pg_reload_conf()")
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
async def test_the_check_reaches_the_upstream_as_agents_do_over_tls(
    tls_only_upstream: EmbeddedPostgres, state_dsn: str, sslmode: str
) -> None:
    dsn = tls_only_upstream.tcp_dsn(sslmode=sslmode)
    root = tls_only_upstream.datadir / "server.crt"
    await starts(pgguard_settings(dsn, state_dsn, upstream={"dsn": dsn, "sslrootcert": root}))


@pytest.mark.parametrize(
    "sslmode",
    [
        "verify-full",  # against the system CAs: the self-signed certificate does not verify
        "disable",  # hostssl only: shows the TLS cases above really used TLS
    ],
)
async def test_an_upstream_the_check_cannot_reach_refuses(
    tls_only_upstream: EmbeddedPostgres, state_dsn: str, sslmode: str
) -> None:
    message = await refusal(pgguard_settings(tls_only_upstream.tcp_dsn(sslmode=sslmode), state_dsn))
    assert "connecting to the upstream server" in message


# --- the attack, with the recommended set-up ----------------------------------------------------


@pytest.fixture
def separated(cluster: Cluster) -> Iterator[tuple[Cluster, PgguardThread, setup.StatePlan]]:
    plan = cluster.plan()
    asyncio.run(apply(plan, cluster.pg.superuser_dsn()))
    thread = PgguardThread(pgguard_settings(cluster.upstream_dsn, cluster.state_dsn(plan)))
    thread.start()
    try:
        yield cluster, thread, plan
    finally:
        thread.stop()


async def test_an_agent_cannot_approve_its_own_held_statement(
    separated: tuple[Cluster, PgguardThread, setup.StatePlan],
) -> None:
    cluster, pgguard, plan = separated
    held_conn = await asyncpg.connect(pgguard.dsn(dbname=cluster.database))
    attacker = await asyncpg.connect(pgguard.dsn(dbname=cluster.database))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        running = asyncio.create_task(held_conn.execute("DROP TABLE t"))
        async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as api:
            request = await _pending(api, headers, "DROP TABLE t")
            attacks = [
                "UPDATE pgguard.approval_requests SET state = 'approved', decided_at = now() "
                f"WHERE id = '{request['id']}'",
                "INSERT INTO pgguard.approval_decisions SELECT * FROM pgguard.approval_decisions",
                "BEGIN; LOCK TABLE pgguard.approval_requests; COMMIT",
            ]
            for sql in attacks:
                with pytest.raises(asyncpg.PostgresError) as refused:
                    await asyncio.wait_for(attacker.execute(sql), 10)
                # no such relation in the agent's database (or, with the built-in deny, policy)
                assert refused.value.sqlstate in ("42P01", "3F000", "42501"), sql
                await attacker.execute("ROLLBACK")  # leave the failed transaction, if any
            # A forged wake-up lands in the agent's database, where no pgguard instance listens
            # (or the built-in deny refuses it).
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await attacker.execute(f"NOTIFY pgguard_approvals, '{request['id']}'")
            # The nearest variant: through pgguard into the state database itself.
            with pytest.raises(asyncpg.PostgresError) as no_connect:
                await asyncpg.connect(pgguard.dsn(dbname=plan.database))
            assert no_connect.value.sqlstate == "42501"
            await asyncio.sleep(0.5)
            assert not running.done()  # still held
            still = await api.get(f"/api/requests/{request['id']}", headers=headers)
            assert still.json()["state"] == "pending"
            await api.post(f"/api/requests/{request['id']}/deny", json={}, headers=headers)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
        assert await attacker.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await held_conn.close()
        await attacker.close()


async def _pending(api: httpx.AsyncClient, headers: dict[str, str], needle: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            response = await api.get("/api/requests", params={"state": "pending"}, headers=headers)
            for item in response.json():
                if needle in item["statement"]:
                    return item
            await asyncio.sleep(0.05)
