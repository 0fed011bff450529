"""Session fixtures: one upstream PostgreSQL and one proxy shared by the integration tests.

The upstream is an embedded server (pgserver's binaries) unless ``PGGUARD_TEST_UPSTREAM_DSN``
names an existing one (it must allow a superuser login; tests needing the embedded server's
extra roles skip themselves then).

pgguard's state lives where the README tells users to put it when the upstream role is a
superuser: in another cluster (always embedded), in a database of its own, owned by a
non-superuser state role created by the same code as ``pgguard state init --apply``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.statedb import setup
from pgguard.statedb.apply import apply
from tests.support import OPEN_RAW_CLIENTS, ProxyThread, agent_settings

# Property tests assert what must hold for every input, not how fast: on a shared CI machine a
# per-example deadline, or the health check on slow data generation, only adds timing flakes.
settings.register_profile("pgguard", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pgguard")

UPSTREAM_ENV = "PGGUARD_TEST_UPSTREAM_DSN"


@pytest.fixture(scope="session")
def embedded_pg() -> Iterator[EmbeddedPostgres | None]:
    if os.environ.get(UPSTREAM_ENV):
        yield None
        return
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-test-")) / "data")
    pg.start()
    pg.psql("CREATE DATABASE allowed_db")
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def upstream_dsn(embedded_pg: EmbeddedPostgres | None) -> str:
    """pgguard's upstream DSN (the proxy's own credentials)."""
    if embedded_pg is None:
        return os.environ[UPSTREAM_ENV]
    return embedded_pg.unix_dsn()


@pytest.fixture(scope="session")
def direct_dsn(embedded_pg: EmbeddedPostgres | None) -> str:
    """A DSN for talking to the upstream directly over TCP, for direct-vs-proxy comparisons."""
    if embedded_pg is None:
        return os.environ[UPSTREAM_ENV]
    return embedded_pg.tcp_dsn()


@pytest.fixture(scope="session")
def state_pg() -> Iterator[EmbeddedPostgres]:
    """The cluster holding pgguard's state: never the upstream's."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-state-")) / "data")
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


STATE_PLAN = setup.StatePlan(password="state-password")


@pytest.fixture(scope="session")
def state_dsn(state_pg: EmbeddedPostgres) -> str:
    """pgguard's ``[state] dsn``: the state role on its own database in the state cluster."""
    asyncio.run(apply(STATE_PLAN, state_pg.superuser_dsn()))
    return setup.state_dsn(STATE_PLAN, parse_dsn(state_pg.superuser_dsn()))


@pytest.fixture(scope="session")
def need_embedded(embedded_pg: EmbeddedPostgres | None) -> EmbeddedPostgres:
    if embedded_pg is None:
        pytest.skip(f"needs the embedded server (unset {UPSTREAM_ENV})")
    return embedded_pg


@pytest.fixture(scope="session")
def proxy(upstream_dsn: str) -> Iterator[ProxyThread]:
    thread = ProxyThread(agent_settings(upstream_dsn)).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while OPEN_RAW_CLIENTS:
        OPEN_RAW_CLIENTS.pop().close()
