"""The separation check's judgement and the ``state init`` SQL, without a server."""

from __future__ import annotations

import pytest

from pgguard.dsn import parse_dsn
from pgguard.statedb import setup
from pgguard.statedb.separation import Facts, Reach, Side, problems, refusal, verdict

UP = Side("app", "app", system_identifier=1, server_version_num=160002)
STATE = Side("pgguard_state", "pgguard_state", system_identifier=1, server_version_num=160002)


def facts(reach: Reach, *, up: Side = UP, state: Side = STATE) -> Facts:
    return Facts(up, state, "pgguard", reach)


def test_another_cluster_is_out_of_reach_whatever_the_roles() -> None:
    other = Side("pgguard_state", "pgguard_state", system_identifier=2, server_version_num=160002)
    reach = Reach(superuser_roles=("app",), connect_roles=("app",), member_of_state_role=True)
    assert problems(facts(reach, state=other)) == []
    verdict(facts(reach, state=other))  # does not raise


def test_a_clean_same_cluster_set_up_passes() -> None:
    assert problems(facts(Reach(schema_exists=True))) == []


def test_a_superuser_gets_only_the_fix_that_helps() -> None:
    found = problems(facts(Reach(superuser_roles=("postgres",), connect_roles=("postgres",))))
    assert len(found) == 1
    assert "superuser" in found[0].what
    assert any("another PostgreSQL cluster" in step for step in found[0].fix)


@pytest.mark.parametrize(("version", "refused"), [(150006, True), (160002, False)])
def test_createrole_matters_before_postgresql_16(version: int, refused: bool) -> None:
    up = Side("app", "app", 1, version)
    state = Side("pgguard_state", "pgguard_state", 1, version)
    found = problems(facts(Reach(createrole_roles=("app",)), up=up, state=state))
    assert bool(found) is refused


def test_public_connect_is_revoked_from_public() -> None:
    found = problems(facts(Reach(connect_roles=("app",), public_connect=True)))
    (problem,) = found
    assert problem.fix[0] == 'REVOKE CONNECT, TEMPORARY ON DATABASE "pgguard_state" FROM PUBLIC;'
    assert 'REVOKE ALL ON DATABASE "pgguard_state" FROM "app";' in problem.fix


def test_the_message_numbers_every_problem_and_points_to_state_init() -> None:
    f = facts(Reach(member_of_state_role=True, predefined=("pg_signal_backend",)))
    message = refusal(f, problems(f))
    assert "refusing to start" in message
    assert "  1. " in message
    assert "  2. " in message
    assert 'REVOKE "pgguard_state" FROM "app";' in message
    assert "pgguard state init" in message


def test_identifiers_in_fixes_are_quoted() -> None:
    up = Side('we"ird', "app", 1, 160002)
    (problem,) = problems(facts(Reach(member_of_state_role=True), up=up))
    assert problem.fix == ('REVOKE "pgguard_state" FROM "we""ird";',)


def test_the_script_never_holds_the_plain_password() -> None:
    plan = setup.StatePlan(password="plain-secret-123", upstream_roles=("app",))
    script = setup.script(plan)
    assert "plain-secret-123" not in script
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in script
    assert "\\connect pgguard_state" in script
    assert 'REVOKE ALL ON DATABASE "pgguard_state" FROM PUBLIC;' in script
    assert 'REVOKE "pgguard_state" FROM "app";' in script


@pytest.mark.parametrize(
    "changes",
    [
        {"role": "Bad-Name"},
        {"database": "x; DROP"},
        {"schema": "1abc"},
        {"password": ""},
        {"upstream_roles": ("pgguard_state",)},
    ],
)
def test_plans_refuse_what_would_be_unsafe(changes: dict[str, object]) -> None:
    base: dict[str, object] = {"password": "pw"}
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        setup.StatePlan(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "server",
    [
        "postgresql://postgres@db.internal:5433/postgres?sslmode=verify-full",
        "postgresql://postgres@/postgres?host=/var/run/postgresql&port=5432",
    ],
)
def test_the_state_dsn_parses_back(server: str) -> None:
    plan = setup.StatePlan(password="p@ss:w/rd?&=")
    dsn = parse_dsn(setup.state_dsn(plan, parse_dsn(server)))
    origin = parse_dsn(server)
    assert (dsn.user, dsn.password, dsn.dbname) == (
        "pgguard_state",
        "p@ss:w/rd?&=",
        "pgguard_state",
    )
    assert (dsn.host, dsn.port, dsn.sslmode) == (origin.host, origin.port, origin.sslmode)
