"""Identities compared as identity providers compare them (issue 14, deliverable 5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard.approvals.identity import identity_collisions, normalise_identity
from pgguard.approvals.model import Approver
from pgguard.errors import ConfigError
from pgguard.settings import Settings


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("ops", "Ops"),
        ("ops", " OPS "),
        ("alice@example.com", "Alice@EXAMPLE.com"),
        ("alice@example.com", "alice+ci@example.com"),
        ("alice@example.com", "alice@example.com."),
        ("ops", "\uff4f\uff50\uff53"),  # fullwidth letters: NFKC
        ("strasse", "STRASSE"),
        ("straße", "STRASSE"),  # casefold, not lower()
    ],
)
def test_spellings_of_one_identity(one: str, other: str) -> None:
    assert normalise_identity(one) == normalise_identity(other)
    assert Approver(id=other, name="x").is_owner(one)


@pytest.mark.parametrize(
    ("one", "other"),
    [("a.b@example.com", "ab@example.com"), ("ops", "ops2"), ("a@x.com", "a@y.com")],
)
def test_different_identities_stay_different(one: str, other: str) -> None:
    assert normalise_identity(one) != normalise_identity(other)
    assert not Approver(id=other, name="x").is_owner(one)


@given(st.text())
def test_normalising_is_idempotent(name: str) -> None:
    once = normalise_identity(name)
    assert normalise_identity(once) == once


def test_aliases_count_as_the_approver() -> None:
    approver = Approver(id="0f3c-oid", name="Ops", aliases=("OPS@example.com",))
    assert approver.is_owner("ops@example.com")


def test_collisions_are_grouped() -> None:
    assert identity_collisions(["ops", "Ops", "bob", "bob", "x@y.z", "X+1@y.z"]) == [
        ("Ops", "ops"),
        ("X+1@y.z", "x@y.z"),
    ]


def _agent(name: str, owner: str) -> dict[str, str]:
    return {"name": name, "password": "pw", "owner": owner}


def test_owners_spelled_two_ways_refuse_to_start() -> None:
    with pytest.raises(ConfigError, match="Ops / ops"):
        Settings.load(agents=[_agent("a", "ops"), _agent("b", "Ops")])
    # One owner of two agents, spelled the same, is fine.
    Settings.load(agents=[_agent("a", "ops"), _agent("b", "ops")])


def test_approvers_spelled_two_ways_refuse_to_start() -> None:
    token = "0" * 64
    with pytest.raises(ConfigError, match="approver ids that are one identity"):
        Settings.load(
            approvers=[
                {"id": "dba@example.com", "name": "A", "token_sha256": token},
                {"id": "DBA+2@example.com", "name": "B", "token_sha256": "1" * 64},
            ]
        )
