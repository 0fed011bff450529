"""Reviewers see all the code they approve and none of the data (issue #17, item 5).

Through the real path (an agent on asyncpg, pgguard holding every statement of agent "leaky",
the REST API, the approval page, the Teams webhook stub, the ledger and the log):

- every code fragment of the issue's examples (DO/EXECUTE, COPY PROGRAM, LOAD, lo_export, a
  function body, a COPY file) is visible in the API, the page and the Teams card;
- distinct marker values planted everywhere an agent controls them - literals, Bind
  parameters, the reason, application_name, an alias, and values that make the server fail
  after approval - appear in none of the Teams bodies, API answers, pages, ledger rows or logs.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging

import asyncpg
import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import TOKENS, auth, eventually
from tests.support import PgguardThread
from tests.teams_stub import TeamsStub

CODE_EXAMPLES = [
    (
        "DO $$BEGIN EXECUTE 'DROP TABLE IF EXISTS zz_payroll_code'; END$$",
        "EXECUTE 'DROP TABLE IF EXISTS zz_payroll_code'",
    ),
    (
        "COPY (SELECT 1) TO PROGRAM 'gzip -9 > /tmp/pgguard-zz-code.gz'",
        "PROGRAM 'gzip -9 > /tmp/pgguard-zz-code.gz'",
    ),
    ("LOAD '/usr/lib/postgresql/zz_code_evil.so'", "LOAD '/usr/lib/postgresql/zz_code_evil.so'"),
    (
        "SELECT lo_export(0, '/tmp/pgguard-zz-code-export.bin')",
        "'/tmp/pgguard-zz-code-export.bin'",
    ),
    (
        "CREATE FUNCTION zz_code_f() RETURNS int LANGUAGE plpgsql "
        "AS $f$ BEGIN PERFORM pg_sleep(0); RETURN 0; END $f$",
        "BEGIN PERFORM pg_sleep(",
    ),
    ("COPY hold_t TO '/tmp/pgguard-zz-code.csv'", "TO '/tmp/pgguard-zz-code.csv'"),
]

MARKERS = {
    "literal": "lit.marker@example.org",
    "parameter": "param.marker@example.org",
    "reason": "123-45-0042",
    "application_name": "app.marker@example.org",
    "alias": "alias.marker@example.org",
    "failing value": "hunter2hunter2",
    "failing key": "dup.marker@example.org",
}


async def _pending(api: httpx.AsyncClient, known: set[str]) -> dict[str, object]:
    async with asyncio.timeout(10):
        while True:
            listed = await api.get(
                "/api/requests", params={"state": "pending"}, headers=auth("dba1")
            )
            for item in listed.json():
                if item["id"] not in known and item["agent"] == "leaky":
                    known.add(item["id"])
                    return dict(item)
            await asyncio.sleep(0.03)


async def _page_client(pgguard: PgguardThread) -> httpx.AsyncClient:
    page = httpx.AsyncClient(base_url=pgguard.http_url, timeout=10)
    login = await page.post("/login", data={"token": TOKENS["dba1"], "next": "/requests"})
    page.headers["Cookie"] = login.headers["set-cookie"].split(";", 1)[0]
    return page


def _cards_of(teams: TeamsStub, request_id: str) -> str:
    return json.dumps([body for body in teams.received if request_id in json.dumps(body)])


async def test_every_code_fragment_is_visible_to_the_reviewer(
    pgguard: PgguardThread, api: httpx.AsyncClient, teams: TeamsStub
) -> None:
    known: set[str] = set()
    conn = await asyncpg.connect(pgguard.dsn(user="leaky", password="leaky-password"))
    page = await _page_client(pgguard)
    try:
        for sql, fragment in CODE_EXAMPLES:
            running = asyncio.create_task(conn.execute(sql))
            request = await _pending(api, known)
            rid = str(request["id"])
            assert fragment in str(request["statement"]), request["statement"]
            shown = await page.get(f"/requests/{rid}")
            assert fragment in html.unescape(shown.text)
            await eventually(lambda rid=rid: rid in json.dumps(teams.received))  # type: ignore[misc]
            # The card's JSON escapes nothing in these fragments but its Markdown escapes in
            # facts; the statement itself is a TextRun, shown as written.
            assert json.dumps(fragment)[1:-1] in _cards_of(teams, rid)
            await api.post(
                f"/api/requests/{rid}/deny", json={"reason": "test"}, headers=auth("dba1")
            )
            with pytest.raises(asyncpg.PostgresError):
                await asyncio.wait_for(running, 10)
    finally:
        await page.aclose()
        await conn.close()


@pytest.fixture
def unique_table(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS zz_unique")
        conn.execute("CREATE TABLE zz_unique (email text UNIQUE)")
        conn.execute("INSERT INTO zz_unique VALUES (%s)", (MARKERS["failing key"],))
        conn.execute("GRANT ALL ON zz_unique TO PUBLIC")


async def test_no_marker_reaches_any_reviewer_or_operator_output(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    teams: TeamsStub,
    caplog: pytest.LogCaptureFixture,
    state_dsn: str,
    unique_table: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    m = MARKERS
    # (statement, bind arguments, approve it?) - approved ones fail on the server.
    steps: list[tuple[str, tuple[object, ...], bool]] = [
        (f"INSERT INTO hold_t (id, email) VALUES (1, '{m['literal']}')", (), False),
        ("UPDATE hold_t SET email = $1 WHERE id = 1", (m["parameter"],), False),
        (f"DELETE FROM hold_t /* reason='Finance asked for SSN {m['reason']}' */", (), False),
        (f'SELECT 1 AS "{m["alias"]}" FROM hold_t', (), False),
        ("SELECT $$/* reason='Sup3rS3cret!pw' */$$ FROM hold_t", (), False),
        (f"SELECT '{m['failing value']}'::int FROM hold_t", (), True),
        (f"INSERT INTO zz_unique VALUES ('{m['failing key']}')", (), True),
    ]
    captured: list[str] = []
    known: set[str] = set()
    conn = await asyncpg.connect(
        pgguard.dsn(user="leaky", password="leaky-password"),
        server_settings={"application_name": m["application_name"]},
    )
    page = await _page_client(pgguard)
    reasons: list[object] = []
    try:
        for sql, args, approve in steps:
            running = asyncio.create_task(conn.execute(sql, *args))
            request = await _pending(api, known)
            rid = str(request["id"])
            reasons.append(request["reason"])
            assert "<email>" in str(request["application_name"])
            shown = await page.get(f"/requests/{rid}")
            captured += [json.dumps(request), shown.text]
            captured.append((await page.get(f"/requests/{rid}/status")).text)
            verb = "approve" if approve else "deny"
            decided = await api.post(
                f"/api/requests/{rid}/{verb}", json={"reason": "t"}, headers=auth("dba1")
            )
            captured.append(decided.text)
            with pytest.raises(asyncpg.PostgresError):
                await asyncio.wait_for(running, 10)
            captured.append((await page.get(f"/requests/{rid}")).text)
        listed = await api.get("/api/requests", headers=auth("dba1"))
        captured += [json.dumps(i) for i in listed.json() if i["agent"] == "leaky"]
        captured.append((await page.get("/requests")).text)
    finally:
        await page.aclose()
        await conn.close()
    # The reason: only from a real comment, masked; none from inside a dollar quote; no
    # application_name fallback.
    assert reasons[2] == "Finance asked for SSN <ssn>"
    assert reasons[4] is None
    assert reasons[0] is None
    await asyncio.sleep(0.5)
    captured.append(
        json.dumps([b for b in teams.received if any(r in json.dumps(b) for r in known)])
    )
    assert pgguard.running.ledger is not None
    pgguard.call(pgguard.running.ledger.flush())
    schema = pgguard.settings.state.schema_name
    ledger = await asyncpg.connect(state_dsn)
    try:
        rows = await ledger.fetch(
            f"SELECT to_jsonb(e)::text AS row FROM {schema}.ledger e WHERE agent = 'leaky'"
        )
        raw = await ledger.fetch(
            f"SELECT to_jsonb(e)::text AS row FROM {schema}.ledger_entries e WHERE agent = 'leaky'"
        )
        packs = await ledger.fetch(f"SELECT body FROM {schema}.ledger_packs")
    finally:
        await ledger.close()
    ledger_text = "\n".join([r["row"] for r in rows] + [r["row"] for r in raw])
    # The failures were recorded, with their shape and without their values.
    assert "invalid input syntax for type integer" in ledger_text
    assert "duplicate key value violates unique constraint" in ledger_text
    captured += [ledger_text] + [p["body"] for p in packs]
    captured.append(caplog.text)
    everything = "\n".join(captured).lower()
    for where, marker in {**m, "dollar-quoted secret": "Sup3rS3cret!pw"}.items():
        assert marker.lower() not in everything, (
            f"the {where} marker leaked: {_where(everything, marker.lower())}"
        )


def _where(everything: str, marker: str) -> str:
    i = everything.find(marker)
    return everything[max(0, i - 300) : i + 100]


async def test_ordinary_statement_alias_is_masked_in_the_ledger(
    pgguard: PgguardThread, state_dsn: str
) -> None:
    """An allowed statement (not held) whose alias is an e-mail: the ledger's fast
    literal-blind rendering must not keep it."""
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        await conn.fetch('SELECT 1 AS "ordinary.alias.marker@example.org"')
    finally:
        await conn.close()
    assert pgguard.running.ledger is not None
    pgguard.call(pgguard.running.ledger.flush())
    schema = pgguard.settings.state.schema_name
    ledger = await asyncpg.connect(state_dsn)
    try:
        packs = await ledger.fetch(f"SELECT body FROM {schema}.ledger_packs")
        rows = await ledger.fetch(f"SELECT to_jsonb(e)::text AS row FROM {schema}.ledger e")
    finally:
        await ledger.close()
    text = "\n".join([p["body"] for p in packs] + [r["row"] for r in rows])
    assert '"<email>"' in text or '\\"<email>\\"' in text
    assert "ordinary.alias.marker" not in text


async def test_alter_role_of_pgguards_own_upstream_role_is_flagged(
    pgguard: PgguardThread, api: httpx.AsyncClient, teams: TeamsStub
) -> None:
    """`ALTER ROLE <pgguard's upstream role> PASSWORD ...`: the reviewer is told whose role it
    is (it was "Touches: (not known)"), with the lock and the headline in words."""
    role = pgguard.settings.upstream.parsed().user
    assert role
    known: set[str] = set()
    conn = await asyncpg.connect(pgguard.dsn(user="leaky", password="leaky-password"))
    try:
        running = asyncio.create_task(
            conn.execute(f"ALTER ROLE \"{role}\" PASSWORD 'new-upstream-pw-marker'")
        )
        request = await _pending(api, known)
        rid = str(request["id"])
        touches = dict(request["touches"])  # type: ignore[call-overload]
        assert touches["roles"] == [role]
        assert touches["own_role"] is True
        assert isinstance(request["seconds_left"], float)
        assert 0 < request["seconds_left"] <= request["hold_timeout_s"]
        await eventually(lambda: rid in json.dumps(teams.received))
        card = _cards_of(teams, rid)
        assert "pgguard's own upstream role" in card
        assert "wants to change privileges" in card
        assert "new-upstream-pw-marker" not in card + json.dumps(request)
        await api.post(f"/api/requests/{rid}/deny", json={"reason": "no"}, headers=auth("dba1"))
        with pytest.raises(asyncpg.PostgresError):
            await asyncio.wait_for(running, 10)
        decided = (await api.get(f"/api/requests/{rid}", headers=auth("dba1"))).json()
        assert decided["seconds_left"] == 0
    finally:
        await conn.close()


async def test_status_endpoint_needs_a_session(pgguard: PgguardThread) -> None:
    """The page's status poll answers only a signed-in approver, and says only the state."""
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as anonymous:
        refused = await anonymous.get("/requests/nosuchrequest/status")
        assert refused.status_code == 401
        script = await anonymous.get("/assets/status.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
    page = await _page_client(pgguard)
    try:
        missing = await page.get("/requests/nosuchrequest/status")
        assert missing.status_code == 404
        shown = await page.get("/requests")
        assert "script-src 'self'" in shown.headers["content-security-policy"]
    finally:
        await page.aclose()
