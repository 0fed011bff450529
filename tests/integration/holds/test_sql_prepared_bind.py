"""A statement SQL-``PREPARE``d (approved once) and run again through protocol Bind/Execute.

SQL ``PREPARE`` and protocol Parse share one namespace on the server, so a protocol Bind of a
name only a SQL ``PREPARE`` made binds that body. An approved ``PREPARE`` runs nothing; each run
of it (SQL ``EXECUTE``, protocol Bind + Execute, ``FETCH`` of a portal bound from it) is judged
again. Server-side oracle: ``lo_import(path, oid)`` leaves a large object with that OID.
"""

from __future__ import annotations

import asyncio
import struct

import httpx
import psycopg
import pytest

from pgguard.wire import messages as m
from tests.integration.holds.helpers import auth, wait_for_request
from tests.support import PgguardThread, RawClient, error_fields

SYNC = m.message(ord("S"))
PREPARE = "PREPARE imp{n}(oid) AS SELECT lo_import('/etc/hostname', $1)"


def _bind(portal: str, statement: str, oid: int) -> bytes:
    value = str(oid).encode()
    body = (
        portal.encode()
        + b"\0"
        + statement.encode()
        + b"\0"
        + struct.pack("!hh", 0, 1)
        + struct.pack("!i", len(value))
        + value
        + struct.pack("!h", 0)
    )
    return m.message(ord("B"), body)


def _execute(portal: str = "") -> bytes:
    return m.message(ord("E"), portal.encode() + b"\0" + struct.pack("!i", 0))


def _large_object_exists(direct_dsn: str, oid: int) -> bool:
    with psycopg.connect(direct_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = %s", (oid,)
        ).fetchone()
        return row == (1,)


@pytest.fixture(autouse=True)
def no_large_objects(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid BETWEEN 424200 AND 424299"
        )


async def _approved_prepare(raw: RawClient, api: httpx.AsyncClient, n: int) -> None:
    """Send the PREPARE, approve it, and check the server prepared it (nothing ran yet)."""
    raw.send(m.query(PREPARE.format(n=n)))
    request = await wait_for_request(api, f"PREPARE imp{n}")
    url = f"/api/requests/{request['id']}/approve"
    response = await api.post(url, json={}, headers=auth("dba1"))
    assert response.status_code == 200
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    assert [t for t, _ in replies if t != "N"] == ["C", "Z"], replies


async def _deny_next(api: httpx.AsyncClient, needle: str) -> dict[str, object]:
    request = await wait_for_request(api, needle)
    # What the reviewer is asked about: the EXECUTE the Bind amounts to, with its parameter.
    assert str(request["statement"]).startswith('EXECUTE "imp'), request
    response = await api.post(
        f"/api/requests/{request['id']}/deny", json={"reason": "no"}, headers=auth("dba1")
    )
    assert response.status_code == 200
    return request


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_protocol_bind_of_an_approved_sql_prepare_is_judged_again(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str, in_transaction: bool
) -> None:
    """Bind "" to the SQL-prepared name, Execute: held like ``EXECUTE imp1`` (here denied).

    In a transaction the unnamed portal first holds a harmless binding, which a Bind of a name
    the protocol model does not know must not leave standing in the model."""
    n = 2 if in_transaction else 1
    raw = RawClient.connect(pgguard.port)
    raw.login()
    await _approved_prepare(raw, api, n)
    if in_transaction:
        raw.send(m.query("BEGIN"))
        assert raw.recv_until("Z")[-1] == ("Z", b"T")
        plain_bind = m.message(ord("B"), b"\0\0" + struct.pack("!hhh", 0, 0, 0))
        raw.send(m.parse("", "SELECT 1") + plain_bind + _execute() + SYNC)
        assert [t for t, _ in raw.recv_until("Z")] == ["1", "2", "D", "C", "Z"]
    oid = 424200 + n
    raw.send(_bind("", f"imp{n}", oid) + _execute() + SYNC)
    await _deny_next(api, f"imp{n}")
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    assert [error_fields(b).sqlstate for t, b in replies if t == "E"] == ["42501"], replies
    assert not _large_object_exists(direct_dsn, oid)


async def test_protocol_bind_of_an_approved_sql_prepare_named_portal(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    raw = RawClient.connect(pgguard.port)
    raw.login()
    await _approved_prepare(raw, api, 3)
    raw.send(_bind("p3", "imp3", 424203) + _execute("p3") + SYNC)
    await _deny_next(api, "imp3")
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    assert [error_fields(b).sqlstate for t, b in replies if t == "E"] == ["42501"], replies
    assert not _large_object_exists(direct_dsn, 424203)


async def test_fetch_of_a_portal_bound_from_an_approved_sql_prepare_is_refused(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    """SQL FETCH of a protocol portal runs it: judged by what the portal runs (and refused,
    as a FETCH cannot be held halfway through a portal)."""
    raw = RawClient.connect(pgguard.port)
    raw.login()
    await _approved_prepare(raw, api, 4)
    raw.send(m.query("BEGIN"))
    assert raw.recv_until("Z")[-1] == ("Z", b"T")
    raw.send(_bind("p4", "imp4", 424204) + SYNC)
    assert [t for t, _ in raw.recv_until("Z")] == ["2", "Z"]
    raw.send(m.query("FETCH ALL FROM p4"))
    replies = raw.recv_until("Z")
    assert [error_fields(b).sqlstate for t, b in replies if t == "E"] == ["42501"], replies
    raw.send(m.query("ROLLBACK"))
    raw.recv_until("Z")
    assert not _large_object_exists(direct_dsn, 424204)


async def test_a_name_the_model_knows_re_prepared_in_sql_is_never_shown_as_the_old_text(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    """Parse imp5 (protocol, harmless); SQL DEALLOCATE imp5 and an approved SQL PREPARE imp5:
    the model still holds the Parse's text, the server the PREPARE's body. The Execute may run
    either, so it is refused - not held showing the reviewer the harmless text."""
    raw = RawClient.connect(pgguard.port)
    raw.login()
    raw.send(m.parse("imp5", "SELECT $1::oid") + SYNC)
    assert [t for t, _ in raw.recv_until("Z")] == ["1", "Z"]
    raw.send(m.query("DEALLOCATE imp5"))
    assert raw.recv_until("Z")[-1] == ("Z", b"I")
    await _approved_prepare(raw, api, 5)
    raw.send(_bind("", "imp5", 424205) + _execute() + SYNC)
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    errors = [error_fields(b) for t, b in replies if t == "E"]
    assert [e.sqlstate for e in errors] == ["42501"], replies
    assert "more than one text" in errors[0].message
    pending = await api.get("/api/requests", params={"state": "pending"}, headers=auth("dba1"))
    assert not [r for r in pending.json() if "$1::oid" in r["statement"]]
    assert not _large_object_exists(direct_dsn, 424205)


async def test_an_approved_run_of_a_sql_prepared_name_runs_once_with_its_parameter(
    pgguard: PgguardThread, api: httpx.AsyncClient, direct_dsn: str
) -> None:
    """Approving the held ``EXECUTE "imp6"`` lets that Bind/Execute run (the fix holds, it does
    not break the statement); the next run is held again."""
    raw = RawClient.connect(pgguard.port)
    raw.login()
    await _approved_prepare(raw, api, 6)
    raw.send(_bind("", "imp6", 424206) + _execute() + SYNC)
    request = await wait_for_request(api, "imp6")
    assert str(request["statement"]).startswith('EXECUTE "imp6"')
    url = f"/api/requests/{request['id']}/approve"
    assert (await api.post(url, json={}, headers=auth("dba1"))).status_code == 200
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    assert [t for t, _ in replies if t != "N"] == ["2", "D", "C", "Z"], replies
    assert _large_object_exists(direct_dsn, 424206)
    raw.send(_bind("", "imp6", 424207) + _execute() + SYNC)
    await _deny_next(api, "imp6")
    replies = await asyncio.to_thread(raw.recv_until, "Z")
    assert [error_fields(b).sqlstate for t, b in replies if t == "E"] == ["42501"], replies
    assert not _large_object_exists(direct_dsn, 424207)
